"""Built-in problems, the problem registry and loading user problems from import paths."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import engine.problems as registry
from engine import Evaluation, Space, SpecError
from engine.core.evaluation import Status
from engine.problems import PROBLEMS, describe_problem, load_problem, problem_space
from engine.problems.benchmarks import Ackley, Benchmark, Rastrigin, Rosenbrock, Sphere, busy_wait
from engine.problems.sklearn_tuning import GradientBoostingTuning, RandomForestTuning, SVCTuning

BENCHMARKS: list[type[Benchmark]] = [Sphere, Rosenbrock, Rastrigin, Ackley]


def random_candidates(problem: Any, n: int, seed: int = 0) -> list[dict[str, Any]]:
    space = Space(problem.space)
    return [dict(c) for c in space.decode(np.random.default_rng(seed).random((n, len(space))))]


# ---------------------------------------------------------------------------------------------
# Benchmarks


@pytest.mark.parametrize("cls", BENCHMARKS)
@pytest.mark.parametrize("dim", [2, 7])
def test_benchmark_is_zero_at_its_optimum(cls: type[Benchmark], dim: int) -> None:
    problem = cls(dim=dim)
    assert problem.evaluate(problem.optimum()) == pytest.approx(0.0, abs=1e-12)
    assert problem.evaluate_batch([problem.optimum()]) == [pytest.approx(0.0, abs=1e-12)]


@pytest.mark.parametrize(
    ("problem", "point", "expected"),
    [
        (Sphere(dim=3), [1.0, 2.0, 3.0], 14.0),
        (Sphere(dim=1), [-0.5], 0.25),
        (Rosenbrock(dim=2), [0.0, 0.0], 1.0),
        (Rosenbrock(dim=2), [1.0, 2.0], 100.0),
        (Rosenbrock(dim=3), [0.0, 0.0, 0.0], 2.0),
        # 20 + (1 - 10 cos 2pi) + (0.25 - 10 cos pi) = 20 - 9 + 10.25
        (Rastrigin(dim=2), [1.0, 0.5], 21.25),
        # -20 exp(-0.2) - exp(1) + 20 + e
        (Ackley(dim=2), [1.0, 1.0], 20.0 - 20.0 * math.exp(-0.2)),
    ],
    ids=repr,
)
def test_benchmark_matches_hand_computation(problem: Benchmark, point: list[float], expected: float) -> None:
    candidate = {f"x{i}": v for i, v in enumerate(point)}
    assert problem.evaluate(candidate) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("cls", BENCHMARKS)
def test_benchmark_space_direction_and_domain(cls: type[Benchmark]) -> None:
    problem = cls(dim=4)
    space = problem_space(problem)
    assert space.names == ("x0", "x1", "x2", "x3")
    lo, hi = {
        Sphere: (-5.12, 5.12),
        Rosenbrock: (-5, 10),
        Rastrigin: (-5.12, 5.12),
        Ackley: (-32.768, 32.768),
    }[cls]
    assert all((d.low, d.high) == (lo, hi) for d in space.values())  # type: ignore[union-attr]
    assert problem.direction == "minimize"
    assert problem.version == "1"
    assert cls(version="7").version == "7"
    assert len(cls().space) == 10


@pytest.mark.parametrize("cls", BENCHMARKS)
@pytest.mark.parametrize("dim", [1, 3, 25])
def test_evaluate_batch_equals_evaluate(cls: type[Benchmark], dim: int) -> None:
    problem = cls(dim=max(dim, cls.min_dim))
    candidates = random_candidates(problem, 50, seed=dim)
    batch = problem.evaluate_batch(candidates)
    assert batch == pytest.approx([problem.evaluate(c) for c in candidates], rel=1e-13, abs=1e-13)
    assert all(type(v) is float for v in batch)
    assert problem.evaluate_batch([]) == []


def test_fail_share_fails_about_that_share_deterministically() -> None:
    problem = Sphere(dim=3, fail_share=0.3)
    candidates = random_candidates(problem, 2000)
    failing = [problem.fails(c) for c in candidates]
    assert 0.25 < sum(failing) / len(candidates) < 0.35
    # The same candidates fail in a fresh instance and after a trip through pickle (another worker).
    assert [Sphere(dim=3, fail_share=0.3).fails(c) for c in candidates] == failing
    assert [pickle.loads(pickle.dumps(problem)).fails(c) for c in candidates] == failing

    for candidate, fails in zip(candidates[:200], failing[:200], strict=True):
        if fails:
            with pytest.raises(RuntimeError, match="simulated failure"):
                problem.evaluate(candidate)
        else:
            assert problem.evaluate(candidate) == Sphere(dim=3).evaluate(candidate)


def test_a_failing_candidate_fails_only_itself_in_a_batch() -> None:
    from engine.execution import ProblemRef, evaluate_shard

    problem = Rastrigin(dim=2, fail_share=0.5)
    candidates = random_candidates(problem, 100)
    assert problem.evaluate_batch(candidates) is NotImplemented  # one at a time, each on its own
    batch = [e if e.status is Status.FAILED else e.score for e in
             evaluate_shard(ProblemRef("rastrigin", {"dim": 2, "fail_share": 0.5}), candidates)]  # fmt: skip
    assert len(batch) == len(candidates)
    clean = Rastrigin(dim=2)
    for candidate, result in zip(candidates, batch, strict=True):
        if problem.fails(candidate):
            assert isinstance(result, Evaluation)
            assert result.status is Status.FAILED
            assert result.error is not None and "simulated failure" in result.error
        else:
            assert result == clean.evaluate(candidate)
    assert 20 < sum(isinstance(r, Evaluation) for r in batch) < 80


def test_fail_share_extremes() -> None:
    candidates = random_candidates(Sphere(dim=2), 50)
    assert not any(Sphere(dim=2).fails(c) for c in candidates)
    assert all(Sphere(dim=2, fail_share=1.0).fails(c) for c in candidates)
    assert Sphere(dim=2, fail_share=1).evaluate_batch(candidates) is NotImplemented


def test_cost_ms_spends_cpu_time() -> None:
    problem = Sphere(dim=2, cost_ms=40)
    candidate = problem.optimum()
    start = time.process_time()
    assert problem.evaluate(candidate) == 0.0
    assert time.process_time() - start >= 0.02
    assert problem.evaluate_batch([candidate] * 3) is NotImplemented  # costly: one at a time
    start = time.perf_counter()
    busy_wait(0)
    busy_wait(-5)
    assert time.perf_counter() - start < 0.01


@pytest.mark.parametrize("cls", BENCHMARKS)
def test_benchmarks_pickle_small_and_whole(cls: type[Benchmark]) -> None:
    problem = cls(dim=500, cost_ms=1.5, fail_share=0.25, version="x")
    data = pickle.dumps(problem)
    assert len(data) < 500  # only the constructor params travel, not the 500-dimension space
    clone = pickle.loads(data)
    assert clone.params == problem.params
    assert clone.space == problem.space
    candidate = {k: 0.5 for k in problem.space}
    assert clone.fails(candidate) == problem.fails(candidate)


@pytest.mark.parametrize(
    ("cls", "kwargs", "words"),
    [
        (Sphere, {"dim": 0}, ["'dim'", "0", ">= 1"]),
        (Rosenbrock, {"dim": 1}, ["rosenbrock", "'dim'", ">= 2"]),
        (Ackley, {"dim": 2.5}, ["'dim'", "integer"]),
        (Sphere, {"fail_share": 2}, ["'fail_share'", "2", "0 to 1"]),
        (Sphere, {"fail_share": -0.1}, ["'fail_share'", "0 to 1"]),
        (Rastrigin, {"cost_ms": -1}, ["'cost_ms'", ">= 0"]),
        (Rastrigin, {"cost_ms": math.nan}, ["'cost_ms'"]),
        (Sphere, {"version": ""}, ["'version'", "non-empty"]),
    ],
)
def test_benchmark_params_out_of_range(
    cls: type[Benchmark], kwargs: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(SpecError) as info:
        cls(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


# ---------------------------------------------------------------------------------------------
# scikit-learn tuning

SMALL: dict[str, dict[str, Any]] = {
    "svc": {"C": 1.0, "gamma": 0.01, "kernel": "rbf"},
    "gradient_boosting": {
        "learning_rate": 0.3,
        "max_iter": 10,
        "max_leaf_nodes": 4,
        "max_depth": 2,
        "min_samples_leaf": 20,
        "l2_regularization": 1e-3,
    },
    "random_forest": {"n_estimators": 10, "max_depth": 5, "max_features": "sqrt", "min_samples_leaf": 2},
}


@pytest.mark.parametrize(
    ("name", "dataset"),
    [
        ("svc", "digits"),
        ("svc", "breast_cancer"),
        ("svc", "wine"),
        ("gradient_boosting", "digits"),
        ("random_forest", "digits"),
        ("random_forest", "breast_cancer"),
    ],
)
def test_sklearn_problem_scores_a_small_candidate(name: str, dataset: str) -> None:
    problem = load_problem(name, {"dataset": dataset})
    assert problem.direction == "maximize"  # type: ignore[attr-defined]
    candidate = SMALL[name]
    problem_space(problem).validate(candidate)
    result = problem.evaluate(candidate)
    assert isinstance(result, Evaluation)
    assert result.score is not None and 0.0 < result.score <= 1.0
    assert result.score > 0.5  # well above chance on all three datasets
    assert result.metrics["cv_std"] >= 0.0
    assert result.metrics["fit_seconds"] > 0.0


def test_sklearn_problem_is_deterministic_for_a_seed() -> None:
    candidate = SMALL["random_forest"]
    first = RandomForestTuning(dataset="wine", seed=3).evaluate(candidate)
    again = RandomForestTuning(dataset="wine", seed=3).evaluate(candidate)
    assert first.score == again.score


def test_sklearn_version_tracks_what_decides_the_score() -> None:
    base = SVCTuning()
    assert base.version == SVCTuning().version
    assert len(base.version) == 12
    assert SVCTuning(dataset="wine").version != base.version
    assert SVCTuning(dataset="breast_cancer").version != SVCTuning(dataset="wine").version
    assert SVCTuning(cv=5).version != base.version
    assert SVCTuning(scoring="f1_macro").version != base.version
    assert SVCTuning(seed=1).version != base.version
    assert RandomForestTuning().version != base.version
    assert GradientBoostingTuning().version != base.version
    assert SVCTuning(version="2").version == f"2-{base.version}"


def test_sklearn_problem_pickles_without_its_data() -> None:
    problem = SVCTuning(dataset="digits", cv=4, seed=5, version="v")
    problem.evaluate(SMALL["svc"])  # loads and caches the dataset
    data = pickle.dumps(problem)
    assert len(data) < 1000
    clone = pickle.loads(data)
    assert clone.params == problem.params
    assert clone.version == problem.version


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"dataset": "mnist"}, ["'dataset'", "mnist", "digits, breast_cancer, wine"]),
        ({"cv": 1}, ["'cv'", "2 to 20"]),
        ({"cv": "100"}, ["'cv'", "2 to 20"]),
        ({"seed": -1}, ["'seed'", "2**32"]),
        ({"scoring": "accurasy"}, ["'scoring'", "accurasy", "scorer name"]),
    ],
)
def test_sklearn_params_out_of_range(params: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        load_problem("svc", params)
    for word in ["'svc'", *words]:
        assert word in str(info.value)


def test_sklearn_string_params_coerce() -> None:
    problem = load_problem("random_forest", {"dataset": "wine", "cv": "4", "seed": "7", "version": "3"})
    assert isinstance(problem, RandomForestTuning)
    assert problem.params == {"dataset": "wine", "cv": 4, "scoring": "accuracy", "seed": 7, "version": "3"}
    assert problem.version.startswith("3-")


def test_a_failing_fit_is_an_exception_with_the_reason() -> None:
    problem = SVCTuning(dataset="wine", scoring="roc_auc")  # binary-only scorer on a three-class dataset
    with pytest.raises(ValueError):
        problem.evaluate(SMALL["svc"])


# ---------------------------------------------------------------------------------------------
# Registry and loading


def test_registry_lists_every_builtin_and_each_loads() -> None:
    assert set(PROBLEMS) == {
        "sphere",
        "rosenbrock",
        "rastrigin",
        "ackley",
        "gradient_boosting",
        "random_forest",
        "svc",
    }
    for name, description in PROBLEMS.items():
        assert description and "\n" not in description
        problem = load_problem(name, {})
        described = describe_problem(problem)
        assert set(described) == {"name", "description", "direction", "version", "space"}
        assert described["direction"] in ("minimize", "maximize")
        assert described["space"] and all(isinstance(v, str) for v in described["space"].values())


def test_describe_problem_formats_the_space() -> None:
    described = describe_problem(load_problem("svc", {}))
    assert described["name"] == "SVCTuning"
    assert described["direction"] == "maximize"
    assert described["space"] == {
        "C": "Float(0.001, 1000.0, log)",
        "gamma": "Float(1e-05, 10.0, log)",
        "kernel": "Choice(['rbf', 'poly', 'sigmoid'])",
    }
    assert describe_problem(Sphere(dim=1))["space"] == {"x0": "Float(-5.12, 5.12)"}


def test_builtin_string_params_coerce() -> None:
    problem = load_problem("rosenbrock", {"dim": "4", "cost_ms": "0", "fail_share": "0.25", "version": "2"})
    assert isinstance(problem, Rosenbrock)
    assert problem.params == {"dim": 4, "cost_ms": 0.0, "fail_share": 0.25, "version": "2"}
    assert type(problem.dim) is int and type(problem.fail_share) is float
    assert load_problem("sphere", {"dim": 3.0, "version": 5}).params["version"] == "5"  # type: ignore[attr-defined]
    assert load_problem("sphere", {"dim": "1e1"}).params["dim"] == 10  # type: ignore[attr-defined]


def test_load_user_class_and_instance_by_import_path() -> None:
    from tests.fixtures_user_problem import Quadratic, quadratic

    problem = load_problem("tests.fixtures_user_problem:Quadratic", {})
    assert isinstance(problem, Quadratic)
    assert problem.evaluate({"x": 1.0, "n": 2, "kind": "a"}) == 0.0
    shifted = load_problem("tests.fixtures_user_problem:Quadratic", {"offset": "0.5"})
    assert shifted.evaluate({"x": 1.0, "n": 2, "kind": "a"}) == 0.5
    assert load_problem(" tests.fixtures_user_problem:quadratic ", {}) is quadratic
    described = describe_problem(quadratic)
    assert described["name"] == "Quadratic"
    assert described["version"] == "1"
    assert described["direction"] == "minimize"
    assert described["space"] == {"x": "Float(-3, 3)", "n": "Int(1, 5)", "kind": "Choice(['a', 'b'])"}


def test_load_problem_from_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = EntryPoint(name="quad", value="tests.fixtures_user_problem:Quadratic", group="irefine.problems")
    broken = EntryPoint(name="broken", value="no_such_module_xyz:Thing", group="irefine.problems")
    monkeypatch.setattr(registry, "_entry_points", lambda: {"quad": plugin, "broken": broken})
    from tests.fixtures_user_problem import Quadratic

    assert isinstance(load_problem("quad", {"offset": "1"}), Quadratic)
    with pytest.raises(SpecError, match=r"entry point 'broken'.*no_such_module_xyz"):
        load_problem("broken", {})
    with pytest.raises(SpecError, match=r"unknown problem 'nope': choose one of sphere, .*quad"):
        load_problem("nope", {})


BAD_MODULE = """
from engine import Float, Int, Choice


class NoSpace:
    def evaluate(self, candidate):
        return 0.0


class EmptySpace:
    space = {}

    def evaluate(self, candidate):
        return 0.0


class ListSpace:
    space = [Float(0, 1)]

    def evaluate(self, candidate):
        return 0.0


class BadDimension:
    space = {"x": (0, 1)}

    def evaluate(self, candidate):
        return 0.0


class NoEvaluate:
    space = {"x": Float(0, 1)}


class BadDirection:
    space = {"x": Float(0, 1)}
    direction = "max"

    def evaluate(self, candidate):
        return 0.0


class NeedsParam:
    space = {"x": Float(0, 1)}

    def __init__(self, size: int, flag: bool = False, ratio: "float | None" = None) -> None:
        self.size, self.flag, self.ratio = size, flag, ratio

    def evaluate(self, candidate):
        return 0.0


class Crashes:
    space = {"x": Float(0, 1)}

    def __init__(self) -> None:
        raise RuntimeError("no GPU\\nfound")

    def evaluate(self, candidate):
        return 0.0


def a_function(candidate):
    return 0.0


ok_instance = NeedsParam(3)
"""


@pytest.fixture
def bad_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = "irefine_test_bad_problems"
    (tmp_path / f"{name}.py").write_text(BAD_MODULE)
    (tmp_path / "irefine_test_broken_import.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "irefine_test_syntax_error.py").write_text("def broken(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in (name, "irefine_test_broken_import", "irefine_test_syntax_error"):
        sys.modules.pop(module, None)


@pytest.mark.parametrize(
    ("ref", "params", "words"),
    [
        ("foo", {}, ["unknown problem 'foo'", "sphere", "svc", "module:attr"]),
        ("", {}, ["choose one of"]),
        ("rosenbrock", {"dims": 3}, []),  # exact message checked below
        ("sphere", {"dim": 0}, ["'dim'", ">= 1"]),
        ("sphere", {"dim": "ten"}, ["'dim'", "'ten'", "not an integer"]),
        ("sphere", {"dim": "2.5"}, ["'dim'", "not an integer"]),
        ("sphere", {"dim": True}, ["'dim'", "not an integer"]),
        ("sphere", {"fail_share": "lots"}, ["'fail_share'", "not a number"]),
        ("ackley", {"fail_share": "2"}, ["'fail_share'", "0 to 1"]),
        ("svc", {"dataset": "mnist"}, ["'dataset'", "'mnist'", "digits"]),
        ("svc", {"C": 1}, ["has no parameter 'C'", "cv, dataset, scoring, seed, version"]),
        ("no_such_module_xyz:Thing", {}, ["no_such_module_xyz", "No module named", "PYTHONPATH"]),
        ("irefine_test_broken_import:X", {}, ["irefine_test_broken_import", "no_such_dependency_xyz"]),
        ("irefine_test_syntax_error:X", {}, ["irefine_test_syntax_error", "SyntaxError"]),
        ("tests.fixtures_user_problem:Nope", {}, ["has no attribute 'Nope'", "tests.fixtures_user_problem"]),
        ("tests.fixtures_user_problem:", {}, ["module:attr"]),
        ("tests.fixtures_user_problem:quadratic", {"x": 1}, ["instance", "no parameters", "x"]),
        ("tests.fixtures_user_problem:Quadratic", {"offset": "far"}, ["'offset'", "'far'", "not a number"]),
        ("tests.fixtures_user_problem:Quadratic", {"size": 1}, ["no parameter 'size'", "offset"]),
        ("{mod}:NoSpace", {}, ["has no 'space'"]),
        ("{mod}:EmptySpace", {}, ["search space is empty"]),
        ("{mod}:ListSpace", {}, ["'space' is list", "mapping"]),
        ("{mod}:BadDimension", {}, ["'x'", "not a Float, Int or Choice"]),
        ("{mod}:NoEvaluate", {}, ["no callable 'evaluate"]),
        ("{mod}:BadDirection", {}, ["direction 'max'", "'minimize' or 'maximize'"]),
        ("{mod}:NeedsParam", {}, ["needs parameter(s) size"]),
        ("{mod}:NeedsParam", {"size": "3", "flag": "maybe"}, ["'flag'", "'maybe'", "not a boolean"]),
        ("{mod}:Crashes", {}, ["could not be created", "RuntimeError", "no GPU found"]),
        ("{mod}:a_function", {}, ["is a function", "class"]),
    ],
)
def test_bad_problem_refs_raise_one_line_spec_errors(
    bad_module: str, ref: str, params: dict[str, Any], words: list[str]
) -> None:
    ref = ref.replace("{mod}", bad_module)
    with pytest.raises(SpecError) as info:
        load_problem(ref, params)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_unknown_param_message_lists_the_valid_ones() -> None:
    with pytest.raises(SpecError) as info:
        load_problem("rosenbrock", {"dims": 3})
    assert (
        str(info.value)
        == "problem 'rosenbrock' has no parameter 'dims': use one of cost_ms, dim, fail_share, version"
    )


def test_user_class_params_coerce_through_annotations(bad_module: str) -> None:
    problem: Any = load_problem(f"{bad_module}:NeedsParam", {"size": "3", "flag": "yes", "ratio": "0.5"})
    assert (problem.size, problem.flag, problem.ratio) == (3, True, 0.5)
    problem = load_problem(f"{bad_module}:NeedsParam", {"size": 4, "flag": "false", "ratio": "none"})
    assert (problem.size, problem.flag, problem.ratio) == (4, False, None)
    assert load_problem(f"{bad_module}:ok_instance", {}).size == 3  # type: ignore[attr-defined]


def test_problem_space_validates() -> None:
    class Broken:
        space: dict[str, Any] = {}

    with pytest.raises(SpecError, match="empty"):
        problem_space(Broken())
    assert isinstance(problem_space(Sphere(dim=2)), Space)


def test_importing_the_registry_imports_no_heavy_libraries() -> None:
    code = textwrap.dedent(
        """
        import sys
        import engine.problems
        engine.problems.load_problem("sphere", {"dim": "3"})
        heavy = ("sklearn", "prefect", "dask", "distributed", "redis", "sqlmodel")
        print(",".join(m for m in heavy if m in sys.modules))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
