"""Real services for tests: a throwaway Redis and a throwaway PostgreSQL (and a streaming replica
of it, :class:`PostgresReplica`), no fakes.

Both start on a free loopback port with their data in a temporary folder, and are stopped and
removed by ``close()`` (also at interpreter exit). From a shell::

    python -m tests.services            # start both, print their URLs, stop on Ctrl-C
    python -m tests.services redis      # just one of them

PostgreSQL refuses to run as root; as root the server runs as the ``postgres`` user if there is
one, else as a system user ``iretest`` created once. Set ``IRE_TEST_POSTGRES_URL`` to use an
existing server instead (``new_database`` then needs the CREATEDB privilege).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

from irefine.server import stop_process

__all__ = ["PostgresReplica", "PostgresServer", "RedisServer", "ServiceError", "free_port"]

_START_TIMEOUT = 30.0
_PG_SYSTEM_USER = "iretest"


class ServiceError(RuntimeError):
    """A test service could not be found or started; the message says what to install or set."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Service:
    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


# -- Redis ----------------------------------------------------------------------------------------


def find_redis_server() -> str:
    """The path of ``redis-server``: on PATH, else /usr/bin; raise :class:`ServiceError` if absent."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if not found:
        raise ServiceError(
            "redis-server not found on PATH or in /usr/bin: install it (apt-get install redis-server)"
        )
    return found


class RedisServer(_Service):
    """A private ``redis-server`` on 127.0.0.1: no persistence, LRU eviction, data in a temp folder.

    Started on construction; :meth:`stop` and :meth:`start` stop and restart it on the same port
    (to test lost connections); :meth:`close` stops it for good and removes its folder. With a
    ``password`` the server requires it (``requirepass``) and :attr:`url` carries it.
    """

    def __init__(self, port: int | None = None, *, password: str | None = None) -> None:
        self.binary = find_redis_server()
        self.password = password
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ire-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.close)
        try:
            for attempt in range(3):  # a free port may be taken before redis-server binds it
                try:
                    self.start()
                    break
                except ServiceError:
                    if port or attempt == 2:
                        raise
                    self.port = free_port()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (``redis://:PASSWORD@127.0.0.1:PORT/0`` with a password)."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server (on the same port as before) and wait until it answers PING."""
        if self.running:
            return
        log = self.dir / "redis.log"
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--maxmemory-policy", "allkeys-lru",
            "--daemonize", "no",
            "--logfile", str(log),
        ]  # fmt: skip
        if self.password:
            cmd += ["--requirepass", self.password]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        self._wait_ready(log)

    def _wait_ready(self, log: Path) -> None:
        import redis

        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise ServiceError(
                    f"redis-server on port {self.port} exited with {self._proc.returncode}:\n{_tail(log)}"
                )
            client = redis.Redis(
                host="127.0.0.1",
                port=self.port,
                password=self.password,
                socket_connect_timeout=0.5,
                socket_timeout=0.5,
            )
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            finally:
                client.close()
            if time.monotonic() > deadline:
                self.stop()
                waited = f"{_START_TIMEOUT:.0f} s"
                raise ServiceError(
                    f"redis-server on port {self.port} did not answer PING in {waited}:\n{_tail(log)}"
                )
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (its data is lost); :meth:`start` brings it back on the same port."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        stop_process(proc, 10)

    def close(self) -> None:
        """Stop the server and remove its folder."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        atexit.unregister(self.close)


# -- PostgreSQL -----------------------------------------------------------------------------------


def find_pg_bindir() -> Path:
    """The folder of ``initdb``/``pg_ctl``: the newest /usr/lib/postgresql/*/bin, else ``pg_config
    --bindir``, else ``initdb`` on PATH; raise :class:`ServiceError` if none has them."""

    def usable(folder: Path) -> bool:
        return all(os.access(folder / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres"))

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(x) for x in re.findall(r"\d+", Path(path).parent.name))

    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if usable(Path(folder)):
            return Path(folder)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout
            if usable(Path(out.strip())):
                return Path(out.strip())
    initdb = shutil.which("initdb")
    if initdb and usable(Path(initdb).parent):
        return Path(initdb).parent
    raise ServiceError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in /usr/lib/postgresql/*/bin, "
        "via pg_config or on PATH: install them (apt-get install postgresql) or set IRE_TEST_POSTGRES_URL"
    )


def _server_user() -> str:
    """The OS user to run PostgreSQL as: ourselves, or as root ``postgres`` or ``iretest``."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    for name in ("postgres", _PG_SYSTEM_USER):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    proc = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _PG_SYSTEM_USER],
        capture_output=True,
        text=True,
    )
    if proc.returncode not in (0, 9):  # 9: created meanwhile by another process
        raise ServiceError(
            f"cannot create the system user {_PG_SYSTEM_USER!r} to run PostgreSQL: {proc.stderr.strip()}"
        )
    return _PG_SYSTEM_USER


def _traversable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & stat.S_IXOTH for p in path.resolve().parents)


class PostgresServer(_Service):
    """A private PostgreSQL cluster on 127.0.0.1 with trust auth, or the server of ``IRE_TEST_POSTGRES_URL``.

    ``url`` names the database ``ire_test`` (``postgresql+psycopg://USER@127.0.0.1:PORT/ire_test``);
    :meth:`new_database` creates more. ``durable=False`` (the default) turns fsync off: fast, and
    fine for a cluster that is thrown away.
    """

    def __init__(self, *, durable: bool = False, database: str = "ire_test") -> None:
        external = os.environ.get("IRE_TEST_POSTGRES_URL")
        self.external = bool(external)
        self._dir: Path | None = None
        self._started = False
        if external:
            from sqlalchemy.engine import make_url

            parsed = make_url(external)
            if "+" not in parsed.drivername:
                parsed = parsed.set(drivername="postgresql+psycopg")
            self.url = parsed.render_as_string(hide_password=False)
            self.user = parsed.username or ""
            self.host = parsed.host or "127.0.0.1"
            self.port = parsed.port or 5432
            self.database = parsed.database or "postgres"
            self._admin_url = parsed
            return
        self.bindir = find_pg_bindir()
        self.user = _server_user()
        self.host = "127.0.0.1"
        self.port = free_port()
        self.database = database
        base = Path(tempfile.gettempdir())
        if os.geteuid() == 0 and not _traversable_by_others(base / "x"):
            base = Path("/tmp")
        self._dir = Path(tempfile.mkdtemp(prefix="ire-pg-", dir=base))
        self.url = f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"
        atexit.register(self.close)
        try:
            self._init_and_start(durable)
            self.new_database(database)
        except BaseException:
            self.close()
            raise

    @property
    def data_dir(self) -> Path:
        """The cluster's data folder (not for an external server)."""
        assert self._dir is not None, "an external server has no data folder here"
        return self._dir / "data"

    def _run(self, *args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in args]
        if os.geteuid() == 0:
            cmd = [shutil.which("runuser") or "/usr/sbin/runuser", "-u", self.user, "--", *cmd]
        assert self._dir is not None
        proc = subprocess.run(cmd, cwd=self._dir, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            log = _tail(self._dir / "server.log")
            output = (proc.stderr or proc.stdout).strip()
            raise ServiceError(f"{Path(str(args[0])).name} failed ({proc.returncode}): {output}\n{log}")
        return proc

    def _init_and_start(self, durable: bool) -> None:
        assert self._dir is not None
        if os.geteuid() == 0:
            entry = pwd.getpwnam(self.user)
            os.chown(self._dir, entry.pw_uid, entry.pw_gid)
        self._run(
            self.bindir / "initdb", "-D", self.data_dir, "-U", self.user, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self._dir}",
            "-c max_connections=200",
        ]
        if not durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        for attempt in range(3):  # a free port may be taken before the server binds it
            server_options = " ".join([*options, f"-c port={self.port}"])
            try:
                self._run(
                    self.bindir / "pg_ctl", "-D", self.data_dir, "-l", self._dir / "server.log", "-w",
                    "-t", str(int(_START_TIMEOUT)), "-o", server_options, "start",
                )  # fmt: skip
                break
            except ServiceError:
                if attempt == 2:
                    raise
                self.port = free_port()
        self._started = True
        self.url = self._url_for(self.database)

    def _admin(self) -> Any:
        import psycopg

        if self.external:
            url = self._admin_url
            return psycopg.connect(
                host=url.host, port=url.port, user=url.username, password=url.password,
                dbname=url.database or "postgres", autocommit=True,
            )  # fmt: skip
        return psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True
        )

    def _url_for(self, name: str) -> str:
        if self.external:
            return self._admin_url.set(database=name).render_as_string(hide_password=False)
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{name}"

    def new_database(self, name: str | None = None) -> str:
        """Create a database (a fresh random name by default) and return its URL."""
        from psycopg import sql

        name = name or f"ire_{uuid.uuid4().hex[:12]}"
        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self._url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever still uses it."""
        from psycopg import sql

        with self._admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def close(self) -> None:
        """Stop the cluster (fast shutdown) and remove its folder; an external server is left alone."""
        atexit.unregister(self.close)
        if self._dir is None:
            return
        if self._started:
            self._started = False
            with contextlib.suppress(ServiceError, subprocess.TimeoutExpired, OSError):
                self._run(self.bindir / "pg_ctl", "-D", self.data_dir, "-m", "fast", "-w", "stop", timeout=60)
        shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None


class PostgresReplica(PostgresServer):
    """A streaming replica of a private :class:`PostgresServer`, on its own port.

    Made by ``pg_basebackup -R`` through a physical replication slot, and started as a hot
    standby: read-only, it serves the primary's databases (``url_for``) as the primary's WAL is
    replayed. :meth:`promote` makes it a primary; :meth:`close` stops it and removes its folder.
    """

    def __init__(self, primary: PostgresServer) -> None:
        if primary.external or primary._dir is None:
            raise ServiceError("a replica needs a private PostgresServer (not IRE_TEST_POSTGRES_URL)")
        self.external = False
        self._started = False
        self.primary = primary
        self.bindir = primary.bindir
        self.user = primary.user
        self.host = "127.0.0.1"
        self.port = free_port()
        self.database = primary.database
        self.slot = f"ire_replica_{uuid.uuid4().hex[:8]}"
        self._dir = Path(tempfile.mkdtemp(prefix="ire-pg-replica-", dir=primary._dir.parent))
        self.url = self._url_for(self.database)
        atexit.register(self.close)
        try:
            self._clone_and_start()
        except BaseException:
            self.close()
            raise

    def _clone_and_start(self) -> None:
        assert self._dir is not None
        if os.geteuid() == 0:
            entry = pwd.getpwnam(self.user)
            os.chown(self._dir, entry.pw_uid, entry.pw_gid)
        self._run(
            self.bindir / "pg_basebackup", "-D", self.data_dir, "-h", self.primary.host,
            "-p", str(self.primary.port), "-U", self.user, "-X", "stream", "-R", "-C", "-S", self.slot,
            "--no-sync", "--checkpoint=fast",
        )  # fmt: skip
        options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self._dir}",
                f"-c port={self.port}",
                "-c hot_standby=on",
                "-c max_connections=200",  # a standby needs at least the primary's
                "-c fsync=off",
            ]
        )
        self._run(
            self.bindir / "pg_ctl", "-D", self.data_dir, "-l", self._dir / "server.log", "-w",
            "-t", str(int(_START_TIMEOUT)), "-o", options, "start",
        )  # fmt: skip
        self._started = True

    def url_for(self, database: str) -> str:
        """The URL of one of the primary's databases, read on this replica."""
        return self._url_for(database)

    def wait_caught_up(self, timeout: float = 30.0) -> None:
        """Wait until the replica has replayed everything the primary has written so far."""
        with self.primary._admin() as conn:
            target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        deadline = time.monotonic() + timeout
        with self._admin() as conn:
            while True:
                row = conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (str(target),)).fetchone()
                if row[0]:
                    return
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"replica on port {self.port} did not replay up to {target} in {timeout} s"
                    )
                time.sleep(0.02)

    def pause_replay(self) -> None:
        """Stop applying the primary's WAL (it is still received): reads see a frozen past."""
        with self._admin() as conn:
            conn.execute("SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        """Apply the primary's WAL again."""
        with self._admin() as conn:
            conn.execute("SELECT pg_wal_replay_resume()")

    def promote(self) -> None:
        """Make this replica a primary (``pg_ctl promote``, waiting until it accepts writes)."""
        self._run(
            self.bindir / "pg_ctl", "-D", self.data_dir, "-w", "-t", str(int(_START_TIMEOUT)), "promote"
        )

    def new_database(self, name: str | None = None) -> str:
        """A replica cannot create databases: create them on the primary."""
        raise ServiceError("create databases on the primary; a replica is read-only")

    def close(self) -> None:
        """Stop the replica, drop its slot on the primary if that still runs, remove its folder."""
        super().close()
        if self.primary._started:
            import psycopg

            # A slot left behind would make the primary keep WAL for ever; best effort on close.
            with contextlib.suppress(psycopg.Error), self.primary._admin() as conn:
                conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    "WHERE slot_name = %s",
                    (self.slot,),
                )


def main(argv: list[str]) -> int:
    """Start the named services (default: both), print their URLs, stop them on Ctrl-C or SIGTERM."""
    wanted = set(argv) or {"redis", "postgres"}
    unknown = wanted - {"redis", "postgres"}
    if unknown:
        print(f"usage: python -m tests.services [redis] [postgres]; unknown: {', '.join(sorted(unknown))}")
        return 2

    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)  # stop the services on kill, too
    services: list[_Service] = []
    try:
        if "redis" in wanted:
            services.append(redis_server := RedisServer())
            print(f"IRE_REDIS_URL={redis_server.url}", flush=True)
        if "postgres" in wanted:
            services.append(pg := PostgresServer())
            print(f"IRE_DATABASE_URL={pg.url}", flush=True)
        print("running; Ctrl-C stops", file=sys.stderr, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    finally:
        for service in reversed(services):
            service.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
