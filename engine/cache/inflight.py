"""In-flight de-duplication: a candidate one job is computing is not computed again by another.

Jobs that share a cache take a lease on each miss before computing it (:meth:`claim_many`). A job
computes the misses it leased, renewing the leases on a background thread while it does; the
misses another job holds it waits for, polling with backoff until their entries land (the
workers' writeback stores them). A lease ends when its holder releases it or when it expires
because the holder died: a waiter then takes the candidate over. A waiter that has waited
``max_wait_seconds`` (a holder alive but stuck) computes the rest itself.

Only what reaches the cache is shared: a failure that the holder does not cache
(``cache_failures = false``) is computed again by each waiting job, as by any later job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from engine.cache.base import Claim, InferenceCache
from engine.core.evaluation import Evaluation

__all__ = ["SharedEvaluations", "evaluate_once", "lease_owner"]

log = logging.getLogger(__name__)

POLL_FIRST_SECONDS: Final = 0.01
POLL_MAX_SECONDS: Final = 0.25
_POLL_GROWTH: Final = 1.5

Compute = Callable[[list[str]], list[Evaluation]]
"""Evaluates the candidates of the given keys (writing them to the cache) and returns their evaluations."""


def lease_owner(job_id: str) -> str:
    """The lease owner of a job: ``job:<id>``. Not per process, so that a job resumed after a crash
    takes back at once the leases its dead run left (instead of waiting for them to expire)."""
    return f"job:{job_id}"


@dataclass(frozen=True)
class SharedEvaluations:
    """The result of :func:`evaluate_once`: what this job computed and what it read from the cache."""

    computed: dict[str, Evaluation]
    read: dict[str, Evaluation]

    def get(self, key: str) -> Evaluation:
        """The evaluation of ``key``, computed here or read (status ``CACHED``)."""
        return self.computed[key] if key in self.computed else self.read[key]


class _Leases:
    """Holds ``owner``'s leases on ``keys``: renews them every third of their lifetime on a daemon
    thread while the block runs, and releases them at its end."""

    def __init__(self, cache: InferenceCache, keys: list[str], owner: str, lease_seconds: float) -> None:
        self._cache, self._keys, self._owner, self._seconds = cache, keys, owner, lease_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="cache-lease-renewer", daemon=True)

    def _renew(self) -> None:
        while not self._stop.wait(self._seconds / 3):
            try:
                self._cache.claim_many(self._keys, self._owner, self._seconds)
            except Exception:  # adapters do not raise for outages; anything else must not kill a job
                log.exception("inference cache: could not renew %d in-flight leases", len(self._keys))

    def __enter__(self) -> None:
        self._thread.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._cache.release_many(self._keys, self._owner)


def evaluate_once(
    cache: InferenceCache,
    keys: Sequence[str],
    compute: Compute,
    *,
    owner: str,
    lease_seconds: float,
    max_wait_seconds: float,
) -> SharedEvaluations:
    """Evaluate the distinct missing ``keys`` once across the jobs sharing ``cache``.

    Leases what nobody computes and computes it with ``compute`` (holding the leases); then waits
    for the rest, taking over what a dead holder left. Returns every key's evaluation.
    """
    computed: dict[str, Evaluation] = {}
    read: dict[str, Evaluation] = {}

    def settle(pending: list[str]) -> list[str]:
        """Claim ``pending``; read what is stored, compute what is now ours; return the busy rest."""
        states = cache.claim_many(pending, owner, lease_seconds)
        owned = [k for k, s in zip(pending, states, strict=True) if s is Claim.OWNED]
        stored = [k for k, s in zip(pending, states, strict=True) if s is Claim.STORED]
        for key, ev in zip(stored, cache.get_many(stored), strict=True):
            if ev is None:  # expired or unreadable since the claim: compute it here
                owned.append(key)
            else:
                read[key] = ev
        if owned:
            with _Leases(cache, owned, owner, lease_seconds):
                computed.update(zip(owned, compute(owned), strict=True))
        return [k for k, s in zip(pending, states, strict=True) if s is Claim.BUSY]

    busy = settle(list(dict.fromkeys(keys)))
    if not busy:
        return SharedEvaluations(computed, read)
    log.info("inference cache: waiting for %d candidates another job is computing", len(busy))
    deadline = time.monotonic() + max_wait_seconds
    delay = POLL_FIRST_SECONDS
    while busy:
        if time.monotonic() >= deadline:
            log.warning(
                "inference cache: %d candidates another job holds did not arrive in %.0f s; "
                "computing them here",
                len(busy),
                max_wait_seconds,
            )
            computed.update(zip(busy, compute(busy), strict=True))
            break
        time.sleep(delay)
        delay = min(delay * _POLL_GROWTH, POLL_MAX_SECONDS)
        busy = settle(busy)
    return SharedEvaluations(computed, read)
