"""Scores the anomaly detector (``engine.observe.anomaly``) on labelled synthetic runs.

Each run is a job's per-cycle series (``CycleRecord`` s) drawn from a fixed seed:

- **normal** behaviour, in every run: cycle times with log-normal noise (3-25%), a slow first
  cycle, a slow drift, GC-like single-cycle spikes (x1.5-4), a share of cache hits in some runs;
  evaluation costs that vary a little per cycle; a background failure rate of 0-8%; convergence
  ``floor + A * exp(-rate * t)`` with log-normal batch-best noise of sd 0.1-0.9 and a rate of
  0.1-1 times that a cycle (what CMA-ES showed on sphere, rosenbrock and ackley in dim 3-30 with
  batches of 8-64), and the odd single bad batch (x2-6); half the runs maximise, half have a
  target (and stop when they reach it, like the engine); a cycle failing more than the spec's
  ``max_failure_share`` ends the run, like the engine.
- **injected** episodes, in half the runs, one kind each, at a random cycle:
  ``stall`` (the population freezes, wandering with the same noise or collapsed to a point,
  while 20-80% of the way is left, for 12-30 cycles and at least long enough to cost three times
  the batch noise in progress, or to the end of the run),
  ``failure_burst`` (30-90% of evaluations fail for 2-6 cycles), ``slow_cycle`` (each evaluation
  costs 2-5x as much for 3-15 cycles), ``throughput_collapse`` (the executor is idle: wall time
  x2-6 for 3-15 cycles, evaluation cost unchanged) and ``regression`` (the batch bests lose
  ground: their gap to the floor grows by 4-8 batch-noise deviations, in log, and at least
  doubles, and makes no progress for 3-10 cycles).

A finding is a hit when it is the first of its kind within an episode of that kind (from its
onset to 3 cycles after its end); a second one there is a duplicate; anything else is a false
alarm. Precision counts duplicates and false alarms against the detector; recall is per episode;
false alarms are per 100 cycles outside every episode window; the delay is the detection cycle
minus the onset (a stall cannot be called before ``stall_cycles`` cycles have passed, so its
delay is at least 5: the per-kind breakdown shows it).

Audit (2026-11-27), kept as it was: the labels are what a user would call an anomaly (a stall
costs at least three batch-noise deviations of progress, or runs to the end; a regression at
least doubles the gap and is 4-8 deviations of the batch noise); scoring is the usual
episode-level recall with precision over findings. A finding of another kind during an episode
(``cross_kind``, e.g. a stall called during a regression, which does make no progress) counts
against precision: it names the wrong cause and sets off the wrong remedy (``restart_on_stall``).
One blind spot makes the default data easier than real jobs: normal runs converge at a steady
rate for ever, where a real job without a target spends its last cycles at a floor (a local
minimum, a noisy objective). ``--plateau SHARE`` levels that share of the normal runs off at
0.1-10% of their first gap, without a target; the default (0) keeps the figures comparable, and
any rule that calls a hovering job "stalled" must be checked with it (bench/README.md).
Second audit (2026-11-27, later), labels and scoring unchanged: the misses looked at (stalls and
regressions of seeds 1, 2 and the default) are anomalies by the definitions above, not labelling
errors. The default seed is one of the easier draws: judge a change on other seeds too
(``--seed 7``, ``11``, ``12345``), where the same detector scores 0.01-0.04 lower.
Third audit (2026-11-27, second round), labels and scoring unchanged: the ``throughput_collapse``
false alarms looked at (the default seed and seeds 1-3) are normal runs whose GC-like spikes fell
in 3 or 4 of 4 cycles (at up to 5% a cycle, a few runs in 300): normal by the definition above,
not a labelling error, and a floor under that kind's precision. The stalls without a target
missed to the end of a long run (e.g. ``--seed 1``, run 3) struck while the best already moved
slowly: stalls by the definition (20-80% of the way left), which without a target only the batch
noise (how wide the batch bests still spread) tells from a floor.
Fourth audit (2026-11-27, session 6), one labelling change: an episode that the job's reaching
its target cut shorter than its kind's shortest (``SHORTEST``: a throughput collapse of 1-2 cycles,
a slow cycle of 1-2) is *unscored*: neither a hit nor a miss, its cycles not normal, a finding of
its kind in its window not a false alarm. One slow cycle at the end of a run is what the normal
runs' GC-like spikes are too, so labelling it an anomaly contradicted the definition of normal
above. Such episodes are rare (none in the default run, 4-10 in 2,400 runs); every other episode is
still scored, a burst that failed the job on its first cycle included. The JSON line counts them
(``unscored_episodes``, ``unscored_findings``).

Progress goes to stderr; the last stdout line is one JSON object. From the repository root::

    .venv/bin/python bench/anomaly.py              # 600 runs, ~10 s
    .venv/bin/python bench/anomaly.py --runs 100 --seed 7
    .venv/bin/python bench/anomaly.py --plateau 0.5    # half the normal runs level off
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.core import CycleRecord  # noqa: E402  (after the path set-up above)
from engine.observe.anomaly import ANOMALY_KINDS, AnomalyDetector, DetectorConfig  # noqa: E402

GRACE_CYCLES = 3
"""A finding up to this many cycles after an episode's end still counts as detecting it."""

SHORTEST = {"failure_burst": 2, "stall": 12, "regression": 3, "slow_cycle": 3, "throughput_collapse": 3}
"""The fewest cycles an injected episode of each kind lasts, unless the run ends first."""


@dataclass(frozen=True)
class Episode:
    """An injected anomaly: its kind and the cycles it spans (inclusive)."""

    kind: str
    onset: int
    end: int


@dataclass
class Run:
    """One synthetic job: what the detector is told, and the truth."""

    maximize: bool
    target: float | None
    tolerance: float
    records: list[CycleRecord] = field(default_factory=list)
    episodes: list[Episode] = field(default_factory=list)
    unscored: list[Episode] = field(default_factory=list)
    """Episodes the job's reaching its target cut shorter than their kind's shortest (SHORTEST)."""


def _binomial(rng: random.Random, n: int, p: float) -> int:
    return sum(1 for _ in range(n) if rng.random() < p)


def synthetic_run(rng: random.Random, kind: str | None, plateau_share: float = 0.0) -> Run:
    """One run with realistic noise, and an injected episode of ``kind`` unless None; a normal run
    levels off at a plateau with probability ``plateau_share`` (see ``--plateau``)."""
    cycles = rng.randint(40, 120)
    batch = rng.choice([8, 16, 16, 32, 64, 128, 256])
    workers = rng.choice([1, 2, 4, 8])
    cost = 10 ** rng.uniform(-2.5, 0.5)  # seconds per evaluation
    overhead_share = rng.uniform(0.02, 0.3)
    noise = rng.uniform(0.03, 0.25)
    drift = rng.uniform(-0.004, 0.008)  # log duration per cycle (e.g. a strategy whose tell grows)
    spike_p = rng.uniform(0.0, 0.05)
    hit_rate = rng.uniform(0.0, 0.3) if rng.random() < 0.2 else 0.0
    fail_rate = 0.0 if rng.random() < 0.5 else rng.uniform(0.005, 0.08)
    max_failure_share = 0.5 if rng.random() < 0.7 else 1.0
    # Batch-best noise (sd of log gap) and convergence rate per cycle as CMA-ES showed them on
    # sphere, rosenbrock and ackley (dim 3-30, batch 8-64): noise 0.07-1.3, rate/noise 0.1-1.
    spread = rng.uniform(0.1, 0.9)
    rate = min(1.0, spread * 10 ** rng.uniform(-1, 0))
    scale = 10 ** rng.uniform(-1, 3)
    floor = rng.uniform(-scale, scale)
    bad_batch_p = rng.uniform(0.0, 0.04)
    maximize = rng.random() < 0.5
    tolerance = 0.0 if rng.random() < 0.8 else 1e-4 * scale
    target_loss = None
    if rng.random() < 0.5:
        target_loss = floor + scale * math.exp(-rate * rng.uniform(0.6, 1.5) * cycles)
    plateau = 0.0  # the gap levels off here (share of the first): a local minimum, a noisy objective
    if plateau_share and kind is None and rng.random() < plateau_share:
        plateau, target_loss = 10 ** rng.uniform(-3, -1), None  # no target: it would be out of reach
    sign = -1.0 if maximize else 1.0
    run = Run(maximize, None if target_loss is None else sign * target_loss, tolerance)

    episode = None
    collapsed = False  # a stall where the population collapsed to a point (else it wanders)
    if kind is not None:
        if kind == "stall":
            # While 20-80% of the gap is left; long enough that the progress it costs (rate *
            # length in log gap) is three times the batch noise (a shorter one cannot be told
            # from a run of unlucky batches); half of them last to the end of the run.
            # (so the rate and noise follow from where the stall strikes, in the same ratio)
            onset = rng.randint(6, 30)
            rate = -math.log(rng.uniform(0.2, 0.8)) / onset
            spread = min(0.9, max(0.1, rate * 10 ** rng.uniform(0, 1)))
            length = max(rng.randint(12, 30), math.ceil(3 * spread / rate))
            if rng.random() < 0.5:
                length = max(length, cycles)
            cycles = max(cycles, min(onset + length + 5, 250))
            collapsed = rng.random() < 0.5
        else:
            latest = cycles - 12
            if kind == "regression":  # before the job has closed in on its floor to 1e-4 of the gap
                latest = max(10, min(latest, int(math.log(1e4) / rate)))
            onset = rng.randint(10, latest)
            length = {"failure_burst": rng.randint(2, 6), "regression": rng.randint(3, 10)}.get(
                kind, rng.randint(3, 15)
            )
        episode = Episode(kind, onset, min(onset + length - 1, cycles))
        factor = {
            "failure_burst": rng.uniform(0.3, 0.9),
            "slow_cycle": rng.uniform(2, 5),
            "throughput_collapse": rng.uniform(2, 6),
            "regression": math.exp(max(math.log(2), spread * rng.uniform(4, 8))),
        }.get(kind, 1.0)

    best = math.inf
    reached = False  # the job stopped at its target
    progress_t = 0.0  # convergence clock: stands still during a stall
    for cycle in range(1, cycles + 1):
        active = episode is not None and episode.onset <= cycle <= episode.end
        active_kind = episode.kind if active and episode is not None else None
        if active_kind not in ("stall", "regression"):
            progress_t += 1.0  # a stalled or set-back search makes no progress meanwhile
        gap = scale * (math.exp(-rate * progress_t) + plateau)
        # evaluations
        cached = _binomial(rng, batch, hit_rate) if hit_rate else 0
        computed = batch - cached
        p_fail = factor if active_kind == "failure_burst" else fail_rate
        failed = _binomial(rng, computed, p_fail)
        # timing
        per_eval = cost * math.exp(rng.gauss(0, noise / 2))
        if active_kind == "slow_cycle":
            per_eval *= factor
        compute = math.ceil(computed / workers) * per_eval
        duration = (compute + overhead_share * math.ceil(batch / workers) * cost) * math.exp(
            rng.gauss(0, noise) + drift * cycle
        )
        if cycle == 1:
            duration *= rng.uniform(1.0, 4.0)
        if rng.random() < spike_p:
            duration *= rng.uniform(1.5, 4.0)
        if active_kind == "throughput_collapse":
            duration *= factor
        eval_seconds = computed * per_eval * math.exp(rng.gauss(0, 0.03))
        # scores
        batch_loss = None
        if failed < batch:
            level = gap * (factor if active_kind == "regression" else 1.0)
            batch_noise = spread / 10 if active_kind == "stall" and collapsed else spread
            batch_loss = floor + level * math.exp(rng.gauss(0, batch_noise))
            if rng.random() < bad_batch_p:
                batch_loss = floor + level * rng.uniform(2, 6)
        improved = batch_loss is not None and batch_loss < best - tolerance
        if batch_loss is not None and batch_loss < best:
            best = batch_loss
        run.records.append(
            CycleRecord(
                cycle=cycle,
                evaluations=batch,
                failed=failed,
                cached=cached,
                batch_best_score=None if batch_loss is None else sign * batch_loss,
                best_score=None if best == math.inf else sign * best,
                improved=improved,
                duration=duration,
                eval_seconds=eval_seconds,
            )
        )
        if failed / batch > max_failure_share:
            break  # the engine fails the job
        if target_loss is not None and best <= target_loss:
            reached = True
            break  # target reached: the job stops
    if episode is not None and episode.onset <= len(run.records):
        cut = Episode(episode.kind, episode.onset, min(episode.end, len(run.records)))
        # A job that reached its target cut the episode short, for a reason of its own: one
        # slow cycle at the end is what the normal runs' GC-like spikes are too.
        short = reached and cut.end - cut.onset + 1 < SHORTEST[cut.kind]
        (run.unscored if short else run.episodes).append(cut)
    return run


def synthetic_runs(count: int, seed: int, plateau_share: float = 0.0) -> list[Run]:
    """``count`` runs, half normal and half with one injected episode (kinds in turn)."""
    runs = []
    for i in range(count):
        rng = random.Random(seed * 1_000_003 + i)
        kind = None if i % 2 == 0 else ANOMALY_KINDS[(i // 2) % len(ANOMALY_KINDS)]
        runs.append(synthetic_run(rng, kind, plateau_share))
    return runs


def _p50(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def score(runs: Sequence[Run], config: DetectorConfig | None = None) -> dict[str, Any]:
    """Run the detector over ``runs`` and score its findings against the injected episodes."""
    hits = duplicates = cross_kind = false_alarms = normal_cycles = unscored_findings = 0
    delays: list[int] = []
    per_kind = {
        k: {"episodes": 0, "detected": 0, "findings": 0, "false_alarms": 0, "delays": []}
        for k in ANOMALY_KINDS
    }
    for run in runs:
        detector = AnomalyDetector(run.maximize, run.target, run.tolerance, config or DetectorConfig())
        findings = [f for record in run.records for f in detector.observe(record)]
        windows = [(e, e.onset, e.end + GRACE_CYCLES) for e in run.episodes]
        unscored = [(e, e.onset, e.end + GRACE_CYCLES) for e in run.unscored]
        covered = {c for _, lo, hi in windows + unscored for c in range(lo, hi + 1)}
        normal_cycles += sum(1 for r in run.records if r.cycle not in covered)
        detected: set[Episode] = set()
        for e in run.episodes:
            per_kind[e.kind]["episodes"] += 1
        for f in findings:
            if any(e.kind == f.kind and lo <= f.cycle <= hi for e, lo, hi in unscored):
                unscored_findings += 1  # neither a hit nor a false alarm
                continue
            per_kind[f.kind]["findings"] += 1
            episode = next((e for e, lo, hi in windows if e.kind == f.kind and lo <= f.cycle <= hi), None)
            if episode is None:
                per_kind[f.kind]["false_alarms"] += 1
                if f.cycle in covered:
                    cross_kind += 1  # during another kind's episode: a real anomaly, misnamed
                else:
                    false_alarms += 1
            elif episode in detected:
                duplicates += 1
            else:
                detected.add(episode)
                hits += 1
                delays.append(f.cycle - episode.onset)
                per_kind[f.kind]["detected"] += 1
                per_kind[f.kind]["delays"].append(f.cycle - episode.onset)
    episodes = sum(len(r.episodes) for r in runs)
    findings_total = hits + duplicates + cross_kind + false_alarms
    breakdown = {
        k: {
            "episodes": v["episodes"],
            "recall": v["detected"] / v["episodes"] if v["episodes"] else None,
            "precision": v["detected"] / v["findings"] if v["findings"] else None,
            "false_alarms": v["false_alarms"],
            "delay_cycles_p50": _p50(v["delays"]),
        }
        for k, v in per_kind.items()
    }
    return {
        "precision": hits / findings_total if findings_total else 1.0,
        "recall": hits / episodes if episodes else 1.0,
        "false_alarms_per_100_normal_cycles": 100.0 * false_alarms / max(normal_cycles, 1),
        "detection_delay_cycles_p50": _p50(delays),
        "episodes": episodes,
        "findings": findings_total,
        "duplicates": duplicates,
        "cross_kind": cross_kind,
        "false_alarms": false_alarms,
        "unscored_episodes": sum(len(r.unscored) for r in runs),
        "unscored_findings": unscored_findings,
        "normal_cycles": normal_cycles,
        "cycles": sum(len(r.records) for r in runs),
        "per_kind": breakdown,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=600, help="synthetic runs (half of them normal)")
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument(
        "--plateau",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of normal runs that level off at 0.1-10%% of their first gap (stress test)",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    runs = synthetic_runs(args.runs, args.seed, args.plateau)
    generated = time.perf_counter()
    report = score(runs)
    scored = time.perf_counter()
    cycles = report["cycles"]
    print(
        f"[anomaly] {args.runs} runs, {cycles} cycles: generated in {generated - started:.1f} s, "
        f"scored in {scored - generated:.1f} s ({1e6 * (scored - generated) / cycles:.0f} us a cycle)",
        file=sys.stderr,
    )
    for kind, row in report["per_kind"].items():
        print(f"[anomaly] {kind:<20} {row}", file=sys.stderr)
    print(
        json.dumps(
            {
                "bench": "anomaly",
                "precision": round(report.pop("precision"), 4),
                "recall": round(report.pop("recall"), 4),
                "false_alarms_per_100_normal_cycles": round(
                    report.pop("false_alarms_per_100_normal_cycles"), 4
                ),
                "detection_delay_cycles_p50": report.pop("detection_delay_cycles_p50"),
                **report,
                "runs": args.runs,
                "seed": args.seed,
                "plateau_share": args.plateau,
                "us_per_cycle": round(1e6 * (scored - generated) / cycles, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
