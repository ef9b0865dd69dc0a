"""The Redis adapter of the inference cache: one MGET per look-up batch, one pipeline per write batch.

URLs: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS, options such as
``?ssl_cert_reqs=required`` as redis-py reads them), ``unix:///path/redis.sock?db=0``, and Redis
Sentinel as ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]``
(``rediss+sentinel://`` for TLS; ``?sentinel_password=...`` when the sentinels need their own
password). redis-py has no Sentinel URL scheme of its own: this module parses that form and uses
``redis.sentinel.Sentinel(...).master_for(service)``, which follows failovers.

A Redis outage never fails a job: calls return misses at once, one warning is logged, and the
connection is retried with exponential backoff (0.5 s doubling to 30 s) until Redis answers again.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from engine.cache.base import (
    CLAIM_SUFFIX,
    DEFAULT_NAMESPACE,
    DEFAULT_TTL_SECONDS,
    CacheCounters,
    CacheStats,
    CacheUnavailableError,
    Claim,
    check_ttl,
    claim_key,
    decode_found,
    encode_items,
    key_prefix,
    redact_url,
    scoped_prefix,
)
from engine.core.errors import SpecError
from engine.core.evaluation import Evaluation

__all__ = ["RedisCache", "LRU_POLICIES"]

log = logging.getLogger(__name__)

#: Eviction policies that drop the least recently (or frequently) used keys; every cache entry has
#: a TTL, so the ``volatile-*`` variants evict cache entries too.
LRU_POLICIES: Final = frozenset({"allkeys-lru", "volatile-lru", "allkeys-lfu", "volatile-lfu"})
_MANAGED_POLICY: Final = "allkeys-lru"
_CHUNK: Final = 10_000  # keys per MGET and commands per pipeline execution
_OUTAGE_ERRORS: Final = (redis.RedisError, OSError)
_CLAIM_CHUNK: Final = 1_000  # keys per claim script call (the script blocks Redis while it runs)
_CLAIM_STATES: Final = (Claim.OWNED, Claim.BUSY, Claim.STORED)

# KEYS: entry, lease, entry, lease, ...; ARGV: owner, lease ms. Per key: 2 = an entry is stored,
# 1 = another owner's lease is live, 0 = the lease is (now) the owner's, taken or renewed.
_CLAIM_SCRIPT: Final = """
local owner, px, out = ARGV[1], ARGV[2], {}
for i = 1, #KEYS, 2 do
  local state = 0
  if redis.call('EXISTS', KEYS[i]) == 1 then
    state = 2
  else
    local holder = redis.call('GET', KEYS[i + 1])
    if not holder then
      redis.call('SET', KEYS[i + 1], owner, 'PX', px)
    elseif holder == owner then
      redis.call('PEXPIRE', KEYS[i + 1], px)
    else
      state = 1
    end
  end
  out[#out + 1] = state
end
return out
"""
# KEYS: leases; ARGV: owner. Deletes only the owner's own leases.
_RELEASE_SCRIPT: Final = """
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
    n = n + 1
  end
end
return n
"""

_LEASE_SUFFIX: Final = CLAIM_SUFFIX.encode()


def _is_lease(key: bytes) -> bool:
    """True for an in-flight lease key (an entry key has three ':', a lease one more)."""
    return key.endswith(_LEASE_SUFFIX) and key.count(b":") == 4


def _glob_escape(text: str) -> str:
    """``text`` with the glob characters of SCAN MATCH escaped."""
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def _sentinel_client(
    url: str, sentinel_kwargs: dict[str, Any], **kwargs: Any
) -> tuple[redis.Redis, Sentinel]:
    """A client of the master named in a ``redis+sentinel://`` URL, and its Sentinel manager."""
    parts = urlsplit(url)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    if userinfo:
        user, has_password, password = userinfo.partition(":")
        kwargs["username"] = unquote(user) or None
        kwargs["password"] = unquote(password) if has_password else None
    sentinels: list[tuple[str, int]] = []
    for item in filter(None, hostlist.split(",")):
        match = re.fullmatch(r"\[?([^\[\]]+?)\]?(?::(\d+))?", item)
        if not match:
            raise SpecError(f"Redis Sentinel URL {redact_url(url)!r}: cannot read the address {item!r}")
        sentinels.append((match.group(1), int(match.group(2) or 26379)))
    segments = [unquote(s) for s in parts.path.split("/") if s]
    db_ok = len(segments) == 1 or (len(segments) == 2 and segments[1].isdigit())
    if not sentinels or not db_ok:
        raise SpecError(
            f"Redis Sentinel URL {redact_url(url)!r}: use "
            "redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]"
        )
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    ssl = parts.scheme.lower().startswith("rediss")
    sentinel_kwargs = {
        **sentinel_kwargs,
        "username": query.get("sentinel_username"),
        "password": query.get("sentinel_password"),
        "ssl": ssl,
    }
    manager = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    db = int(segments[1]) if len(segments) == 2 else 0
    client: redis.Redis = manager.master_for(  # type: ignore[no-untyped-call]
        segments[0], db=db, ssl=ssl, **kwargs
    )
    return client, manager


class RedisCache:
    """An :class:`~engine.cache.InferenceCache` on Redis (see the module docstring for URLs).

    Entries are ``SET key json PX ttl``; look-ups one ``MGET`` per batch (chunked at 10,000 keys,
    the chunks sent in one pipeline). The client connects lazily; on its first contact (and again
    after each outage) it reads ``maxmemory-policy`` and warns once if it is not an LRU/LFU policy;
    with ``manage_server=True`` it sets ``allkeys-lru`` instead (a managed Redis that disables
    CONFIG gets a warning). Socket timeouts are short (``socket_connect_timeout`` 1 s,
    ``socket_timeout`` 2 s) so a dead server costs a cycle at most a few seconds, once per retry.

    Thread-safe; each process (also after a fork) uses its own connections. Counters in
    :meth:`stats` are per object; ``entries`` is None (DBSIZE would count other applications'
    keys) and ``memory_bytes`` the server's ``used_memory``.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        default_ttl_seconds: float = DEFAULT_TTL_SECONDS,
        manage_server: bool = False,
        socket_connect_timeout: float = 1.0,
        socket_timeout: float = 2.0,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._namespace = key_prefix(namespace)[:-1]
        self._default_ttl = check_ttl(default_ttl_seconds, DEFAULT_TTL_SECONDS)
        self._manage_server = manage_server
        self._shown_url = redact_url(url)
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._clock = clock
        self._sentinel: Sentinel | None = None
        timeouts = {"socket_connect_timeout": socket_connect_timeout, "socket_timeout": socket_timeout}
        # One immediate retry on a dropped connection (a pooled socket closed by a restart); timeouts
        # are not retried, so a hung server costs one timeout per attempt.
        retry = Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
        scheme = url.partition("://")[0].lower()
        try:
            if scheme in ("redis+sentinel", "rediss+sentinel"):
                sentinel_kwargs = {**timeouts, "retry": Retry(NoBackoff(), 0)}
                self._client, self._sentinel = _sentinel_client(url, sentinel_kwargs, **timeouts, retry=retry)
            elif scheme in ("redis", "rediss", "unix"):
                self._client = redis.Redis.from_url(url, **timeouts, retry=retry)
            else:
                raise ValueError("the scheme must be redis, rediss, unix or redis+sentinel")
        except (ValueError, TypeError) as exc:
            raise SpecError(f"Redis URL {self._shown_url!r}: {exc}") from None
        if self._client.get_connection_kwargs().get("decode_responses"):
            raise SpecError(f"Redis URL {self._shown_url!r}: remove decode_responses (values are bytes)")

        self._claim_script = self._client.register_script(_CLAIM_SCRIPT)
        self._release_script = self._client.register_script(_RELEASE_SCRIPT)
        self._claims_refused = False  # the server refuses scripts: every key is computed here
        self._lock = threading.Lock()
        self._down = False  # in an outage: skip the network until _retry_at
        self._down_since = 0.0
        self._retry_at = 0.0
        self._backoff = retry_initial
        self._policy_due = True  # check maxmemory-policy on the next successful contact
        self._policy_warned = False
        self._write_refusal_warned = False
        self._encode_warned = [False]
        self._counters = CacheCounters()

    # -- the port ---------------------------------------------------------------------------------

    @property
    def namespace(self) -> str:
        """The (sanitised) namespace of this cache's keys."""
        return self._namespace

    def get_many(self, keys: Sequence[str]) -> list[Evaluation | None]:
        """The cached evaluations of ``keys`` in order (None = miss); all misses during an outage."""
        n = len(keys)
        if n == 0:
            return []
        if not self._usable():
            self._counters.add(unavailable=n)
            return [None] * n
        try:
            self._check_policy()
            if n <= _CHUNK:
                raws: list[Any] = self._client.mget(keys)
            else:
                pipe = self._client.pipeline(transaction=False)
                for start in range(0, n, _CHUNK):
                    pipe.mget(keys[start : start + _CHUNK])
                raws = [raw for chunk in pipe.execute() for raw in chunk]
        except _OUTAGE_ERRORS as exc:
            self._failed(exc)
            self._counters.add(unavailable=n)
            return [None] * n
        self._succeeded()
        out, hits, rejected = decode_found(keys, lambda i, _: raws[i])
        self._counters.add(hits=hits, misses=n - hits, rejected=rejected)
        return out

    def put_many(self, items: Sequence[tuple[str, Evaluation]], ttl_seconds: float | None = None) -> None:
        """Store the items with ``SET ... PX`` in one pipeline; drop them during an outage."""
        ttl = check_ttl(ttl_seconds, self._default_ttl)
        if not items:
            return
        if not self._usable():
            self._counters.add(unwritten=len(items))
            return
        encoded, skipped = encode_items(items, self._encode_warned)
        px = max(1, round(ttl * 1000))
        written = 0
        try:
            self._check_policy()
            pipe = self._client.pipeline(transaction=False)
            pending = 0
            for key, value in encoded.items():
                pipe.set(key, value, px=px)
                pending += 1
                if pending == _CHUNK:
                    pipe.execute()
                    written, pending = written + pending, 0
            if pending:
                pipe.execute()
                written += pending
        except redis.ResponseError as exc:  # e.g. OOM under noeviction: the server is up but refuses
            self._succeeded()
            self._counters.add(writes=written, unwritten=len(encoded) - written + skipped)
            with self._lock:
                first, self._write_refusal_warned = not self._write_refusal_warned, True
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "inference cache: Redis at %s refused a write (%s); those evaluations are not cached",
                self._shown_url,
                exc,
            )
            return
        except _OUTAGE_ERRORS as exc:
            self._failed(exc)
            self._counters.add(writes=written, unwritten=len(encoded) - written + skipped)
            return
        self._succeeded()
        self._counters.add(writes=written, unwritten=skipped)

    def claim_many(self, keys: Sequence[str], owner: str, ttl_seconds: float) -> list[Claim]:
        """Leases as ``SET key:inflight owner NX PX ttl`` in a Lua script (atomic with the entry
        check); every key OWNED during an outage or if the server refuses scripts."""
        ttl = check_ttl(ttl_seconds, self._default_ttl)
        if not keys:
            return []
        if self._claims_refused or not self._usable():
            return [Claim.OWNED] * len(keys)
        px = max(1, round(ttl * 1000))
        try:
            pipe = self._client.pipeline(transaction=False)
            for start in range(0, len(keys), _CLAIM_CHUNK):
                chunk = keys[start : start + _CLAIM_CHUNK]
                pair_keys = [k for key in chunk for k in (key, claim_key(key))]
                self._claim_script(keys=pair_keys, args=[owner, px], client=pipe)
            states = [int(state) for chunk_states in pipe.execute() for state in chunk_states]
        except redis.ResponseError as exc:  # e.g. EVAL denied by an ACL or a managed service
            self._refuse_claims(exc)
            return [Claim.OWNED] * len(keys)
        except _OUTAGE_ERRORS as exc:
            self._failed(exc)
            return [Claim.OWNED] * len(keys)
        self._succeeded()
        return [_CLAIM_STATES[state] for state in states]

    def release_many(self, keys: Sequence[str], owner: str) -> None:
        """Delete the owner's own leases on ``keys`` (a script: GET == owner, then DEL)."""
        if not keys or self._claims_refused or not self._usable():
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for start in range(0, len(keys), _CLAIM_CHUNK):
                chunk = [claim_key(key) for key in keys[start : start + _CLAIM_CHUNK]]
                self._release_script(keys=chunk, args=[owner], client=pipe)
            pipe.execute()
        except redis.ResponseError as exc:
            self._refuse_claims(exc)
        except _OUTAGE_ERRORS as exc:  # the leases expire by themselves
            self._failed(exc)
        else:
            self._succeeded()

    def _refuse_claims(self, exc: BaseException) -> None:
        with self._lock:
            first, self._claims_refused = not self._claims_refused, True
        if first:
            log.warning(
                "inference cache: Redis at %s refuses the in-flight lease script (%s); jobs sharing "
                "this cache may compute the same candidate at the same time",
                self._shown_url,
                exc,
            )

    def stats(self) -> CacheStats:
        """Counters of this object; ``memory_bytes`` from ``INFO memory`` when Redis is reachable."""
        memory: int | None = None
        if self._usable():
            try:
                memory = int(self._client.info("memory")["used_memory"])
            except _OUTAGE_ERRORS as exc:
                self._failed(exc)
            except (KeyError, TypeError, ValueError):
                pass
            else:
                self._succeeded()
        return self._counters.stats(entries=None, memory_bytes=memory, backend="redis")

    def clear(self, prefix: str = "") -> int:
        """Delete this namespace's keys starting with ``prefix`` (SCAN + UNLINK); return how many."""
        pattern = _glob_escape(scoped_prefix(self._namespace, prefix)) + "*"
        removed = 0
        try:
            batch: list[bytes] = []
            for key in self._client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    removed += int(self._client.unlink(*batch))
                    batch = []
            if batch:
                removed += int(self._client.unlink(*batch))
        except _OUTAGE_ERRORS as exc:
            self._failed(exc)
            raise CacheUnavailableError(
                f"cannot clear the inference cache: Redis at {self._shown_url} is unavailable ({exc})"
            ) from None
        self._succeeded()
        return removed

    def count(self, prefix: str = "") -> int:
        """How many entries of this namespace start with ``prefix`` (a SCAN: an admin operation;
        in-flight leases are not counted)."""
        pattern = _glob_escape(scoped_prefix(self._namespace, prefix)) + "*"
        try:
            return sum(1 for key in self._client.scan_iter(match=pattern, count=1000) if not _is_lease(key))
        except _OUTAGE_ERRORS as exc:
            self._failed(exc)
            raise CacheUnavailableError(
                f"cannot count the inference cache: Redis at {self._shown_url} is unavailable ({exc})"
            ) from None

    def close(self) -> None:
        """Close the connection pool (and the Sentinel connections)."""
        self._client.close()
        if self._sentinel is not None:
            for sentinel in self._sentinel.sentinels:
                sentinel.close()

    def __repr__(self) -> str:
        return f"RedisCache({self._shown_url!r}, namespace={self._namespace!r})"

    # -- outages ----------------------------------------------------------------------------------

    def _usable(self) -> bool:
        """False while in an outage and before the next retry time."""
        if not self._down:
            return True
        with self._lock:
            return not self._down or self._clock() >= self._retry_at

    def _failed(self, exc: BaseException) -> None:
        """Enter (or prolong) an outage: one warning per outage, then retries with backoff."""
        with self._lock:
            first = not self._down
            now = self._clock()
            if first:
                self._down, self._down_since, self._backoff = True, now, self._retry_initial
            else:
                self._backoff = min(self._backoff * 2, self._retry_max)
            self._retry_at = now + self._backoff
            self._policy_due = True
            backoff = self._backoff
        if first:
            log.warning(
                "inference cache: Redis at %s is unavailable (%s: %s); the job goes on without the "
                "cache (look-ups count as misses) and reconnects with backoff",
                self._shown_url,
                type(exc).__name__,
                exc,
            )
        else:
            log.debug("inference cache: Redis still unavailable (%s); next try in %.1f s", exc, backoff)

    def _succeeded(self) -> None:
        """Leave an outage, if in one: log that the cache is back and reset the backoff."""
        if not self._down:
            return
        with self._lock:
            if not self._down:
                return
            self._down = False
            self._backoff = self._retry_initial
            down_for = self._clock() - self._down_since
        log.info("inference cache: redis cache is back at %s after %.1f s", self._shown_url, down_for)

    def _check_policy(self) -> None:
        """On first contact (and after outages) make sure Redis evicts by LRU; warn once if not.

        Connection errors propagate (the caller treats them as an outage); a server that refuses
        CONFIG (managed Redis) is told about once and not asked again.
        """
        if not self._policy_due:
            return
        try:
            reply = self._client.config_get("maxmemory-policy")
        except redis.ResponseError as exc:
            self._policy_due = False
            log.info("inference cache: cannot read maxmemory-policy from Redis (%s); not checked", exc)
            return
        self._policy_due = False
        values: dict[Any, Any] = dict(reply)
        raw = values.get("maxmemory-policy") or values.get(b"maxmemory-policy") or b""
        policy = raw.decode() if isinstance(raw, bytes) else str(raw)
        if policy in LRU_POLICIES:
            return
        if self._manage_server:
            try:
                self._client.config_set("maxmemory-policy", _MANAGED_POLICY)
            except redis.ResponseError as exc:
                self._warn_policy(policy, f"setting {_MANAGED_POLICY} failed: {exc}")
            else:
                log.info(
                    "inference cache: set Redis maxmemory-policy from %r to %r at %s",
                    policy,
                    _MANAGED_POLICY,
                    self._shown_url,
                )
            return
        self._warn_policy(policy, f"set maxmemory-policy {_MANAGED_POLICY} or let the engine manage it")

    def _warn_policy(self, policy: str, advice: str) -> None:
        with self._lock:
            first, self._policy_warned = not self._policy_warned, True
        if not first:
            return
        log.warning(
            "inference cache: Redis at %s has maxmemory-policy %r, not an LRU policy: when it fills "
            "up it %s; %s",
            self._shown_url,
            policy,
            "refuses writes" if policy == "noeviction" else "does not evict the least recently used",
            advice,
        )
