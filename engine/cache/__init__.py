"""The inference cache: evaluations of candidates keyed by problem, version and fingerprint.

One port, :class:`InferenceCache`, with two adapters: :class:`RedisCache` (``IRE_REDIS_URL``) and
:class:`EmbeddedCache` (a SQLite file under ``IRE_HOME``, the default). :func:`open_cache` picks
one; :func:`cache_key` builds the keys. Values are JSON, never pickle.
"""

from engine.cache.base import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_NAMESPACE,
    DEFAULT_TTL_SECONDS,
    CacheStats,
    CacheUnavailableError,
    Claim,
    InferenceCache,
    cache_key,
    decode_evaluation,
    encode_evaluation,
    key_prefix,
    redact_url,
)
from engine.cache.config import CacheConfig, process_cache
from engine.cache.embedded import EmbeddedCache
from engine.cache.factory import open_cache
from engine.cache.redis_cache import RedisCache

__all__ = [
    "CacheConfig",
    "process_cache",
    "InferenceCache",
    "CacheStats",
    "CacheUnavailableError",
    "Claim",
    "RedisCache",
    "EmbeddedCache",
    "open_cache",
    "cache_key",
    "key_prefix",
    "encode_evaluation",
    "decode_evaluation",
    "redact_url",
    "DEFAULT_NAMESPACE",
    "DEFAULT_TTL_SECONDS",
    "DEFAULT_MAX_ENTRIES",
]
