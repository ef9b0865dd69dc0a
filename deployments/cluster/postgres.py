"""PostgreSQL 15 nodes of ``irefine cluster``: a primary and a streaming replica, promotion of the
replica and the old primary's return as replica through ``pg_rewind``."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

from deployments.cluster.procs import (
    ClusterError,
    alive,
    chown_to,
    port_open,
    run_as,
    spawn,
    system_user,
    tail,
    wait_until,
)

REPLICATION_SLOT = "ire_replica"
START_TIMEOUT = 30.0


def pg_bindir() -> Path:
    """The newest /usr/lib/postgresql/*/bin with the server binaries."""

    def version(path: str) -> int:
        found = re.findall(r"\d+", Path(path).parent.name)
        return int(found[0]) if found else 0

    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if all(
            os.access(Path(folder) / b, os.X_OK) for b in ("initdb", "postgres", "pg_basebackup", "pg_rewind")
        ):
            return Path(folder)
    raise ClusterError(
        "postgres: no /usr/lib/postgresql/*/bin with initdb, pg_basebackup and pg_rewind: "
        "install PostgreSQL 15 (scripts/setup.sh --services)"
    )


@dataclass
class PgNode:
    """One PostgreSQL server: data in ``folder/data``, listening on 127.0.0.1:``port``."""

    name: str
    folder: Path
    port: int

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    @property
    def user(self) -> str | None:
        return system_user()

    @property
    def superuser(self) -> str:
        return self.user or os.environ.get("USER", "postgres")

    def pid(self) -> int | None:
        """The postmaster's pid from ``postmaster.pid``, if it runs."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
            return pid if alive(pid) else None
        return None

    def _run(self, *command: str | Path, timeout: float = 120) -> str:
        return run_as(self.user, [str(c) for c in command], cwd=self.folder, what=self.name, timeout=timeout)

    def _prepare_folder(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.user:
            for parent in self.folder.resolve().parents:
                if not parent.stat().st_mode & 0o001:
                    raise ClusterError(
                        f"{self.name}: {parent} is not searchable by the user {self.user!r} that runs "
                        "PostgreSQL: pass --dir under /tmp or another world-searchable folder"
                    )
            chown_to(self.folder, self.user)

    def init_primary(self) -> None:
        """A new cluster with trust authentication on loopback (replication included)."""
        self._prepare_folder()
        self._run(
            pg_bindir() / "initdb", "-D", self.data, "-U", self.superuser, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        # In the configuration file, not only on the command line: pg_rewind reads wal_log_hints
        # from pg_control, which the single-user recovery run before it rewrites.
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# irefine cluster\nwal_log_hints = on\nwal_keep_size = 256MB\nhot_standby_feedback = on\n"
            )

    def init_replica(self, primary: PgNode) -> None:
        """A base backup of ``primary`` that streams from it through a replication slot."""
        self._prepare_folder()
        self._run(
            pg_bindir() / "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary.port), "-U",
            primary.superuser, "-D", self.data, "-R", "-X", "stream", "-C", "-S", REPLICATION_SLOT,
            "--checkpoint=fast",
        )  # fmt: skip

    def start(self) -> int:
        """Start the server and wait until it accepts connections; the postmaster's pid."""
        options = {
            "port": str(self.port),
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.folder),
            "max_connections": "300",
            "wal_log_hints": "on",  # lets pg_rewind bring a failed primary back as replica
            "wal_keep_size": "256MB",
            "hot_standby_feedback": "on",
            "fsync": "off",  # a crashed process keeps its writes in the kernel's page cache
            "full_page_writes": "on",
        }
        command = [str(pg_bindir() / "postgres"), "-D", str(self.data)]
        for key, value in options.items():
            command += ["-c", f"{key}={value}"]
        pid = spawn(command, log=self.log, cwd=self.folder, user=self.user)
        wait_until(
            lambda: port_open(self.port) and self.query("SELECT 1") == 1,
            START_TIMEOUT,
            lambda: (
                f"{self.name} did not accept connections on port {self.port} within "
                f"{START_TIMEOUT:.0f} s:\n{tail(self.log)}"
            ),
        )
        return pid

    def query(self, sql: str, dbname: str = "postgres") -> object:
        """The first column of the first row of ``sql`` (autocommit)."""
        import psycopg

        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.superuser,
            dbname=dbname,
            autocommit=True,
            connect_timeout=3,
        ) as conn:
            cursor = conn.execute(sql)  # type: ignore[arg-type]
            row = cursor.fetchone() if cursor.description else None
            return row[0] if row else None

    def role(self) -> str:
        """``primary``, ``replica`` or ``down``."""
        try:
            return "replica" if self.query("SELECT pg_is_in_recovery()") else "primary"
        except Exception:
            return "down"

    def create_database(self, name: str) -> None:
        """Create database ``name`` unless it exists."""
        if not self.query(f"SELECT 1 FROM pg_database WHERE datname = '{name}'"):
            self.query(f'CREATE DATABASE "{name}"')

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast`` or ``immediate``); nothing if it is not running."""
        if self.pid() is None:
            return
        with contextlib.suppress(ClusterError):
            self._run(
                pg_bindir() / "pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "30", "stop", timeout=40
            )
        pid = self.pid()
        if pid:
            os.kill(pid, signal.SIGKILL)

    def promote(self) -> None:
        """Promote this replica to primary and wait for it to accept writes."""
        self._run(pg_bindir() / "pg_ctl", "-D", self.data, "-w", "-t", "30", "promote", timeout=40)
        wait_until(
            lambda: self.role() == "primary",
            START_TIMEOUT,
            lambda: f"{self.name} did not leave recovery after promotion:\n{tail(self.log)}",
        )

    def rejoin_as_replica(self, primary: PgNode) -> int:
        """Rewind this stopped former primary onto ``primary`` and start it as its replica."""
        if self.pid() is not None:
            raise ClusterError(f"{self.name}: stop it before rewinding it")
        # pg_rewind needs a cleanly shut down target: a crashed one is first run to the end of
        # recovery in single-user mode.
        with contextlib.suppress(ClusterError):
            self._run(
                pg_bindir() / "postgres",
                "--single",
                "-D",
                self.data,
                "-c",
                "wal_log_hints=on",
                "postgres",
                timeout=60,
            )
        self._run(
            pg_bindir() / "pg_rewind", "--target-pgdata", self.data,
            "--source-server", f"host=127.0.0.1 port={primary.port} user={primary.superuser} dbname=postgres",
        )  # fmt: skip
        if not primary.query(f"SELECT 1 FROM pg_replication_slots WHERE slot_name = '{REPLICATION_SLOT}'"):
            primary.query(f"SELECT pg_create_physical_replication_slot('{REPLICATION_SLOT}')")
        conninfo = f"host=127.0.0.1 port={primary.port} user={primary.superuser}"
        auto = self.data / "postgresql.auto.conf"
        kept = [
            line
            for line in auto.read_text().splitlines()
            if not line.startswith(("primary_conninfo", "primary_slot_name"))
        ]
        kept += [f"primary_conninfo = '{conninfo}'", f"primary_slot_name = '{REPLICATION_SLOT}'"]
        auto.write_text("\n".join(kept) + "\n")
        (self.data / "standby.signal").touch()
        chown_to(self.folder, self.user)
        return self.start()
