"""Settings read from the environment (prefix ``IRE_``); read when asked for, never at import."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.cache.base import DEFAULT_MAX_ENTRIES, DEFAULT_NAMESPACE, DEFAULT_TTL_SECONDS
from engine.core.errors import SpecError


class Settings(BaseSettings):
    """Where the engine keeps its data and which services it talks to."""

    # An empty variable (IRE_METRICS_PORT=) means unset, as in most tools.
    model_config = SettingsConfigDict(env_prefix="IRE_", extra="ignore", env_ignore_empty=True)

    home: Path = Field(default_factory=lambda: Path.home() / ".irefine", description="data folder")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in IRE_HOME")
    database_replica_url: str | None = Field(
        None,
        description="read replica for lag-tolerant reads; with several shards, a comma-separated list "
        "of one replica per shard, in shard order",
    )
    database_shards: str | None = Field(
        None,
        description="comma-separated primary URLs of the shards jobs are spread over by a hash of "
        "their id; keep the list as it is once jobs exist. Default: IRE_DATABASE_URL alone",
    )
    database_partitions: int = Field(
        8,
        ge=0,
        le=1024,
        description="hash partitions of the growing tables when the store creates them, or rebuilds "
        "plain ones, on PostgreSQL; 0: plain tables",
    )
    database_retry_seconds: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="how long a PostgreSQL store call retries a refused or reset connection or a "
        "read-only session (a restart, a promotion) before it fails; 0: no retry",
    )
    dask_address: str | None = Field(None, description="existing Dask scheduler; default: a LocalCluster")
    dask_workers: int | None = Field(None, ge=1, description="LocalCluster workers; default: CPU count")
    dask_worker_memory: str | None = Field(
        None,
        description="memory limit of each LocalCluster worker, e.g. '2GiB'; its nanny restarts a worker "
        "past 95% of it. Default: 80% of this machine's memory shared among the workers",
    )
    redis_url: str | None = Field(None, description="inference cache; default: the embedded cache")
    cache_namespace: str = Field(
        DEFAULT_NAMESPACE, description="key prefix: one per deployment sharing a Redis"
    )
    cache_ttl_seconds: float = Field(DEFAULT_TTL_SECONDS, gt=0, description="default time to live of entries")
    cache_max_entries: int | None = Field(
        DEFAULT_MAX_ENTRIES, ge=1, description="bound of the embedded cache"
    )
    cache_manage_server: bool = Field(False, description="set Redis' eviction policy to allkeys-lru")
    notify_webhook_url: str | None = Field(
        None, description="webhook the automations notify through (irefine setup --notify-webhook)"
    )
    result_storage: str | None = Field(
        None,
        description="Prefect block slug for persisted stage results, e.g. 'redis-database/irefine' or "
        "'azure-blob-storage-container/results'; default: Prefect's local storage",
    )

    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="serve Prometheus metrics on this port while a job runs; 0/unset: off",
    )
    metrics_addr: str = Field("127.0.0.1", description="address the metrics endpoint listens on")
    log_format: Literal["text", "json"] = Field("text", description="console log lines: text or JSON")
    secret_key: SecretStr | None = Field(
        None,
        description="key that signs checkpoints (16+ characters, the same on every machine sharing a "
        "store); default: the key file IRE_HOME/secret.key, made on first use",
    )
    secret_key_block: str | None = Field(
        None, description="name of a Prefect Secret block holding the signing key (wins over IRE_SECRET_KEY)"
    )
    problem_modules: str = Field(
        "",
        description="comma-separated module prefixes that specs from deployment runs may import "
        "problems from (built-ins and entry-point plug-ins are always allowed)",
    )

    @field_validator("secret_key")
    @classmethod
    def _key_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("give a key of 16 or more characters, e.g. from `openssl rand -hex 32`")
        return value

    @field_validator("problem_modules")
    @classmethod
    def _module_prefixes(cls, value: str) -> str:
        for prefix in (p.strip() for p in value.split(",")):
            if prefix and not _MODULE_PREFIX.fullmatch(prefix):
                raise ValueError(f"{prefix!r} is not a module name: write e.g. mycompany.problems,lab")
        return value

    def problem_module_prefixes(self) -> tuple[str, ...]:
        """The allow-listed module prefixes of ``problem_modules``."""
        return tuple(p.strip() for p in self.problem_modules.split(",") if p.strip())

    @field_validator("dask_worker_memory")
    @classmethod
    def _memory_size(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from dask.utils import parse_bytes  # only when set: dask is a heavy import

        try:
            size = parse_bytes(value.strip())
        except ValueError:
            size = 0
        if not _MEMORY_SIZE.fullmatch(value.strip()) or size <= 0:
            raise ValueError("write a positive size such as 2GiB, 1500MB or 800000000")
        return value.strip()

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.home / 'irefine.db'}"

    def database_shard_urls(self) -> list[str]:
        """The shards' primary URLs in shard order: IRE_DATABASE_SHARDS, else the one database."""
        if not self.database_shards:
            return [self.resolved_database_url()]
        shards = _split_urls(self.database_shards)
        if self.database_url and self.database_url.strip() != shards[0]:
            raise SpecError(
                "IRE_DATABASE_URL must be unset or the first URL of IRE_DATABASE_SHARDS (the shards' list)"
            )
        return shards

    def database_replica_urls(self, shard_count: int) -> list[str | None]:
        """The replica of each of ``shard_count`` shards (``None``: reads go to the primary)."""
        if not self.database_replica_url:
            return [None] * shard_count
        replicas = _split_urls(self.database_replica_url)
        if len(replicas) != shard_count:
            raise SpecError(
                f"IRE_DATABASE_REPLICA_URL lists {len(replicas)} replicas for {shard_count} shards: "
                "give one per shard in IRE_DATABASE_SHARDS order, or none"
            )
        return list(replicas)


_MODULE_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_MEMORY_SIZE = re.compile(r"\d+(\.\d+)?\s*([kKmMgGtT]i?[bB]?|[bB])?")
# A comma that starts the next URL (a multi-host URL, H1:P1,H2:P2, has commas of its own).
_URL_SEPARATOR = re.compile(r"\s*,\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def _split_urls(value: str) -> list[str]:
    return [part.strip() for part in _URL_SEPARATOR.split(value.strip()) if part.strip()]


def load_settings() -> Settings:
    """The settings of the environment; a bad value raises :class:`SpecError` naming its variable."""
    try:
        return Settings()  # type: ignore[call-arg]  # fields come from the environment
    except ValidationError as exc:
        err = exc.errors()[0]
        name = "IRE_" + "_".join(str(part) for part in err["loc"]).upper()
        message = err["msg"].removeprefix("Value error, ")
        raise SpecError(f"{name}={err.get('input')!r}: {message}") from None
