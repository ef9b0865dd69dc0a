"""The parts of ``irefine cluster`` and their order: start, status, stop, failover.

Every part is a real process on loopback with its own process group; the cluster's state (ports,
pids, which PostgreSQL is primary) is ``cluster.json`` in the cluster folder, so that any later
``irefine cluster`` command, or a drill, finds the parts again. Parts of zone ``b`` (API replica
b, services b, node b, Dask worker 1) are the ones a zone loss takes away.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deployments.cluster.haproxy import haproxy_binary, render_config, server_states, set_state
from deployments.cluster.postgres import PgNode
from deployments.cluster.procs import (
    ClusterError,
    alive,
    free_port,
    group_alive,
    port_open,
    reap,
    signal_group,
    spawn,
    stop_group,
    system_user,
    tail,
    wait_until,
)
from deployments.server import SERVER_SETTINGS

ROOT = Path(__file__).resolve().parents[2]
API_REPLICAS = ("api-a", "api-b")
SERVICES = ("services-a", "services-b")
NODES = ("node-a", "node-b")
DASK_WORKERS = 2
ZONE_B = ("api-b", "services-b", "node-b", "dask-worker-1")
PREFECT_DATABASE = "prefect"
STORE_DATABASE = "irefine"
API_START_TIMEOUT = 180.0  # a replica took 83 s on this 2-core machine at load average 20
PART_TIMEOUT = 60.0
SETTLE_SECONDS = 5.0
STOP_SECONDS = 15.0

# Every server setting whose default lives in one process's memory (notes/prefect-3.9-facts.md
# section 10; checked against prefect 3.9.1's settings: these six are all the in-memory ones).
REDIS_MODULES = {
    "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
    "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
    "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
    "PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE": "prefect_redis.cleanup_queue",
}


def default_folder() -> Path:
    """``IRE_HOME/cluster`` (IRE_HOME defaults to ~/.irefine)."""
    home = os.environ.get("IRE_HOME") or str(Path.home() / ".irefine")
    return Path(home) / "cluster"


class Cluster:
    """The cluster whose state is in ``folder``; ``log`` receives one line per step of ``up``."""

    def __init__(self, folder: Path, log: Callable[[str], None] = lambda line: None) -> None:
        self.folder = folder.resolve()
        self.log = log
        self.state: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            self.state = json.loads(self.state_file.read_text())

    # -- state ------------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.folder / "cluster.json"

    def _save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.state_file)

    @property
    def ports(self) -> dict[str, int]:
        return dict(self.state.get("ports", {}))

    @property
    def pids(self) -> dict[str, int]:
        return self.state.setdefault("pids", {})  # type: ignore[no-any-return]

    @property
    def primary(self) -> str:
        return str(self.state.get("primary", "postgres-a"))

    @property
    def replica(self) -> str:
        return "postgres-b" if self.primary == "postgres-a" else "postgres-a"

    def pg(self, name: str) -> PgNode:
        return PgNode(name, self.folder / name, self.ports[name])

    def _log_path(self, name: str) -> Path:
        return self.folder / "logs" / f"{name}.log"

    # -- addresses clients use ---------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        """The balancer's API URL: the only Prefect address clients see."""
        return f"http://127.0.0.1:{self.ports['balancer']}/api"

    def database_url(self, database: str, driver: str = "psycopg", read_write: bool = True) -> str:
        """A multi-host URL over both PostgreSQL nodes: libpq and asyncpg try each host and keep
        the one that accepts writes (or, for reads, prefer the standby), so failover needs no new URL."""
        user = self.pg("postgres-a").superuser
        hosts = "&".join(f"host=127.0.0.1:{self.ports[n]}" for n in ("postgres-a", "postgres-b"))
        attrs = "read-write" if read_write else "prefer-standby"
        return f"postgresql+{driver}://{user}@/{database}?{hosts}&target_session_attrs={attrs}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports['redis']}"

    @property
    def dask_address(self) -> str:
        return f"tcp://127.0.0.1:{self.ports['dask-scheduler']}"

    def client_env(self) -> dict[str, str]:
        """What a client of the cluster (a worker, ``irefine submit``, a drill) sets."""
        return {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "IRE_DATABASE_URL": self.database_url(STORE_DATABASE),
            "IRE_DATABASE_REPLICA_URL": self.database_url(STORE_DATABASE, read_write=False),
            "IRE_REDIS_URL": f"{self.redis_url}/1",
            "IRE_DASK_ADDRESS": self.dask_address,
            "IRE_PROJECT_DIR": str(ROOT),
            # One checkpoint-signing key for every node: a job resumed on another node verifies
            # what the first one signed (engine.signing). The operator's IRE_SECRET_KEY wins.
            "IRE_SECRET_KEY": os.environ.get("IRE_SECRET_KEY") or self.secret_key(),
        }

    def secret_key(self) -> str:
        """The cluster's checkpoint-signing key, kept in its folder (mode 0600, made on first use)."""
        from engine.signing import key_file_key

        return key_file_key(self.folder).decode()

    def _server_env(self, name: str) -> dict[str, str]:
        env = {**SERVER_SETTINGS, **os.environ}
        env.pop("PREFECT_API_URL", None)
        env.update(REDIS_MODULES)
        env.update(
            {
                "PREFECT_HOME": str(self.folder / "prefect-home" / name),
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": self.database_url(PREFECT_DATABASE, "asyncpg"),
                "PREFECT_API_DATABASE_MIGRATE_ON_START": "false",
                "PREFECT_SERVER_DOCKET_URL": f"{self.redis_url}/0",
                "PREFECT_REDIS_MESSAGING_HOST": "127.0.0.1",
                "PREFECT_REDIS_MESSAGING_PORT": str(self.ports["redis"]),
                "PREFECT_REDIS_MESSAGING_DB": "0",
                # prefect-redis' cleanup queue has its own connection settings (default localhost)
                "PREFECT_REDIS_WORKER_CLEANUP_QUEUE_URL": f"{self.redis_url}/0",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
                "PREFECT_UI_API_URL": self.api_url,
            }
        )
        return env

    # -- up ---------------------------------------------------------------------------------------

    def check_folder(self) -> None:
        """:class:`ClusterError` if PostgreSQL (run as its own user when we are root) could not
        reach the cluster folder."""
        if system_user():
            for parent in self.folder.parents:
                if parent.exists() and not parent.stat().st_mode & 0o001:
                    raise ClusterError(
                        f"{parent} is not searchable by the user PostgreSQL runs as: "
                        "pass --dir under a world-searchable folder such as /tmp"
                    )

    def up(self, balancer_port: int = 4200, job_limit: int = 4) -> float:
        """Start every part in order, waiting on each one's health; the seconds it took.

        Raises :class:`ClusterError` naming the part that failed (the parts already started are
        stopped again).
        """
        if self.state.get("pids") and any(alive(p) for p in self.pids.values()):
            raise ClusterError(f"a cluster already runs from {self.folder}: `irefine cluster down` first")
        self.check_folder()
        if self.folder.exists():
            shutil.rmtree(self.folder)
        start = time.monotonic()
        names = ["postgres-a", "postgres-b", "redis", *API_REPLICAS, "dask-scheduler"]
        ports = {name: free_port() for name in names}
        ports["balancer"] = balancer_port or free_port()
        if port_open(ports["balancer"]):
            raise ClusterError(
                f"balancer: port {ports['balancer']} is taken: pass --port with a free one (0: any)"
            )
        self.state = {"ports": ports, "pids": {}, "primary": "postgres-a", "folder": str(self.folder)}
        self._save()
        try:
            # Parts that need nothing else start while PostgreSQL initialises and Prefect migrates.
            self.start_part("redis", wait=False)
            self.start_part("dask", wait=False)
            self._start_postgres()
            self._migrate()
            for name in ("api-a", *SERVICES):
                self.start_part(name, wait=False)
            self._wait_api("api-a")
            # One replica at a time: two replicas registering block types at once collide on
            # block_type's unique slug and one of them exits.
            self.start_part("api-b", wait=False)
            self.start_part("balancer")
            self.wait_healthy("redis")
            self._setup_project(job_limit)
            self._wait_api("api-b")
            for name in SERVICES:
                self.wait_healthy(name)
            self.wait_healthy("dask")
            for name in NODES:
                self.start_part(name, wait=False)
            for name in NODES:
                self.wait_healthy(name)
        except BaseException:
            self.down()
            raise
        self.state["up_seconds"] = round(time.monotonic() - start, 1)
        self._save()
        return float(self.state["up_seconds"])

    def _step(self, what: str) -> None:
        self.log(f"[{time.strftime('%H:%M:%S')}] {what}")

    def _start_postgres(self) -> None:
        primary, replica = self.pg("postgres-a"), self.pg("postgres-b")
        self._step(f"postgres-a: initdb, start on port {primary.port}")
        primary.init_primary()
        self.pids["postgres-a"] = primary.start()
        self._save()
        for database in (PREFECT_DATABASE, STORE_DATABASE):
            primary.create_database(database)
        self._step(f"postgres-b: base backup of postgres-a, stream on port {replica.port}")
        replica.init_replica(primary)
        self.pids["postgres-b"] = replica.start()
        self._save()
        wait_until(
            lambda: (
                replica.role() == "replica"
                and primary.query("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") == 1
            ),
            PART_TIMEOUT,
            lambda: f"postgres-b: not streaming from postgres-a:\n{tail(replica.log)}",
        )

    def _migrate(self) -> None:
        self._step("prefect: migrating the database once")
        log = self._log_path("migrate")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            import subprocess

            done = subprocess.run(
                [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                env=self._server_env("migrate"),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=300,
            )
        if done.returncode != 0:
            raise ClusterError(f"prefect database migration failed ({done.returncode}):\n{tail(log)}")

    def _command(self, name: str) -> tuple[list[str], dict[str, str] | None, Path | None]:
        """How part ``name`` is started: command, environment, working directory."""
        python = [sys.executable, "-m"]
        if name == "redis":
            binary = shutil.which("redis-server") or "/usr/bin/redis-server"
            if not os.access(binary, os.X_OK):
                raise ClusterError("redis: redis-server not found: install it (apt-get install redis-server)")
            folder = self.folder / "redis"
            folder.mkdir(parents=True, exist_ok=True)
            return [
                binary, "--port", str(self.ports["redis"]), "--bind", "127.0.0.1", "--dir", str(folder),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
            ], None, folder  # fmt: skip
        if name in API_REPLICAS:
            port = self.ports[name]
            command = [*python, "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
            env = self._server_env(name)
            if name != "api-a":  # api-a registers the block types (see up)
                env["PREFECT_API_BLOCKS_REGISTER_ON_START"] = "false"
            return [*command, "--no-services"], env, None
        if name in SERVICES:
            env = self._server_env(name)
            # INFO: the triggers log which automation covers which event (what a drill checks)
            env["PREFECT_SERVER_LOGGING_LEVEL"] = "INFO"
            return [*python, "prefect", "server", "services", "start"], env, None
        if name == "balancer":
            config = self.folder / "haproxy.cfg"
            replicas = {n: self.ports[n] for n in API_REPLICAS}
            config.write_text(
                render_config(
                    self.ports["balancer"], replicas, self.admin_socket, self.folder / "haproxy.pid"
                )
            )
            return [haproxy_binary(), "-db", "-f", str(config)], None, None
        if name == "dask":
            module = "deployments.cluster.supervisor"
            command = [
                *python,
                module,
                str(self.folder),
                str(self.ports["dask-scheduler"]),
                str(DASK_WORKERS),
            ]
            return command, {**os.environ, "PYTHONPATH": str(ROOT), "IRE_CLUSTER_DIR": str(self.folder)}, ROOT
        if name in NODES:
            env = {**os.environ, **self.client_env()}
            env["IRE_HOME"] = str(self.folder / name)
            env["PREFECT_HOME"] = str(self.folder / "prefect-home" / name)
            env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
            env["PREFECT_WORKER_PREFETCH_SECONDS"] = "2"
            command = [
                *python,
                "irefine",
                "worker",
                "--pool",
                "irefine-local",
                "--name",
                name,
                "--limit",
                "16",
            ]
            return command, env, ROOT
        raise ClusterError(f"no part named {name!r}")

    @property
    def admin_socket(self) -> Path:
        return self.folder / "haproxy.sock"

    def start_part(self, name: str, wait: bool = True) -> None:
        """Start part ``name`` (again: a drill's repair) and, with ``wait``, wait for its health."""
        if name.startswith("postgres-"):
            self.pids[name] = self.pg(name).start()
            self._save()
            return
        self._step(f"{name}: starting")
        command, env, cwd = self._command(name)
        if env is not None:
            env["PYTHONUNBUFFERED"] = "1"  # logs show what happened up to a kill -9
            if "PREFECT_HOME" in env:
                Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
        self.pids[name] = spawn(command, log=self._log_path(name), env=env, cwd=cwd)
        self.state.setdefault("started_at", {})[name] = time.time()
        self._save()
        if wait:
            self.wait_healthy(name)

    def _wait_api(self, name: str) -> None:
        wait_until(
            lambda: self.health(name) == "ok",
            API_START_TIMEOUT,
            lambda: (
                f"{name}: no 200 from /api/health on port {self.ports[name]} within "
                f"{API_START_TIMEOUT:.0f} s:\n{tail(self._log_path(name))}"
            ),
        )

    def wait_healthy(self, name: str, timeout: float = PART_TIMEOUT) -> float:
        """Wait until part ``name`` reports ``ok``; the seconds it took."""
        if name in API_REPLICAS or name in SERVICES:  # both import Prefect's server first (~50 s here)
            timeout = max(timeout, API_START_TIMEOUT)

        def failure() -> str:
            log = self._log_path(name)
            if name == "dask":
                log = self._log_path("dask-scheduler")
            return f"{name}: not healthy within {timeout:.0f} s (health {self.health(name)}):\n{tail(log)}"

        return wait_until(lambda: self.health(name) == "ok", timeout, failure)

    def _setup_project(self, job_limit: int) -> None:
        import subprocess

        env = {
            **os.environ,
            **self.client_env(),
            "PREFECT_HOME": str(self.folder / "prefect-home" / "client"),
        }
        for what, command in (
            ("irefine setup", ["irefine", "setup", "--no-aks", "--job-limit", str(job_limit)]),
            ("prefect deploy", ["prefect", "--no-prompt", "deploy", "--name", "refine"]),
        ):
            self._step(f"{what} through the balancer")
            done = subprocess.run(
                [sys.executable, "-m", *command],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if done.returncode != 0:
                raise ClusterError(
                    f"{what} failed ({done.returncode}): {(done.stderr or done.stdout)[-1500:]}"
                )

    # -- status -----------------------------------------------------------------------------------

    def dask_state(self) -> dict[str, Any]:
        """The supervisor's record: its children's pids and restarts."""
        with contextlib.suppress(OSError, ValueError):
            return dict(json.loads((self.folder / "dask.json").read_text()))
        return {}

    def part_pid(self, name: str) -> int | None:
        """The pid of part ``name`` (a Dask child from the supervisor's record)."""
        if name.startswith("postgres-"):
            return self.pg(name).pid()
        if name.startswith("dask-"):
            pid = self.dask_state().get("pids", {}).get(name)
            return int(pid) if pid else None
        return self.pids.get(name)

    def health(self, name: str) -> str:
        """``ok``, ``down`` or a short reason."""
        pid = self.part_pid(name)
        if name.startswith("postgres-"):
            return "ok" if self.pg(name).role() != "down" else "down"
        if name == "dask":
            if not alive(pid):
                return "down"
            state = self.dask_state()
            children = ["dask-scheduler", *(f"dask-worker-{n}" for n in range(DASK_WORKERS))]
            if not all(alive(state.get("pids", {}).get(c)) for c in children):
                return "starting"
            return "ok" if self._dask_workers() >= DASK_WORKERS else "waiting for workers"
        if not alive(pid):
            return "down"
        if name == "redis":
            return "ok" if self._redis_ping() else "no PING"
        if name in API_REPLICAS or name == "balancer":
            import httpx

            url = f"http://127.0.0.1:{self.ports[name]}/api/health"
            try:
                return "ok" if httpx.get(url, timeout=2).status_code == 200 else "unhealthy"
            except httpx.HTTPError:
                return "no answer"
        if name == "dask-scheduler":
            return "ok" if port_open(self.ports[name]) else "no answer"
        # A process that is still alive a few seconds after its start got past its set-up.
        started = self.state.get("started_at", {}).get(name, 0.0)
        return "ok" if time.time() - started > SETTLE_SECONDS else "starting"

    def _redis_ping(self) -> bool:
        import socket

        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.ports["redis"]), 1) as s,
        ):
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
        return False

    def _triggers_backlog(self) -> str:
        """The automation triggers' consumer group on Prefect's ``events`` stream in Redis: its
        consumers and its lag (events not yet read by any of them). Redis 7.0 reports a consumer's
        idle time since its last *delivery*, so an idle count says nothing on a quiet cluster
        (it misled an earlier diagnosis); the lag does: 0 means the triggers keep up."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.ports["redis"], socket_timeout=2)
        try:
            groups = {g["name"]: g for g in client.xinfo_groups("events")}
        except redis.RedisError as exc:
            return f"unknown ({type(exc).__name__})"
        finally:
            client.close()
        group = groups.get(b"reactive-triggers") or groups.get("reactive-triggers")
        if group is None:
            return "no consumer group"
        return f"{group['consumers']} consumers, lag {group.get('lag')}"

    def _dask_workers(self) -> int:
        """Workers the scheduler knows, from the supervisor's worker logs (no client import)."""
        count = 0
        for n in range(DASK_WORKERS):
            text = tail(self._log_path(f"dask-worker-{n}"), 40)
            last_register = text.rfind("Registered to:")
            last_start = text.rfind("Start worker at:")
            if last_register >= 0 and last_register > last_start:
                count += 1
        return count

    def status(self) -> list[dict[str, Any]]:
        """Each part: name, pid, address, health, role, zone."""
        if not self.state.get("ports"):
            return []
        parts: list[dict[str, Any]] = []
        states: dict[str, str] = {}
        with contextlib.suppress(ClusterError, OSError, ValueError):
            states = server_states(self.admin_socket)
        names = ["postgres-a", "postgres-b", "redis", *API_REPLICAS, "balancer", *SERVICES, "dask"]
        names += ["dask-scheduler", *(f"dask-worker-{n}" for n in range(DASK_WORKERS)), *NODES]
        for name in names:
            port = self.ports.get(name)
            role: str | None = None
            if name.startswith("postgres-"):
                role = self.pg(name).role()
                role = None if role == "down" else role
            elif name in API_REPLICAS:
                role = f"balancer: {states.get(name, 'unknown')}"
            elif name in SERVICES:
                # Automations fire only while some services process consumes events for the triggers.
                role = f"triggers: {self._triggers_backlog()}"
            parts.append(
                {
                    "name": name,
                    "pid": self.part_pid(name),
                    "address": f"127.0.0.1:{port}" if port else None,
                    "health": self.health(name),
                    "role": role,
                    "zone": "b" if name in ZONE_B else "a",
                }
            )
        return parts

    # -- faults and repairs -----------------------------------------------------------------------

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to part ``name``'s whole process group (a lost process or node)."""
        pid = self.part_pid(name)
        if not pid:
            raise ClusterError(f"{name}: no such running part")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)

    def drain(self, replica: str) -> None:
        """Take ``replica`` out of the balancer: no new requests, open ones finish."""
        set_state(self.admin_socket, replica, "drain")

    def undrain(self, replica: str) -> None:
        set_state(self.admin_socket, replica, "ready")

    def failover(self) -> dict[str, Any]:
        """Fence the primary, promote the replica, rewind the old primary as the new replica.

        Clients hold multi-host URLs with ``target_session_attrs=read-write``: their next
        connection finds the new primary. Returns the seconds each step took.
        """
        old, new = self.pg(self.primary), self.pg(self.replica)
        if new.role() != "replica":
            raise ClusterError(f"{new.name}: not a running replica (role {new.role()}); nothing to promote")
        timings: dict[str, Any] = {"old_primary": old.name, "new_primary": new.name}
        t0 = time.monotonic()
        old.stop("fast")  # fencing: the old primary takes no write after this point
        timings["fence_s"] = round(time.monotonic() - t0, 2)
        t1 = time.monotonic()
        new.promote()
        self.state["primary"] = new.name
        self._save()
        timings["promote_s"] = round(time.monotonic() - t1, 2)
        t2 = time.monotonic()
        old.rejoin_as_replica(new)
        wait_until(
            lambda: old.role() == "replica",
            PART_TIMEOUT,
            lambda: f"{old.name}: did not come back as replica:\n{tail(old.log)}",
        )
        timings["rejoin_s"] = round(time.monotonic() - t2, 2)
        timings["total_s"] = round(time.monotonic() - t0, 2)
        return timings

    # -- down -------------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Stop every part; the names of the parts that were running.

        The nodes go first (SIGTERM: their flow runs end with them), then every other process
        group at once, SIGKILL for what is left after :data:`STOP_SECONDS`, and PostgreSQL last.
        """
        stopped: list[str] = []
        order = [*NODES, "dask", *SERVICES, "balancer", *API_REPLICAS, "redis"]
        groups = {name: self.pids[name] for name in order if self.pids.get(name)}
        groups.update({f"{n} (dask)": int(p) for n, p in self.dask_state().get("pids", {}).items()})
        stopped = [name for name, pid in groups.items() if alive(pid) and "(dask)" not in name]
        for name in NODES:
            if name in groups:
                stop_group(groups.pop(name), timeout=STOP_SECONDS)
        for pid in groups.values():
            signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_SECONDS
        while time.monotonic() < deadline and any(group_alive(pid) for pid in groups.values()):
            reap()
            time.sleep(0.2)
        for pid in groups.values():
            stop_group(pid, timeout=1)
        for name in ("postgres-b", "postgres-a"):
            if name in self.ports:
                node = self.pg(name)
                if node.pid():
                    stopped.append(name)
                node.stop("fast")
        reap()
        if self.state:
            self.state["pids"] = {}
            self._save()
        return stopped

    def leftovers(self) -> list[int]:
        """Processes of this cluster still running (none after :meth:`down`)."""
        found = []
        marker = str(self.folder)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    environ = (entry / "environ").read_bytes().decode(errors="replace")
                    if alive(int(entry.name)) and (marker in cmdline or f"={marker}" in environ):
                        found.append(int(entry.name))
        return found
