"""Unit tests for the built-in strategies (random, cmaes, tpe) and the strategy registry."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import engine.strategies as strategies
from engine.core.candidate import Candidate
from engine.core.errors import SpecError
from engine.core.space import Choice, Float, Int, Space
from engine.core.strategy import Strategy
from engine.strategies import STRATEGIES, make_strategy, restore_strategy
from engine.strategies.cmaes import CMAES, penalised_losses

NAMES = ["random", "cmaes", "tpe"]
ROOT = Path(__file__).resolve().parents[1]

MIXED = Space(
    {
        "x": Float(-2.0, 3.0),
        "lr": Float(1e-4, 1.0, log=True),
        "n": Int(1, 9),
        "width": Int(1, 1024, log=True),
        "kind": Choice(["a", "b", 1, 1.0, True, None]),
    }
)


def mixed_loss(c: dict[str, Any]) -> float:
    return float((c["x"] - 1.0) ** 2 + math.log10(c["lr"]) ** 2 / 10 + abs(c["n"] - 4) + (c["kind"] != "b"))


def sphere(c: dict[str, Any]) -> float:
    return float(sum((v - 0.5) ** 2 for v in c.values()))


SPHERE = Space({f"x{i}": Float(-3.0, 3.0) for i in range(4)})


def run(strategy: Strategy, loss: Any, rounds: int, n: int) -> list[list[Candidate]]:
    """Drive ask/tell for ``rounds`` cycles of ``n`` and return every batch."""
    batches = []
    for _ in range(rounds):
        batch = strategy.ask(n)
        strategy.tell(batch, [loss(c) for c in batch])
        batches.append(batch)
    return batches


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(state, allow_nan=False))
    return out


# --- registry ------------------------------------------------------------------------------------


def test_registry_lists_builtins() -> None:
    assert set(STRATEGIES) == set(NAMES)
    assert all(isinstance(d, str) and d and "\n" not in d for d in STRATEGIES.values())
    for name in NAMES:
        s = make_strategy(name, SPHERE, 0, {})
        assert isinstance(s, Strategy)
        assert s.name == name


def test_unknown_strategy() -> None:
    with pytest.raises(SpecError, match=r"^unknown strategy 'x': choose one of cmaes, random, tpe$"):
        make_strategy("x", SPHERE, 0, {})
    with pytest.raises(SpecError, match="unknown strategy 'x'"):
        restore_strategy("x", SPHERE, {})


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("cmaes", {"sigma0": "abc"}, r"strategy parameter 'sigma0' must be a number in \(0, 1\], got 'abc'"),
        ("cmaes", {"sigma0": 0}, r"'sigma0' must be a number in \(0, 1\], got 0"),
        ("cmaes", {"sigma0": 1.5}, r"'sigma0' must be a number in \(0, 1\]"),
        ("cmaes", {"sigma0": True}, r"'sigma0' must be a number"),
        ("cmaes", {"sigma0": "nan"}, r"'sigma0' must be a number"),
        ("cmaes", {"popsize": 2}, r"'popsize' must be an integer >= 3, got 2"),
        ("cmaes", {"popsize": "ten"}, r"'popsize' must be an integer >= 3, got 'ten'"),
        ("cmaes", {"popsize": 4.5}, r"'popsize' must be an integer >= 3"),
        (
            "cmaes",
            {"sigma": 0.3},
            r"unknown strategy parameter 'sigma' for cmaes: choose from popsize, sigma0, x0",
        ),
        ("cmaes", {"x0": {"x0": 0.0}}, r"strategy parameter 'x0' must be a point of the space"),
        ("cmaes", {"x0": "{not json"}, r"strategy parameter 'x0' must be a JSON object"),
        ("cmaes", {"x0": [0, 0, 0, 0]}, r"strategy parameter 'x0' must be a mapping"),
        ("tpe", {"multivariate": "maybe"}, r"'multivariate' must be true or false, got 'maybe'"),
        ("tpe", {"n_startup_trials": 0}, r"'n_startup_trials' must be an integer >= 1, got 0"),
        ("tpe", {"gamma": 0.1}, r"unknown strategy parameter 'gamma' for tpe"),
        ("random", {"sigma0": 0.3}, r"unknown strategy parameter 'sigma0' for random: it takes none"),
    ],
)
def test_bad_params(name: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        make_strategy(name, SPHERE, 0, params)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "3", None])
def test_bad_seed(seed: Any) -> None:
    with pytest.raises(SpecError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
        make_strategy("random", SPHERE, seed, {})


def test_string_params_are_coerced() -> None:
    s = make_strategy(
        "cmaes", SPHERE, 1, {"sigma0": "0.2", "popsize": "6", "x0": '{"x0":0,"x1":1,"x2":0,"x3":1}'}
    )
    st = s.state()
    assert st["sigma0"] == 0.2 and st["popsize"] == 6
    assert st["x0"] == pytest.approx([0.5, 4 / 6, 0.5, 4 / 6])
    t = make_strategy(
        "tpe", SPHERE, 1, {"n_startup_trials": "4", "multivariate": "false", "constant_liar": "0"}
    )
    assert t.state()["n_startup_trials"] == 4
    assert t.state()["multivariate"] is False and t.state()["constant_liar"] is False
    same = make_strategy(
        "cmaes", SPHERE, 1, {"sigma0": 0.2, "popsize": 6, "x0": {"x0": 0, "x1": 1, "x2": 0, "x3": 1}}
    )
    assert run(s, sphere, 3, 6) == run(same, sphere, 3, 6)


class _PluginStrategy:
    """A minimal plug-in: always proposes the centre of the unit cube."""

    name = "centre"

    def __init__(self, space: Space, seed: int, scale: float = 1.0) -> None:
        self.space, self.seed, self.scale = space, seed, scale

    def ask(self, n: int) -> list[Candidate]:
        return self.space.decode(np.full((n, len(self.space)), 0.5))

    def tell(self, candidates: Sequence[Candidate], losses: Sequence[float | None]) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {"seed": self.seed, "scale": self.scale}

    @classmethod
    def from_state(cls, space: Space, state: dict[str, Any]) -> _PluginStrategy:
        return cls(space, state["seed"], state["scale"])


class _FakeEntryPoint:
    def __init__(self, name: str, obj: Any) -> None:
        self.name, self.value, self._obj = name, f"fake:{name}", obj

    def load(self) -> Any:
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


def test_plugin_strategies(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = [
        _FakeEntryPoint("centre", _PluginStrategy),
        _FakeEntryPoint("broken", ImportError("no module named nowhere")),
        _FakeEntryPoint("random", _PluginStrategy),  # a built-in name: ignored
    ]
    monkeypatch.setattr(
        strategies, "entry_points", lambda group: eps if group == "irefine.strategies" else []
    )
    s = make_strategy("centre", SPHERE, 5, {"scale": 2.0})
    assert isinstance(s, _PluginStrategy) and s.scale == 2.0
    assert s.ask(1) == [Candidate({f"x{i}": 0.0 for i in range(4)})]
    restored = restore_strategy("centre", SPHERE, s.state())
    assert isinstance(restored, _PluginStrategy) and restored.scale == 2.0
    assert isinstance(make_strategy("random", SPHERE, 0, {}), strategies.RandomSearch)
    assert "centre" in strategies.available_strategies()
    with pytest.raises(SpecError, match="choose one of broken, centre, cmaes, random, tpe"):
        make_strategy("nope", SPHERE, 0, {})
    with pytest.raises(SpecError, match=r"strategy plug-in 'broken' .* failed to load"):
        make_strategy("broken", SPHERE, 0, {})
    with pytest.raises(SpecError, match="strategy 'centre' rejected its parameters"):
        make_strategy("centre", SPHERE, 0, {"bogus": 1})


# --- behaviour common to every strategy ----------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_candidates(name: str) -> None:
    a = run(make_strategy(name, SPHERE, 7, {}), sphere, 5, 6)
    b = run(make_strategy(name, SPHERE, 7, {}), sphere, 5, 6)
    assert a == b


@pytest.mark.parametrize("name", NAMES)
def test_different_seeds_differ(name: str) -> None:
    a = run(make_strategy(name, SPHERE, 7, {}), sphere, 2, 6)
    b = run(make_strategy(name, SPHERE, 8, {}), sphere, 2, 6)
    assert a[0] != b[0]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 12345])
def test_state_roundtrip_after_tell(name: str, seed: int) -> None:
    original = make_strategy(name, MIXED, seed, {"n_startup_trials": 4} if name == "tpe" else {})
    fresh = restore_strategy(name, MIXED, roundtrip(original.state()))  # before the first ask
    assert run(original, mixed_loss, 3, 5) == run(fresh, mixed_loss, 3, 5)
    restored = restore_strategy(name, MIXED, roundtrip(original.state()))
    assert run(original, mixed_loss, 4, 5) == run(restored, mixed_loss, 4, 5)
    # pycma's pickle holds wall-clock timers, so compare everything else.
    assert {k: v for k, v in restored.state().items() if k != "es"} == {
        k: v for k, v in original.state().items() if k != "es"
    }


@pytest.mark.parametrize("name", NAMES)
def test_state_roundtrip_between_ask_and_tell(name: str) -> None:
    original = make_strategy(name, MIXED, 3, {"n_startup_trials": 4} if name == "tpe" else {})
    run(original, mixed_loss, 2, 6)
    batch = original.ask(6)
    restored = restore_strategy(name, MIXED, roundtrip(original.state()))
    losses = [mixed_loss(c) for c in batch]
    original.tell(batch, losses)
    restored.tell(batch, losses)
    assert run(original, mixed_loss, 3, 6) == run(restored, mixed_loss, 3, 6)


@pytest.mark.parametrize("name", NAMES)
def test_candidates_valid_in_mixed_space(name: str) -> None:
    by_name: dict[str, dict[str, Any]] = {"tpe": {"n_startup_trials": 5}, "cmaes": {"sigma0": 1.0}}
    params = by_name.get(name, {})
    s = make_strategy(name, MIXED, 11, params)
    seen_kinds = set()
    for batch in run(s, mixed_loss, 8, 10):
        assert len(batch) == 10
        for c in batch:
            assert isinstance(c, Candidate)
            assert list(c) == list(MIXED.names)
            MIXED.validate(c)
            seen_kinds.add(repr(c["kind"]))
    assert len(seen_kinds) >= 3  # options equal in Python (1, 1.0, True) stay distinct


@pytest.mark.parametrize("name", NAMES)
def test_failed_losses_accepted(name: str) -> None:
    s = make_strategy(name, MIXED, 2, {"n_startup_trials": 3} if name == "tpe" else {})
    for r in range(6):
        batch = s.ask(5)
        if r == 2:
            losses: list[float | None] = [None] * 5  # a wholly failed batch
        else:
            losses = [None if i % 2 else mixed_loss(c) for i, c in enumerate(batch)]
            losses[-1] = math.nan if r == 3 else losses[-1]
        s.tell(batch, losses)
        json.dumps(s.state(), allow_nan=False)
    for c in s.ask(5):
        MIXED.validate(c)


@pytest.mark.parametrize("name", NAMES)
def test_tell_must_match_ask(name: str) -> None:
    s = make_strategy(name, SPHERE, 0, {})
    batch = s.ask(4)
    with pytest.raises(ValueError):
        s.tell(batch[:3], [1.0, 2.0, 3.0, 4.0])


@pytest.mark.parametrize("name", NAMES)
def test_global_numpy_random_untouched(name: str) -> None:
    np.random.seed(99)
    expected = np.random.rand(3)
    np.random.seed(99)
    s = make_strategy(name, SPHERE, 4, {})
    a = run(s, sphere, 3, 6)
    assert np.array_equal(np.random.rand(3), expected)
    # ...and other code drawing from np.random does not change the strategy's sequence.
    b = []
    t = make_strategy(name, SPHERE, 4, {})
    for _ in range(3):
        np.random.rand(17)
        b += run(t, sphere, 1, 6)
    assert a == b


# --- random search -------------------------------------------------------------------------------


def test_random_search_is_uniform() -> None:
    s = make_strategy("random", Space({"x": Float(0.0, 1.0), "k": Int(0, 3)}), 1, {})
    batch = s.ask(4000)
    xs = np.array([c["x"] for c in batch])
    assert 0.47 < xs.mean() < 0.53
    counts = np.bincount([c["k"] for c in batch], minlength=4)
    assert counts.min() > 900


# --- CMA-ES --------------------------------------------------------------------------------------


def test_penalised_losses() -> None:
    assert penalised_losses([1.0, None, -3.0, math.inf], 6) == [1.0, 3.0, -3.0, 3.0, 3.0, 3.0]
    assert penalised_losses([None, None, None], 3) == [1e300] * 3


def test_cmaes_trimmed_and_oversized_batches() -> None:
    s = make_strategy("cmaes", SPHERE, 3, {})
    run(s, sphere, 2, 8)
    assert s.state()["popsize"] is None
    short = s.ask(5)  # a cycle trimmed to the evaluation budget
    assert len(short) == 5
    assert len(s.state()["pending"]) == 8 and s.state()["n_asked"] == 5
    s.tell(short, [sphere(c) for c in short])
    big = s.ask(12)  # more than the population: sampled from the same distribution
    assert len(big) == 12
    s.tell(big, [sphere(c) for c in big])
    restored = restore_strategy("cmaes", SPHERE, roundtrip(s.state()))
    assert run(s, sphere, 2, 8) == run(restored, sphere, 2, 8)


def test_cmaes_small_batch_uses_minimum_popsize() -> None:
    s = make_strategy("cmaes", SPHERE, 3, {})
    batches = run(s, sphere, 4, 1)
    assert [len(b) for b in batches] == [1, 1, 1, 1]
    assert len(s.ask(1)) == 1 and len(s.state()["pending"]) == 3


@pytest.mark.parametrize("dim", [Float(0.0, 1.0), Choice(["a", "b", "c"])])
def test_cmaes_one_dimension(dim: Float | Choice) -> None:
    space = Space({"p": dim})
    s = make_strategy("cmaes", space, 0, {})
    target = 0.3 if isinstance(dim, Float) else "b"
    batches = run(s, lambda c: abs(c["p"] - 0.3) if isinstance(dim, Float) else float(c["p"] != "b"), 40, 4)
    assert any(c["p"] == pytest.approx(target, abs=1e-3) for c in batches[-1])


def test_cmaes_x0_is_the_first_mean() -> None:
    x0 = {"x0": 1.0, "x1": -1.0, "x2": 2.0, "x3": 0.0}
    s = make_strategy("cmaes", SPHERE, 3, {"x0": x0, "sigma0": 1e-6, "popsize": 4})
    for c in s.ask(4):
        assert c == pytest.approx(x0, abs=1e-4)


def test_cmaes_call_order_is_enforced() -> None:
    s = CMAES(SPHERE, 1)
    with pytest.raises(RuntimeError):
        s.tell([], [])
    s.ask(4)
    with pytest.raises(RuntimeError):
        s.ask(4)


def rosenbrock(c: dict[str, Any]) -> float:
    x = np.array(list(c.values()))
    return float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))


def test_cmaes_rosenbrock_10d_matches_standalone_pycma() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import cma

    space = Space({f"x{i}": Float(-5.0, 10.0) for i in range(10)})
    seed, batch, budget = 1, 20, 20_000

    strategy = make_strategy("cmaes", space, seed, {})
    engine_best: list[float] = []
    best, evaluations = math.inf, 0
    while evaluations < budget and best >= 1e-6:
        candidates = strategy.ask(batch)
        losses = [rosenbrock(c) for c in candidates]
        strategy.tell(candidates, losses)
        evaluations += batch
        best = min(best, *losses)
        engine_best.append(best)
    assert best < 1e-6, f"best {best} after {evaluations} evaluations"

    opts = {"seed": seed, "popsize": batch, "bounds": [0, 1], "verbose": -9}
    es = cma.CMAEvolutionStrategy([0.5] * 10, 0.3, opts)
    standalone_best: list[float] = []
    best = math.inf
    for _ in engine_best:
        X = es.ask()
        values = [rosenbrock(c) for c in space.decode(np.array(X))]
        es.tell(X, values)
        best = min(best, *values)
        standalone_best.append(best)
    assert standalone_best == engine_best


# --- TPE -----------------------------------------------------------------------------------------


def test_tpe_ask_after_restore_equals_ask_without() -> None:
    s = make_strategy("tpe", MIXED, 21, {"n_startup_trials": 5})
    run(s, mixed_loss, 3, 4)  # past the startup trials: the model is in use
    restored = restore_strategy("tpe", MIXED, roundtrip(s.state()))
    assert s.ask(4) == restored.ask(4)


def test_tpe_state_records_trials() -> None:
    s = make_strategy("tpe", SPHERE, 1, {})
    batch = s.ask(3)
    s.tell(batch, [1.0, None, 2.5])
    st = s.state()
    assert st["n_asks"] == 1 and st["pending"] is None
    assert [t["value"] for t in st["trials"]] == [1.0, None, 2.5]
    assert [t["params"] for t in st["trials"]] == [dict(c) for c in batch]


def test_tpe_learns() -> None:
    space = Space({"x": Float(-10.0, 10.0), "y": Float(-10.0, 10.0)})
    s = make_strategy("tpe", space, 0, {})
    batches = run(s, lambda c: (c["x"] - 3) ** 2 + (c["y"] + 1) ** 2, 12, 5)
    first = min((c["x"] - 3) ** 2 + (c["y"] + 1) ** 2 for c in batches[0])
    last = min((c["x"] - 3) ** 2 + (c["y"] + 1) ** 2 for b in batches[-3:] for c in b)
    assert last < min(first, 1.0)


# --- restore in another process (another hash seed) --------------------------------------------

_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
from engine.strategies import restore_strategy
from test_strategies import MIXED, mixed_loss, run
results = []
for name, state, pending_losses in json.loads(sys.stdin.read()):
    s = restore_strategy(name, MIXED, state)
    if pending_losses is not None:
        s.tell([None] * len(pending_losses), pending_losses)
    results.append(run(s, mixed_loss, 3, 5))
print(json.dumps(results))
"""


def test_restore_in_another_process() -> None:
    """States restore exactly under another hash seed (pycma keys solutions by ``hash(bytes)``)."""
    cases, expected = [], []
    for name in NAMES:
        for mid_cycle in (False, True):
            s = make_strategy(name, MIXED, 17, {"n_startup_trials": 4} if name == "tpe" else {})
            run(s, mixed_loss, 3, 5)
            pending_losses = None
            if mid_cycle:
                batch = s.ask(5)
                pending_losses = [mixed_loss(c) for c in batch]
            cases.append([name, s.state(), pending_losses])
            if pending_losses is not None:
                s.tell(batch, pending_losses)
            expected.append(run(s, mixed_loss, 3, 5))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD.format(tests=str(ROOT / "tests"))],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONHASHSEED": "4242"},
        check=True,
        timeout=120,
    )
    assert json.loads(out.stdout) == json.loads(json.dumps(expected))
