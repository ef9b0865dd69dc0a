"""Opens the inference cache an address names: the Redis adapter, or the embedded one.

Kept out of ``base.py`` (the port) because it imports the adapters, which import the port.
"""

from __future__ import annotations

from pathlib import Path

from engine.cache.base import DEFAULT_MAX_ENTRIES, DEFAULT_NAMESPACE, DEFAULT_TTL_SECONDS, InferenceCache

__all__ = ["open_cache"]


def open_cache(
    redis_url: str | None,
    home: Path,
    *,
    namespace: str = DEFAULT_NAMESPACE,
    ttl_seconds: float = DEFAULT_TTL_SECONDS,
    max_entries: int | None = DEFAULT_MAX_ENTRIES,
    max_bytes: int | None = None,
    manage_server: bool = False,
) -> InferenceCache:
    """The Redis cache at ``redis_url``, or the embedded cache in ``home/cache.sqlite`` if it is None.

    ``max_entries`` and ``max_bytes`` bound the embedded cache only (Redis is bounded by its own
    ``maxmemory``); ``manage_server`` lets the Redis adapter set an LRU eviction policy.
    """
    if redis_url:
        from engine.cache.redis_cache import RedisCache

        return RedisCache(
            redis_url, namespace=namespace, default_ttl_seconds=ttl_seconds, manage_server=manage_server
        )
    from engine.cache.embedded import EmbeddedCache

    return EmbeddedCache(
        Path(home) / "cache.sqlite",
        namespace=namespace,
        default_ttl_seconds=ttl_seconds,
        max_entries=max_entries,
        max_bytes=max_bytes,
    )
