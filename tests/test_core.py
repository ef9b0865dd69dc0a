"""Unit tests of engine/core: spaces, candidates, evaluations, stop rules, cycle accounting."""

from __future__ import annotations

import ast
import math
import pickle
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from engine.core import (
    Candidate,
    Choice,
    Evaluation,
    Float,
    Int,
    JobSpec,
    Progress,
    Space,
    SpecError,
    Status,
    account_cycle,
    canonical_json,
    fingerprint,
    losses,
    next_batch_size,
    stop_reason,
)
from engine.core.cycle import too_many_failures

ROOT = Path(__file__).resolve().parents[1]


def mixed_space() -> Space:
    return Space(
        {
            "lr": Float(1e-4, 1e-1, log=True),
            "x": Float(-5, 10),
            "n": Int(1, 12),
            "k": Int(1, 1000, log=True),
            "act": Choice(["relu", "tanh", None]),
        }
    )


def test_core_imports_no_framework() -> None:
    banned = {"prefect", "dask", "distributed", "redis", "sqlmodel", "sqlalchemy"}
    for path in (ROOT / "engine" / "core").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"


def test_decode_stays_in_space_and_covers_every_value() -> None:
    space = mixed_space()
    rng = np.random.default_rng(0)
    cands = space.decode(rng.random((4000, len(space))))
    for c in cands:
        space.validate(c)
    assert {c["n"] for c in cands} == set(range(1, 13))
    assert {c["act"] for c in cands} == {"relu", "tanh", None}
    assert min(c["k"] for c in cands) == 1 and max(c["k"] for c in cands) == 1000
    # log scale: about as many below the geometric middle as above it
    below = sum(c["lr"] < math.sqrt(1e-4 * 1e-1) for c in cands)
    assert 1600 < below < 2400


def test_decode_edges_and_encode_roundtrip() -> None:
    space = mixed_space()
    lo, hi = space.decode(np.array([[0.0] * 5, [1.0] * 5]))
    assert lo == {"lr": pytest.approx(1e-4), "x": -5.0, "n": 1, "k": 1, "act": "relu"}
    assert hi == {"lr": pytest.approx(1e-1), "x": 10.0, "n": 12, "k": 1000, "act": None}
    cands = space.decode(np.random.default_rng(1).random((50, 5)))
    again = space.decode(space.encode(cands))
    for a, b in zip(cands, again, strict=True):
        assert a["n"] == b["n"] and a["act"] == b["act"] and a["k"] == b["k"]
        assert a["x"] == pytest.approx(b["x"]) and a["lr"] == pytest.approx(b["lr"])


@pytest.mark.parametrize(
    "make",
    [
        lambda: Float(1, 1),
        lambda: Float(0, 1, log=True),
        lambda: Float(0, math.inf),
        lambda: Int(5, 2),
        lambda: Int(0, 10, log=True),
        lambda: Choice([]),
        lambda: Choice(["a", "a"]),
        lambda: Choice([[1, 2]]),
        lambda: Space({}),
        lambda: Space({"x": (0, 1)}),
    ],
)
def test_bad_dimensions_raise_spec_error(make) -> None:
    with pytest.raises(SpecError):
        make()


def test_validate_rejects_out_of_range_and_missing() -> None:
    space = mixed_space()
    good = space.decode(np.full((1, 5), 0.5))[0]
    space.validate(good)
    with pytest.raises(SpecError, match="'n'"):
        space.validate({**good, "n": 13})
    with pytest.raises(SpecError, match="'n'"):
        space.validate({**good, "n": 2.5})
    with pytest.raises(SpecError, match="keys"):
        space.validate({"x": 1.0})


def test_fingerprint_is_stable_and_order_free() -> None:
    a = Candidate({"x": 1.5, "n": 3, "act": "relu"})
    b = Candidate({"act": "relu", "n": 3, "x": 1.5})
    assert fingerprint(a) == fingerprint(b) == fingerprint(dict(a))
    assert canonical_json(a) == b'{"act":"relu","n":3,"x":1.5}'
    # A fixed value: the fingerprint must never change between releases (cache keys depend on it).
    assert fingerprint(a) == "d52a25fb5cf4a4f88806b00a92c14c4c"
    assert fingerprint(Candidate({"x": 1.5000000000000002})) != fingerprint(Candidate({"x": 1.5}))
    assert hash(a) == hash(b)
    with pytest.raises(ValueError):
        fingerprint({"x": math.nan})


def test_candidate_is_immutable_and_pickles() -> None:
    c = Candidate({"x": 1.0})
    with pytest.raises(TypeError):
        c["x"] = 2.0  # type: ignore[index]
    with pytest.raises(TypeError):
        c.update(x=2.0)
    assert pickle.loads(pickle.dumps(c)) == c
    assert type(pickle.loads(pickle.dumps(c))) is Candidate


@pytest.mark.parametrize(
    ("result", "status", "score"),
    [
        (1.5, Status.OK, 1.5),
        (np.float32(2.0), Status.OK, 2.0),
        (3, Status.OK, 3.0),
        (math.nan, Status.FAILED, None),
        (math.inf, Status.FAILED, None),
        (-math.inf, Status.FAILED, None),
        ("abc", Status.FAILED, None),
        (None, Status.FAILED, None),
        (Evaluation(0.5, metrics={"acc": 0.9}), Status.OK, 0.5),
        (Evaluation(math.nan), Status.FAILED, None),
    ],
)
def test_evaluation_from_result(result, status, score) -> None:
    ev = Evaluation.from_result(result, 0.1)
    assert ev.status is status and ev.score == score and ev.duration == 0.1
    if status is Status.FAILED:
        assert ev.error


def test_losses_follow_direction() -> None:
    evs = [Evaluation(1.0), Evaluation.failed("x"), Evaluation(-2.0)]
    assert losses(evs, maximize=False) == [1.0, None, -2.0]
    assert losses(evs, maximize=True) == [-1.0, None, 2.0]


def spec(**kw) -> JobSpec:
    return JobSpec.parse({"problem": "sphere", **kw})


def test_account_cycle_tracks_best_and_patience() -> None:
    cands = [Candidate({"x": float(i)}) for i in range(3)]
    p, rec = account_cycle(
        Progress(),
        cands,
        [Evaluation(3.0), Evaluation.failed("e"), Evaluation(2.0)],
        maximize=False,
        tolerance=0.1,
        duration=1.0,
    )
    assert (p.cycles, p.evaluations, p.failed, p.best_score, p.best_candidate) == (1, 3, 1, 2.0, {"x": 2.0})
    assert rec.improved and rec.failed == 1 and rec.batch_best_score == 2.0
    # An improvement within tolerance moves the best but counts against patience.
    p, rec = account_cycle(p, cands[:1], [Evaluation(1.95)], maximize=False, tolerance=0.1, duration=1.0)
    assert p.best_score == 1.95 and not rec.improved and p.cycles_without_improvement == 1
    p, rec = account_cycle(
        p, cands[:1], [Evaluation(1.0, status=Status.CACHED)], maximize=False, tolerance=0.1, duration=1.0
    )
    assert rec.improved and p.cycles_without_improvement == 0 and p.cached == 1
    assert Progress.from_dict(p.to_dict()) == p


def test_account_cycle_maximize() -> None:
    cands = [Candidate({"x": 0.0}), Candidate({"x": 1.0})]
    p, _ = account_cycle(
        Progress(), cands, [Evaluation(0.7), Evaluation(0.9)], maximize=True, tolerance=0, duration=0
    )
    assert p.best_score == 0.9 and p.best_candidate == {"x": 1.0}


def test_stop_rules_in_order() -> None:
    p = Progress(cycles=5, evaluations=50, best_score=0.5, cycles_without_improvement=3, elapsed_seconds=9)
    assert stop_reason(spec(max_evaluations=100), p, False) is None
    assert "target" in stop_reason(spec(target=0.6), p, False)
    assert stop_reason(spec(target=0.4), p, False) is None
    assert "target" in stop_reason(spec(target=0.4), p, True)
    assert "max evaluations" in stop_reason(spec(max_evaluations=50), p, False)
    assert "max cycles" in stop_reason(spec(max_cycles=5), p, False)
    assert "no improvement" in stop_reason(spec(patience=3), p, False)
    assert stop_reason(spec(patience=4), p, False) is None
    assert "time limit" in stop_reason(spec(max_seconds=8), p, False)
    now = datetime.now(UTC)
    assert "deadline" in stop_reason(spec(deadline=now - timedelta(seconds=1)), p, False)
    assert stop_reason(spec(deadline=now + timedelta(hours=1)), p, False) is None


def test_batch_trimmed_to_budget() -> None:
    s = spec(batch_size=16, max_evaluations=40)
    assert next_batch_size(s, Progress(evaluations=0)) == 16
    assert next_batch_size(s, Progress(evaluations=32)) == 8


def test_failure_share_bound() -> None:
    s = spec(max_failure_share=0.5)
    _, half = account_cycle(
        Progress(),
        [Candidate({"x": 0.0})] * 2,
        [Evaluation(1.0), Evaluation.failed("e")],
        maximize=False,
        tolerance=0,
        duration=0,
    )
    _, most = account_cycle(
        Progress(),
        [Candidate({"x": 0.0})] * 2,
        [Evaluation.failed("e")] * 2,
        maximize=False,
        tolerance=0,
        duration=0,
    )
    assert not too_many_failures(s, half)
    assert too_many_failures(s, most)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": "many"}, "batch_size"),
        ({"max_failure_share": 1.5}, "max_failure_share"),
        ({"seed": -1}, "seed"),
        ({"colour": "red"}, "colour"),
        ({"max_evaluations": None}, "max_evaluations"),
    ],
)
def test_spec_errors_are_one_line_and_name_the_field(data, field) -> None:
    with pytest.raises(SpecError) as err:
        JobSpec.parse({"problem": "sphere", **data})
    assert field in str(err.value) or "so the job ends" in str(err.value)
    assert "\n" not in str(err.value)
