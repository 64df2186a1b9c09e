"""Catalog ingestion against a real Redis, a real Triton and the on-disk index."""

import asyncio
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import redis as redis_sync

from gateway.index.base import EmbeddingSpace
from gateway.index.embedded import EmbeddedIndex
from gateway.index.lww import Op
from gateway.index.lww import apply as lww_apply
from gateway.ingest.enrich import standardise, vendor_category, vendor_gender, zero_shot_fill
from gateway.ingest.events import DEAD_LETTERS, GROUP, STREAM, PoisonEvent, parse_event
from gateway.ingest.fetch import FetchError, FetchPolicy, fetch_sync
from tests.conftest import ODD_IMAGES, REPO, free_port, looksync, looksync_env, metric, start_redis, wait_for

SPACE = EmbeddingSpace("clip", 1, 64)


# --- pure parts -----------------------------------------------------------------------------


def _arrive(order):
    """Apply events in this arrival order, retrying "missing" ones as the worker does (each
    round redelivers what is still pending); (final row, events still pending)."""
    row, pending = None, list(order)
    for _ in range(len(order) + 1):
        retry = []
        for op in pending:
            new, outcome = lww_apply(row, op)
            row = new if new is not None else row
            if outcome == "missing":
                retry.append(op)
        pending = retry
    return row, pending


@pytest.mark.parametrize("last", ["update", "delete"])
def test_every_arrival_order_converges_to_the_stream_order_result(last):
    """All 5,040 orders of a re-listing history, with "missing" updates retried as the worker
    does, end in the state the events give when applied in stream order."""
    vec = np.ones(2, np.float32)

    def product(title):
        return {"title": title, "price": 1.0, "image_hash": "h", "vector": vec}

    ops = [
        Op("upsert", "p", 100, product("U100")),
        Op("update", "p", 200, {"title": "T200"}),
        Op("delete", "p", 250),
        Op("upsert", "p", 300, product("U300")),
        Op("update", "p", 400, {"title": "T400"}),
        Op("update", "p", 500, {"price": 5.0}),
    ]
    ops.append(Op("update", "p", 600, {"title": "T600"}) if last == "update" else Op("delete", "p", 600))
    for order in itertools.permutations(ops):
        row, pending = _arrive(order)
        if last == "update":
            assert (row["deleted"], row["title"], row["price"]) == (False, "T600", 5.0), order
        else:
            assert row["deleted"] and not pending, order


def test_an_update_older_than_a_delete_is_stale_not_missing():
    tomb, _ = lww_apply(None, Op("delete", "p", 50))
    assert lww_apply(tomb, Op("update", "p", 30, {"price": 1.0})) == (None, "stale")
    assert lww_apply(tomb, Op("update", "p", 70, {"price": 1.0})) == (None, "missing")


def test_any_arrival_order_of_events_gives_the_same_state():
    vec = np.ones(2, np.float32)
    base = {"title": "t", "price": 1.0, "in_stock": True, "image_hash": "h1", "vector": vec}
    events = [
        Op("upsert", "p", 10, dict(base)),
        Op("update", "p", 20, {"price": 2.0}),
        Op("upsert", "p", 30, {**base, "title": "t2", "image_hash": "h2"}),
        Op("update", "p", 40, {"in_stock": False}),
        Op("delete", "p", 50),
        Op("upsert", "p", 60, {**base, "title": "t3"}),
        Op("update", "p", 70, {"price": 7.0}),
    ]

    def final(order):
        row = None
        for op in order:
            new, _ = lww_apply(row, op)
            row = new if new is not None else row
        return row

    for cut in range(1, len(events) + 1):
        prefix = events[:cut]
        expected = final(prefix)
        for order in itertools.permutations(prefix):
            got = final(list(order) + list(order))  # replays too
            if expected is None or expected["deleted"]:
                assert got is None or got["deleted"], (cut, order)
            else:
                keys = ("title", "price", "in_stock", "image_hash", "deleted")
                assert {k: got[k] for k in keys} == {k: expected[k] for k in keys}, (cut, order)


@pytest.mark.parametrize(
    "word, standard",
    [
        ("T-Shirts", "t-shirt"),
        ("  KLEID ", "dress"),
        ("Jupe", "skirt"),
        ("Sac à dos", "backpack"),
        ("sac a dos", "backpack"),
        ("Zapatillas", "sneakers"),
        ("trench coat", "coat"),
        ("jeans", "jeans"),
    ],
)
def test_vendor_categories_map_case_and_accent_insensitively(word, standard):
    assert vendor_category(word) == standard


def test_vendor_genders_and_unknown_values():
    assert [vendor_gender(w) for w in ("Damen", "HOMMES", "Unisex", "ladies", "robots", "", None)] == [
        "women",
        "men",
        "unisex",
        "women",
        None,
        None,
        None,
    ]
    record, sources = standardise({"category": "Spacesuit", "gender": "Herren"})
    assert record["gender"] == "men" and sources == {"category": "missing", "gender": "vendor"}


def test_zero_shot_decides_what_the_vendor_left_unknown():
    record, sources = standardise({"category": "mystery", "gender": ""})
    labels = ["dress", "jeans"]
    prompts = {
        "category": (labels, np.eye(2, dtype=np.float32)),
        "gender": (["women", "men", "unisex"], np.eye(3, 2, dtype=np.float32)),
    }
    zero_shot_fill(record, sources, np.array([0.1, 0.9], np.float32), prompts)
    assert (record["category"], record["gender"]) == ("jeans", "men")
    assert sources == {"category": "zero_shot", "gender": "zero_shot"}


@pytest.mark.parametrize(
    "entry, reason",
    [
        ({}, "no 'event' field"),
        ({"event": "{nope"}, "not JSON"),
        ({"event": json.dumps({"schema": 2, "type": "product.delete", "id": "x"})}, "schema: 2"),
        (
            {"event": json.dumps({"schema": 1, "type": "product.explode", "id": "x"})},
            "type: 'product.explode'",
        ),
        (
            {
                "event": json.dumps(
                    {"schema": 1, "type": "product.update", "id": "x", "fields": {"price": -3}}
                )
            },
            "fields.price",
        ),
        (
            {
                "event": json.dumps(
                    {"schema": 1, "type": "product.update", "id": "x", "fields": {"image_url": "y"}}
                )
            },
            "image_url cannot be updated",
        ),
        (
            {"event": json.dumps({"schema": 1, "type": "product.upsert", "product": {"title": "no id"}})},
            "without an id",
        ),
    ],
)
def test_invalid_events_are_poison_with_a_reason(entry, reason):
    with pytest.raises(PoisonEvent, match=reason):
        parse_event("1-0", entry)


def test_payloads_that_trip_the_json_parser_are_poison():
    for raw in ('{"schema": 1, "n": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000):
        with pytest.raises(PoisonEvent, match="not JSON we accept"):
            parse_event("1-0", {"event": raw})


def test_deletes_over_tombstones_converge_in_any_order():
    vec = np.ones(2, np.float32)
    ops = [
        Op("upsert", "p", 1, {"title": "t", "price": 1.0, "image_hash": "h", "vector": vec}),
        Op("update", "p", 10, {"price": 10.0}),
        Op("delete", "p", 5),
        Op("delete", "p", 7),
        Op("upsert", "p", 8, {"title": "t8", "price": 8.0, "image_hash": "h8", "vector": vec}),
    ]
    results = set()
    for order in itertools.permutations(ops):
        row, _ = _arrive(order)
        results.add((row["deleted"], row.get("title"), row.get("price")))
    assert results == {(False, "t8", 10.0)}, results


def _update(**fields) -> dict:
    return {"event": json.dumps({"schema": 1, "type": "product.update", "id": "x", "fields": fields})}


@pytest.mark.parametrize(
    "fields, stored",
    [
        ({"category": "Kleid"}, {"category": "dress"}),  # vendor words, as for upserts
        ({"gender": "Damen", "market": "de"}, {"gender": "women", "market": "DE"}),
        ({"currency": "eur", "sizes": [" S ", "", "M"]}, {"currency": "EUR", "sizes": ["S", "M"]}),
        ({"title": "  Linen shirt  "}, {"title": "Linen shirt"}),
    ],
)
def test_updates_are_standardised_like_upserts(fields, stored):
    assert parse_event("1-0", _update(**fields)).fields == stored


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"category": "spaceship"}, "fields.category: 'spaceship' is not a known category"),
        ({"title": "x" * 501}, "fields.title: longer than 500"),
        ({"brand": "b" * 201}, "fields.brand: longer than 200"),
        ({"currency": "dollars"}, "fields.currency: 'dollars' is not an ISO 4217"),
        ({"sizes": ["x" * 41]}, "fields.sizes: at most"),
        ({"market": "Narnia"}, "fields.market"),
        ({"in_stock": "yes"}, "fields.in_stock"),
        ({"title": 7}, "fields.title: expected a string"),
        ({"price": 10**400}, "fields.price:"),  # too large for a float: poison, not a crash
    ],
)
def test_bad_update_fields_are_poison_with_the_field_named(fields, reason):
    with pytest.raises(PoisonEvent, match=re.escape(reason)):
        parse_event("1-0", _update(**fields))


# --- the fetcher ----------------------------------------------------------------------------


LOCAL = FetchPolicy(allow_loopback=True, max_bytes=1 << 20, timeout_s=5)


def test_fetcher_reads_a_real_image(image_server):
    assert fetch_sync(f"{image_server}/images/p00001.jpg", LOCAL)[:2] == b"\xff\xd8"


@pytest.mark.parametrize(
    "url, policy, reason",
    [
        ("file:///etc/passwd", LOCAL, "forbidden_scheme"),
        ("ftp://example.com/a.jpg", LOCAL, "forbidden_scheme"),
        ("http://169.254.169.254/latest/meta-data/", LOCAL, "forbidden_address"),
        ("http://10.0.0.8/a.jpg", LOCAL, "forbidden_address"),
        # Carrier-grade NAT (a cloud metadata service lives at 100.100.100.200), 6to4, IPv4
        # inside IPv6, NAT64, and IPv4 spelled in decimal, hex and octal: none is global.
        ("http://100.100.100.200/latest/meta-data/", LOCAL, "forbidden_address"),
        ("http://100.64.0.1/a.jpg", LOCAL, "forbidden_address"),
        ("http://[2002:a00:1::1]/a.jpg", LOCAL, "forbidden_address"),
        ("http://[2002:808:808::1]/a.jpg", LOCAL, "forbidden_address"),
        ("http://[::ffff:10.0.0.1]/a.jpg", LOCAL, "forbidden_address"),
        ("http://[::ffff:169.254.169.254]/a.jpg", LOCAL, "forbidden_address"),
        ("http://[64:ff9b::a9fe:a9fe]/a.jpg", LOCAL, "forbidden_address"),
        ("http://167772161/a.jpg", LOCAL, "forbidden_address"),  # 10.0.0.1 in decimal
        ("http://0x0a000001/a.jpg", LOCAL, "forbidden_address"),
        ("http://012.0.0.1/a.jpg", LOCAL, "forbidden_address"),  # 10.0.0.1 in octal
        ("http://198.18.0.1/a.jpg", LOCAL, "forbidden_address"),  # benchmarking range
        ("http://[fc00::1]/a.jpg", LOCAL, "forbidden_address"),
        ("http://[fec0::1]/a.jpg", LOCAL, "forbidden_address"),  # site-local: is_global says yes
        ("http://[::7f00:1]/a.jpg", LOCAL, "forbidden_address"),  # IPv4-compatible, reserved
        ("http://[ff0e::1]/a.jpg", LOCAL, "forbidden_address"),  # global-scope multicast
        ("http://2130706433/a.jpg", FetchPolicy(), "forbidden_address"),  # 127.0.0.1, loopback off
        ("http://[::1]:1/a.jpg", FetchPolicy(), "forbidden_address"),
        ("{server}/images/p00001.jpg", FetchPolicy(), "forbidden_address"),  # loopback not allowed by default
        ("{server}/redirect-private", LOCAL, "forbidden_address"),
        ("{server}/redirect-metadata", LOCAL, "forbidden_address"),
        ("{server}/huge.jpg", LOCAL, "too_large"),
        ("{server}/page.jpg", LOCAL, "not_image"),
        ("{server}/garbage.jpg", LOCAL, "not_image"),
        (
            "{server}/images/p00001.jpg",
            FetchPolicy(allow_loopback=True, allowed_hosts=("cdn.example.com",)),
            "forbidden_host",
        ),
    ],
)
def test_fetcher_refuses_what_a_vendor_feed_must_not_reach(image_server, url, policy, reason):
    with pytest.raises(FetchError) as err:
        fetch_sync(url.format(server=image_server), policy)
    assert err.value.reason == reason


# --- the worker -----------------------------------------------------------------------------


@pytest.fixture()
def stream(redis_url):
    client = redis_sync.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


def _worker(env, log: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "ingest-worker", "--consumer", name],
        env=env,
        cwd=REPO,
        stdout=open(log, "a"),
        stderr=subprocess.STDOUT,
    )


def _stop(worker: subprocess.Popen) -> None:
    """SIGTERM, and SIGKILL if it has not stopped in 30 s: a test must never leave it running."""
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
        raise


def _drained(client) -> bool:
    if not client.exists(STREAM):
        return False
    groups = client.xinfo_groups(STREAM)
    return bool(groups) and groups[0]["lag"] == 0 and groups[0]["pending"] == 0


def _wait_drained(client, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while not _drained(client):
        assert time.monotonic() < deadline, (
            client.xinfo_groups(STREAM) if client.exists(STREAM) else "no stream"
        )
        time.sleep(0.2)


def _group(client) -> dict:
    """The consumer group's counters, with `acked` = delivered and acknowledged."""
    if not client.exists(STREAM):
        return {"entries-read": 0, "pending": 0, "lag": 0, "acked": 0}
    groups = {g["name"].decode(): g for g in client.xinfo_groups(STREAM)}
    group = dict(groups.get(GROUP) or {"entries-read": 0, "pending": 0, "lag": 0})
    group["acked"] = (group.get("entries-read") or 0) - group["pending"]
    return group


def _pending_of(client, consumer: str) -> int:
    """Entries delivered to `consumer` and not yet acknowledged (work in its hands)."""
    try:
        consumers = client.xinfo_consumers(STREAM, GROUP)
    except redis_sync.ResponseError:  # no group yet: the worker has not started
        return 0
    for c in consumers:
        if c["name"].decode() == consumer:
            return int(c["pending"])
    return 0


def _held_upserts(catalog, products, image_server, numbers) -> list[dict]:
    """Upserts whose images come from `/held/`: their fetches wait until the test opens the gate."""
    return [
        {
            "schema": 1,
            "type": "product.upsert",
            "product": _record(
                catalog, products, n, image_server, image_url=f"{image_server}/held/{products[n].image_url}"
            ),
        }
        for n in numbers
    ]


def _publish(client, events):
    for event in events:
        client.xadd(STREAM, {"event": json.dumps(event)})


def _index_state(data_dir: Path, ids) -> dict:
    async def read():
        index = EmbeddedIndex(data_dir / "index", refresh_s=0)
        return await index.get(SPACE, sorted(ids))

    return {pid: s.product for pid, s in asyncio.run(read()).items()}


def _record(catalog, products, n, image_server, **changes):
    p = products[n]
    rec = {**p.to_dict(), "image_url": f"{image_server}/{p.image_url}"}
    rec.update(changes)
    return rec


def _env(triton, tmp_path, redis_url, **extra):
    settings = {
        "LOOKSYNC_REDIS_URL": redis_url,
        "LOOKSYNC_FETCH_ALLOW_LOOPBACK": "true",
        "LOOKSYNC_INGEST_CLAIM_IDLE_MS": "300",
        "LOOKSYNC_WORKER_METRICS_PORT": "0",
    }
    return looksync_env(triton, tmp_path / "data", **{**settings, **extra})


def _fold(events):
    """The expected index: events applied one by one, in stream order."""
    state = {}
    for e in events:
        if e["type"] == "product.upsert":
            state[e["product"]["id"]] = dict(e["product"])
        elif e["type"] == "product.update" and e["id"] in state:
            state[e["id"]].update(e["fields"])
        elif e["type"] == "product.delete":
            state.pop(e["id"], None)
    return state


def _assert_matches(got: dict, expected: dict):
    assert sorted(got) == sorted(expected)
    for pid, rec in expected.items():
        p = got[pid]
        assert (p.title, p.price, p.in_stock, p.brand) == (
            rec["title"],
            rec["price"],
            rec["in_stock"],
            rec["brand"],
        ), pid


def test_mixed_stream_yields_the_expected_index(
    triton, catalog, products, image_server, stream, redis_url, tmp_path
):
    def up(n, **c):
        return {
            "schema": 1,
            "type": "product.upsert",
            "product": _record(catalog, products, n, image_server, **c),
        }

    events = [up(n) for n in range(12)]
    events[3]["product"]["category"] = "Kleid"  # vendor vocabulary: standardised to dress
    events[3]["product"]["gender"] = "Damen"
    events += [
        {"schema": 1, "type": "product.update", "id": "p00001", "fields": {"price": 11.5, "in_stock": False}},
        {"schema": 1, "type": "product.delete", "id": "p00002"},
        up(4, title="Renamed item", price=99.0),
        {"schema": 1, "type": "product.update", "id": "p00004", "fields": {"title": "Renamed again"}},
        {"schema": 1, "type": "product.delete", "id": "p00005"},
        up(5, title="Back again"),
    ]
    _publish(stream, events)
    worker = _worker(_env(triton, tmp_path, redis_url), tmp_path / "worker.log", "w1")
    try:
        _wait_drained(stream)
    finally:
        _stop(worker)
    expected = _fold(events)
    got = _index_state(tmp_path / "data", {f"p{n:05d}" for n in range(12)})
    _assert_matches(got, expected)
    assert got["p00003"].category == "dress" and got["p00003"].gender == "women"
    assert stream.xlen(DEAD_LETTERS) == 0


def _fragments(data_dir: Path) -> int:
    """Fragments of the catalog table, read from the side (another process may be writing)."""
    import lancedb

    async def read():
        db = await lancedb.connect_async(data_dir / "index")
        table = await db.open_table(SPACE.index_name)
        return (await table.stats())["fragment_stats"]["num_fragments"]

    return asyncio.run(read())


def test_workers_compact_the_embedded_index_their_writes_fragment(
    triton, catalog, products, image_server, stream, redis_url, tmp_path
):
    """Every write leaves a fragment (and rows outside the indexes, brute-forced by every
    search): past LOOKSYNC_INGEST_COMPACT_FRAGMENTS a worker compacts the table, under a Redis
    lock so two workers never both do; the index holds exactly what the stream says."""
    events = [
        {"schema": 1, "type": "product.upsert", "product": _record(catalog, products, n, image_server)}
        for n in range(20, 32)
    ]
    events += [
        {"schema": 1, "type": "product.update", "id": f"p{n:05d}", "fields": {"price": float(n)}}
        for n in range(20, 32)
    ]
    env = _env(
        triton,
        tmp_path,
        redis_url,
        LOOKSYNC_INGEST_BATCH_SIZE="4",
        LOOKSYNC_INGEST_TRIM_EVERY_S="0.2",
        LOOKSYNC_INGEST_COMPACT_EVERY_S="0.2",
        LOOKSYNC_INGEST_COMPACT_FRAGMENTS="6",
    )
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    workers = [_worker(env, log, f"w{i}") for i, log in enumerate(logs, 1)]

    def compactions():
        lines = [line for log in logs for line in log.read_text().splitlines() if '"index compacted"' in line]
        return [json.loads(line) for line in lines]

    try:
        # In waves, each drained before the next: every wave writes at least one fragment.
        for n in range(12):
            _publish(stream, [events[n], events[12 + n]])
            _wait_drained(stream)
        wait_for(compactions, what="a worker to compact the table")
        # Once the writes stop, the next checks leave fewer fragments than the threshold.
        wait_for(lambda: _fragments(tmp_path / "data") < 6, what="the table to be compacted")
    finally:
        for worker in workers:
            _stop(worker)
    assert all(c["fragments"] >= 6 and c["index"] == SPACE.index_name for c in compactions())
    _assert_matches(_index_state(tmp_path / "data", {f"p{n:05d}" for n in range(20, 32)}), _fold(events))
    assert stream.xlen(DEAD_LETTERS) == 0
    assert not stream.exists("looksync:compact-lock:" + SPACE.index_name)  # released


def test_metadata_updates_never_call_the_image_model(
    triton, catalog, products, image_server, stream, redis_url, tmp_path
):
    import tritonclient.grpc as grpcclient

    tc = grpcclient.InferenceServerClient(f"127.0.0.1:{triton.grpc_port}")

    def image_inferences():
        return int(
            tc.get_inference_statistics("clip_image", as_json=True)["model_stats"][0].get(
                "inference_count", 0
            )
        )

    env = _env(triton, tmp_path, redis_url)
    worker = _worker(env, tmp_path / "worker.log", "w-meta")
    try:
        _publish(
            stream,
            [
                {
                    "schema": 1,
                    "type": "product.upsert",
                    "product": _record(catalog, products, n, image_server),
                }
                for n in range(20, 26)
            ],
        )
        _wait_drained(stream)
        before = image_inferences()
        _publish(
            stream,
            [
                {"schema": 1, "type": "product.update", "id": f"p{n:05d}", "fields": {"price": 1.0 + n}}
                for n in range(20, 26)
            ],
        )
        # An upsert whose image is unchanged is metadata-only too.
        _publish(
            stream,
            [
                {
                    "schema": 1,
                    "type": "product.upsert",
                    "product": _record(catalog, products, 20, image_server, title="New title"),
                }
            ],
        )
        _wait_drained(stream)
        assert image_inferences() == before
    finally:
        _stop(worker)
    got = _index_state(tmp_path / "data", {f"p{n:05d}" for n in range(20, 26)})
    assert got["p00021"].price == 22.0 and got["p00020"].title == "New title"


def test_poison_messages_are_dead_lettered_and_the_stream_keeps_flowing(
    triton, catalog, products, image_server, stream, redis_url, tmp_path
):
    stream.xadd(STREAM, {"event": "{not json"})
    stream.xadd(STREAM, {"wrong": "field"})
    latin1 = {"schema": 1, "type": "product.upsert", "product": _record(catalog, products, 34, image_server)}
    latin1["product"]["title"] = "Café crème"
    stream.xadd(STREAM, {"event": json.dumps(latin1, ensure_ascii=False).encode("latin-1")})
    stream.xadd(STREAM, {"event": "x" * 300_000})  # poison, and too big to keep whole
    _publish(
        stream,
        [
            {"schema": 9, "type": "product.delete", "id": "x"},
            {
                "schema": 1,
                "type": "product.upsert",
                "product": _record(
                    catalog, products, 30, image_server, image_url=f"{image_server}/missing.jpg", id="broken"
                ),
            },
            {
                "schema": 1,
                "type": "product.upsert",
                "product": _record(
                    catalog, products, 31, image_server, image_url=f"{image_server}/page.jpg", id="html"
                ),
            },
            {
                "schema": 1,
                "type": "product.upsert",
                "product": _record(catalog, products, 32, image_server, price="free"),
            },
            {"schema": 1, "type": "product.update", "id": "never-existed", "fields": {"price": 3.0}},
            {"schema": 1, "type": "product.delete", "id": "d" * 1_000_000},
            {"schema": 1, "type": "product.update", "id": "u" * 5000, "fields": {"price": 3.0}},
            {
                "schema": 1,
                "type": "product.upsert",
                "product": _record(catalog, products, 35, image_server, title="\ud800 lone surrogate"),
            },
            {"schema": 1, "type": "product.upsert", "product": _record(catalog, products, 33, image_server)},
        ],
    )
    worker = _worker(
        _env(triton, tmp_path, redis_url, LOOKSYNC_INGEST_MAX_TRIES="2"), tmp_path / "worker.log", "w-poison"
    )
    try:
        _wait_drained(stream)
    finally:
        _stop(worker)
    dead = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in stream.xrange(DEAD_LETTERS)]
    reasons = " | ".join(d["reason"] for d in dead)
    assert len(dead) == 12, reasons
    for needle in (
        "not JSON",
        "no 'event' field",
        "event: not UTF-8",
        "schema: 9",
        "HTTP 404",
        "content type 'text/html'",
        "price: 'free'",
        "'never-existed' is not in the index",
        "id: longer than 200 characters",
        "title: not valid Unicode",
    ):
        assert needle in reasons, needle
    assert reasons.count("id: longer than 200 characters") == 2  # the delete and the update, at once
    # What was sent is kept (an entry without an event: all its fields), cut when it is huge.
    by_reason = {d["reason"]: d["event"] for d in dead}
    assert json.loads(next(e for r, e in by_reason.items() if "no 'event' field" in r)) == {"wrong": "field"}
    assert next(e for r, e in by_reason.items() if "not UTF-8" in r).startswith('{"schema": 1')
    big = next(e for e in by_reason.values() if e.startswith("xxx"))
    assert len(big) < 70_000 and big.endswith("[cut: 300000 characters in all]")
    stored = _index_state(tmp_path / "data", {"p00033", "broken", "html", "p00032", "p00034", "p00035"})
    assert set(stored) == {"p00033"}


def _racing_events(catalog, products, image_server, ids, n_events, rng) -> list[dict]:
    """Upserts, then updates of different fields of the same products (racing once several
    workers take them), deletes and re-listings."""
    state: dict[str, dict] = {}
    events = []
    for n in ids[: len(ids) * 2 // 3]:
        events.append(
            {"schema": 1, "type": "product.upsert", "product": _record(catalog, products, n, image_server)}
        )
        state[f"p{n:05d}"] = events[-1]["product"]
    while len(events) < n_events:
        roll = rng.random()
        if roll < 0.8 and state:
            pid = rng.choice(sorted(state))
            fields = rng.choice(
                [
                    {"price": round(rng.uniform(1, 500), 2)},
                    {"in_stock": rng.random() < 0.5},
                    {"title": f"Title {len(events)}"},
                    {"brand": f"Brand {len(events) % 7}"},
                    {"price": 5.0, "in_stock": True},
                ]
            )
            events.append({"schema": 1, "type": "product.update", "id": pid, "fields": fields})
        elif roll < 0.88 and state:
            pid = rng.choice(sorted(state))
            events.append({"schema": 1, "type": "product.delete", "id": pid})
            state.pop(pid)
        else:
            n = rng.choice(ids)
            rec = _record(catalog, products, n, image_server, title=f"Upsert {len(events)}")
            events.append({"schema": 1, "type": "product.upsert", "product": rec})
            state[f"p{n:05d}"] = rec
    return events


def test_three_workers_killed_at_random_and_a_redis_restart_lose_and_duplicate_nothing(
    triton, catalog, products, image_server, tmp_path
):
    rng = random.Random(1234)
    ids = list(range(60, 200))
    events = _racing_events(catalog, products, image_server, ids, 5000, rng)
    port, rdir = free_port(), tmp_path / "redis"
    rdir.mkdir()
    proc, client = start_redis(port, rdir, durable=True)
    pipe = client.pipeline(transaction=False)
    for event in events:
        pipe.xadd(STREAM, {"event": json.dumps(event)})
    pipe.execute()
    env = _env(
        triton,
        tmp_path,
        f"redis://127.0.0.1:{port}/0",
        LOOKSYNC_INGEST_MAX_TRIES="1000",
        LOOKSYNC_INGEST_BATCH_SIZE="50",
        # Long enough that a killed worker's entries are still its own when the test looks.
        LOOKSYNC_INGEST_CLAIM_IDLE_MS="2000",
    )
    log = tmp_path / "worker.log"
    workers = {f"w{n}": _worker(env, log, f"w{n}") for n in range(3)}
    kills, restarted = 0, False
    try:
        for round_ in range(6):
            if round_ == 3:  # Redis crashes and comes back from its append-only file
                wait_for(
                    lambda c=client: _group(c)["acked"] >= 2000, timeout_s=180, what="40 % of the stream"
                )
                proc.kill()
                proc.wait()
                proc, client = start_redis(port, rdir, durable=True)
                restarted = True
                continue
            # Kill after measured progress, a worker that holds unacknowledged entries at that
            # moment (the one holding most), so the kill interrupts real work whatever the
            # machine's speed and whichever worker Redis happened to feed.
            target = _group(client)["acked"] + rng.randint(50, 300)

            def busiest(t=target, c=client):
                if _group(c)["acked"] < t:
                    return None
                held = {name: _pending_of(c, name) for name in workers}
                name = max(held, key=held.get)
                return name if held[name] > 0 else None

            victim = wait_for(busiest, timeout_s=180, what="a worker holding work", interval_s=0.02)
            os.kill(workers[victim].pid, signal.SIGKILL)
            workers[victim].wait()
            kills += 1
            assert _pending_of(client, victim) > 0, "the kill interrupted nothing"
            replacement = f"{victim}-r{round_}"
            workers[replacement] = _worker(env, log, replacement)
            del workers[victim]
        _wait_drained(client, timeout_s=300)
        assert all(w.poll() is None for w in workers.values()), "a worker died"
    finally:
        for w in workers.values():
            if w.poll() is None:
                _stop(w)
        proc.terminate()
        proc.wait(10)
    assert kills == 5 and restarted
    expected = _fold(events)
    got = _index_state(tmp_path / "data", {f"p{n:05d}" for n in ids})
    _assert_matches(got, expected)

    async def rows():
        index = EmbeddedIndex(tmp_path / "data" / "index", refresh_s=0)
        table = await index._table(SPACE.index_name, strong=True)
        return (await table.query().select(["id"]).to_arrow()).column("id").to_pylist()

    all_ids = asyncio.run(rows())
    assert len(all_ids) == len(set(all_ids)), "a product has two rows"


def test_redis_going_down_pauses_ingestion_and_loses_nothing(
    triton, catalog, products, image_server, held_images, tmp_path
):
    port = free_port()
    rdir = tmp_path / "redis"
    rdir.mkdir()

    proc, client = start_redis(port, rdir, durable=True)
    rng = random.Random(5)
    first = [
        {"schema": 1, "type": "product.upsert", "product": _record(catalog, products, n, image_server)}
        for n in range(120, 150)
    ]
    # Upserts whose images are held: their fetches are in flight when Redis dies.
    held = _held_upserts(catalog, products, image_server, range(150, 160))
    updates = [
        {
            "schema": 1,
            "type": "product.update",
            "id": f"p{rng.randrange(120, 150):05d}",
            "fields": {"price": float(i)},
        }
        for i in range(200)
    ]
    later = [
        {
            "schema": 1,
            "type": "product.update",
            "id": f"p{rng.randrange(120, 160):05d}",
            "fields": {"price": float(i)},
        }
        for i in range(200, 400)
    ]
    _publish(client, first)
    env = _env(triton, tmp_path, f"redis://127.0.0.1:{port}/0", LOOKSYNC_INGEST_MAX_TRIES="1000")
    log = tmp_path / "worker.log"
    worker = _worker(env, log, "w-redis")
    try:
        wait_for(lambda: _group(client)["acked"] == len(first), what="the first upserts")
        _publish(client, held + updates)
        # The held upserts are in the worker's hands: now Redis crashes.
        wait_for(lambda: _pending_of(client, "w-redis") > 0, what="work in flight")
        proc.kill()
        proc.wait()
        wait_for(lambda: "redis unavailable; pausing" in log.read_text(), what="the worker to notice")
        held_images.set()  # the fetches finish while Redis is away; their acks must wait
        assert worker.poll() is None, "the worker must survive Redis going away"
        proc, client = start_redis(port, rdir, durable=True)
        _publish(client, later)
        _wait_drained(client)
    finally:
        _stop(worker)
        proc.terminate()
        proc.wait(10)
    got = _index_state(tmp_path / "data", {f"p{n:05d}" for n in range(120, 160)})
    _assert_matches(got, _fold(first + held + updates + later))


def test_a_worker_started_before_redis_and_triton_waits_then_ingests(
    tiny_repo, catalog, products, image_server, tmp_path
):
    from gateway.tritonserver import TritonServer

    redis_port, metrics_port = free_port(), free_port()
    triton = TritonServer(tiny_repo, free_port(), free_port(), free_port(), work_dir=tmp_path / "triton")
    env = _env(
        triton,
        tmp_path,
        f"redis://127.0.0.1:{redis_port}/0",
        LOOKSYNC_WORKER_METRICS_PORT=str(metrics_port),
    )
    log = tmp_path / "worker.log"
    worker = _worker(env, log, "w-early")
    proc = None
    try:
        # Nothing is up: the worker waits for Redis, alive and reporting not ready.
        wait_for(lambda: '"dependency": "redis"' in log.read_text(), what="the worker to wait for Redis")
        wait_for(lambda: _ready(metrics_port) is not None, what="worker metrics")
        assert _ready(metrics_port) == 0.0
        proc, client = start_redis(redis_port, tmp_path)
        events = [
            {"schema": 1, "type": "product.upsert", "product": _record(catalog, products, n, image_server)}
            for n in range(160, 170)
        ]
        events.append({"schema": 1, "type": "product.update", "id": "p00161", "fields": {"price": 3.5}})
        _publish(client, events)
        # Redis is there, Triton is not: no embedding space yet, still waiting, still alive.
        wait_for(
            lambda: '"dependency": "embedding space"' in log.read_text(),
            what="the worker to wait for Triton",
        )
        assert worker.poll() is None and _ready(metrics_port) == 0.0
        triton.start(timeout_s=120, log_file=open(tmp_path / "triton.log", "a"))
        try:
            _wait_drained(client)
            assert _ready(metrics_port) == 1.0
        finally:
            _stop(worker)
            triton.stop()
    finally:
        if worker.poll() is None:
            worker.kill()
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    got = _index_state(tmp_path / "data", {f"p{n:05d}" for n in range(160, 170)})
    _assert_matches(got, _fold(events))


def _ready(port: int) -> float | None:
    try:
        return metric(port, "looksync_ingest_ready")
    except OSError:  # not listening yet
        return None


def test_reindexing_a_snapshot_never_undoes_newer_stream_events(
    triton, catalog, products, image_server, stream, redis_url, tmp_path
):
    from tests.conftest import looksync

    snapshot = tmp_path / "snapshot.jsonl"
    records = [
        {**products[n].to_dict(), "image_url": str(catalog.parent / products[n].image_url)}
        for n in range(40, 52)
    ]
    snapshot.write_text("".join(json.dumps(r) + "\n" for r in records))
    env = _env(triton, tmp_path, redis_url)
    assert looksync("index", str(snapshot), "--quiet", env=env).returncode == 0
    events = [upsert for upsert in ({"schema": 1, "type": "product.upsert", "product": r} for r in records)]
    # Stream events after the snapshot: a price change, a rename, a delete, a re-listing.
    newer = [
        {"schema": 1, "type": "product.update", "id": "p00040", "fields": {"price": 1.25}},
        {"schema": 1, "type": "product.update", "id": "p00041", "fields": {"title": "Renamed live"}},
        {"schema": 1, "type": "product.delete", "id": "p00042"},
        {
            "schema": 1,
            "type": "product.upsert",
            "product": _record(catalog, products, 43, image_server, title="Relisted"),
        },
    ]
    _publish(stream, newer)
    worker = _worker(env, tmp_path / "worker.log", "w-snapshot")
    try:
        _wait_drained(stream)
    finally:
        _stop(worker)
    ids = {r["id"] for r in records}
    after_stream = _index_state(tmp_path / "data", ids)
    _assert_matches(after_stream, _fold(events + newer))
    # The same snapshot indexed again on the live system: nothing the stream wrote is undone.
    again = looksync("index", str(snapshot), "--quiet", env=env)
    assert again.returncode == 0, again.stderr
    assert _index_state(tmp_path / "data", ids) == after_stream
    # A snapshot stamped after the events (--as-of) is newer, and does win.
    later = looksync("index", str(snapshot), "--quiet", "--as-of", "2200-01-01T00:00:00Z", env=env)
    assert later.returncode == 0, later.stderr
    assert _index_state(tmp_path / "data", {"p00040"})["p00040"].price == records[0]["price"]


def _hostile_urls(image_server: str) -> dict[str, str]:
    """Image URLs a vendor feed may carry, each with the dead-letter reason it must get."""
    long_label = "a" * 70 + ".example.com"
    q = urllib.parse.quote
    return {
        "http://127.0.0.1:99999/a.jpg": "fetch_bad_url",  # port out of range
        "http://127.0.0.1:bad/a.jpg": "fetch_bad_url",
        "http://[::1/a.jpg": "fetch_bad_url",  # malformed IPv6
        f"http://{long_label}/a.jpg": "fetch_bad_url",  # a label over 63 characters
        "http://exa\ud800mple.com/a.jpg": "fetch_bad_url",  # not encodable to IDNA
        "http://a..b/a.jpg": "fetch_bad_url",  # empty label
        "http://:80/a.jpg": "fetch_bad_url",  # no host
        "http://10.1.2.3/a.jpg": "fetch_forbidden_address",
        "http://169.254.169.254/latest/meta-data/": "fetch_forbidden_address",
        "ftp://127.0.0.1/a.jpg": "fetch_forbidden_scheme",
        "/etc/passwd": "fetch_forbidden_scheme",  # a local path, no local directory configured
        "file:///etc/passwd": "fetch_forbidden_scheme",
        f"{image_server}/redirect-private": "fetch_forbidden_address",
        f"{image_server}/redirect?to={q('http://127.0.0.1:99999/x.jpg')}": "fetch_bad_url",
        f"{image_server}/redirect?to={q('http://[::1/x.jpg')}": "fetch_bad_redirect",
        f"{image_server}/redirect?to={q(f'http://{long_label}/x.jpg')}": "fetch_bad_url",
        f"{image_server}/redirect?to={q('http://169.254.169.254/')}": "fetch_forbidden_address",
        f"{image_server}/loop": "fetch_too_many_redirects",
        f"{image_server}/trickle.jpg": "fetch_timeout",
        f"{image_server}/cut.jpg": "fetch_network",
        f"{image_server}/empty.jpg": "fetch_not_image",
        f"{image_server}/page.jpg": "fetch_not_image",  # HTML
        f"{image_server}/garbage.jpg": "fetch_not_image",
        f"{image_server}/bomb.png": "fetch_not_image",  # 3.6 gigapixels claimed
        f"{image_server}/huge.jpg": "fetch_too_large",
        f"{image_server}/nothing-here.jpg": "fetch_http_status",
        # Whole transfers of cut images and of formats outside JPEG/PNG/WebP/GIF.
        **{f"{image_server}{path}": "fetch_not_image" for path in ODD_IMAGES},
    }


def test_a_hostile_feed_is_dead_lettered_and_every_worker_survives(
    triton, catalog, products, image_server, stream, redis_url, tmp_path
):
    hostile = _hostile_urls(image_server)
    events, expected_dead = [], {}
    good = list(range(60, 80))
    for i, (url, reason) in enumerate(hostile.items()):
        pid = f"hostile-{i}"
        rec = _record(catalog, products, good[i % len(good)], image_server, id=pid, image_url=url)
        events.append({"schema": 1, "type": "product.upsert", "product": rec})
        expected_dead[pid] = reason
        if i < len(good):  # good products in between
            events.append(
                {
                    "schema": 1,
                    "type": "product.upsert",
                    "product": _record(catalog, products, good[i], image_server),
                }
            )
    _publish(stream, events)
    env = _env(
        triton,
        tmp_path,
        redis_url,
        LOOKSYNC_INGEST_MAX_TRIES="1",
        LOOKSYNC_FETCH_TIMEOUT_S="2",
        LOOKSYNC_FETCH_MAX_BYTES=str(1 << 20),
    )
    workers = [_worker(env, tmp_path / f"worker-{n}.log", f"w-hostile-{n}") for n in range(2)]
    try:
        _wait_drained(stream)
        assert all(w.poll() is None for w in workers), "a worker died"
    finally:
        for w in workers:
            _stop(w)
    assert all(w.returncode == 0 for w in workers)  # SIGTERM: a clean exit
    dead = {}
    for _, fields in stream.xrange(DEAD_LETTERS):
        doc = json.loads(fields[b"event"])
        dead[doc["product"]["id"]] = fields[b"reason"].decode()
    assert set(dead) == set(expected_dead)
    wrong = {
        pid: (dead[pid], reason)
        for pid, reason in expected_dead.items()
        if reason.split("_", 1)[1] not in dead[pid]
    }
    assert not wrong, wrong
    got = _index_state(tmp_path / "data", {f"p{n:05d}" for n in good} | set(expected_dead))
    assert set(got) == {f"p{n:05d}" for n in good}


def test_redis_state_stays_bounded_after_10000_events(
    triton, catalog, products, image_server, stream, redis_url, tmp_path
):
    ids = [f"p{n:05d}" for n in range(100, 110)]
    events = [
        {"schema": 1, "type": "product.upsert", "product": _record(catalog, products, n, image_server)}
        for n in range(100, 110)
    ]
    events += [
        {"schema": 1, "type": "product.update", "id": ids[i % 10], "fields": {"price": float(i)}}
        for i in range(9985)
    ]
    events += [{"schema": 1, "type": "product.delete", "id": pid} for pid in ids[:5]]
    env = _env(
        triton,
        tmp_path,
        redis_url,
        LOOKSYNC_INGEST_TRIM_EVERY_S="0.5",
        LOOKSYNC_INGEST_CONSUMER_IDLE_S="1",
        LOOKSYNC_INGEST_BATCH_SIZE="500",
    )
    log = tmp_path / "worker.log"
    # A worker that dies leaves its name in the group; the live one must clear it.
    doomed = _worker(env, log, "w-doomed")
    _publish(stream, events[:10])
    wait_for(lambda: _group(stream)["acked"] == 10, what="the first upserts")
    doomed.kill()
    doomed.wait()
    live = _worker(env, log, "w-live")
    try:
        pipe = stream.pipeline(transaction=False)
        for event in events[10:]:
            pipe.xadd(STREAM, {"event": json.dumps(event)})
        pipe.execute()
        _wait_drained(stream, timeout_s=300)
        # Drained: nothing pending or unread, so the stream keeps only its newest entry (XTRIM
        # MINID keeps the floor itself), and the group only the live consumer.
        wait_for(lambda: stream.xlen(STREAM) <= 1, what="the stream to be trimmed")
        wait_for(
            lambda: [c["name"].decode() for c in stream.xinfo_consumers(STREAM, GROUP)] == ["w-live"],
            what="the dead consumer to be removed",
        )
        assert live.poll() is None
    finally:
        _stop(live)
    got = _index_state(tmp_path / "data", set(ids))
    assert sorted(got) == ids[5:]
    assert got[ids[9]].price == 9979.0  # the last update of p00109: i = 9979


def test_sigterm_mid_batch_acknowledges_only_what_was_written(
    triton, catalog, products, image_server, held_images, stream, redis_url, tmp_path
):
    held = _held_upserts(catalog, products, image_server, range(110, 116))
    env = _env(
        triton, tmp_path, redis_url, LOOKSYNC_INGEST_DRAIN_TIMEOUT_S="1", LOOKSYNC_FETCH_TIMEOUT_S="60"
    )
    log = tmp_path / "worker.log"
    worker = _worker(env, log, "w-term")
    _publish(stream, held)
    wait_for(lambda: _pending_of(stream, "w-term") == len(held), what="the batch in the worker's hands")
    worker.send_signal(signal.SIGTERM)
    # The fetches never finish: the drain gives up after its timeout and the worker exits,
    # leaving the batch pending and unwritten, never acknowledged without its write.
    assert worker.wait(60) == 0
    assert _pending_of(stream, "w-term") == len(held)
    assert _index_state(tmp_path / "data", {e["product"]["id"] for e in held}) == {}
    assert "left_pending" in log.read_text()
    held_images.set()
    # A new worker takes the batch over and completes it.
    worker = _worker(env, log, "w-after")
    try:
        _wait_drained(stream)
    finally:
        _stop(worker)
    _assert_matches(_index_state(tmp_path / "data", {e["product"]["id"] for e in held}), _fold(held))


def test_a_model_unloaded_mid_run_holds_upserts_and_their_updates_and_loses_nothing(
    triton, catalog, products, image_server, stream, redis_url, tmp_path
):
    """Triton up but the image model unloaded (a swap's unload, a restart still loading): the
    worker waits as for Triton down. An update of a product whose upsert is held waits behind
    it instead of finding the product missing on every delivery and being dead-lettered."""
    import tritonclient.grpc as tgrpc

    models = tgrpc.InferenceServerClient(f"127.0.0.1:{triton.grpc_port}")
    env = _env(triton, tmp_path, redis_url, LOOKSYNC_INGEST_MAX_TRIES="2")
    log = tmp_path / "worker.log"
    worker = _worker(env, log, "w-unloaded")
    try:
        _publish(
            stream,
            [
                {
                    "schema": 1,
                    "type": "product.upsert",
                    "product": _record(catalog, products, 40, image_server),
                }
            ],
        )
        _wait_drained(stream)
        models.unload_model("clip_image")
        wait_for(lambda: not models.is_model_ready("clip_image"), what="the image model to unload")
        _publish(
            stream,
            [
                {
                    "schema": 1,
                    "type": "product.upsert",
                    "product": _record(catalog, products, 41, image_server),
                },
                {
                    "schema": 1,
                    "type": "product.update",
                    "id": "p00041",
                    "fields": {"price": 7.0, "in_stock": False},
                },
                {"schema": 1, "type": "product.update", "id": "p00040", "fields": {"price": 8.0}},
            ],
        )

        def deliveries() -> int:
            pending = stream.xpending_range(STREAM, GROUP, min="-", max="+", count=10)
            return min((p["times_delivered"] for p in pending), default=0) if len(pending) == 2 else 0

        # Both held entries delivered more often than max_tries allows a failing message.
        wait_for(lambda: deliveries() > 3, what="the held events to be redelivered", timeout_s=120)
        assert worker.poll() is None
        assert "not loaded in Triton" in log.read_text()
        models.load_model("clip_image")
        _wait_drained(stream)
    finally:
        if not models.is_model_ready("clip_image"):
            models.load_model("clip_image")
        _stop(worker)
    assert stream.xlen(DEAD_LETTERS) == 0, stream.xrange(DEAD_LETTERS)
    got = _index_state(tmp_path / "data", {"p00040", "p00041"})
    assert (got["p00041"].price, got["p00041"].in_stock) == (7.0, False)
    assert got["p00040"].price == 8.0  # a product that needed no model was never held


def test_redis_out_of_memory_pauses_workers_instead_of_ending_them(
    triton, catalog, products, image_server, stream, redis_url, tmp_path
):
    """`maxmemory` reached with noeviction: Redis refuses writes that grow it (XADD to the dead
    letters, XGROUP CREATE). A running worker and one started meanwhile wait, then go on."""
    env = _env(triton, tmp_path, redis_url)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = _worker(env, first_log, "w-oom-1")
    second = None
    try:
        upsert = {
            "schema": 1,
            "type": "product.upsert",
            "product": _record(catalog, products, 42, image_server),
        }
        _publish(stream, [upsert])
        _wait_drained(stream)
        # A poison event and a full Redis at once: its dead letter cannot be written.
        full = stream.pipeline(transaction=True)
        full.xadd(STREAM, {"event": json.dumps({"schema": 7, "type": "product.delete", "id": "x"})})
        full.config_set("maxmemory-policy", "noeviction")
        full.config_set("maxmemory", 1)
        full.execute()
        wait_for(lambda: "OutOfMemoryError" in first_log.read_text(), what="the worker to meet a full Redis")
        second = _worker(env, second_log, "w-oom-2")
        wait_for(
            lambda: "OutOfMemoryError" in second_log.read_text(), what="a worker started into a full Redis"
        )
        assert first.poll() is None and second.poll() is None, "a full Redis ended a worker"
        assert stream.xlen(DEAD_LETTERS) == 0
        stream.config_set("maxmemory", 0)
        _publish(
            stream,
            [
                {
                    "schema": 1,
                    "type": "product.upsert",
                    "product": _record(catalog, products, 43, image_server),
                }
            ],
        )
        _wait_drained(stream)
        assert first.poll() is None and second.poll() is None
    finally:
        stream.config_set("maxmemory", 0)
        for w in (first, second):
            if w is not None:
                _stop(w)
    assert set(_index_state(tmp_path / "data", {"p00042", "p00043"})) == {"p00042", "p00043"}
    dead = stream.xrange(DEAD_LETTERS)
    assert len(dead) == 1 and b"schema: 7" in dead[0][1][b"reason"]  # written once Redis had room


def test_publish_checks_the_whole_file_before_publishing_any_of_it(stream, redis_url, tmp_path):
    env = {**os.environ, "LOOKSYNC_REDIS_URL": redis_url}
    lines = [json.dumps({"id": f"p{n}", "image_url": f"{n}.jpg"}) for n in range(5)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:2] + ['{"id": "p2" "image_url": 1}'] + lines[3:4] + ["[1, 2]"]) + "\n")
    refused = looksync("publish", str(bad), "--as-upserts", env=env)
    assert refused.returncode == 2
    assert "2 bad line(s), nothing published" in refused.stderr
    assert "line 3: not JSON" in refused.stderr and "line 5: not a JSON object" in refused.stderr
    assert not stream.exists(STREAM)
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(lines) + "\n\n")
    published = looksync("publish", str(good), "--as-upserts", env=env)
    assert published.returncode == 0, published.stderr
    events = [json.loads(fields[b"event"]) for _, fields in stream.xrange(STREAM)]
    assert [e["product"]["id"] for e in events] == [f"p{n}" for n in range(5)]
    assert all(e["type"] == "product.upsert" for e in events)
