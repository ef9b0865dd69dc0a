"""The inference-cache block: where cached evaluations live (Redis, or the embedded cache)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from engine.cache import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_NAMESPACE,
    DEFAULT_TTL_SECONDS,
    CacheConfig,
    InferenceCache,
)


class InferenceCacheBlock(Block):
    """The inference cache: a Redis URL (kept secret) or the embedded cache, with its defaults.

    ``config()`` gives the picklable :class:`~engine.cache.CacheConfig` that workers open;
    ``get_client()`` opens a cache client in this process (the caller closes it).
    """

    _block_type_name: ClassVar[str | None] = "Refinement Inference Cache"
    _block_type_slug: ClassVar[str | None] = "irefine-inference-cache"

    redis_url: SecretStr | None = Field(
        None,
        description="redis://, rediss://, unix:// or redis+sentinel:// URL; empty: the embedded cache",
    )
    namespace: str = Field(
        DEFAULT_NAMESPACE, min_length=1, description="key prefix: one per deployment sharing a Redis"
    )
    ttl_seconds: float = Field(DEFAULT_TTL_SECONDS, gt=0, description="default time to live of entries")
    max_entries: int | None = Field(DEFAULT_MAX_ENTRIES, ge=1, description="bound of the embedded cache")
    manage_server: bool = Field(False, description="set Redis' eviction policy to allkeys-lru")

    def config(self, home: Path | None = None) -> CacheConfig:
        """The cache description; ``home`` (default: ``IRE_HOME``) holds the embedded cache."""
        if home is None:
            from engine.settings import load_settings

            home = load_settings().home
        return CacheConfig(
            redis_url=self.redis_url.get_secret_value() if self.redis_url is not None else None,
            home=Path(home),
            namespace=self.namespace,
            ttl_seconds=self.ttl_seconds,
            max_entries=self.max_entries,
            manage_server=self.manage_server,
        )

    def get_client(self, home: Path | None = None) -> InferenceCache:
        """A new cache client in this process; the caller owns it and closes it."""
        return self.config(home).open()
