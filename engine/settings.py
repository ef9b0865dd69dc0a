"""Settings read from the environment (prefix ``IRE_``); read when asked for, never at import."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where the engine keeps its data and which services it talks to."""

    model_config = SettingsConfigDict(env_prefix="IRE_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".irefine", description="data folder")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in IRE_HOME")
    database_replica_url: str | None = Field(None, description="read replica for lag-tolerant reads")
    dask_address: str | None = Field(None, description="existing Dask scheduler; default: a LocalCluster")
    dask_workers: int | None = Field(None, ge=1, description="LocalCluster workers; default: CPU count")
    redis_url: str | None = Field(None, description="inference cache; default: the embedded cache")
    cache_namespace: str = Field("ire", description="key prefix: one per deployment sharing a Redis")
    cache_ttl_seconds: float = Field(7 * 24 * 3600.0, gt=0, description="default time to live of entries")
    cache_max_entries: int | None = Field(1_000_000, ge=1, description="bound of the embedded cache")
    cache_manage_server: bool = Field(False, description="set Redis' eviction policy to allkeys-lru")
    notify_webhook_url: str | None = Field(
        None, description="webhook the automations notify through (irefine setup --notify-webhook)"
    )
    result_storage: str | None = Field(
        None,
        description="Prefect block slug for persisted stage results, e.g. 'redis-database/irefine' or "
        "'azure-blob-storage-container/results'; default: Prefect's local storage",
    )

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.home / 'irefine.db'}"


def load_settings() -> Settings:
    return Settings()  # type: ignore[call-arg]  # fields come from the environment
