"""Swapping model versions under load and with live ingestion, on both index backends (the
Elasticsearch one against tests/es_double.py's ElasticsearchDouble: the same REST
calls a cluster gets, from the gateway, the worker and the CLI as separate processes)."""

import asyncio
import json
import shutil
import threading
import time

import grpc
import pytest
import redis as redis_sync

from export.clip import ExportRequest, export_clip
from gateway.embedder import TritonEmbedder
from gateway.errors import FailedPrecondition
from gateway.filters import build_filters
from gateway.index.base import EmbeddingSpace
from gateway.index.elastic import ElasticIndex
from gateway.index.embedded import EmbeddedIndex
from gateway.ingest.events import STREAM
from gateway.ingest.fetch import FetchPolicy
from gateway.models import Swap, TritonModels
from tests.conftest import looksync, looksync_env, start_gateway, start_triton, wait_for
from tests.es_double import ElasticsearchDouble
from tests.test_ingest import _drained, _stop, _worker

V1, V2 = EmbeddingSpace("clip", 1, 64), EmbeddingSpace("clip", 2, 64)


@pytest.fixture(scope="module")
def swap_repo(tiny_repo, tmp_path_factory):
    repo = tmp_path_factory.mktemp("swap_repo")
    shutil.copytree(tiny_repo, repo, dirs_exist_ok=True)
    # Other weights than version 1: a query embedded by one version finds nothing sensible in
    # the other's index, so any mixing of spaces would show in the results.
    export_clip(ExportRequest(arch="looksync-tiny", version=2, repository=repo, seed=1))
    return repo


@pytest.fixture(params=["embedded", "elasticsearch"])
def backend(request):
    """Environment for the processes, and how the test itself opens the same index."""
    if request.param == "embedded":
        yield {}, lambda data: EmbeddedIndex(data / "index", refresh_s=0.2)
        return
    fake = ElasticsearchDouble()
    try:
        env = {"LOOKSYNC_INDEX_BACKEND": "elasticsearch", "LOOKSYNC_ES_URL": fake.url}
        yield env, lambda data: ElasticIndex(fake.url, refresh_s=0.2)
    finally:
        fake.stop()


class Load(threading.Thread):
    """Searches without pause; records each response's space, and whether a product's own image
    still finds it first (it does only when query and index share a space)."""

    def __init__(self, client, image, product_id):
        super().__init__(daemon=True)
        self.client, self.image, self.product_id = client, image, product_id
        self.stop = threading.Event()
        # (sent at, version answered, the probe product came first)
        self.results: list[tuple[float, int, bool]] = []
        self.errors: list[str] = []

    def run(self):
        while not self.stop.is_set():
            try:
                sent = time.monotonic()
                resp = self.client.search_image(self.image, k=3, timeout_s=30)
                self.results.append((sent, resp.space.version, resp.hits[0].product.id == self.product_id))
                sent = time.monotonic()
                text = self.client.search_text("striped shirt", k=3, timeout_s=30)
                self.results.append((sent, text.space.version, True))
            except grpc.RpcError as exc:
                self.errors.append(f"{exc.code().name}: {exc.details()}")

    def sent_after(self, t: float) -> list[int]:
        return [v for sent, v, _ in self.results if sent > t]


def test_swap_under_load_with_live_ingestion_then_rollback(
    swap_repo, catalog, products, redis_url, image_server, tmp_path, backend
):
    backend_env, open_index = backend
    server = start_triton(swap_repo, tmp_path / "triton")
    data = tmp_path / "data"
    env = looksync_env(
        server,
        data,
        **backend_env,
        LOOKSYNC_REDIS_URL=redis_url,
        LOOKSYNC_INGEST_CLAIM_IDLE_MS="300",
        LOOKSYNC_WORKER_METRICS_PORT="0",
        LOOKSYNC_FETCH_ALLOW_LOOPBACK="true",
    )
    r = redis_sync.Redis.from_url(redis_url)
    r.flushdb()
    gw = worker = None
    try:
        url = f"127.0.0.1:{server.grpc_port}"
        asyncio.run(_serve_only(url, swap_repo, [1]))
        assert looksync("index", str(catalog), "--quiet", "--version", "1", env=env).returncode == 0
        gw = start_gateway(env, tmp_path / "gateway.log")
        worker = _worker(env, tmp_path / "worker.log", "swap-worker")
        probe = products[7]
        with gw.client() as client:
            load = Load(client, (catalog.parent / probe.image_url).read_bytes(), probe.id)
            load.start()
            wait_for(lambda: len(load.results) >= 4, what="the load to run")
            asyncio.run(
                _activate(server, swap_repo, open_index(data), catalog, products, r, image_server, redis_url)
            )
            # The swap has returned: its grace period is over, every gateway has seen the
            # alias move. Requests sent from now on must all be answered by version 2.
            swapped = time.monotonic()
            wait_for(lambda: len(load.sent_after(swapped)) >= 6, what="requests after the swap")
            load.stop.set()
            load.join(60)

            assert load.errors == []
            assert all(ok for _, _, ok in load.results), "a query met an index of another space"
            versions = {v for _, v, _ in load.results}
            assert versions == {1, 2}
            assert set(load.sent_after(swapped)) == {2}

            # Live products written during the reindex are in the new index.
            async def live_in_v2():
                index = open_index(data)
                try:
                    return set(await index.get(V2, ["live-1", "live-2", "live-3"]))
                finally:
                    await index.close()

            assert asyncio.run(live_in_v2()) == {"live-1", "live-2", "live-3"}

            # The grace period is over: Triton serves v2 only.
            loaded = asyncio.run(_loaded(url, swap_repo))
            assert loaded["clip_image"] == [2] and loaded["clip_text_encoder"] == [2]

            rolled = looksync("models", "rollback", env=env)
            assert rolled.returncode == 0, rolled.stderr
            wait_for(lambda: client.search_text("dress", k=1).space.version == 1, what="the rollback")
            resp = client.search_image((catalog.parent / probe.image_url).read_bytes(), k=1)
            assert resp.space.version == 1 and resp.hits[0].product.id == probe.id
            status = looksync("models", "status", env=env)
            assert "alias products -> products-clip-v1" in status.stdout, status.stdout
            assert "previous: products-clip-v2" in status.stdout, status.stdout

            # The serving index cannot be dropped; the one rolled away from can.
            refused = looksync("models", "drop", "--version", "1", env=env)
            assert refused.returncode == 2 and "FAILED_PRECONDITION" in refused.stderr, refused.stderr
            dropped = looksync("models", "drop", "--version", "2", env=env)
            assert dropped.returncode == 0, dropped.stderr
            status = looksync("models", "status", env=env)
            assert "products-clip-v2" not in status.stdout, status.stdout
            assert client.search_text("dress", k=1).space.version == 1
    finally:
        if worker is not None:
            _stop(worker)
        if gw is not None:
            gw.stop()
        server.stop()


async def _serve_only(url, repo, versions):
    models = TritonModels(url, repo, "clip")
    await models.serve_versions(versions)
    await models.close()


async def _loaded(url, repo):
    models = TritonModels(url, repo, "clip")
    try:
        return await models.loaded()
    finally:
        await models.close()


async def _activate(server, repo, index, catalog, products, r, image_server, redis_url) -> None:
    url = f"127.0.0.1:{server.grpc_port}"
    embedder = TritonEmbedder(url)
    models = TritonModels(url, repo, "clip")
    try:
        swap = Swap(
            index, embedder, models, 2, progress=False, redis_url=redis_url,
            fetch_policy=FetchPolicy(allow_loopback=True),
        )  # fmt: skip
        # Upserts after the catalog file was exported and before the swap: written to v1 only
        # (v2 does not exist yet); the swap must bring them into v2, not the file's older rows.
        relisted = {
            **products[8].to_dict(),
            "title": "relisted after the export",
            "image_url": f"{image_server}/{products[9].image_url}",
        }
        brand_new = {**relisted, "id": "gap-new", "title": "new after the export"}
        for rec in (relisted, brand_new):
            r.xadd(STREAM, {"event": json.dumps({"schema": 1, "type": "product.upsert", "product": rec})})
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(_drained, r):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        # Two listings grouped into one item in v1 (`looksync dedup`): a catalog fact the new
        # index must keep, or every search would show them apart, without offers.
        pair = [products[10].id, products[11].id]
        stored = await index.get(V1, pair)
        assert (
            await index.assign_items(V1, {p: (pair[0], stored[p].image_hash) for p in pair})
            == ["applied"] * 2
        )
        report = await swap.prepare()
        assert (report.old, report.new) == (V1, V2)
        # Events published after the new index exists but before the switch: the worker must
        # write them to both indexes.
        for n in (1, 2, 3):
            rec = {
                **products[40 + n].to_dict(),
                "id": f"live-{n}",
                "image_url": f"{image_server}/{products[40 + n].image_url}",
            }
            r.xadd(STREAM, {"event": json.dumps({"schema": 1, "type": "product.upsert", "product": rec})})
        # A price change and a delete of catalog products the rebuild has not reached yet:
        # the new index must end up with them, not with the older catalog file's state.
        update = {"schema": 1, "type": "product.update", "id": products[5].id, "fields": {"price": 1.23}}
        r.xadd(STREAM, {"event": json.dumps(update)})
        r.xadd(STREAM, {"event": json.dumps({"schema": 1, "type": "product.delete", "id": products[6].id})})
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(_drained, r):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        await swap.reindex(catalog)
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(_drained, r):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        with pytest.raises(FailedPrecondition, match="overlap"):
            await swap.validate(catalog, min_overlap=0.999, force=False)
        await swap.validate(catalog, min_overlap=0.999, force=True)
        assert report.counts[0] == report.counts[1] == 203  # 200 + 3 live + 1 new - 1 deleted
        got = await index.get(V2, [products[5].id, products[6].id])
        assert list(got) == [products[5].id] and got[products[5].id].product.price == 1.23
        assert {p: s.product.item_id for p, s in (await index.get(V2, pair)).items()} == dict.fromkeys(
            pair, pair[0]
        )
        old, new = (
            await index.get(V1, [products[8].id, "gap-new"]),
            await index.get(V2, [products[8].id, "gap-new"]),
        )
        assert set(new) == set(old) == {products[8].id, "gap-new"}
        for pid in old:
            assert (
                new[pid].product.title == old[pid].product.title
                and new[pid].image_hash == old[pid].image_hash
            )
        # A v1 query vector is refused by the v2 index.
        vec, _ = await embedder.embed_texts("clip", 1, ["shirt"], 10)
        with pytest.raises(FailedPrecondition):
            await index.search(vec[0], V1, build_filters(), 3, index=V2.index_name)
        await swap.switch(grace_s=1.0)
    finally:
        await embedder.close()
        await models.close()
        await index.close()
