"""Creating and upgrading the store's tables, and hash-partitioning the growing ones on PostgreSQL.

On PostgreSQL ``cycles``, ``evaluation_batches`` and ``anomalies`` are declared
``PARTITION BY HASH (job_id)`` with ``partitions`` partitions each (``<table>_p<i>``), so that
each job's rows live in one partition and a table's indexes and vacuum work stay partition-sized.
A database made before partitioning has its plain tables rebuilt as partitioned ones, in the
same transaction that creates what is missing: the rows are copied under an exclusive lock, so
the first start after the upgrade waits for that copy. Tables already partitioned keep their
partition count. SQLite keeps plain tables.
"""

from __future__ import annotations

import time

from sqlalchemy import Connection, Engine, Table, select, text
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.schema import CreateColumn, CreateTable
from sqlmodel import SQLModel

from engine.core.errors import SpecError
from engine.store.engines import database_errors
from engine.store.tables import PARTITIONED_TABLES, SHARD, STORE_TABLES
from engine.store.values import StoreError

__all__ = ["DEFAULT_PARTITIONS", "create_schema", "partition_counts"]

DEFAULT_PARTITIONS = 8
# Serialises CREATE TABLE across processes starting against a fresh PostgreSQL database.
_PG_SCHEMA_LOCK = 0x1EF1_0001
_OLD_SUFFIX = "_unpartitioned"


def create_schema(
    engine: Engine, label: str, *, partitions: int, shard: int = 0, shard_count: int = 1
) -> None:
    """Create the missing tables, add missing columns, partition plain tables (PostgreSQL, when
    ``partitions`` > 0) and check that the database is shard ``shard`` of ``shard_count``."""
    shown = engine.url.render_as_string(hide_password=True)
    what = f"{label} {shown!r}: cannot create the tables"
    # On PostgreSQL an advisory lock serialises stores starting together on a fresh database;
    # SQLite DDL runs outside a transaction, so there a loser of that race just tries again.
    for attempt in range(3):
        try:
            with database_errors(what), engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_SCHEMA_LOCK})
                    _create_postgres_tables(conn, partitions)
                else:
                    SQLModel.metadata.create_all(conn, tables=list(STORE_TABLES))
                _add_missing_columns(conn)
                if conn.dialect.name == "postgresql" and partitions > 0:
                    _partition_plain_tables(conn, partitions)
                _check_shard(conn, f"{label} {shown!r}", shard, shard_count)
            return
        except StoreError as exc:
            if attempt == 2 or "already exists" not in str(exc):
                raise
            time.sleep(0.05)


def partition_counts(conn: Connection) -> dict[str, int]:
    """How many partitions each partitioned store table has (PostgreSQL; absent tables are plain)."""
    rows = conn.execute(
        text(
            "SELECT c.relname, count(i.inhrelid) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN pg_inherits i ON i.inhparent = c.oid "
            "WHERE n.nspname = current_schema() AND c.relkind = 'p' AND c.relname = ANY(:names) "
            "GROUP BY c.relname"
        ),
        {"names": [t.name for t in PARTITIONED_TABLES]},
    )
    return {name: int(count) for name, count in rows}


def _relation_kinds(conn: Connection) -> dict[str, str]:
    """``relkind`` of each store table present in the current schema ('r' plain, 'p' partitioned)."""
    rows = conn.execute(
        text(
            "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relname = ANY(:names)"
        ),
        {"names": [t.name for t in STORE_TABLES]},
    )
    return {name: str(kind) for name, kind in rows}


def _create_postgres_tables(conn: Connection, partitions: int) -> None:
    present = _relation_kinds(conn)
    for table in STORE_TABLES:
        if table.name in present:
            continue
        if partitions > 0 and table in PARTITIONED_TABLES:
            _create_partitioned(conn, table, partitions)
        else:
            table.create(conn)


def _create_partitioned(conn: Connection, table: Table, partitions: int) -> None:
    ddl = str(CreateTable(table).compile(dialect=conn.dialect)).strip()
    conn.execute(text(f"{ddl} PARTITION BY HASH (job_id)"))
    for index in table.indexes:
        index.create(conn)
    for remainder in range(partitions):
        conn.execute(
            text(
                f"CREATE TABLE {table.name}_p{remainder} PARTITION OF {table.name} "
                f"FOR VALUES WITH (MODULUS {partitions}, REMAINDER {remainder})"
            )
        )


def _partition_plain_tables(conn: Connection, partitions: int) -> None:
    """Rebuild each plain growing table as a partitioned one holding the same rows.

    The old table is renamed (with its indexes, whose names would clash), copied into the new
    one and dropped, all in the caller's transaction: an upgrade is all or nothing.
    """
    kinds = _relation_kinds(conn)
    quote = conn.dialect.identifier_preparer.quote
    for table in PARTITIONED_TABLES:
        if kinds.get(table.name) != "r":
            continue
        old = f"{table.name}{_OLD_SUFFIX}"
        conn.execute(text(f"ALTER TABLE {table.name} RENAME TO {old}"))
        constraints = conn.execute(
            text(
                "SELECT conname FROM pg_constraint "
                "WHERE conrelid = CAST(:t AS regclass) AND contype IN ('p', 'u', 'x')"
            ),
            {"t": old},
        ).scalars()
        for name in list(constraints):
            conn.execute(
                text(f"ALTER TABLE {old} RENAME CONSTRAINT {quote(name)} TO {quote(_renamed(name))}")
            )
        indexes = conn.execute(
            text(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE i.indrelid = CAST(:t AS regclass) AND NOT c.relname LIKE :suffix"
            ),
            {"t": old, "suffix": f"%{_OLD_SUFFIX}"},
        ).scalars()
        for name in list(indexes):
            conn.execute(text(f"ALTER INDEX {quote(name)} RENAME TO {quote(_renamed(name))}"))
        _create_partitioned(conn, table, partitions)
        columns = ", ".join(quote(c.name) for c in table.columns)
        conn.execute(text(f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM {old}"))
        conn.execute(text(f"DROP TABLE {old}"))


def _renamed(name: str) -> str:
    return name[: 63 - len(_OLD_SUFFIX)] + _OLD_SUFFIX  # PostgreSQL names hold 63 bytes


def _add_missing_columns(conn: Connection) -> None:
    """Bring a database made by an older release up to date: add the columns it lacks.

    Releases so far change the schema only by adding columns (counters with defaults), which
    ``ALTER TABLE ... ADD COLUMN`` covers on SQLite and PostgreSQL alike (on a partitioned table
    it reaches every partition).
    """
    inspector = sa_inspect(conn)
    for table in STORE_TABLES:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            ddl = str(CreateColumn(column).compile(dialect=conn.dialect)).replace(" NOT NULL", "")
            default = getattr(column.default, "arg", None)
            number = isinstance(default, (int, float)) and not isinstance(default, bool)
            clause = f" DEFAULT {default!r}" if number else ""
            conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {ddl}{clause}"))


def _check_shard(conn: Connection, where: str, shard: int, shard_count: int) -> None:
    """Record which shard this database is, or check that it is the one it was."""
    values = {"id": 1, "shard": shard, "shard_count": shard_count}
    upsert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    conn.execute(upsert(SHARD).values(values).on_conflict_do_nothing())  # a racing store may insert it
    row = conn.execute(select(SHARD.c.shard, SHARD.c.shard_count)).one()
    if (row.shard, row.shard_count) != (shard, shard_count):
        raise SpecError(
            f"{where} holds shard {row.shard + 1} of {row.shard_count} but is listed as shard "
            f"{shard + 1} of {shard_count}: jobs are placed by a hash of their id over the shards, so "
            "list the shard databases as when they were created (moving jobs between shards is not supported)"
        )
