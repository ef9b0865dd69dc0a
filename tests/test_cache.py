"""The inference cache: one contract suite run against a real Redis and the embedded SQLite cache.

Adapter-specific tests follow the contract: LRU eviction under each backend's own bound, the
Redis outage (server stopped mid-use, then restarted), eviction-policy checks, URLs (password,
Sentinel), and the embedded cache shared by several processes.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import multiprocessing
import pickle
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

import engine.cache.embedded as embedded_module
import engine.cache.redis_cache as redis_module
from engine.cache import (
    CacheStats,
    CacheUnavailableError,
    Claim,
    EmbeddedCache,
    InferenceCache,
    RedisCache,
    cache_key,
    decode_evaluation,
    encode_evaluation,
    key_prefix,
    open_cache,
)
from engine.core import Evaluation, SpecError, Status, fingerprint
from tests.services import RedisServer, find_redis_server, free_port

MakeCache = Callable[..., InferenceCache]


def key(cache: InferenceCache, i: int | str, problem: str = "pkg.problems:Sphere", version: str = "1") -> str:
    return cache_key(cache.namespace, problem, version, fingerprint({"i": i}))


def ev(score: float, **metrics: Any) -> Evaluation:
    return Evaluation(score, metrics=metrics, duration=0.25)


def cached(evaluation: Evaluation) -> Evaluation:
    """What a hit returns for ``evaluation``."""
    status = Status.FAILED if evaluation.status is Status.FAILED else Status.CACHED
    return Evaluation(evaluation.score, status, evaluation.metrics, evaluation.error, evaluation.duration)


# -- fixtures -------------------------------------------------------------------------------------

BACKENDS = [pytest.param("redis", marks=pytest.mark.integration), "embedded"]


@pytest.fixture(params=BACKENDS)
def make_cache(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeCache]:
    """Create caches of one backend: Redis on the session server (a fresh namespace per test) or a
    SQLite file in ``tmp_path``. Every cache made is cleared and closed after the test."""
    made: list[InferenceCache] = []
    default_namespace = f"t{uuid.uuid4().hex[:12]}"

    def make(**kwargs: Any) -> InferenceCache:
        kwargs.setdefault("namespace", default_namespace)
        cache: InferenceCache
        if request.param == "redis":
            server: RedisServer = request.getfixturevalue("redis_server")
            server.start()  # no-op when running
            cache = RedisCache(server.url, **kwargs)
        else:
            cache = EmbeddedCache(tmp_path / "cache.sqlite", **kwargs)
        made.append(cache)
        return cache

    yield make
    for cache in made:
        with suppress(CacheUnavailableError):
            cache.clear()
        cache.close()


@pytest.fixture
def cache(make_cache: MakeCache) -> InferenceCache:
    return make_cache()


def write_raw(cache: InferenceCache, key: str, raw: bytes) -> None:
    """Write ``raw`` under ``key`` behind the adapter's back, as another program would."""
    if isinstance(cache, RedisCache):
        client = cache._client
        client.set(key, raw, px=60_000)
    else:
        assert isinstance(cache, EmbeddedCache)
        cache.stats()  # creates the file and its table
        conn = sqlite3.connect(cache.path)
        with conn:
            conn.execute(
                "INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)",
                (key, raw, time.time() + 60, time.time(), len(raw)),
            )
        conn.close()


# -- the contract ---------------------------------------------------------------------------------


def test_is_an_inference_cache(cache: InferenceCache) -> None:
    assert isinstance(cache, InferenceCache)


def test_hits_and_misses_in_order(cache: InferenceCache) -> None:
    k1, k2, k3 = key(cache, 1), key(cache, 2), key(cache, 3)
    e1, e3 = ev(1.0, a=1), ev(3.0)
    cache.put_many([(k1, e1), (k3, e3)])
    assert cache.get_many([k1, k2, k3, k1]) == [cached(e1), None, cached(e3), cached(e1)]
    assert cache.get_many([]) == []
    assert all(e is None for e in cache.get_many([key(cache, i) for i in range(10, 20)]))
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.writes, stats.unavailable, stats.rejected) == (3, 11, 2, 0, 0)
    assert stats.hit_rate == pytest.approx(3 / 14)


def test_later_duplicate_wins_and_overwrite(cache: InferenceCache) -> None:
    k = key(cache, 1)
    cache.put_many([(k, ev(1.0)), (k, ev(2.0))])
    assert cache.get_many([k]) == [cached(ev(2.0))]
    cache.put_many([(k, ev(5.0))])
    assert cache.get_many([k]) == [cached(ev(5.0))]


def test_large_batches_keep_their_order(cache: InferenceCache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_module, "_CHUNK", 7)
    monkeypatch.setattr(embedded_module, "_CHUNK", 7)
    keys = [key(cache, i) for i in range(60)]
    cache.put_many([(k, ev(float(i))) for i, k in enumerate(keys) if i % 3])
    got = cache.get_many(keys)
    assert [None if e is None else e.score for e in got] == [
        None if i % 3 == 0 else float(i) for i in range(60)
    ]


def test_ttl_expiry_and_per_call_override(make_cache: MakeCache) -> None:
    cache = make_cache(default_ttl_seconds=0.4)
    short, long = key(cache, "short"), key(cache, "long")
    cache.put_many([(short, ev(1.0))])  # default TTL
    cache.put_many([(long, ev(2.0))], ttl_seconds=60)  # a problem's own TTL
    assert cache.get_many([short, long]) == [cached(ev(1.0)), cached(ev(2.0))]
    time.sleep(0.6)
    assert cache.get_many([short, long]) == [None, cached(ev(2.0))]


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf])
def test_bad_ttl_is_a_spec_error(cache: InferenceCache, ttl: float) -> None:
    with pytest.raises(SpecError):
        cache.put_many([(key(cache, 1), ev(1.0))], ttl_seconds=ttl)


def test_bumping_the_version_invalidates(cache: InferenceCache) -> None:
    v1 = key(cache, 1, version="1")
    cache.put_many([(v1, ev(1.0))])
    assert cache.get_many([key(cache, 1, version="2")]) == [None]
    assert cache.get_many([key(cache, 1, problem="pkg.problems:Other")]) == [None]
    assert cache.get_many([v1]) == [cached(ev(1.0))]


def test_json_round_trip_of_every_value_type(cache: InferenceCache) -> None:
    metrics = {
        "text": 'naïve ✓ 日本語 \n\t"quoted"',
        "int": 7,
        "big_int": 2**62,
        "negative": -3,
        "float": 0.1,
        "tiny": 5e-324,
        "huge": 1.7976931348623157e308,
        "true": True,
        "false": False,
        "none": None,
        "list": [1, "a", None, [2.5, False]],
        "nested": {"a": {"b": [1, {"c": "d"}]}, "empty": {}},
        "empty_list": [],
    }
    items = {
        "ok": Evaluation(-3.25, Status.OK, metrics, None, 12.5),
        "int_score": Evaluation(3, Status.OK, {}, None, 0),
        "failed": Evaluation.failed("ValueError: bad input ✗ «quoted»", duration=0.5),
        "failed_with_metrics": Evaluation(None, Status.FAILED, {"stage": "fit"}, "boom", 1.0),
        "cached_again": Evaluation(1.5, Status.CACHED, {"x": 1}, None, 2.0),
    }
    keys = {name: key(cache, name) for name in items}
    cache.put_many([(keys[name], e) for name, e in items.items()])
    got = dict(zip(items, cache.get_many(list(keys.values())), strict=True))

    assert got["ok"] == Evaluation(-3.25, Status.CACHED, metrics, None, 12.5)
    assert got["int_score"] == Evaluation(3.0, Status.CACHED, {}, None, 0.0)
    assert isinstance(got["int_score"].score, float)
    # a cached failure comes back as a failure with its error, not as a "cached" success
    assert got["failed"] == Evaluation(None, Status.FAILED, {}, "ValueError: bad input ✗ «quoted»", 0.5)
    assert got["failed"] is not None and not got["failed"].ok
    assert got["failed_with_metrics"] == Evaluation(None, Status.FAILED, {"stage": "fit"}, "boom", 1.0)
    assert got["cached_again"] == Evaluation(1.5, Status.CACHED, {"x": 1}, None, 2.0)


def test_numpy_tuples_and_non_finite_metrics_read_back_as_the_job_store_does(cache: InferenceCache) -> None:
    k = key(cache, 1)
    metrics = {
        "f32": np.float32(0.5),
        "i64": np.int64(3),
        "array": np.array([1.0, 2.0]),
        "tuple": (1, 2),
        "nan": math.nan,
        "inf": -math.inf,
    }
    cache.put_many([(k, Evaluation(np.float64(2.0), metrics=metrics))])
    [got] = cache.get_many([k])
    assert got is not None
    assert got.metrics == {
        "f32": 0.5,
        "i64": 3,
        "array": [1.0, 2.0],
        "tuple": [1, 2],
        "nan": None,
        "inf": None,
    }
    assert got.score == 2.0


def test_unencodable_evaluations_are_skipped_not_raised(cache: InferenceCache) -> None:
    good, odd_keys, obj, nan_score = key(cache, 1), key(cache, 2), key(cache, 3), key(cache, 4)
    cache.put_many(
        [
            (good, ev(1.0)),
            (odd_keys, Evaluation(1.0, metrics={1: "non-string key"})),  # type: ignore[dict-item]
            (obj, Evaluation(1.0, metrics={"x": object()})),
            (nan_score, Evaluation(math.nan)),
        ]
    )
    assert cache.get_many([good, odd_keys, obj, nan_score]) == [cached(ev(1.0)), None, None, None]
    stats = cache.stats()
    assert (stats.writes, stats.unwritten) == (1, 3)


class _Exploit:
    """Unpickling this creates the file ``marker``: proof that a loader ran attacker code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_pickle_is_rejected_not_loaded(cache: InferenceCache, tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Exploit(probe)))  # the payload is live: unpickling runs code
    assert probe.exists()

    marker = tmp_path / "pwned"
    k = key(cache, 1)
    write_raw(cache, k, pickle.dumps(_Exploit(marker)))
    assert cache.get_many([k]) == [None]
    assert not marker.exists()
    stats = cache.stats()
    assert (stats.rejected, stats.misses, stats.hits) == (1, 1, 0)

    cache.put_many([(k, ev(1.0))])  # the caller evaluates and overwrites the poisoned entry
    assert cache.get_many([k]) == [cached(ev(1.0))]


@pytest.mark.parametrize(
    "raw",
    [
        b"garbage",
        b"",
        b"[1, 2]",
        b'{"v": 2, "score": 1.0, "status": "ok", "metrics": {}, "error": null, "duration": 0}',
        b'{"v": 1, "score": "1.0", "status": "ok", "metrics": {}, "error": null, "duration": 0}',
        b'{"v": 1, "score": true, "status": "ok", "metrics": {}, "error": null, "duration": 0}',
        b'{"v": 1, "score": 1.0, "status": "cached", "metrics": {}, "error": null, "duration": 0}',
        b'{"v": 1, "score": 1.0, "status": "ok", "metrics": [], "error": null, "duration": 0}',
        b'{"v": 1, "score": 1.0, "status": "ok", "metrics": {}, "error": 3, "duration": 0}',
        b'{"v": 1, "score": 1.0, "status": "ok", "metrics": {}, "error": null}',
    ],
)
def test_entries_of_another_shape_are_rejected(cache: InferenceCache, raw: bytes) -> None:
    k = key(cache, 1)
    write_raw(cache, k, raw)
    assert cache.get_many([k]) == [None]
    assert cache.stats().rejected == 1


def test_clear_by_prefix_stays_inside_the_namespace(make_cache: MakeCache) -> None:
    cache = make_cache()
    other = make_cache(namespace=f"{cache.namespace}x")  # shares the backend, not the namespace
    ns = cache.namespace
    keys = {
        "a1": key(cache, 1, "a", "1"),
        "a2": key(cache, 1, "a", "2"),
        "ab1": key(cache, 1, "ab", "1"),
        "b1": key(cache, 1, "b*?[", "1"),  # glob characters are matched literally
    }
    cache.put_many([(k, ev(1.0)) for k in keys.values()])
    other_key = key(other, 1, "a", "1")
    other.put_many([(other_key, ev(1.0))])

    def present() -> set[str]:
        return {name for name, e in zip(keys, cache.get_many(list(keys.values())), strict=True) if e}

    assert cache.clear(key_prefix(ns, "a", "1")) == 1
    assert present() == {"a2", "ab1", "b1"}
    assert cache.clear(key_prefix(ns, "a")) == 1  # not "ab"
    assert present() == {"ab1", "b1"}
    assert cache.clear(key_prefix(ns, "b*?[")) == 1
    assert cache.clear() == 1
    assert present() == set()
    assert other.get_many([other_key]) == [cached(ev(1.0))]
    with pytest.raises(SpecError):
        cache.clear(key_prefix(other.namespace))


def test_threads_share_one_cache(cache: InferenceCache) -> None:
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for round_ in range(5):
                keys = [key(cache, f"{t}-{round_}-{i}") for i in range(50)]
                cache.put_many([(k, ev(float(i))) for i, k in enumerate(keys)])
                got = cache.get_many(keys)
                assert [e.score if e else None for e in got] == [float(i) for i in range(50)]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats = cache.stats()
    assert (stats.hits, stats.writes) == (6 * 5 * 50, 6 * 5 * 50)


def test_stats_when_fresh(cache: InferenceCache) -> None:
    stats = cache.stats()
    assert isinstance(stats, CacheStats)
    assert (stats.hits, stats.misses, stats.unavailable, stats.writes, stats.rejected) == (0, 0, 0, 0, 0)
    assert stats.hit_rate == 0.0
    assert stats.backend in ("redis", "embedded")


# -- keys, values, factory ------------------------------------------------------------------------


def test_cache_key_components_never_run_together() -> None:
    assert cache_key("ire", "pkg.mod:Cls", "1", "ab12") == "ire:pkg.mod.Cls:1:ab12"
    assert cache_key("ire", "my problem", "v 2", "ab") == "ire:my_problem:v_2:ab"
    assert cache_key("a:b", "c", "1", "f").count(":") == 3
    assert key_prefix("ire") == "ire:"
    assert key_prefix("ire", "pkg:P") == "ire:pkg.P:"
    assert key_prefix("ire", "p", "3") == "ire:p:3:"
    with pytest.raises(SpecError):
        key_prefix("ire", version="1")
    with pytest.raises(SpecError):
        cache_key("ire", "", "1", "f")


def test_encode_decode() -> None:
    e = Evaluation(1.5, Status.OK, {"a": [1, {"b": None}]}, None, 2.0)
    raw = encode_evaluation(e)
    assert raw.startswith(b'{"v":1,')
    assert decode_evaluation(raw) == Evaluation(1.5, Status.CACHED, {"a": [1, {"b": None}]}, None, 2.0)
    assert decode_evaluation(pickle.dumps(e)) is None
    assert decode_evaluation(b"\x80\x04junk") is None
    with pytest.raises(ValueError):
        encode_evaluation(Evaluation(math.inf))


def test_open_cache_picks_the_adapter(tmp_path: Path, redis_server: RedisServer) -> None:
    embedded = open_cache(None, tmp_path, namespace="n", max_entries=10)
    assert isinstance(embedded, EmbeddedCache)
    assert embedded.path == tmp_path / "cache.sqlite"
    embedded.close()
    remote = open_cache(redis_server.url, tmp_path, namespace="n")
    assert isinstance(remote, RedisCache)
    remote.close()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379",
        "redis+sentinel://127.0.0.1:26379",
        "redis+sentinel://127.0.0.1:26379/mymaster/x",
        "redis://127.0.0.1:6379/0?decode_responses=true",
    ],
)
def test_bad_redis_url_is_a_spec_error(url: str) -> None:
    with pytest.raises(SpecError):
        RedisCache(url)


# -- Redis ----------------------------------------------------------------------------------------


# -- in-flight leases (the contract; across processes and jobs: tests/test_cache_inflight.py) ----


def test_a_lease_is_owned_busy_then_stored(cache: InferenceCache) -> None:
    k1, k2, k3 = key(cache, 1), key(cache, 2), key(cache, 3)
    cache.put_many([(k3, ev(3.0))])
    assert cache.claim_many([k1, k2, k3, k1], "job-a", 30) == [
        Claim.OWNED,
        Claim.OWNED,
        Claim.STORED,
        Claim.OWNED,
    ]
    assert cache.claim_many([k1, k2], "job-b", 30) == [Claim.BUSY, Claim.BUSY]
    assert cache.claim_many([k1, k2], "job-a", 30) == [Claim.OWNED, Claim.OWNED]  # a renewal
    cache.put_many([(k1, ev(1.0))])  # the holder's result lands: nobody leases it again
    assert cache.claim_many([k1], "job-b", 30) == [Claim.STORED]
    cache.release_many([k2], "job-b")  # not b's lease: left alone
    assert cache.claim_many([k2], "job-b", 30) == [Claim.BUSY]
    cache.release_many([k2], "job-a")
    assert cache.claim_many([k2], "job-b", 30) == [Claim.OWNED]
    assert cache.claim_many([], "job-b", 30) == []
    assert cache.get_many([k2]) == [None]  # a lease is not an entry


def test_a_lease_not_renewed_expires(cache: InferenceCache) -> None:
    k = key(cache, 1)
    assert cache.claim_many([k], "dead-holder", 0.3) == [Claim.OWNED]
    assert cache.claim_many([k], "waiter", 5) == [Claim.BUSY]
    time.sleep(0.45)
    assert cache.claim_many([k], "waiter", 5) == [Claim.OWNED]  # taken over
    assert cache.claim_many([k], "dead-holder", 5) == [Claim.BUSY]


def test_clear_removes_leases_and_count_ignores_them(cache: InferenceCache) -> None:
    k1, k2 = key(cache, 1), key(cache, 2)
    cache.put_many([(k1, ev(1.0))])
    cache.claim_many([k2], "job-a", 30)
    if isinstance(cache, RedisCache):
        assert cache.count() == 1
    assert cache.stats().entries in (1, None)
    cache.clear()
    assert cache.claim_many([k1, k2], "job-b", 30) == [Claim.OWNED, Claim.OWNED]


@pytest.mark.parametrize("ttl", [0, -1, math.nan])
def test_bad_lease_ttl_is_a_spec_error(cache: InferenceCache, ttl: float) -> None:
    with pytest.raises(SpecError):
        cache.claim_many([key(cache, 1)], "job-a", ttl)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis server of the test's own, to stop, restart or reconfigure."""
    with RedisServer() as server:
        yield server


def admin(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=5)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.integration
def test_redis_entries_always_have_a_ttl(redis_server: RedisServer) -> None:
    cache = RedisCache(redis_server.url, namespace="ttl", default_ttl_seconds=3600)
    try:
        k1, k2 = key(cache, 1), key(cache, 2)
        cache.put_many([(k1, ev(1.0))])
        cache.put_many([(k2, ev(1.0))], ttl_seconds=2.5)
        client = admin(redis_server)
        assert 3_500_000 < client.pttl(k1) <= 3_600_000
        assert 0 < client.pttl(k2) <= 2500
        assert client.get(k1) == encode_evaluation(ev(1.0))  # JSON on the wire
    finally:
        cache.clear()
        cache.close()


@pytest.mark.integration
def test_redis_lru_eviction_under_a_small_memory_bound(own_redis: RedisServer) -> None:
    client = admin(own_redis)
    cache = RedisCache(own_redis.url, namespace="lru")
    blob = "x" * 6000
    old = [key(cache, f"old{i}") for i in range(150)]
    cache.put_many([(k, ev(1.0, blob=blob)) for k in old])
    used = int(client.info("memory")["used_memory"])
    old_size = used - 1_000_000  # roughly what the old entries take
    client.config_set("maxmemory", used + old_size // 2)
    client.config_set("maxmemory-samples", 10)
    time.sleep(1.1)  # Redis keeps last-use times to the second
    hot = old[:10]
    assert all(cache.get_many(hot))  # touching them makes them recent: LRU, not FIFO
    new = [key(cache, f"new{i}") for i in range(150)]
    for start in range(0, len(new), 25):
        cache.put_many([(k, ev(2.0, blob=blob)) for k in new[start : start + 25]])

    # EXISTS does not count as a use (a GET would refresh the entries it checks)
    assert client.exists(*new) == len(new), "recently written entries were evicted"
    assert client.exists(*hot) == len(hot), "recently read entries were evicted"
    cold_left = client.exists(*old[10:])
    assert cold_left < 140 - 40, f"only {140 - cold_left} of 140 cold entries were evicted"

    # ~10 MB more: writes keep succeeding under the bound and the oldest entries make room
    for batch in range(40):
        cache.put_many([(key(cache, f"flood{batch}-{i}"), ev(3.0, blob=blob)) for i in range(40)])
    assert cache.stats().unwritten == 0
    bound = int(client.config_get("maxmemory")["maxmemory"] or 0)
    assert int(client.info("memory")["used_memory"]) < bound + 64 * 1024  # evicts before each write
    assert client.exists(*old[10:]) == 0
    cache.close()


@pytest.mark.integration
def test_redis_outage_goes_on_uncached_and_recovers(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engine.cache")
    now = [1000.0]
    cache = RedisCache(own_redis.url, namespace="out", retry_initial=0.5, retry_max=4, clock=lambda: now[0])
    keys = [key(cache, i) for i in range(20)]
    items = [(k, ev(float(i))) for i, k in enumerate(keys)]
    cache.put_many(items)
    assert all(cache.get_many(keys))

    own_redis.stop()  # Redis dies mid-job
    started = time.monotonic()
    assert cache.get_many(keys) == [None] * 20  # no exception
    calls: list[object] = []  # every command the cache sends
    send = cache._client.execute_command

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return send(*args, **kwargs)  # type: ignore[no-untyped-call]

    cache._client.execute_command = counting  # type: ignore[method-assign]
    assert cache.get_many(keys) == [None] * 20  # within the backoff: no network at all
    assert calls == []
    cache.put_many(items)  # dropped, no exception
    assert cache.stats().memory_bytes is None
    now[0] += 0.6  # past the first retry time: tries again, still down, backs off further
    assert cache.get_many(keys) == [None] * 20
    assert len(calls) == 1
    assert time.monotonic() - started < 3
    warnings = warnings_of(caplog)
    assert len(warnings) == 1, warnings
    assert "unavailable" in warnings[0] and "without the cache" in warnings[0]
    stats = cache.stats()
    assert (stats.unavailable, stats.unwritten, stats.hits) == (60, 20, 20)

    own_redis.start()  # back, empty (no persistence)
    now[0] += 0.6  # still within the doubled backoff (1 s): not retried yet
    assert cache.get_many(keys) == [None] * 20
    assert len(calls) == 1
    now[0] += 0.5
    cache.put_many(items)
    assert cache.get_many(keys) == [cached(e) for _, e in items]
    assert any("redis cache is back" in r.getMessage() for r in caplog.records)
    assert len(warnings_of(caplog)) == 1
    stats = cache.stats()
    assert (stats.hits, stats.writes) == (40, 40)
    assert stats.memory_bytes is not None

    own_redis.stop()  # a second outage is reported again, once
    cache.get_many(keys)
    cache.get_many(keys)
    assert len(warnings_of(caplog)) == 2
    cache.close()


@pytest.mark.integration
def test_redis_leases_in_an_outage_and_when_scripts_are_refused(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    cache = RedisCache(own_redis.url, namespace="lease", retry_initial=0.05, retry_max=0.1)
    k = key(cache, 1)
    assert cache.claim_many([k], "job-a", 30) == [Claim.OWNED]
    own_redis.stop()
    assert cache.claim_many([k], "job-b", 30) == [Claim.OWNED]  # each job computes, as uncached
    cache.release_many([k], "job-b")  # never raises
    own_redis.start()  # empty again
    time.sleep(0.15)
    assert cache.claim_many([k], "job-b", 30) == [Claim.OWNED]
    assert cache.claim_many([k], "job-a", 30) == [Claim.BUSY]
    cache.close()

    admin(own_redis).execute_command("ACL", "SETUSER", "noscript", "on", ">pw", "~*", "+@all", "-@scripting")
    refused = RedisCache(f"redis://noscript:pw@127.0.0.1:{own_redis.port}/0", namespace="lease")
    caplog.clear()
    assert refused.claim_many([k, key(refused, 2)], "job-c", 30) == [Claim.OWNED, Claim.OWNED]
    refused.release_many([k], "job-c")
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and "in-flight lease script" in warnings[0], warnings
    assert "pw@" not in warnings[0]
    refused.close()


@pytest.mark.integration
def test_redis_unreachable_from_the_start(caplog: pytest.LogCaptureFixture) -> None:
    cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", namespace="none")
    started = time.monotonic()
    assert cache.get_many(["none:p:1:a", "none:p:1:b"]) == [None, None]
    cache.put_many([("none:p:1:a", ev(1.0))])
    assert time.monotonic() - started < 3
    assert cache.stats().unavailable == 2
    assert len(warnings_of(caplog)) == 1
    with pytest.raises(CacheUnavailableError):
        cache.clear()
    cache.close()


@pytest.mark.integration
def test_redis_warns_once_about_a_non_lru_policy(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    admin(own_redis).config_set("maxmemory-policy", "noeviction")
    cache = RedisCache(own_redis.url, namespace="pol")
    cache.get_many([key(cache, 1)])
    cache.put_many([(key(cache, 1), ev(1.0))])
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and "noeviction" in warnings[0]
    assert admin(own_redis).config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    cache.close()


@pytest.mark.integration
def test_redis_managed_server_gets_an_lru_policy(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    admin(own_redis).config_set("maxmemory-policy", "noeviction")
    cache = RedisCache(own_redis.url, namespace="pol", manage_server=True)
    cache.get_many([key(cache, 1)])
    assert admin(own_redis).config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
    assert warnings_of(caplog) == []
    cache.close()


@pytest.mark.integration
def test_redis_refused_writes_do_not_raise(own_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    client = admin(own_redis)
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)  # full: every write is refused with OOM
    cache = RedisCache(own_redis.url, namespace="oom")
    cache.put_many([(key(cache, 1), ev(1.0))])
    assert cache.get_many([key(cache, 1)]) == [None]
    stats = cache.stats()
    assert (stats.unwritten, stats.writes, stats.unavailable, stats.misses) == (1, 0, 0, 1)
    assert any("refused a write" in w for w in warnings_of(caplog))
    cache.close()


@pytest.mark.integration
def test_redis_password_in_the_url(own_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    admin(own_redis).config_set("requirepass", "s3cret/pw")
    good = RedisCache(f"redis://:s3cret%2Fpw@127.0.0.1:{own_redis.port}/0", namespace="pw")
    k = key(good, 1)
    good.put_many([(k, ev(1.0))])
    assert good.get_many([k]) == [cached(ev(1.0))]
    good.close()

    bad = RedisCache(f"redis://:wrong-one@127.0.0.1:{own_redis.port}/0", namespace="pw")
    assert bad.get_many([k]) == [None]
    warnings = warnings_of(caplog)
    assert len(warnings) == 1
    assert "wrong-one" not in warnings[0] and "***" in warnings[0]
    assert "wrong-one" not in repr(bad)
    bad.close()


@contextmanager
def sentinel_for(server: RedisServer, folder: Path, service: str) -> Iterator[int]:
    """A Redis Sentinel monitoring ``server`` as ``service``; yields its port."""
    port = free_port()
    conf = folder / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {folder}\nsentinel monitor {service} 127.0.0.1 {server.port} 1\n"
    )
    proc = subprocess.Popen(
        [find_redis_server(), str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )
    try:
        client = redis.Redis(port=port, socket_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            with suppress(redis.RedisError):
                if client.sentinel_get_master_addr_by_name(service):
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "sentinel did not start"
            time.sleep(0.05)
        client.close()
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.integration
def test_redis_sentinel_url(own_redis: RedisServer, tmp_path: Path) -> None:
    with sentinel_for(own_redis, tmp_path, "cachemaster") as port:
        cache = RedisCache(
            f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{port}/cachemaster/2", namespace="sen"
        )  # the first sentinel is down: the second answers
        k = key(cache, 1)
        cache.put_many([(k, ev(1.0))])
        assert cache.get_many([k]) == [cached(ev(1.0))]
        assert redis.Redis.from_url(own_redis.url.replace("/0", "/2")).exists(k) == 1
        cache.close()


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


@pytest.mark.integration
def test_redis_tls_url_with_password(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cert, key_file = _self_signed_certificate(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [
            find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(cert), "--tls-key-file", str(key_file), "--tls-ca-cert-file", str(cert),
            "--tls-auth-clients", "no", "--requirepass", "tls-pw", "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path), "--maxmemory-policy", "allkeys-lru",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"rediss://:tls-pw@127.0.0.1:{port}/0?ssl_ca_certs={cert}&ssl_cert_reqs=required"
    try:
        probe = redis.Redis.from_url(url, socket_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            with suppress(redis.RedisError):
                if probe.ping():
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "TLS redis-server did not start"
            time.sleep(0.05)
        probe.close()

        cache = RedisCache(url, namespace="tls")
        k = key(cache, 1)
        cache.put_many([(k, ev(1.0))])
        assert cache.get_many([k]) == [cached(ev(1.0))]
        cache.close()

        untrusted = RedisCache(f"rediss://:tls-pw@127.0.0.1:{port}/0", namespace="tls")  # unknown CA
        assert untrusted.get_many([k]) == [None]
        assert any("CERTIFICATE_VERIFY_FAILED" in w for w in warnings_of(caplog))
        untrusted.close()
    finally:
        proc.terminate()
        proc.wait(10)


# -- embedded -------------------------------------------------------------------------------------


def test_embedded_lru_eviction_by_entries(tmp_path: Path) -> None:
    cache = EmbeddedCache(tmp_path / "c.sqlite", max_entries=100)
    old = [key(cache, i) for i in range(100)]
    cache.put_many([(k, ev(1.0)) for k in old])
    time.sleep(0.01)
    hot = old[:5]
    assert all(cache.get_many(hot))  # used: now the most recent of the old entries
    new = [key(cache, i) for i in range(100, 300)]
    for start in range(0, len(new), 10):
        cache.put_many([(k, ev(2.0)) for k in new[start : start + 10]])
        assert all(cache.get_many(hot))  # used again and again: never evicted
    assert not any(cache.get_many(old[5:]))
    assert all(cache.get_many(new[-80:]))
    entries = cache.stats().entries
    assert entries is not None and entries <= 100
    cache.close()


def test_embedded_lru_eviction_by_bytes(tmp_path: Path) -> None:
    cache = EmbeddedCache(tmp_path / "c.sqlite", max_entries=None, max_bytes=50_000)
    keys = [key(cache, i) for i in range(300)]
    for start in range(0, 300, 10):
        cache.put_many([(k, ev(1.0, blob="y" * 900)) for k in keys[start : start + 10]])
    stats = cache.stats()
    assert stats.memory_bytes is not None and 40_000 <= stats.memory_bytes <= 50_000
    assert not any(cache.get_many(keys[:100]))
    assert all(cache.get_many(keys[-40:]))
    cache.close()


def test_embedded_persists_across_runs(tmp_path: Path) -> None:
    first = EmbeddedCache(tmp_path / "home" / "cache.sqlite")
    k = key(first, 1)
    first.put_many([(k, ev(1.0, a="b"))])
    first.close()
    second = EmbeddedCache(tmp_path / "home" / "cache.sqlite")
    assert second.get_many([k]) == [cached(ev(1.0, a="b"))]
    second.close()


def test_embedded_expired_entries_are_deleted(tmp_path: Path) -> None:
    cache = EmbeddedCache(tmp_path / "c.sqlite")
    cache.put_many([(key(cache, i), ev(1.0)) for i in range(5)], ttl_seconds=0.05)
    time.sleep(0.1)
    assert cache.get_many([key(cache, i) for i in range(5)]) == [None] * 5
    assert cache.stats().entries == 0
    cache.close()


def _write_entries(path: str, namespace: str, start: int, count: int) -> None:
    cache = EmbeddedCache(Path(path), namespace=namespace, max_entries=1000)
    for i in range(start, start + count, 20):
        batch = [(cache_key(namespace, "p", "1", f"{j:032x}"), ev(float(j))) for j in range(i, i + 20)]
        cache.put_many(batch)
        assert cache.get_many([k for k, _ in batch]) == [cached(e) for _, e in batch]
    assert cache.stats().unavailable == 0
    cache.close()


def test_embedded_cache_is_shared_by_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite")
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=_write_entries, args=(path, "mp", n * 200, 200)) for n in range(2)]
    for child in children:
        child.start()
    _write_entries(path, "mp", 400, 200)  # the parent writes at the same time
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    cache = EmbeddedCache(Path(path), namespace="mp")
    got = cache.get_many([cache_key("mp", "p", "1", f"{j:032x}") for j in range(600)])
    assert [e.score if e else None for e in got] == [float(j) for j in range(600)]
    cache.close()


def test_embedded_unusable_file_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="engine.cache")
    path = tmp_path / "cache.sqlite"
    path.write_bytes(b"this is not a SQLite database" * 100)
    cache = EmbeddedCache(path)
    k = key(cache, 1)
    assert cache.get_many([k, k]) == [None, None]
    cache.put_many([(k, ev(1.0))])
    assert cache.get_many([k]) == [None]
    stats = cache.stats()
    assert (stats.unavailable, stats.unwritten, stats.entries) == (3, 1, None)
    assert len(warnings_of(caplog)) == 1
    with pytest.raises(CacheUnavailableError):
        cache.clear()

    path.unlink()  # repaired: the cache works again and says so
    cache.put_many([(k, ev(1.0))])
    assert cache.get_many([k]) == [cached(ev(1.0))]
    assert any("usable again" in r.getMessage() for r in caplog.records)
    cache.close()


@pytest.mark.parametrize("bound", [{"max_entries": 0}, {"max_bytes": -5}, {"max_entries": 1.5}])
def test_embedded_bad_bounds(tmp_path: Path, bound: dict[str, Any]) -> None:
    with pytest.raises(SpecError):
        EmbeddedCache(tmp_path / "c.sqlite", **bound)
