"""Offline look matching: `looksync match-looks`, `looksync match-worker`, GetLookMatches.

Real tritonserver (tiny CLIP v1 and v2), real Redis, the gateway over gRPC, the embedded index
on disk. The tests run in file order on one catalog: batch == online first, then catalog
changes through ingestion, then workers, then the model swap that makes everything stale.
"""

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import grpc
import pytest
import redis as redis_sync

from clients.client import FilterArgs
from clients.world import write_world
from export.clip import ExportRequest, export_clip
from gateway.index.embedded import EmbeddedIndex
from gateway.ingest.events import STREAM as CATALOG_STREAM
from gateway.ingest.events import delete_event, update_event
from gateway.offline.worker import DEAD_LETTERS, GROUP, STREAM
from tests.conftest import REPO, looksync, looksync_env, start_gateway, start_triton, wait_for
from tests.look_store_contract import check_store
from tests.test_ingest import _drained, _stop, _worker

K = 5


def test_embedded_store_keeps_one_record_per_look(tmp_path):
    asyncio.run(check_store(EmbeddedIndex(tmp_path / "index", refresh_s=0.0).look_matches))


@pytest.fixture(scope="module")
def offline_repo(tiny_repo, tmp_path_factory):
    repo = tmp_path_factory.mktemp("offline_repo")
    shutil.copytree(tiny_repo, repo, dirs_exist_ok=True)
    export_clip(ExportRequest(arch="looksync-tiny", version=2, repository=repo, seed=1))
    return repo


@pytest.fixture(scope="module")
def env(offline_repo, redis_url, tmp_path_factory):
    work = tmp_path_factory.mktemp("offline")
    server = start_triton(offline_repo, work / "triton")
    world = work / "world"
    truth = write_world(world, products=80, looks=6, seed=41)
    data = work / "data"
    env = looksync_env(
        server,
        data,
        LOOKSYNC_REDIS_URL=redis_url,
        LOOKSYNC_CACHE="off",
        LOOKSYNC_WORKER_METRICS_PORT="0",
        LOOKSYNC_MATCH_BATCH_LOOKS="3",
        LOOKSYNC_MATCH_CLAIM_IDLE_MS="1500",
        # Calls of looks in flight are merged within this window: wide enough for a loaded host.
        LOOKSYNC_MATCH_WINDOW_MS="50",
        # One deleted candidate out of the look's stored ones is enough to re-queue it here.
        LOOKSYNC_MATCH_REQUEUE_SHARE="0.005",
    )
    redis_sync.Redis.from_url(redis_url).flushdb()
    assert (
        looksync("index", str(world / "catalog.jsonl"), "--quiet", "--version", "1", env=env).returncode == 0
    )
    looks = {f"look-{i}": str(world / t["image"]) for i, t in enumerate(truth["looks"])}
    manifest = work / "looks.jsonl"
    lines = [json.dumps({"look_id": lid, "image": path}) for lid, path in looks.items()]
    lines += [
        '{"look_id": "broken", "image": ',  # not JSON
        json.dumps({"look_id": "no-image", "image": "missing/look.png"}),  # relative to the manifest
        json.dumps({"look_id": "bad-market", "image": looks["look-0"], "market": "Mars"}),
    ]
    manifest.write_text("\n".join(lines) + "\n")
    gw = start_gateway(env, work / "gateway.log")
    try:
        yield {
            "env": env,
            "gw": gw,
            "work": work,
            "world": world,
            "looks": looks,
            "manifest": manifest,
            "data": data,
        }
    finally:
        gw.stop()
        server.stop()


def _same_ranking(a, b) -> None:
    """Equal ids at each rank; where they differ, the two scores tie (batched and single
    Triton calls may differ in the last float bits, which can swap exact-tie neighbours)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x.product.id != y.product.id:
            assert abs(x.score - y.score) < 2e-5, (x.product.id, x.score, y.product.id, y.score)
        else:
            assert abs(x.score - y.score) < 2e-5


def _store(env):
    async def read():
        index = EmbeddedIndex(env["data"] / "index", refresh_s=0.0)
        return [r for batch in [b async for b in index.look_matches.scan()] for r in batch]

    return asyncio.run(read())


def test_batch_results_equal_online_search_look_garment_by_garment(env):
    result = looksync("match-looks", str(env["manifest"]), "--quiet", "--json", env=env["env"])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["matched"] == len(env["looks"]) and report["skipped"] == 0
    # Bad lines and looks are failures with a reason; the job went on.
    failed = {k: v["reason"] for k, v in report["failed"].items()}
    assert failed == {
        "line 7": "invalid_request",
        "line 9": "invalid_request",
        "no-image": "fetch_not_found",
    }
    assert "filters.market" in report["failed"]["line 9"]["detail"]
    # Crops of several looks went to Triton together: fewer requests than looks.
    assert report["batch_sizes"]["image"]["calls"] < len(env["looks"])
    saved = [
        json.loads(line) for line in (env["data"] / "look-match-failures.jsonl").read_text().splitlines()
    ]
    assert {s["look_id"] for s in saved} == set(failed)

    with env["gw"].client() as client:
        for look_id, path in env["looks"].items():
            image = open(path, "rb").read()
            online = client.search_look(image, k_per_layer=K)
            pre = client.get_look_matches(look_id, k_per_layer=K)
            assert (pre.source, pre.look_id, online.source) == ("precomputed", look_id, "online")
            assert pre.space == online.space and pre.computed_at_unix <= time.time()
            assert len(pre.layers) == len(online.layers) >= 2
            for p, o in zip(pre.layers, online.layers):
                assert (p.layer, p.query, p.box, p.region_source, p.rerank_source) == (
                    o.layer,
                    o.query,
                    o.box,
                    o.region_source,
                    o.rerank_source,
                )
                assert len(p.hits) == K
                _same_ranking(p.hits, o.hits)

        # Unknown: NOT_FOUND, unless the image came too (then it is searched online).
        with pytest.raises(grpc.RpcError) as err:
            client.get_look_matches("never-matched", k_per_layer=K)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "never-matched" in err.value.details()
        image = open(env["looks"]["look-0"], "rb").read()
        fallback = client.get_look_matches("never-matched", k_per_layer=K, image=image)
        assert fallback.source == "online" and fallback.layers and fallback.look_id == "never-matched"
        for bad, field in (("", "look_id"), ("x" * 300, "look_id")):
            with pytest.raises(grpc.RpcError) as err:
                client.get_look_matches(bad, k_per_layer=K)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()

    # Resumable: a second run matches nothing it already has.
    again = looksync("match-looks", str(env["manifest"]), "--quiet", "--json", env=env["env"])
    assert again.returncode == 0, again.stderr
    assert (json.loads(again.stdout)["matched"], json.loads(again.stdout)["skipped"]) == (
        0,
        len(env["looks"]),
    )


def test_read_time_filters_follow_the_catalog_through_ingestion(env, redis_url):
    r = redis_sync.Redis.from_url(redis_url)
    worker = _worker(env["env"], env["work"] / "ingest.log", "offline-ingest")
    try:
        with env["gw"].client() as client:

            def ids(**filters):
                resp = client.get_look_matches("look-1", k_per_layer=K, filters=FilterArgs(**filters))
                return resp, [[h.product.id for h in layer.hits] for layer in resp.layers]

            before, lists = ids()
            target = lists[0][0]
            assert before.requeued is False
            r.xadd(CATALOG_STREAM, {"event": json.dumps(update_event(target, {"in_stock": False}))})
            wait_for(
                lambda: target not in ids(in_stock_only=True)[1][0], what="the sold-out product to leave"
            )
            _, in_stock = ids(in_stock_only=True)
            assert len(in_stock[0]) == K  # more candidates were kept than k: the list stays full
            assert target in ids()[1][0]  # sold out, still listed without the filter

            r.xadd(CATALOG_STREAM, {"event": json.dumps(delete_event(target))})
            wait_for(lambda: target not in ids()[1][0], what="the deleted product to leave")
            after, lists = ids()
            assert len(lists[0]) == K and after.source == "precomputed"
            # Its candidates are going: the look was queued to be matched again.
            assert after.requeued

            def queued():  # the re-queue runs after the answer, in the background
                return [json.loads(f[b"look"])["look_id"] for _, f in r.xrange(STREAM)]

            wait_for(queued, what="the look to be queued again")
            assert queued() == ["look-1"]
            wait_for(lambda: _drained(r), what="ingestion to finish")
    finally:
        _stop(worker)


def _match_worker(env, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "match-worker", "--consumer", name],
        env=env["env"],
        cwd=REPO,
        stdout=open(env["work"] / f"{name}.log", "a"),
        stderr=subprocess.STDOUT,
    )


def _pending(r, consumer: str) -> int:
    for c in r.xinfo_consumers(STREAM, GROUP):
        if c["name"].decode() == consumer:
            return c["pending"]
    return 0


def test_two_workers_one_killed_mid_batch_every_look_stored_once(env, redis_url):
    r = redis_sync.Redis.from_url(redis_url)
    paths = list(env["looks"].values())
    manifest = env["work"] / "workers.jsonl"
    ids = [f"w-{i}" for i in range(15)]
    manifest.write_text(
        "".join(json.dumps({"look_id": i, "image": paths[n % len(paths)]}) + "\n" for n, i in enumerate(ids))
    )
    before = {rec.look_id: rec.computed_at for rec in _store(env)}
    queued = looksync("match-looks", str(manifest), "--enqueue", env=env["env"])
    assert queued.returncode == 0 and "queued 15 looks" in queued.stdout, queued.stderr

    doomed = _match_worker(env, "doomed")
    survivor = None
    try:
        # Kill it while it holds requests it has not acknowledged (mid-batch).
        wait_for(lambda: r.exists(STREAM) and r.xinfo_groups(STREAM) and _pending(r, "doomed") > 0,
                 interval_s=0.01, what="the first worker to take a batch")  # fmt: skip
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        held = _pending(r, "doomed")
        assert held > 0
        survivor = _match_worker(env, "survivor")

        def done():
            stored = Counter(rec.look_id for rec in _store(env))
            group = r.xinfo_groups(STREAM)[0]
            return stored if group["lag"] == 0 and group["pending"] == 0 and set(ids) <= set(stored) else None

        stored = wait_for(done, timeout_s=120, what="every look to be matched")
        after = {rec.look_id: rec.computed_at for rec in _store(env)}
        assert all(stored[i] == 1 for i in ids)  # exactly one record per look
        assert _pending(r, "doomed") == 0  # what it held was taken over
        assert r.xlen(DEAD_LETTERS) == 0
        # The look re-queued by the previous test was matched again.
        assert after["look-1"] > before["look-1"]
    finally:
        if doomed.poll() is None:
            doomed.kill()
        if survivor is not None:
            _stop(survivor)


def test_a_model_swap_makes_results_stale_and_stale_recomputes_them(env):
    stored_before = {rec.look_id: rec for rec in _store(env)}
    swap = looksync(
        "models", "activate", "--version", "2", "--catalog", str(env["world"] / "catalog.jsonl"),
        "--no-catch-up", "--grace-s", "0", "--force", "--quiet", env=env["env"],
    )  # fmt: skip
    assert swap.returncode == 0, swap.stderr + swap.stdout
    image = open(env["looks"]["look-0"], "rb").read()
    with env["gw"].client() as client:

        def stale():
            try:
                client.get_look_matches("look-0", k_per_layer=K)
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.NOT_FOUND and "v1" in exc.details()
            return False

        wait_for(stale, what="the gateway to see the new space")
        online = client.get_look_matches("look-0", k_per_layer=K, image=image)
        assert online.source == "online" and online.space.version == 2

        result = looksync("match-looks", "--stale", "--quiet", "--json", env=env["env"])
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["matched"] == len(stored_before) and not report["failed"]
        after = {rec.look_id: rec for rec in _store(env)}
        assert set(after) == set(stored_before)
        assert all(
            rec.space.version == 2 and rec.computed_at > stored_before[k].computed_at
            for k, rec in after.items()
        )
        pre = client.get_look_matches("look-0", k_per_layer=K)
        assert pre.source == "precomputed" and pre.space.version == 2
        _same_ranking(pre.layers[0].hits, online.layers[0].hits)

    nothing = looksync("match-looks", "--stale", "--quiet", "--json", env=env["env"])
    assert json.loads(nothing.stdout)["looks"] == 0


def test_a_worker_requeues_looks_of_other_spaces_once_per_new_space(tmp_path, redis_url):
    """After a swap one worker, and only one, queues every look stored in another space."""
    from types import SimpleNamespace

    import redis.asyncio as redis_async

    from gateway.index.base import EmbeddingSpace
    from gateway.offline.worker import MatchWorker
    from tests.look_store_contract import record

    async def scenario():
        index = EmbeddedIndex(tmp_path / "index", refresh_s=0.0)
        v1, v2 = EmbeddingSpace("clip", 1, 64), EmbeddingSpace("clip", 2, 64)
        await index.ensure(v1)
        await index.ensure(v2, make_current_if_none=False)
        await index.look_matches.put([record("old-a", 1.0), record("old-b", 1.0)])
        client = redis_async.from_url(redis_url)
        await client.flushdb()
        matcher = SimpleNamespace(index=index)  # the re-queue reads the index and the store only
        first, second = MatchWorker(client, matcher, consumer="a"), MatchWorker(client, matcher, consumer="b")
        await first._requeue_after_swap()
        assert await client.xlen(STREAM) == 0  # every stored look is in the serving space
        await index.look_matches.put([record("rematched", 2.0, version=2)])  # already in v2
        await index.set_current(v2)
        await first._requeue_after_swap()
        await second._requeue_after_swap()  # the same space: already done by the first worker
        queued = [json.loads(f[b"look"])["look_id"] for _, f in await client.xrange(STREAM)]
        await client.aclose()
        return queued

    queued = asyncio.run(scenario())
    assert sorted(queued) == ["old-a", "old-b"]


def test_a_stored_listing_that_fails_the_filters_gives_way_to_another_listing_of_its_item(tmp_path):
    """A look stores one listing per item; when that listing is sold out (or too dear) now, the
    item still shows through another shop's listing that passes, as SearchLook would show it."""
    import numpy as np

    from gateway.catalog import Product
    from gateway.filters import build_filters
    from gateway.index.base import EmbeddingSpace
    from gateway.look.stored import restore

    async def scenario():
        index = EmbeddedIndex(tmp_path / "index", refresh_s=0.0)
        space = EmbeddingSpace("clip", 1, 4)

        def listing(pid, price, in_stock, shop):
            return Product(
                pid, "red shirt", "b", "shirt", "women", "US", price, "USD", [], in_stock, "", shop
            )

        rows = [
            listing("a1", 50.0, False, "one"),
            listing("a2", 60.0, True, "two"),
            listing("b1", 40.0, True, "one"),
        ]
        await index.upsert(
            space, [(p, f"h{p.id}", np.eye(4, dtype=np.float32)[i]) for i, p in enumerate(rows)]
        )
        await index.assign_items(space, {"a1": ("a1", "ha1"), "a2": ("a1", "ha2")})
        stored = [
            {
                "query": {
                    "layer": "topwear",
                    "categories": ["shirt"],
                    "query": "red shirt",
                    "source": "fallback",
                },
                "rerank_source": "embedding",
                "candidates": [
                    {"id": "a1", "score": 0.9, "duplicates": 2, "item_id": "a1"},
                    {"id": "b1", "score": 0.8, "duplicates": 0, "item_id": ""},
                ],
            }
        ]
        in_stock = await restore(index, space, stored, build_filters(in_stock_only=True), k=5)
        cheap = await restore(index, space, stored, build_filters(max_price=55), k=5)
        return in_stock, cheap

    in_stock, cheap = asyncio.run(scenario())
    hits = in_stock.layers[0].candidates
    assert [(c.hit.product.id, c.hit.score, c.duplicates) for c in hits] == [("a2", 0.9, 2), ("b1", 0.8, 0)]
    assert hits[0].hit.offers == []  # a1 is sold out: not an offer either
    hits = cheap.layers[0].candidates
    assert [c.hit.product.id for c in hits] == ["a1", "b1"]  # a2 is over the price


def test_a_model_unloaded_mid_job_pauses_it_and_a_look_that_cannot_pass_is_not_retried(env, tmp_path):
    """A Triton model unloaded or still loading is a dependency being down: the job waits for
    it and no look fails. A look whose image can never be read fails once, not max_tries
    times; and the failures file says what this run failed, never an earlier run's."""
    import tritonclient.grpc as tgrpc

    models = tgrpc.InferenceServerClient(env["env"]["LOOKSYNC_TRITON_URL"])
    paths = list(env["looks"].values())
    manifest = tmp_path / "unloaded.jsonl"
    lines = [json.dumps({"look_id": f"u-{i}", "image": paths[i]}) for i in range(4)]
    lines.append(json.dumps({"look_id": "u-refused", "image": "http://127.0.0.1:9/look.png"}))
    manifest.write_text("\n".join(lines) + "\n")
    failures = tmp_path / "failures.jsonl"
    log = tmp_path / "job.log"
    models.unload_model("clip_image")
    try:
        job = subprocess.Popen(
            [sys.executable, "-m", "clients.cli", "match-looks", str(manifest), "--quiet", "--json",
             "--failures", str(failures)],
            env=env["env"], cwd=REPO, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
        )  # fmt: skip
        wait_for(lambda: "waiting for a dependency" in log.read_text(), what="the job to wait for the model")
        assert job.poll() is None
    finally:
        models.load_model("clip_image")
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, log.read_text()[-2000:]
    report = json.loads(out)
    assert report["matched"] == 4, report
    assert list(report["failed"]) == ["u-refused"]
    assert report["failed"]["u-refused"]["reason"] == "fetch_forbidden_address"
    assert report["retries"] == 0  # it could never pass
    assert [json.loads(line)["look_id"] for line in failures.read_text().splitlines()] == ["u-refused"]
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(lines[:2]) + "\n")
    again = looksync(
        "match-looks", str(clean), "--quiet", "--no-resume", "--failures", str(failures), env=env["env"]
    )
    assert again.returncode == 0, again.stderr
    assert failures.read_text() == ""  # this run failed nothing


def test_queued_and_manifest_requests_are_checked_alike(env, redis_url, tmp_path):
    """A hand-made queue message gets the manifest's checks (keep in range, filters an object);
    a manifest line that is not UTF-8 is refused, never stored under a changed id."""
    manifest = tmp_path / "odd.jsonl"
    path = next(iter(env["looks"].values()))
    manifest.write_bytes(
        json.dumps({"look_id": "caf\u00e9", "image": path}, ensure_ascii=False).encode("latin-1") + b"\n"
        + json.dumps({"look_id": "keep-true", "image": path, "keep": True}).encode() + b"\n"
        + json.dumps({"look_id": "filters-list", "image": path, "filters": []}).encode() + b"\n"
    )  # fmt: skip
    ran = looksync("match-looks", str(manifest), "--quiet", "--json", env=env["env"])
    assert ran.returncode == 0, ran.stderr
    failed = json.loads(ran.stdout)["failed"]
    assert sorted(failed) == ["line 1", "line 2", "line 3"], failed
    assert "not UTF-8" in failed["line 1"]["detail"] and "keep" in failed["line 2"]["detail"]
    r = redis_sync.Redis.from_url(redis_url)
    r.delete(DEAD_LETTERS)
    r.xadd(
        STREAM, {"look": json.dumps({"look_id": "hand-made", "image": path, "filters": {}, "keep": 100000})}
    )
    worker = _match_worker(env, "checker")
    try:

        def refused():
            return next((f for _, f in r.xrange(DEAD_LETTERS) if b"hand-made" in f[b"look"]), None)

        dead = wait_for(refused, what="the hand-made request to be refused")
    finally:
        _stop(worker)
    assert dead[b"reason"] == b"invalid_request" and b"keep 100000 is out of range" in dead[b"detail"]
    assert "hand-made" not in {rec.look_id for rec in _store(env)}
