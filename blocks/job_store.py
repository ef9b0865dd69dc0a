"""The job-store block: the database of jobs, cycles and checkpoints, and its read replica."""

from __future__ import annotations

from typing import ClassVar

from prefect.blocks.core import Block
from pydantic import Field, SecretStr

from engine.store import JobStore


class JobStoreBlock(Block):
    """The job store's database URL and optional read-replica URL, both kept secret.

    ``get_store()`` connects a :class:`~engine.store.JobStore` (the caller closes it).
    """

    _block_type_name: ClassVar[str | None] = "Refinement Job Store"
    _block_type_slug: ClassVar[str | None] = "irefine-job-store"

    database_url: SecretStr = Field(
        description="primary database: postgresql+psycopg://USER:PASSWORD@HOST/DB or sqlite:///PATH"
    )
    replica_url: SecretStr | None = Field(
        None, description="read replica for lag-tolerant reads (status, listings); empty: the primary"
    )

    def get_store(self) -> JobStore:
        """A new job store on these databases; the caller owns it and closes it."""
        replica = self.replica_url.get_secret_value() if self.replica_url is not None else None
        return JobStore(self.database_url.get_secret_value(), replica)
