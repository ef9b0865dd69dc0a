"""A picklable description of the inference cache, so every process (workers too) can open it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.cache.base import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_NAMESPACE,
    DEFAULT_TTL_SECONDS,
    InferenceCache,
    redact_url,
)
from engine.cache.factory import open_cache

DEFAULT_LEASE_SECONDS = 30.0
DEFAULT_MAX_WAIT_SECONDS = 1800.0


@dataclass(frozen=True, repr=False)
class CacheConfig:
    """Where the cache lives and its defaults; ``open()`` makes a client in the calling process.

    It travels in every Dask task's arguments, so its repr hides the Redis URL's password.
    ``lease_seconds`` is how long an in-flight lease outlives a holder that stopped renewing it
    (a crashed job); ``max_wait_seconds`` how long a job waits for another job's candidates
    before it computes them itself (see :mod:`engine.cache.inflight`).
    """

    redis_url: str | None
    home: Path
    namespace: str = DEFAULT_NAMESPACE
    ttl_seconds: float = DEFAULT_TTL_SECONDS
    max_entries: int | None = DEFAULT_MAX_ENTRIES
    manage_server: bool = False
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    max_wait_seconds: float = DEFAULT_MAX_WAIT_SECONDS

    @classmethod
    def from_settings(cls, settings: Any) -> CacheConfig:
        return cls(
            redis_url=settings.redis_url,
            home=Path(settings.home),
            namespace=settings.cache_namespace,
            ttl_seconds=settings.cache_ttl_seconds,
            max_entries=settings.cache_max_entries,
            manage_server=settings.cache_manage_server,
        )

    def open(self) -> InferenceCache:
        self.home.mkdir(parents=True, exist_ok=True)
        options = {name: getattr(self, name) for name in ("namespace", "ttl_seconds", "max_entries")}
        return open_cache(self.redis_url, self.home, manage_server=self.manage_server, **options)

    def __repr__(self) -> str:
        url = None if self.redis_url is None else redact_url(self.redis_url)
        return (
            f"CacheConfig(redis_url={url!r}, home={self.home!r}, namespace={self.namespace!r}, "
            f"ttl_seconds={self.ttl_seconds!r}, max_entries={self.max_entries!r}, "
            f"manage_server={self.manage_server!r}, lease_seconds={self.lease_seconds!r}, "
            f"max_wait_seconds={self.max_wait_seconds!r})"
        )


_OPEN: dict[CacheConfig, InferenceCache] = {}


def process_cache(config: CacheConfig) -> InferenceCache:
    """The cache client for ``config`` in this process, opened once (workers write through it)."""
    cache = _OPEN.get(config)
    if cache is None:
        cache = _OPEN[config] = config.open()
    return cache
