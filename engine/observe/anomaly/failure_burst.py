"""``failure_burst``: a cycle (or the last few pooled) fails a large share of its evaluations, and
improbably so at the job's own failure rate so far (binomial upper tail)."""

from __future__ import annotations

from collections import deque

from engine.core.cycle import CycleRecord
from engine.observe.anomaly.config import DetectorConfig
from engine.observe.anomaly.episodes import Episodes, Evidence
from engine.observe.anomaly.stats import binomial_upper_tail, wilson_bounds


class FailureBursts:
    """The failure-burst rule for one job, and the failure rate it learned."""

    def __init__(self, config: DetectorConfig, episodes: Episodes) -> None:
        self.config = config
        self._episodes = episodes
        self._fail_clean = [config.failure_prior[0], config.failure_prior[1]]  # failures, evaluations
        self._fail_recent: deque[tuple[int, int]] = deque(maxlen=config.failure_window)
        self._fail_held: deque[tuple[int, int, int]] = deque()  # suspect (cycle, failed, evaluations)

    def observe(self, record: CycleRecord) -> Evidence | None:
        """This cycle's burst evidence, or None; learns the cycle into the usual rate when it is not
        suspect (a cycle improbable short of a burst is learned once ``failure_window`` more passed
        without one: a burst's first cycles must not raise the rate its later ones are judged by)."""
        c = self.config
        failures, evaluations = self._fail_clean
        # The upper end of the usual rate's 90% interval: a job seen for a few cycles may fail
        # more often than it has so far, and a handful of failures must not look like a burst.
        usual = failures / evaluations
        rate = wilson_bounds(failures, evaluations)[1]
        self._fail_recent.append((record.failed, record.evaluations))
        evidence = None
        suspect = False  # improbable in some scope (failure_hold_alpha), if short of a burst
        scopes = [(record.failed, record.evaluations, "cycle")]
        pooled_failed = pooled_n = 0
        for cycles, (failed, n) in enumerate(reversed(self._fail_recent), start=1):
            pooled_failed += failed
            pooled_n += n
            if cycles > 1:
                scopes.append((pooled_failed, pooled_n, f"last {cycles} cycles"))
        for failed, n, scope in scopes:
            if n == 0 or failed < c.failure_min_count or failed / n <= c.failure_share_bound:
                continue
            if scope != "cycle" and record.failed / max(record.evaluations, 1) <= rate:
                continue  # the pooled window may only extend a burst this cycle takes part in
            tail = binomial_upper_tail(failed, n, rate)
            suspect = suspect or tail < c.failure_hold_alpha
            if tail < c.failure_alpha:
                evidence = {
                    "message": (
                        f"cycle {record.cycle}: {failed} of {n} evaluations failed ({failed / n:.0%}) "
                        f"over the {scope}, against a usual {usual:.1%}"
                    ),
                    "failed": failed,
                    "evaluations": n,
                    "failure_share": failed / n,
                    "usual_failure_share": usual,
                    "tested_share": rate,
                    "scope": scope,
                    "probability": tail,
                    "bound": c.failure_share_bound,
                }
                break
        # What is learned as the usual rate: not a burst's cycles; a suspect one (short of a burst,
        # improbable all the same) once failure_window more cycles passed without a burst.
        if evidence is not None:
            self._fail_held.clear()  # a burst's first cycles after all
        while self._fail_held and self._fail_held[0][0] <= record.cycle - c.failure_window:
            self._learn_failures(*self._fail_held.popleft()[1:])
        if evidence is None and not self._episodes.is_open("failure_burst"):
            if suspect:
                self._fail_held.append((record.cycle, record.failed, record.evaluations))
            else:
                self._learn_failures(record.failed, record.evaluations)
        return evidence

    def _learn_failures(self, failed: int, evaluations: int) -> None:
        self._fail_clean[0] += failed
        self._fail_clean[1] += evaluations
