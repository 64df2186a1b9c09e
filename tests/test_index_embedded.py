"""The embedded LanceDB index on disk: filters, upsert, identity, visibility across processes."""

import asyncio
import itertools
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from gateway.catalog import Product
from gateway.errors import FailedPrecondition
from gateway.filters import build_filters
from gateway.index.base import EmbeddingSpace
from gateway.index.embedded import EmbeddedIndex, where_clause
from tests.conftest import REPO

SPACE = EmbeddingSpace("clip", 1, 16)


def _products(n=120, seed=0):
    rng = np.random.default_rng(seed)
    cats = ["dress", "jeans", "sneakers", "shirt"]
    out = []
    for i in range(n):
        out.append(
            Product(
                id=f"x{i}",
                title=f"item {i} it's",
                brand=["O'Neil", "Kumo", "Brisa"][i % 3],
                category=cats[i % 4],
                gender=["women", "men", "unisex"][i % 3 if i % 5 else 2],
                market=["US", "DE"][i % 2],
                price=float(rng.uniform(5, 300)),
                currency="USD",
                sizes=[["S", "M"], ["L"], [], ["38", "39"]][i % 4],
                in_stock=bool(i % 4),
                image_url="",
            )
        )
    return out


def _vectors(n, dim=16, seed=1):
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture()
def filled(tmp_path):
    products, vectors = _products(), _vectors(120)

    async def fill():
        index = EmbeddedIndex(tmp_path, refresh_s=0.0)
        await index.upsert(SPACE, [(p, f"h{p.id}", v) for p, v in zip(products, vectors)])
        return index

    return asyncio.run(fill()), products, vectors


FILTER_CASES = [
    {},
    {"categories": ["dress"]},
    {"categories": ["dress", "jeans"], "gender": "women"},
    {"gender": "men", "market": "de"},
    {"gender": "unisex"},
    {"brands": ["O'Neil"], "in_stock_only": True},
    {"sizes": ["M", "38"]},
    {"min_price": 50.0, "max_price": 120.0},
    {"categories": ["sneakers"], "sizes": ["39"], "max_price": 250.0, "market": "US", "in_stock_only": True},
    {"brands": ["nobody"]},
]


@pytest.mark.parametrize("case", FILTER_CASES, ids=lambda c: ",".join(c) or "none")
def test_filtered_knn_equals_brute_force(filled, case):
    index, products, vectors = filled
    filters = build_filters(**case)
    query = _vectors(1, seed=9)[0]
    space, hits = asyncio.run(index.search(query, SPACE, filters, 10))
    allowed = [i for i, p in enumerate(products) if filters.matches(p)]
    expected = sorted(allowed, key=lambda i: -float(vectors[i] @ query))[:10]
    assert space == SPACE
    assert [h.product.id for h in hits] == [products[i].id for i in expected]
    assert all(filters.matches(h.product) for h in hits)
    for h, i in zip(hits, expected):
        assert h.score == pytest.approx(float(vectors[i] @ query), abs=1e-5)


def test_a_search_past_the_requests_deadline_is_deadline_exceeded(filled):
    # No time left: the search is abandoned, not answered late; with time left it answers.
    from gateway.errors import DeadlineExceeded

    index, _, _ = filled
    query = _vectors(1, seed=9)[0]
    with pytest.raises(DeadlineExceeded, match="deadline"):
        asyncio.run(index.search(query, SPACE, build_filters(), 10, timeout_s=0.0))
    _, hits = asyncio.run(index.search(query, SPACE, build_filters(), 10, timeout_s=30.0))
    assert len(hits) == 10


def test_upsert_replaces_by_id(filled):
    index, products, vectors = filled
    changed = Product(**{**products[0].to_dict(), "price": 1.0, "title": "renamed"})
    asyncio.run(index.upsert(SPACE, [(changed, "new", vectors[5])]))
    stored = asyncio.run(index.get(SPACE, ["x0"]))["x0"]
    assert asyncio.run(index.count(SPACE)) == 120
    assert (stored.product.title, stored.product.price, stored.image_hash) == ("renamed", 1.0, "new")
    np.testing.assert_allclose(stored.vector, vectors[5])


@pytest.mark.parametrize(
    "query_space, dim",
    [
        (EmbeddingSpace("clip", 2, 16), 16),  # same model, other version
        (EmbeddingSpace("dinov2", 1, 16), 16),  # other model
        (EmbeddingSpace("clip", 1, 8), 8),  # right identity, wrong dimension
    ],
)
def test_query_vector_of_another_space_is_refused(filled, query_space, dim):
    index, _, _ = filled
    with pytest.raises(FailedPrecondition):
        asyncio.run(index.search(_vectors(1, dim)[0], query_space, build_filters(), 5))


def test_the_manifest_records_identity_and_alias(filled, tmp_path):
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["aliases"] == {"products": "products-clip-v1"}
    assert manifest["indexes"]["products-clip-v1"]["dim"] == 16
    with pytest.raises(FailedPrecondition):
        asyncio.run(filled[0].ensure(EmbeddingSpace("clip", 1, 32)))


def test_a_calibrated_dedup_threshold_travels_with_the_space(filled, tmp_path):
    index = filled[0]
    space = EmbeddingSpace("clip", 1, 16)
    asyncio.run(index.set_dedup_threshold(space, 0.9931))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["indexes"]["products-clip-v1"]["dedup_threshold"] == 0.9931
    got = asyncio.run(index.space())
    assert got == space and got.dedup_threshold == 0.9931
    asyncio.run(index.set_dedup_threshold(space, None))
    assert asyncio.run(index.space()).dedup_threshold is None
    with pytest.raises(FailedPrecondition):
        asyncio.run(index.set_dedup_threshold(EmbeddingSpace("clip", 9, 16), 0.5))


def test_writes_from_another_process_become_visible_without_reopening(filled, tmp_path):
    index, products, vectors = filled
    query = _vectors(1, seed=42)[0]
    code = f"""
import asyncio, numpy as np
from gateway.catalog import Product
from gateway.index.base import EmbeddingSpace
from gateway.index.embedded import EmbeddedIndex
p = Product(id="late", title="late", brand="B", category="dress", gender="women", market="US",
            price=10.0, currency="USD", sizes=["M"], in_stock=True, image_url="")
v = np.array({query.tolist()}, dtype=np.float32)
asyncio.run(EmbeddedIndex({str(tmp_path)!r}).upsert(EmbeddingSpace("clip", 1, 16), [(p, "h", v)]))
"""

    async def scenario():
        _, first = await index.search(query, SPACE, build_filters(), 1)
        assert first[0].product.id != "late"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
        await asyncio.sleep(0.1)
        _, after = await index.search(query, SPACE, build_filters(), 1)
        return after[0].product.id

    assert asyncio.run(scenario()) == "late"


def test_where_clause_quotes_every_value():
    clause = where_clause(build_filters(brands=["O'Neil", "x') OR 1=1 --"]))
    assert clause == "deleted = false AND brand IN ('O''Neil', 'x'') OR 1=1 --')"


def test_all_filter_combinations_build():
    keys = ["categories", "gender", "market", "brands", "sizes", "min_price", "in_stock_only"]
    values = {
        "categories": ["dress"],
        "gender": "women",
        "market": "US",
        "brands": ["Kumo"],
        "sizes": ["M"],
        "min_price": 10.0,
        "in_stock_only": True,
    }
    for r in range(len(keys) + 1):
        for combo in itertools.combinations(keys, r):
            clause = where_clause(build_filters(**{k: values[k] for k in combo}))
            assert clause.startswith("deleted = false") and clause.count(" AND ") == r


def test_events_apply_in_order_whatever_order_they_arrive_in(filled):
    from gateway.index.embedded import wall_clock_seq

    index, products, vectors = filled
    p = products[0]
    t0 = wall_clock_seq() + 10**9  # after the fixture's own (wall-clock ordered) writes

    async def scenario():
        await index.upsert(SPACE, [(p, "h", vectors[0], t0 + 100)])
        assert await index.update_fields(SPACE, p.id, {"price": 7.0}, t0 + 300) == "applied"
        assert await index.update_fields(SPACE, p.id, {"price": 5.0}, t0 + 200) == "stale"  # late, older
        await index.upsert(
            SPACE, [(Product(**{**p.to_dict(), "price": 1.0}), "h", vectors[0], t0 + 250)]
        )  # older
        assert (await index.get(SPACE, [p.id]))[p.id].product.price == 7.0
        await index.delete(SPACE, [p.id], t0 + 400)
        await index.upsert(
            SPACE, [(p, "h", vectors[0], t0 + 350)]
        )  # a replayed upsert from before the delete
        assert await index.get(SPACE, [p.id]) == {}
        assert await index.update_fields(SPACE, p.id, {"price": 9.0}, t0 + 500) == "missing"
        _, hits = await index.search(vectors[0], SPACE, build_filters(), 5)
        assert p.id not in [h.product.id for h in hits]
        assert await index.count(SPACE) == 119
        await index.upsert(SPACE, [(p, "h", vectors[0], t0 + 600)])  # re-listed later: back again
        assert p.id in await index.get(SPACE, [p.id])

    asyncio.run(scenario())


def test_large_tables_get_an_ann_index_and_selective_filters_stay_exact(tmp_path):
    """With the thresholds scaled down: ANN once big enough, exact answers under filters."""
    n, dim = 3000, 16
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, dim)).astype(np.float32)
    vecs = centres[rng.integers(0, 30, n)] + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    space = EmbeddingSpace("clip", 1, dim)
    products = [
        Product(
            id=f"a{i}",
            title="t",
            brand=f"B{i % 100}",
            category="dress",
            gender="women",
            market="US",
            price=float(i),
            currency="USD",
            sizes=["M"],
            in_stock=True,
            image_url="",
        )
        for i in range(n)
    ]

    async def scenario():
        index = EmbeddedIndex(tmp_path, refresh_s=0.0, ann_min_rows=2000, exact_max_rows=100)
        await index.upsert(space, [(p, "h", v) for p, v in zip(products, vecs)])
        assert await index.optimize(space)
        query = vecs[7]
        # 1 % of rows (30 <= exact_max_rows): exact, so equal to brute force
        f = build_filters(brands=["B7"])
        _, hits = await index.search(query, space, f, 10)
        allowed = [i for i in range(n) if i % 100 == 7]
        expected = sorted(allowed, key=lambda i: -float(vecs[i] @ query))[:10]
        assert [h.product.id for h in hits] == [f"a{i}" for i in expected]
        # unfiltered: through the ANN index, still finds the query's own vector first
        _, hits = await index.search(query, space, build_filters(), 10)
        assert hits[0].product.id == "a7" and len(hits) == 10
        # the batch jobs' read: ids and scores only, exact under the narrow filter, the job's
        # plan (more probes) through the index otherwise
        (near,) = await index.neighbours([query], space, f, 10)
        assert [pid for pid, _ in near] == [f"a{i}" for i in expected]
        assert near[0][1] == pytest.approx(float(vecs[expected[0]] @ query), abs=1e-4)
        many = await index.neighbours([vecs[7], vecs[8], vecs[9]], space, build_filters(), 5)
        assert [m[0][0] for m in many] == ["a7", "a8", "a9"] and all(len(m) == 5 for m in many)
        return index._ann[space.index_name][0]

    assert asyncio.run(scenario()) > 0


_RACER = """
import asyncio, pathlib, sys, time
import numpy as np
from gateway.catalog import Product
from gateway.index.base import EmbeddingSpace
from gateway.index.embedded import EmbeddedIndex

root, writer, gate = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
space = EmbeddingSpace("clip", 1, 16)
rng = np.random.default_rng(writer)

async def main():
    index = EmbeddedIndex(root, refresh_s=0)
    await index.ensure(space)
    (gate / f"ready-{writer}").touch()
    while not (gate / "go").exists():  # all writers start together: the race is real
        time.sleep(0.001)
    for round_ in range(30):
        items = []
        for i in range(5):  # every writer inserts the same new ids
            p = Product(id=f"new-{round_}-{i}", title=f"w{writer}", brand="b", category="dress",
                        gender="women", market="US", price=1.0 + writer, currency="USD", sizes=[],
                        in_stock=True, image_url="")
            v = rng.standard_normal(16).astype(np.float32)
            items.append((p, f"h{writer}", v / np.linalg.norm(v), 1000 * round_ + writer))
        await index.upsert(space, items)

asyncio.run(main())
"""


def test_writers_in_several_processes_never_duplicate_a_new_id(tmp_path):
    # Measured before the cross-process write lock: 165 rows for 150 ids in this race.
    root, gate = tmp_path / "index", tmp_path / "gate"
    gate.mkdir()
    writers = [
        subprocess.Popen([sys.executable, "-c", _RACER, str(root), str(w), str(gate)], cwd=REPO)
        for w in range(3)
    ]
    deadline = time.monotonic() + 120
    while len(list(gate.glob("ready-*"))) < 3:
        assert time.monotonic() < deadline and all(w.poll() is None for w in writers)
        time.sleep(0.05)
    (gate / "go").touch()
    for w in writers:
        assert w.wait(300) == 0

    async def rows():
        index = EmbeddedIndex(root, refresh_s=0)
        table = await index._table(SPACE.index_name, strong=True)
        return (await table.query().select(["id", "title"]).to_arrow()).to_pylist()

    got = asyncio.run(rows())
    ids = [r["id"] for r in got]
    assert len(ids) == 30 * 5 and len(set(ids)) == len(ids), "a new id was inserted twice"
    # Last writer wins by event order, whatever order the processes committed in.
    assert {r["title"] for r in got} == {"w2"}


def test_a_table_from_before_the_offer_columns_is_migrated_in_place(tmp_path):
    # A table written by an older release (no retailer, product_url, item_id columns) keeps its
    # rows, gains the columns empty, and takes writes and dedup assignments.
    import lancedb
    import pyarrow as pa

    from gateway.index.embedded import ADDED_COLUMNS, Manifest, _schema

    old = pa.schema([f for f in _schema(16) if f.name not in ADDED_COLUMNS])
    products, vectors = _products(3), _vectors(3)

    async def scenario():
        index = EmbeddedIndex(tmp_path, refresh_s=0.0)
        await index.upsert(SPACE, list(zip(products, [f"h{p.id}" for p in products], vectors)))
        rows = await (await index._table(SPACE.index_name)).query().to_arrow()
        await index.close()
        db = await lancedb.connect_async(str(tmp_path))
        await db.drop_table(SPACE.index_name)
        await db.create_table(SPACE.index_name, rows.select(old.names).cast(old))
        reopened = EmbeddedIndex(tmp_path, refresh_s=0.0)
        try:
            got = await reopened.get(SPACE, [p.id for p in products])
            assert {pid: s.product.retailer for pid, s in got.items()} == {p.id: "" for p in products}
            new = Product(**{**products[0].to_dict(), "id": "n1", "retailer": "Shop", "item_id": ""})
            await reopened.upsert(SPACE, [(new, "hn1", vectors[0])])
            assert (await reopened.assign_items(SPACE, {products[1].id: ("n1", f"h{products[1].id}")})) == [
                "applied"
            ]
            got = await reopened.get(SPACE, ["n1", products[1].id])
            assert got["n1"].product.retailer == "Shop" and got[products[1].id].product.item_id == "n1"
            _, hits = await reopened.search(vectors[0], SPACE, build_filters(), 5)
            assert {h.product.id for h in hits} == {p.id for p in products} | {"n1"}
        finally:
            await reopened.close()
        assert Manifest(tmp_path).read()["indexes"][SPACE.index_name]["dim"] == 16

    asyncio.run(scenario())


def test_search_plan_is_exact_under_narrow_filters_and_fixed_settings_otherwise():
    """The measured plan (benchmarks/RESULTS.md, knob sweep): exact search when the filter leaves
    at most exact_max_rows or there is no ANN index; otherwise the same probes, refine and ef
    whatever the filter (the old rule probed all partitions under a 5 % filter: 7x slower)."""
    from gateway.index.ann_plan import plan_search

    assert plan_search(0, 10**6, 20_000).exact  # no ANN index
    assert plan_search(500, 20_000, 20_000).exact  # few enough rows for exact
    wide, narrow = plan_search(500, 10**6, 20_000), plan_search(500, 50_000, 20_000)
    assert not wide.exact and wide == narrow
    assert (wide.nprobes, wide.refine, wide.ef) == (8, 4, 300)
    assert plan_search(5000, 10**8, 20_000).nprobes == 83  # scales with the partitions
    assert plan_search(4, 10**6, 20_000).nprobes == 4  # never more than there are
    # batch jobs: more probes for recall, no refine (they re-check candidates on full vectors)
    job = plan_search(500, 10**6, 20_000, job=True)
    assert (job.exact, job.nprobes, job.refine) == (False, 24, 0)
    assert plan_search(1732, 12 * 10**6, 20_000, job=True).nprobes == 72
    assert plan_search(500, 20_000, 20_000, job=True).exact


def test_scalar_indexes_change_no_answer_of_any_filter(tmp_path):
    """optimize() indexes every filter column (bitmaps, B-trees, a label list for sizes): each
    kind of filter gives exactly the brute-force answer before and after, including rows written
    after the indexes were built (LanceDB scans what an index does not cover yet) and a delete."""
    n, dim = 600, 8
    rng = np.random.default_rng(3)
    vecs = rng.standard_normal((n + 40, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    cats, markets, sizes = ["dress", "shirt", "boots"], ["US", "DE", "FR"], ["S", "M", "L", "XL"]
    products = [
        Product(
            id=f"s{i}",
            title="t",
            brand=f"B{i % 7}",
            category=cats[i % 3],
            gender=["women", "men"][i % 2],
            market=markets[(i // 3) % 3],
            price=float(i % 97),
            currency="USD",
            sizes=[sizes[i % 4], sizes[(i + 1) % 4]],
            in_stock=i % 5 != 0,
            image_url="",
        )  # fmt: skip
        for i in range(n + 40)
    ]
    filters = [
        build_filters(),
        build_filters(categories=["boots"]),
        build_filters(gender="men", market="DE"),
        build_filters(brands=["B3"], in_stock_only=True),
        build_filters(sizes=["XL"]),
        build_filters(min_price=10, max_price=20.5, categories=["dress", "shirt"]),
    ]
    space = EmbeddingSpace("clip", 1, dim)

    def brute(f, query, gone):
        def ok(p):
            return (
                p.id not in gone
                and (not f.categories or p.category in f.categories)
                and (not f.genders() or p.gender in f.genders())
                and (not f.market or p.market == f.market)
                and (not f.brands or p.brand in f.brands)
                and (not f.sizes or set(p.sizes) & set(f.sizes))
                and (f.min_price is None or p.price >= f.min_price)
                and (f.max_price is None or p.price <= f.max_price)
                and (not f.in_stock_only or p.in_stock)
            )

        live = [i for i in range(len(products)) if i < written[0] and ok(products[i])]
        return sorted(live, key=lambda i: -float(vecs[i] @ query))[:10]

    written = [n]

    async def answers(index, gone=frozenset()):
        out = []
        for f in filters:
            for q in (vecs[5], vecs[77]):
                _, hits = await index.search(q, space, f, 10)
                assert [h.product.id for h in hits] == [f"s{i}" for i in brute(f, q, gone)], where_clause(f)
                out.append([h.product.id for h in hits])
        return out

    async def scenario():
        index = EmbeddedIndex(tmp_path, refresh_s=0.0, ann_min_rows=10**9)
        await index.upsert(space, [(p, "h", v) for p, v in zip(products[:n], vecs[:n])])
        before = await answers(index)
        await index.optimize(space)
        table = await index._table(space.index_name)
        indexed = {c for i in await table.list_indices() for c in i.columns}
        assert {"deleted", "category", "market", "in_stock", "sizes", "price", "brand"} <= indexed
        assert await answers(index) == before
        # rows the indexes do not cover yet, and a delete
        await index.upsert(space, [(p, "h", v) for p, v in zip(products[n:], vecs[n:])])
        written[0] = n + 40
        await index.delete(space, ["s5"])
        await answers(index, gone={"s5"})

    asyncio.run(scenario())


def test_upkeep_compacts_when_writes_left_rows_outside_the_indexes_or_many_fragments(tmp_path):
    """The ingest workers' upkeep (EmbeddedIndex.upkeep): rows written or rewritten after
    `optimize` sit outside the indexes and every write adds a fragment; past either threshold
    it compacts (indexes brought up to date, fragments merged) and the answers stay the same."""
    products, vectors = _products(60), _vectors(60)

    async def scenario():
        index = EmbeddedIndex(tmp_path, refresh_s=0.0)
        try:
            await index.upsert(SPACE, [(p, f"h{p.id}", v) for p, v in zip(products[:40], vectors[:40])])
            await index.optimize(SPACE)  # scalar indexes over the first 40 rows
            clean = await index.upkeep(SPACE, max_unindexed_rows=5, max_fragments=100)
            assert clean == {"unindexed_rows": 0, "fragments": clean["fragments"], "compacted": False}
            for p, v in zip(products[40:], vectors[40:]):  # one write, one fragment each
                await index.upsert(SPACE, [(p, f"h{p.id}", v)])
            assert await index.update_fields(SPACE, "x3", {"price": 1.0}) == "applied"  # a rewritten row
            _, before = await index.search(vectors[45], SPACE, build_filters(), 5)
            found = await index.upkeep(SPACE, max_unindexed_rows=10**6, max_fragments=100)
            assert found["unindexed_rows"] == 21 and not found["compacted"]  # under both
            found = await index.upkeep(SPACE, max_unindexed_rows=21, max_fragments=100)
            assert found["compacted"] and found["fragments"] >= 21
            after = await index.upkeep(SPACE, max_unindexed_rows=21, max_fragments=100)
            assert after["unindexed_rows"] == 0 and after["fragments"] < found["fragments"]
            assert not after["compacted"]
            _, again = await index.search(vectors[45], SPACE, build_filters(), 5)
            assert [(h.product.id, h.product.price) for h in again] == [
                (h.product.id, h.product.price) for h in before
            ]
            assert (await index.get(SPACE, ["x3"]))["x3"].product.price == 1.0
            # many fragments alone (no index to be outside of) also compact
            for p, v in zip(products[:12], vectors[:12]):
                await index.upsert(SPACE, [(p, f"new{p.id}", v)])
            many = await index.upkeep(SPACE, max_unindexed_rows=10**6, max_fragments=after["fragments"] + 12)
            assert many["compacted"]
        finally:
            await index.close()

    asyncio.run(scenario())
