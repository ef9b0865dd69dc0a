"""Small user problems used by the tests (importable on Dask workers as tests.problems_for_tests)."""

from __future__ import annotations

import math
import os
import time
from typing import Any

from engine import Choice, Evaluation, Float, Int


class Flaky:
    """Fails (raises, NaN or inf) for a deterministic share of candidates; otherwise x**2 + n."""

    space = {"x": Float(-1, 1), "n": Int(0, 3), "mode": Choice(["a", "b"])}
    version = "1"

    def __init__(self, fail_every: int = 4) -> None:
        self.fail_every = fail_every

    def evaluate(self, candidate: Any) -> float | Evaluation:
        bucket = int(abs(candidate["x"]) * 1000) % self.fail_every if self.fail_every else 1
        if bucket == 0:
            raise ValueError("boom")
        if bucket == 1 and self.fail_every > 2:
            return math.nan
        return Evaluation(candidate["x"] ** 2 + candidate["n"], metrics={"mode": candidate["mode"]})


class Slow:
    """x**2 after sleeping ``ms`` milliseconds: long enough to kill a process mid-cycle."""

    space = {"x": Float(-2, 2), "y": Float(-2, 2)}

    def __init__(self, ms: float = 50.0) -> None:
        self.ms = ms

    def evaluate(self, candidate: Any) -> float:
        time.sleep(self.ms / 1000)
        return (candidate["x"] - 0.3) ** 2 + (candidate["y"] + 0.1) ** 2


class WorkerPid:
    """Returns the worker's process id as a metric (to see where evaluations ran)."""

    space = {"x": Float(0, 1)}

    def evaluate(self, candidate: Any) -> Evaluation:
        time.sleep(0.02)
        return Evaluation(candidate["x"], metrics={"pid": os.getpid()})


class Logged:
    """Sleeps ``ms`` and appends each evaluated candidate to the file ``log`` (to count real work)."""

    space = {"x": Float(-2, 2), "y": Float(-2, 2)}
    version = "1"

    def __init__(self, log: str, ms: float = 60.0, version: str = "1") -> None:
        self.log, self.ms, self.version = log, ms, version

    def evaluate(self, candidate: Any) -> float:
        time.sleep(self.ms / 1000)
        with open(self.log, "a") as fh:
            fh.write(f"{candidate['x']!r},{candidate['y']!r}\n")
        return (candidate["x"] - 0.3) ** 2 + (candidate["y"] + 0.1) ** 2


class Tiny:
    """Two possible candidates: batches of random search repeat them."""

    space = {"n": Int(0, 1)}

    def evaluate(self, candidate: Any) -> float:
        time.sleep(0.002)
        return float(candidate["n"])


_HOARD: list[bytes] = []


class Leaky:
    """x after ``ms`` of sleep; the first evaluation with x > 0.5 (the one that creates the file
    ``marker``, across all workers) keeps ``leak_mb`` MiB and waits, as a leaking evaluation
    would, for the worker's nanny to restart the worker. The file holds that worker's pid."""

    space = {"x": Float(0, 1)}

    def __init__(self, marker: str, leak_mb: int = 700, ms: float = 5.0) -> None:
        self.marker, self.leak_mb, self.ms = marker, leak_mb, ms

    def evaluate(self, candidate: Any) -> float:
        time.sleep(self.ms / 1000)
        if candidate["x"] > 0.5:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return float(candidate["x"])
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            _HOARD.append(b"\x01" * (self.leak_mb << 20))  # written, so resident
            time.sleep(30)  # the nanny restarts the worker long before this ends
        return float(candidate["x"])


class BrokenOnWorker:
    """Builds in the flow's process but raises when built on a Dask worker, appending a line to
    the file ``counter`` each time it is tried there (to count retries)."""

    space = {"x": Float(0, 1)}

    def __init__(self, counter: str) -> None:
        from distributed import get_worker

        try:
            get_worker()
        except ValueError:  # not on a Dask worker
            return
        with open(counter, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        raise RuntimeError("the licence server is unreachable from this worker")

    def evaluate(self, candidate: Any) -> float:
        return float(candidate["x"])
