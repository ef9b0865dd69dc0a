"""Database URLs to SQLAlchemy engines, and database exceptions to one-line store errors.

PostgreSQL is reached through psycopg 3. A URL may list several hosts for failover, in libpq's
form ``postgresql+psycopg://USER@H1:P1,H2:P2/DB?target_session_attrs=read-write`` or in
SQLAlchemy's ``postgresql+psycopg://USER@/DB?host=H1:P1&host=H2:P2``: libpq tries them in order
and keeps the first that matches ``target_session_attrs``. Pooled connections are pinged before
use, so after a promotion the next checkout connects to the new primary.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    OperationalError,
    SQLAlchemyError,
)

from engine.core.errors import EngineError, SpecError
from engine.sqlite import use_wal
from engine.store.values import StoreError, StoreUnavailableError

__all__ = ["database_errors", "first_line", "make_engine", "redact", "retry_transient"]

_SQLITE_BUSY_MS = 30_000
RETRY_SECONDS = 30.0
"""How long a PostgreSQL store call retries a transient error (a restart, a promotion) by default."""
# SQLSTATEs of a server going away or of a session on a node that is no longer the primary:
# 25006 read-only transaction (a standby, or a demoted primary), 57P01-57P03 shutdown/starting up.
_TRANSIENT_SQLSTATES = {"25006", "57P01", "57P02", "57P03", "40001", "40P01"}
_log = logging.getLogger(__name__)
T = TypeVar("T")
# scheme://[userinfo@]host:port,host:port[/db][?query]: libpq's multi-host form, which
# make_url cannot parse (it reads "port,host:port" as the port).
_MULTI_HOST = re.compile(
    r"^(?P<scheme>[^:/]+://)(?P<user>[^@/]*@)?(?P<hosts>[^/?@]*,[^/?@]*)(?P<rest>[/?].*)?$"
)


def make_engine(url: str, label: str) -> Engine:
    """An engine for ``url``; raise :class:`SpecError` naming ``label`` if the URL is unusable."""
    try:
        parsed = make_url(_hosts_as_query(url))
    except (ArgumentError, ValueError) as exc:
        raise SpecError(f"{label} {redact(url)!r}: {first_line(str(exc))}") from None
    shown = parsed.render_as_string(hide_password=True)
    backend, _, driver = parsed.drivername.partition("+")  # without loading the dialect
    kwargs: dict[str, Any] = {}
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise SpecError(
                f"{label} {shown!r}: driver {driver!r} is not supported; use postgresql+psycopg://"
            )
        parsed = parsed.set(drivername="postgresql+psycopg")  # also for plain postgresql://: no psycopg2
        kwargs["pool_pre_ping"] = True
        if "connect_timeout" not in parsed.query:
            kwargs["connect_args"] = {"connect_timeout": 10}
    elif backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise SpecError(f"{label} {shown!r}: driver {driver!r} is not supported; use sqlite:///PATH")
        _check_sqlite_path(parsed, label, shown)
        kwargs["connect_args"] = {"timeout": _SQLITE_BUSY_MS / 1000}
        kwargs["pool_use_lifo"] = True  # reuse the connection whose page cache is warm
    else:
        raise SpecError(
            f"{label} {shown!r}: unsupported database {backend!r}; use sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST/DB"
        )
    try:
        engine = create_engine(parsed, **kwargs)
    except (ArgumentError, ImportError, TypeError) as exc:
        raise SpecError(f"{label} {shown!r}: {first_line(str(exc))}") from None
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _hosts_as_query(url: str) -> str:
    """libpq's ``H1:P1,H2:P2`` host list moved into SQLAlchemy's ``?host=H1:P1&host=H2:P2``."""
    match = _MULTI_HOST.match(url.strip())
    if match is None:
        return url
    rest = match["rest"] or ""
    path, _, query = rest.partition("?")
    hosts = "&".join(f"host={host.strip()}" for host in match["hosts"].split(","))
    return f"{match['scheme']}{match['user'] or ''}{path or '/'}?{hosts}{'&' + query if query else ''}"


def _check_sqlite_path(url: URL, label: str, shown: str) -> None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    folder = Path(database).expanduser().resolve().parent
    if not folder.is_dir():
        raise SpecError(f"{label} {shown!r}: folder {str(folder)!r} does not exist")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL: readers in other processes never block the writer nor wait for it. NORMAL: WAL commits
    # do not fsync (a power cut may lose the last commits, never corrupt the file). The random
    # fingerprint index dirties pages all over it each cycle: a 64 MiB page cache keeps them in
    # memory, and checkpointing every ~40 MiB of WAL rather than every 4 MiB copies each page to
    # the database file once per several cycles instead of once per cycle.
    cur = dbapi_conn.cursor()
    try:
        cur.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_MS}")
        use_wal(cur, _SQLITE_BUSY_MS / 1000)
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA cache_size=-65536")
        cur.execute("PRAGMA wal_autocheckpoint=10000")
        cur.execute("PRAGMA journal_size_limit=67108864")
    finally:
        cur.close()


@contextmanager
def database_errors(what: str) -> Iterator[None]:
    """Turn database exceptions into one-line :class:`StoreError` s prefixed with ``what``."""
    try:
        yield
    except EngineError:
        raise
    except (OperationalError, InterfaceError) as exc:
        raise StoreUnavailableError(f"{what}: {_db_message(exc)}") from exc
    except DBAPIError as exc:
        sqlstate = getattr(exc.orig, "sqlstate", None) or ""
        transient = (
            exc.connection_invalidated or sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith("08")
        )
        cls = StoreUnavailableError if transient else StoreError
        raise cls(f"{what}: {_db_message(exc)}") from exc
    except SQLAlchemyError as exc:
        raise StoreError(f"{what}: {first_line(str(exc))}") from exc


def retry_transient(
    call: Callable[[], T], *, seconds: float, reset: Callable[[], None], what: str = "job store"
) -> T:
    """``call()``, retried while it raises :class:`StoreUnavailableError` for up to ``seconds``
    (backoff 0.1 s doubling to 2 s), calling ``reset`` (drop pooled connections: they may point
    at a node that is gone or no longer primary) before each retry. Then the last error is raised
    again, saying how long it was retried. Each retry is logged."""
    deadline = time.monotonic() + seconds
    delay = 0.1
    attempt = 0
    while True:
        try:
            return call()
        except StoreUnavailableError as exc:
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0:
                if attempt == 1:
                    raise
                raise StoreUnavailableError(
                    f"{exc} (still failing after {attempt} tries in {seconds:g} s)"
                ) from exc
            _log.warning("%s: %s; retry %d in %.1f s", what, exc, attempt, min(delay, left))
            time.sleep(min(delay, left))
            delay = min(delay * 2, 2.0)
            reset()


def first_line(message: str) -> str:
    """The first non-blank line of an error message."""
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


def _db_message(exc: DBAPIError) -> str:
    return first_line(str(exc.orig) if exc.orig is not None else str(exc))


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
