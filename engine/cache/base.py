"""The inference-cache port: keys, the JSON value format, statistics and the :class:`InferenceCache` contract.

A cache entry maps ``namespace:problem:version:fingerprint`` to one :class:`~engine.core.Evaluation`
stored as a small JSON object (never pickle: whoever can write to the cache must not be able to run
code in the engine). Bumping a problem's version changes every key of that problem, so earlier
entries become unreachable and expire by their TTL.
"""

from __future__ import annotations

import enum
import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode

import orjson

from engine.core.errors import SpecError, TransientError
from engine.core.evaluation import Evaluation, Status

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_TTL_SECONDS",
    "CacheStats",
    "Claim",
    "CacheUnavailableError",
    "InferenceCache",
    "cache_key",
    "key_prefix",
    "encode_evaluation",
    "decode_evaluation",
    "DEFAULT_MAX_ENTRIES",
    "claim_key",
    "redact_url",
]

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE: Final = "ire"
DEFAULT_TTL_SECONDS: Final = 7 * 24 * 3600.0
DEFAULT_MAX_ENTRIES: Final = 1_000_000
"""The embedded cache's bound unless configured (Redis is bounded by its own ``maxmemory``)."""
FORMAT_VERSION: Final = 1
_JSON_OPTS: Final = orjson.OPT_SERIALIZE_NUMPY  # the job store's options: same bytes, same read-back
_UNSAFE = re.compile(r"[:\s]")
CLAIM_SUFFIX: Final = ":inflight"
_USERINFO_PASSWORD = re.compile(r"(://[^/@?#]*?:)[^/@?#]*@")
_SECRET_PARAM = re.compile(r"pass|secret|token|key", re.IGNORECASE)


class CacheUnavailableError(TransientError):
    """The cache backend could not be reached for an explicit administrative call (``clear``)."""


# -- keys -----------------------------------------------------------------------------------------


def _part(value: str, what: str) -> str:
    """One key component: ':' becomes '.' and whitespace '_' so components never run together."""
    if not value:
        raise SpecError(f"cache key {what} must not be empty")
    return _UNSAFE.sub(lambda m: "." if m.group() == ":" else "_", value)


def cache_key(namespace: str, problem: str, version: str, fingerprint: str) -> str:
    """The key of one candidate's evaluation: ``namespace:problem:version:fingerprint``.

    ``problem`` may be an import path such as ``"pkg.mod:Cls"``: inside each component ':' becomes
    '.' and whitespace '_', so the four components always split back apart unambiguously.
    """
    return (
        f"{_part(namespace, 'namespace')}:{_part(problem, 'problem')}:"
        f"{_part(version, 'version')}:{_part(fingerprint, 'fingerprint')}"
    )


def key_prefix(namespace: str, problem: str | None = None, version: str | None = None) -> str:
    """The prefix shared by the keys of a namespace, of one problem, or of one problem version.

    Pass it to :meth:`InferenceCache.clear`. It always ends with ':' so that problem ``"a"`` does
    not also match problem ``"ab"``.
    """
    if version is not None and problem is None:
        raise SpecError("key_prefix: a version needs a problem")
    parts = [_part(namespace, "namespace")]
    if problem is not None:
        parts.append(_part(problem, "problem"))
    if version is not None:
        parts.append(_part(version, "version"))
    return ":".join(parts) + ":"


def claim_key(key: str) -> str:
    """Where the in-flight lease on ``key`` lives: ``key + ":inflight"`` (one component more than
    any entry key, so it is never read as an entry and ``clear`` of a prefix removes it too)."""
    return key + CLAIM_SUFFIX


def redact_url(url: str) -> str:
    """``url`` with its password and any secret-looking query value (``*password*``, ``*secret*``,
    ``*token*``, ``*key*``) replaced by ``***``: safe for reprs, logs and error messages."""
    shown = _USERINFO_PASSWORD.sub(r"\1***@", url)
    base, sep, query = shown.partition("?")
    if not sep:
        return shown
    fragment = ""
    query, hashmark, rest = query.partition("#")
    if hashmark:
        fragment = "#" + rest
    params = [
        (k, "***" if _SECRET_PARAM.search(k) else v) for k, v in parse_qsl(query, keep_blank_values=True)
    ]
    return base + "?" + urlencode(params, safe="*/") + fragment


# -- values ---------------------------------------------------------------------------------------


def encode_evaluation(ev: Evaluation) -> bytes:
    """The JSON bytes stored for ``ev``: ``{"v": 1, "score", "status", "metrics", "error", "duration"}``.

    ``status`` is ``"failed"`` for a failure and ``"ok"`` otherwise (a ``CACHED`` evaluation put
    again is stored as ``"ok"``). Metrics are written as the job store writes them (orjson with
    numpy support): JSON types round-trip exactly; tuples come back as lists, numpy values as
    numbers or lists; NaN and infinities in metrics become ``null``.

    Raise :class:`ValueError` for a non-finite score and :class:`TypeError` for metrics that are
    not JSON-serialisable (e.g. non-string keys, arbitrary objects); adapters skip such items.
    """
    score = ev.score
    if score is not None:
        score = float(score)
        if not math.isfinite(score):
            raise ValueError(f"score {score} is not finite")
    value = {
        "v": FORMAT_VERSION,
        "score": score,
        "status": "failed" if ev.status is Status.FAILED else "ok",
        "metrics": ev.metrics,
        "error": ev.error,
        "duration": float(ev.duration),
    }
    return orjson.dumps(value, option=_JSON_OPTS)


_NUMBER: Final = (float, int)  # orjson returns exactly these types (bool is its own)


def _decode(raw: bytes | bytearray | memoryview | str) -> Evaluation | str:
    """The evaluation in ``raw``, or a short reason why ``raw`` is not a valid entry."""
    if raw[:1] in (b"\x80", "\x80"):
        return "a pickle (refused: pickles can run code)"
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "not JSON"
    if type(obj) is not dict:
        return "not a JSON object"
    get: Callable[[str], Any] = obj.get
    if get("v") != FORMAT_VERSION:
        return f"unknown format version {get('v')!r}"
    score, status, metrics, error, duration = (
        get("score"),
        get("status"),
        get("metrics"),
        get("error"),
        get("duration"),
    )
    if score is not None and type(score) not in _NUMBER:
        return "score is not a number"
    if status != "ok" and status != "failed":
        return "unknown status"
    if type(metrics) is not dict:
        return "metrics is not an object"
    if error is not None and type(error) is not str:
        return "error is not a string"
    if type(duration) not in _NUMBER:
        return "duration is not a number"
    return Evaluation(
        None if score is None else float(score),
        Status.CACHED if status == "ok" else Status.FAILED,
        metrics,
        error,
        float(duration),
    )


_warned_lock = threading.Lock()
_warned_rejected = False


def _warn_rejected(key: str | None, reason: str) -> None:
    """Log the first rejected entry of the process as a warning, later ones at debug level."""
    global _warned_rejected
    where = f" under key {key!r}" if key is not None else ""
    with _warned_lock:
        first, _warned_rejected = not _warned_rejected, True
    if first:
        log.warning(
            "inference cache: ignored an entry%s: %s; it is treated as a miss and overwritten "
            "(further rejected entries are logged at debug level)",
            where,
            reason,
        )
    else:
        log.debug("inference cache: ignored an entry%s: %s", where, reason)


def decode_evaluation(raw: bytes | bytearray | memoryview | str, key: str | None = None) -> Evaluation | None:
    """The evaluation stored in ``raw``, or None if ``raw`` is not a valid cache entry.

    Anything but a JSON object of the shape :func:`encode_evaluation` writes is refused without
    being interpreted further: a pickle (bytes starting with the protocol header ``0x80``), other
    formats, garbage. The first refusal of the process is logged as a warning. A successful result
    has status ``CACHED``, or ``FAILED`` (with its error) if a failure was cached.
    """
    result = _decode(raw)
    if isinstance(result, str):
        _warn_rejected(key, result)
        return None
    return result


def decode_found(
    keys: Sequence[str], found: Callable[[int, str], bytes | str | None]
) -> tuple[list[Evaluation | None], int, int]:
    """The evaluations a look-up of ``keys`` found (``found(i, key)``: the raw entry, None on a
    miss), in order, each key's entry decoded once (:func:`decode_evaluation`); with the number of
    hits and of entries rejected."""
    out: list[Evaluation | None] = []
    hits = rejected = 0
    decoded: dict[str, Evaluation | None] = {}
    for i, key in enumerate(keys):
        if key in decoded:
            ev = decoded[key]
        else:
            raw = found(i, key)
            ev = None if raw is None else decode_evaluation(raw, key)
            rejected += raw is not None and ev is None
            decoded[key] = ev
        hits += ev is not None
        out.append(ev)
    return out, hits, rejected


# -- statistics and the port ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters of one cache object (this process only) and, where cheap, the backend's size.

    ``hits + misses`` are the look-ups the backend answered; ``rejected`` (entries refused as not
    valid JSON evaluations, e.g. pickles) are counted among the misses. ``unavailable`` are the
    look-ups that could not be checked because the backend was down. ``writes`` are the entries
    stored; ``unwritten`` those that were not (backend down, or a value not JSON-encodable).
    ``entries`` and ``memory_bytes`` are None when the backend cannot tell them cheaply; for Redis
    ``memory_bytes`` is the server's ``used_memory``.
    """

    hits: int
    misses: int
    unavailable: int
    writes: int
    rejected: int
    entries: int | None
    memory_bytes: int | None
    backend: str
    unwritten: int = 0

    @property
    def hit_rate(self) -> float:
        """Share of all look-ups answered from the cache (0.0 before the first look-up)."""
        total = self.hits + self.misses + self.unavailable
        return self.hits / total if total else 0.0


class CacheCounters:
    """The process-local counters behind :class:`CacheStats`, shared by the adapters; thread-safe."""

    _FIELDS = ("hits", "misses", "unavailable", "writes", "rejected", "unwritten")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(self._FIELDS, 0)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._values[name] += delta

    def stats(self, *, entries: int | None, memory_bytes: int | None, backend: str) -> CacheStats:
        with self._lock:
            return CacheStats(**self._values, entries=entries, memory_bytes=memory_bytes, backend=backend)


class Claim(enum.Enum):
    """What :meth:`InferenceCache.claim_many` found for one key."""

    OWNED = "owned"  # the caller holds the lease now: compute the candidate, write it, release
    BUSY = "busy"  # another owner holds a live lease: wait for its entry (or for the lease to end)
    STORED = "stored"  # the key has an entry: read it with get_many


@runtime_checkable
class InferenceCache(Protocol):
    """A cache of evaluations keyed by :func:`cache_key`: batched, JSON-valued, with TTL and LRU.

    Contract shared by every adapter (and checked by ``tests/test_cache.py``):

    * **Batches.** :meth:`get_many` answers one whole batch with one backend round trip (or a few
      for very large batches) and returns a list in the order of ``keys`` (None for a miss;
      duplicate keys allowed). :meth:`put_many` stores a batch the same way; a later item wins
      over an earlier one with the same key.
    * **Values.** Only JSON written by :func:`encode_evaluation` is ever read back; anything else
      (a pickle, garbage) is a miss, counted as ``rejected``. A hit has status ``CACHED`` with
      score, metrics, error and duration preserved; a cached failure comes back ``FAILED`` with
      its error (only failures the caller chose to put are cached).
    * **Lifetime.** Every entry has a TTL (the adapter's default or ``ttl_seconds``, fractions
      allowed); the backend evicts least-recently-used entries when it reaches its bound.
    * **Outages never raise.** If the backend is unreachable, :meth:`get_many` returns all misses
      (counted as ``unavailable``), :meth:`put_many` drops the batch (counted as ``unwritten``)
      and :meth:`stats` reports what it knows; one warning is logged per outage and the adapter
      reconnects by itself. Programming errors (a bad ``ttl_seconds``) still raise.
    * **Concurrency.** Safe to share between threads; adapters document what they guarantee
      across processes.
    * :meth:`clear` only touches keys of this cache's :attr:`namespace`, and raises
      :class:`CacheUnavailableError` when the backend is down (it is an explicit request).
    * **In-flight leases** (so that jobs sharing the cache compute a candidate once):
      :meth:`claim_many` answers, per key and atomically, :attr:`Claim.STORED` when an entry
      exists, :attr:`Claim.BUSY` when another owner holds a live lease, else takes (or, for the
      same owner, renews) a lease of ``ttl_seconds`` and answers :attr:`Claim.OWNED`. A lease
      ends when its holder calls :meth:`release_many` or when it expires (a holder that died), so
      a holder renews it by claiming again before it runs out. Leases work across processes
      (Redis: across machines; embedded: the processes of one machine). During an outage every
      key is OWNED (each job computes, as without a cache) and a release does nothing.
    """

    @property
    def namespace(self) -> str:
        """The namespace the keys of this deployment start with (first argument of cache_key)."""
        ...

    def get_many(self, keys: Sequence[str]) -> list[Evaluation | None]:
        """The cached evaluations of ``keys``, in the same order; None for each miss."""
        ...

    def put_many(self, items: Sequence[tuple[str, Evaluation]], ttl_seconds: float | None = None) -> None:
        """Store ``(key, evaluation)`` pairs, each for ``ttl_seconds`` (default: the adapter's TTL)."""
        ...

    def stats(self) -> CacheStats:
        """Counters since this object was created, plus the backend's size where cheap."""
        ...

    def claim_many(self, keys: Sequence[str], owner: str, ttl_seconds: float) -> list[Claim]:
        """Take or renew ``owner``'s lease on each key without an entry or another live holder."""
        ...

    def release_many(self, keys: Sequence[str], owner: str) -> None:
        """End ``owner``'s leases on ``keys``; leases of other owners are left alone."""
        ...

    def clear(self, prefix: str = "") -> int:
        """Remove the entries whose key starts with ``prefix`` (default: the whole namespace).

        Return how many were removed. ``prefix`` must lie inside the namespace (use
        :func:`key_prefix`); a prefix outside it raises :class:`~engine.core.SpecError`.
        """
        ...

    def close(self) -> None:
        """Release connections; the object must not be used afterwards."""
        ...


# -- helpers shared by the adapters ---------------------------------------------------------------


def check_ttl(ttl_seconds: float | None, default: float) -> float:
    """``ttl_seconds`` or ``default``; raise :class:`SpecError` unless it is positive and finite."""
    ttl = default if ttl_seconds is None else ttl_seconds
    if not (isinstance(ttl, (int, float)) and math.isfinite(ttl) and ttl > 0):
        raise SpecError(f"cache TTL {ttl!r}: use a positive number of seconds")
    return float(ttl)


def scoped_prefix(namespace: str, prefix: str) -> str:
    """``prefix`` checked to lie inside ``namespace`` (the namespace's own prefix if empty)."""
    own = key_prefix(namespace)
    if not prefix:
        return own
    if not prefix.startswith(own):
        raise SpecError(f"cache prefix {prefix!r} is outside the namespace {namespace!r}: use key_prefix()")
    return prefix


def encode_items(items: Sequence[tuple[str, Evaluation]], warned: list[bool]) -> tuple[dict[str, bytes], int]:
    """Encode a batch (later duplicates win); return ``{key: value}`` and how many were skipped.

    Items that cannot be encoded are skipped; the first such item per cache object (``warned``
    holds that flag) is logged as a warning.
    """
    encoded: dict[str, bytes] = {}
    skipped = 0
    for key, ev in items:
        try:
            encoded[key] = encode_evaluation(ev)
        except (TypeError, ValueError) as exc:
            skipped += 1
            level = logging.DEBUG if warned[0] else logging.WARNING
            warned[0] = True
            log.log(level, "inference cache: not caching %r: %s", key, exc)
    return encoded, skipped
