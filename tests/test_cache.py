"""Look-result caches never serve what a request's hard filters exclude now, and a broken or
foreign cache entry is a miss (real gateway over gRPC, real Triton, real Redis, ingestion)."""

import json

import pytest
import redis as redis_sync

from clients.client import FilterArgs
from clients.looks import compose_look
from gateway.ingest.events import STREAM
from tests.conftest import looksync, looksync_env, metric, start_gateway, wait_for
from tests.test_ingest import _stop, _wait_drained, _worker

FEET = ("sneakers", "boots", "sandals", "heels", "loafers")


@pytest.fixture(params=["memory", "redis"])
def stack(request, triton, catalog, products, redis_url, tmp_path):
    """A gateway with its own small index (a product of it gets sold out and deleted) and the
    cache under test, plus an ingest worker on the same index."""
    shoe = next(p for p in products if p.category in FEET and p.in_stock)
    others = [p for p in products if p.id != shoe.id]
    records = [shoe, *[p for p in others if p.category in FEET][:11]]
    records += [p for p in others if p.category not in FEET][:8]
    snapshot = tmp_path / "catalog.jsonl"
    snapshot.write_text(
        "".join(
            json.dumps({**p.to_dict(), "image_url": str(catalog.parent / p.image_url)}) + "\n"
            for p in records
        )
    )
    env = looksync_env(
        triton,
        tmp_path / "data",
        LOOKSYNC_CACHE=request.param,
        LOOKSYNC_REDIS_URL=redis_url,
        LOOKSYNC_FETCH_ALLOW_LOOPBACK="true",
        LOOKSYNC_WORKER_METRICS_PORT="0",
    )
    assert looksync("index", str(snapshot), "--quiet", "--as-of", "1-0", env=env).returncode == 0
    r = redis_sync.Redis.from_url(redis_url)
    r.flushdb()
    gw = start_gateway(env, tmp_path / "gateway.log")
    worker = _worker(env, tmp_path / "worker.log", f"w-cache-{request.param}")
    yield request.param, gw, r, shoe, (catalog.parent / shoe.image_url)
    _stop(worker)
    gw.stop()


def _feet(resp) -> list[str]:
    return [h.product.id for layer in resp.layers if layer.layer == "footwear" for h in layer.hits]


def test_cached_look_results_honour_stock_price_and_deletes_now(stack):
    kind, gw, r, shoe, image = stack
    look = compose_look({"feet": image})
    filters = FilterArgs(in_stock_only=True, max_price=shoe.price + 10)

    def search(k):
        with gw.client() as c:
            return c.search_look(look, k_per_layer=k, filters=filters, timeout_s=60)

    def qualifies():  # SearchImage has no result cache: the index's current view
        with gw.client() as c:
            hits = c.search_image(image.read_bytes(), k=20, filters=filters, timeout_s=60).hits
        return shoe.id in {h.product.id for h in hits}

    def publish(event):
        r.xadd(STREAM, {"event": json.dumps({"schema": 1, **event})})
        _wait_drained(r)

    changes = [  # (what happens to the product, how it is undone for the next step)
        ({"type": "product.update", "id": shoe.id, "fields": {"in_stock": False}},
         {"type": "product.update", "id": shoe.id, "fields": {"in_stock": True}}),
        ({"type": "product.update", "id": shoe.id, "fields": {"price": shoe.price + 100}},
         {"type": "product.update", "id": shoe.id, "fields": {"price": shoe.price}}),
        ({"type": "product.delete", "id": shoe.id}, None),
    ]  # fmt: skip
    for step, (change, undo) in enumerate(changes):
        k = 10 + step  # a cache entry of this step's own, made while the product qualifies
        assert shoe.id in _feet(search(k))
        hits = metric(gw.metrics_port, "looksync_cache_lookups_total", cache="look", result="hit")
        cached = search(k)
        assert cached.cached and shoe.id in _feet(cached)
        assert metric(gw.metrics_port, "looksync_cache_lookups_total", cache="look", result="hit") == hits + 1
        publish(change)
        wait_for(lambda k=k: shoe.id not in _feet(search(k)), what=f"the cached answer to honour {change}")
        if undo is not None:
            publish(undo)
            wait_for(qualifies, what="the product to qualify again")


def test_a_corrupt_or_foreign_cache_entry_is_a_miss(stack):
    kind, gw, r, shoe, image = stack
    if kind != "redis":
        pytest.skip("an entry only another process or release can write: the Redis cache")
    look = compose_look({"feet": image})
    with gw.client() as c:
        assert not c.search_look(look, k_per_layer=5, timeout_s=60).cached
        (key,) = r.keys("looksync:look:*")
        for bad in (b"\x80\x04\x95 a pickle from an older release", b'{"format": 0, "value": []}', b"[1, 2"):
            r.set(key, bad)
            corrupt = metric(gw.metrics_port, "looksync_cache_lookups_total", cache="look", result="corrupt")
            resp = c.search_look(look, k_per_layer=5, timeout_s=60)
            assert not resp.cached and resp.layers
            assert (
                metric(gw.metrics_port, "looksync_cache_lookups_total", cache="look", result="corrupt")
                == corrupt + 1
            )
        assert c.search_look(look, k_per_layer=5, timeout_s=60).cached  # rewritten by the miss
