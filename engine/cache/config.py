"""A picklable description of the inference cache, so every process (workers too) can open it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.cache.base import DEFAULT_MAX_ENTRIES, DEFAULT_NAMESPACE, DEFAULT_TTL_SECONDS, InferenceCache
from engine.cache.factory import open_cache


@dataclass(frozen=True)
class CacheConfig:
    """Where the cache lives and its defaults; ``open()`` makes a client in the calling process."""

    redis_url: str | None
    home: Path
    namespace: str = DEFAULT_NAMESPACE
    ttl_seconds: float = DEFAULT_TTL_SECONDS
    max_entries: int | None = DEFAULT_MAX_ENTRIES
    manage_server: bool = False

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


_OPEN: dict[CacheConfig, InferenceCache] = {}


def process_cache(config: CacheConfig) -> InferenceCache:
    """The cache client for ``config`` in this process, opened once (workers write through it)."""
    cache = _OPEN.get(config)
    if cache is None:
        cache = _OPEN[config] = config.open()
    return cache
