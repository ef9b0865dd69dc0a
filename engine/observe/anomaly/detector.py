"""The detector: feeds each cycle to every kind's rule, gives the same lack of progress one name
(a stall or a regression), and reports each anomaly once per episode, when it starts."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.core.cycle import CycleRecord
from engine.observe.anomaly.config import DetectorConfig
from engine.observe.anomaly.episodes import ANOMALY_KINDS, Episodes, Evidence, Finding
from engine.observe.anomaly.failure_burst import FailureBursts
from engine.observe.anomaly.regression import Regressions
from engine.observe.anomaly.slow_cycle import slow_cycle_evidence, slow_cycle_message
from engine.observe.anomaly.stall import Stalls
from engine.observe.anomaly.throughput_collapse import (
    throughput_collapse_evidence,
    throughput_collapse_message,
)
from engine.observe.anomaly.timing import TimingNormal


@dataclass
class AnomalyDetector:
    """Stateful detector for one job; call :meth:`observe` with each cycle in order.

    ``maximize``: the job's direction (scores in records are the problem's own; higher is better
    when maximising). ``target`` and ``tolerance`` are the spec's. Not thread-safe. Its state is a
    function of the cycles seen, so :meth:`rebuild` from the stored cycles restores it on resume.
    """

    maximize: bool
    target: float | None = None
    tolerance: float = 0.0
    config: DetectorConfig = field(default_factory=DetectorConfig)

    def __post_init__(self) -> None:
        self._episodes = Episodes()
        self._last_cycle = 0
        self._failures = FailureBursts(self.config, self._episodes)
        self._stalls = Stalls(self.config, self.maximize, self.target, self.tolerance, self._episodes)
        self._regressions = Regressions(self.config, self.maximize, self._episodes)
        self._timing = _TimingKinds(self.config, self._episodes)

    @classmethod
    def rebuild(
        cls,
        cycles: Iterable[CycleRecord],
        *,
        maximize: bool,
        target: float | None = None,
        tolerance: float = 0.0,
        config: DetectorConfig | None = None,
    ) -> AnomalyDetector:
        """A detector in the state it had after ``cycles`` (the stored ones, on resume).

        Their findings were reported when they happened and are dropped; an episode still open at
        the end stays open, so it is not reported twice. The next cycle starts a new process, so
        its timing is not judged.
        """
        detector = cls(maximize, target, tolerance, config or DetectorConfig())
        for record in cycles:
            detector.observe(record)
        detector._timing.skip = 1
        return detector

    @property
    def open_episodes(self) -> list[str]:
        """The kinds whose anomaly is going on now."""
        return [kind for kind, episode in self._episodes.by_kind.items() if episode.open]

    def observe(self, record: CycleRecord) -> list[Finding]:
        """Take one cycle into account; return the anomalies that start with it."""
        if record.cycle <= self._last_cycle:
            raise ValueError(
                f"cycle {record.cycle} observed after cycle {self._last_cycle}: feed cycles in order"
            )
        self._last_cycle = record.cycle
        found: dict[str, Evidence | None] = {
            "failure_burst": self._failures.observe(record),
            "stall": self._stalls.observe(record),
            "regression": self._regressions.observe(record),
        }
        found.update(self._timing.observe(record))
        self._one_name_per_cause(record.cycle, found)
        findings = []
        for kind in ANOMALY_KINDS:
            finding = self._episode(kind, record.cycle, found[kind])
            if finding is not None:
                findings.append(finding)
        return findings

    def _episode(self, kind: str, cycle: int, evidence: Evidence | None) -> Finding | None:
        """A finding if ``evidence`` starts an episode of ``kind``; an episode ends after
        ``clear_cycles`` cycles without evidence."""
        episode = self._episodes.by_kind[kind]
        if evidence is None:
            episode.clear += 1
            if episode.clear >= self.config.clear_cycles:
                episode.open = False
            return None
        episode.clear = 0
        if episode.open:
            return None
        episode.open = True
        message = str(evidence.pop("message"))
        return Finding(kind, cycle, message, evidence)

    def _one_name_per_cause(self, cycle: int, found: dict[str, Evidence | None]) -> None:
        """Drop a new stall or regression that the other kind's open episode explains.

        A search that lost ground makes no progress either, and a stalled population's batch
        bests wander and, when it moves again, spread wider than they did while it was stuck:
        each episode's symptoms look like the other kind for a while. The first one named
        is the cause; the other is not reported while it is open, nor (a regression) for
        ``stall_quiet_cycles`` after a stall ended. Nor is a stall named on a cycle whose batch
        best is a regression suspect: a regression may be starting, and its first batches are
        what made the stall tests see the trend lost.
        """
        episodes = self._episodes
        stall, regression = episodes.by_kind["stall"], episodes.by_kind["regression"]
        if stall.open:
            episodes.stall_ended = cycle
        if regression.open:
            episodes.regression_ended = cycle
        if (
            not stall.open
            and found["stall"] is not None
            and (regression.open or found["regression"] or self._regressions.suspect_now)
        ):
            found["stall"] = None
        ended = episodes.stall_ended
        quiet = ended is not None and cycle - ended <= self.config.stall_quiet_cycles
        if not regression.open and found["regression"] is not None and (stall.open or quiet):
            found["regression"] = None


class _TimingKinds:
    """``slow_cycle`` and ``throughput_collapse``: each judged on the same learned normal, called in
    ``m`` of the last ``m + 1`` cycles or, at a milder excess, in ``timing_sustained_cycles`` in a row."""

    def __init__(self, config: DetectorConfig, episodes: Episodes) -> None:
        self.config = config
        self._episodes = episodes
        self._normal = TimingNormal(config)
        self.skip = 1  # the first cycle of a run pays for imports and worker start
        self._verdicts: dict[str, deque[bool]] = {"slow_cycle": deque(), "throughput_collapse": deque()}
        self._sustained: dict[str, deque[bool]] = {
            kind: deque(maxlen=config.timing_sustained_cycles) for kind in self._verdicts
        }

    def observe(self, record: CycleRecord) -> dict[str, Evidence | None]:
        c = self.config
        out: dict[str, Evidence | None] = {"slow_cycle": None, "throughput_collapse": None}
        absolute = c.max_cycle_seconds is not None and record.duration > c.max_cycle_seconds
        computed = record.evaluations - record.cached
        if record.duration <= 0:
            return out
        log_d = math.log(record.duration)
        log_tp = math.log(computed / record.duration) if computed > 0 else None
        log_cost = (
            math.log(record.eval_seconds / computed) if computed > 0 and record.eval_seconds > 0 else None
        )
        slow = collapse = mild_slow = mild_collapse = None
        if self.skip:
            self.skip -= 1
        elif len(self._normal.duration) >= c.timing_warmup and record.duration >= c.timing_min_seconds:
            excess = self._normal.excess(log_d, log_tp, log_cost)
            slow = slow_cycle_evidence(excess, c.timing_z)
            collapse = throughput_collapse_evidence(excess, c.timing_z)
            mild_slow = slow or slow_cycle_evidence(excess, c.timing_sustained_z)
            mild_collapse = collapse or throughput_collapse_evidence(excess, c.timing_sustained_z)
            if slow is None and collapse is None:
                self._normal.learn(log_d, log_tp, log_cost)
        else:
            self._normal.learn(log_d, log_tp, log_cost)
        for kind, evidence, mild, needed, message in (
            ("slow_cycle", slow, mild_slow, c.timing_cycles, slow_cycle_message),
            ("throughput_collapse", collapse, mild_collapse, c.collapse_cycles, throughput_collapse_message),
        ):
            # m of the last m + 1 cycles: a slowed job still has the odd normal-looking cycle.
            recent = self._verdicts[kind]
            recent.append(evidence is not None)
            while len(recent) > needed + 1:
                recent.popleft()
            # ...or a milder excess in timing_sustained_cycles cycles in a row: a job whose timing
            # is noisy (or had spikes in its learned window) hides a lasting x2-3 within 3.5
            # deviations, but not cycle after cycle; a milder one also keeps an episode open.
            sustained = self._sustained[kind]
            sustained.append(mild is not None)
            lasting = len(sustained) == sustained.maxlen and all(sustained)
            episode = self._episodes.by_kind[kind]
            episode.run = sum(recent)
            if evidence and episode.run >= needed:
                out[kind] = {"message": message(record.cycle, episode.run, evidence), **evidence}
            elif mild and lasting:
                out[kind] = {"message": message(record.cycle, len(sustained), mild), **mild}
            elif mild and episode.open:
                out[kind] = {"message": ""}  # still going on: keep the episode open
        if absolute and out["slow_cycle"] is None:
            out["slow_cycle"] = {
                "message": (
                    f"cycle {record.cycle} took {record.duration:.3g} s, "
                    f"over the bound of {c.max_cycle_seconds:g} s"
                ),
                "duration": record.duration,
                "bound": c.max_cycle_seconds,
            }
        return out
