"""The Prefect server environment for two or more API replicas: every in-memory default on Redis.

One definition for every topology that runs several replicas: `irefine cluster` on one machine and
the Kubernetes manifests under deployments/k8s/ (a test checks that their env equals this mapping).
"""

from __future__ import annotations

# Settings that default to in-memory and must be shared once a second replica or services process
# exists (notes/prefect-3.9-facts.md section 10): events messaging and its cache, causal ordering,
# concurrency leases and the worker-channel cleanup queue live in Redis through prefect-redis.
HA_REDIS_MODULES: dict[str, str] = {
    "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
    "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
    "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
    "PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE": "prefect_redis.cleanup_queue",
}

# The two settings that carry the Redis address: prefect-redis's connection, and Docket's (the
# perpetual services' task queue; with memory:// every replica would keep a private one).
REDIS_URL_SETTINGS: tuple[str, ...] = ("PREFECT_REDIS_MESSAGING_URL", "PREFECT_SERVER_DOCKET_URL")


def ha_server_settings(redis_url: str) -> dict[str, str]:
    """The environment of each API replica and services process, with Redis at ``redis_url``."""
    if not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"redis_url must be a redis://, rediss:// or unix:// URL, not {redis_url!r}")
    return {**HA_REDIS_MODULES, **dict.fromkeys(REDIS_URL_SETTINGS, redis_url)}
