"""Exact search from vectors held in memory (gateway/index/exact_cache.py) answers exactly what
LanceDB's own exact search answers, through writes, re-embeddings, deletes, compaction, a
budget smaller than the rows and a table dropped and made again."""

import asyncio
import subprocess
import sys

import numpy as np
import pytest
from prometheus_client import REGISTRY

from gateway.catalog import Product
from gateway.filters import build_filters
from gateway.index.base import EmbeddingSpace
from gateway.index.embedded import EmbeddedIndex
from gateway.index.exact_cache import RowVectorCache, top_k
from tests.conftest import REPO

SPACE = EmbeddingSpace("clip", 1, 16)
CATEGORIES = ["dress", "jeans", "sneakers", "shirt"]
FILTERS = [
    {},
    {"categories": ["dress"]},
    {"categories": ["jeans", "shirt"], "in_stock_only": True},
    {"max_price": 80.0},
    {"brands": ["nobody"]},
]


def _product(i: int, price: float, in_stock: bool = True) -> Product:
    return Product(
        id=f"p{i}",
        title=f"item {i}",
        brand=["Kumo", "Brisa"][i % 2],
        category=CATEGORIES[i % 4],
        gender="women",
        market="US",
        price=price,
        currency="USD",
        sizes=["M"],
        in_stock=in_stock,
        image_url="",
    )


def _unit(rng, n, dim=16):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


PATHS = ("memory", "filled", "lancedb")


def _metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _searches(path: str) -> float:
    return _metric("looksync_exact_searches_total", index=SPACE.index_name, path=path)


def _brute_force(truth: dict, query: np.ndarray, f: dict, k: int) -> list[str]:
    """The expected answer from the test's own record of every live product."""
    allowed = [
        pid
        for pid, (p, _) in truth.items()
        if (not f.get("categories") or p.category in f["categories"])
        and (not f.get("in_stock_only") or p.in_stock)
        and (f.get("max_price") is None or p.price <= f["max_price"])
        and (not f.get("brands") or p.brand in f["brands"])
    ]
    return sorted(allowed, key=lambda pid: (-float(truth[pid][1] @ query), pid))[:k]


async def _compare(cached: EmbeddedIndex, plain: EmbeddedIndex, truth: dict, queries: np.ndarray, k=7):
    for f in FILTERS:
        filters = build_filters(**f)
        for q in queries:
            _, a = await cached.search(q, SPACE, filters, k, with_vectors=True)
            _, b = await plain.search(q, SPACE, filters, k, with_vectors=True)
            expected = _brute_force(truth, q, f, k)
            assert [h.product.id for h in a] == expected, f
            assert [h.product.id for h in b] == expected, f
            assert [h.product for h in a] == [h.product for h in b]
            assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
            for hit in a:  # the stored vector, not the cache's normalised copy
                assert np.array_equal(hit.vector, truth[hit.product.id][1])
        many = await cached.search_many(list(queries), SPACE, filters, k)
        assert [[h.product.id for h in hits] for hits in many] == [
            _brute_force(truth, q, f, k) for q in queries
        ]
        near = await cached.neighbours(list(queries[:2]), SPACE, filters, k)
        assert [[pid for pid, _ in hits] for hits in near] == [
            _brute_force(truth, q, f, k) for q in queries[:2]
        ]
    # All at once: fills of one search interleave with another's lookups (and, under a small
    # budget, with the drops that make room).
    cases = [(f, q) for f in FILTERS for q in queries]
    answers = await asyncio.gather(*(cached.search(q, SPACE, build_filters(**f), k) for f, q in cases))
    assert [[h.product.id for h in hits] for _, hits in answers] == [
        _brute_force(truth, q, f, k) for f, q in cases
    ]


@pytest.mark.parametrize("budget_rows", [None, 120], ids=["room-for-all", "budget-under-the-rows"])
def test_exact_search_from_memory_equals_lancedb_through_every_kind_of_write(tmp_path, budget_rows):
    rng = np.random.default_rng(5)
    budget_mb = 1024 if budget_rows is None else budget_rows * 4 * SPACE.dim / 2**20

    async def scenario():
        before = {p: _searches(p) for p in PATHS}
        cached = EmbeddedIndex(tmp_path, refresh_s=0.0, exact_cache_mb=budget_mb, exact_cache_min_floats=0)
        plain = EmbeddedIndex(tmp_path, refresh_s=0.0, exact_cache_mb=0)
        truth: dict[str, tuple[Product, np.ndarray]] = {}
        # Several writes: several fragments, so row addresses span fragment ids.
        for start in range(0, 200, 50):
            vectors = _unit(rng, 50)
            items = [
                (_product(i, float(rng.uniform(10, 200)), bool(i % 3)), vectors[i - start])
                for i in range(start, start + 50)
            ]
            await cached.upsert(SPACE, [(p, f"h{p.id}", v) for p, v in items])
            truth.update({p.id: (p, v) for p, v in items})
        queries = _unit(rng, 3)
        await _compare(cached, plain, truth, queries)
        cache = cached._exact_caches[SPACE.index_name]
        assert 0 < len(cache) <= cache.max_rows
        assert _metric("looksync_exact_cache_rows", index=SPACE.index_name) == len(cache)
        paths = {p: _searches(p) - before[p] for p in PATHS}
        assert paths["memory"] > 0 and paths["filled"] > 0
        # "nobody" matches no row (and under the small budget, 200 unfiltered rows do not fit):
        # LanceDB answers.
        assert paths["lancedb"] > 0
        # With the default threshold a table this small is left to LanceDB's scan.
        default = EmbeddedIndex(tmp_path, refresh_s=0.0)
        _, hits = await default.search(queries[0], SPACE, build_filters(), 7)
        assert [h.product.id for h in hits] == _brute_force(truth, queries[0], {}, 7)
        assert not default._exact_caches

        # New images for some (new vectors at new addresses), metadata for others, deletes:
        # a held vector of an old row version must never be scored again.
        for i in range(0, 200, 7):
            v = _unit(rng, 1)[0]
            p = truth[f"p{i}"][0]
            await cached.upsert(SPACE, [(p, f"h{p.id}-2", v)])
            truth[p.id] = (p, v)
        for i in range(1, 200, 11):
            p, v = truth[f"p{i}"]
            moved = Product(**{**p.to_dict(), "price": 5.0, "in_stock": True})
            assert await cached.update_fields(SPACE, p.id, {"price": 5.0, "in_stock": True}) == "applied"
            truth[p.id] = (moved, v)
        gone = [f"p{i}" for i in range(2, 200, 13)]
        await cached.delete(SPACE, gone)
        for pid in gone:
            truth.pop(pid)
        # The query equal to a re-embedded product's new vector finds it first.
        await _compare(cached, plain, truth, np.stack([truth["p7"][1], *queries]))

        await cached.compact(SPACE)  # every row moves to new addresses
        await _compare(cached, plain, truth, queries)

    asyncio.run(scenario())


_RECREATE = """
import asyncio, sys
import numpy as np
from gateway.catalog import Product
from gateway.index.base import EmbeddingSpace
from gateway.index.embedded import EmbeddedIndex

async def main():
    index = EmbeddedIndex(sys.argv[1], refresh_s=0)
    space = EmbeddingSpace("clip", 1, 16)
    await index.ensure(EmbeddingSpace("clip", 2, 16))  # something else stays current
    await index.set_current(EmbeddingSpace("clip", 2, 16))
    await index.drop(space)
    await index.ensure(space, make_current_if_none=False)
    v = np.zeros(16, np.float32); v[0] = 1.0
    p = Product(id="fresh", title="t", brand="b", category="dress", gender="women", market="US",
                price=1.0, currency="USD", sizes=[], in_stock=True, image_url="")
    await index.upsert(space, [(p, "h", v)])
    # More versions than the old table had: only the manifest's incarnation tells them apart.
    for i in range(30):
        await index.upsert(space, [(Product(**{**p.to_dict(), "id": f"filler{i}"}), "h", -v)])

asyncio.run(main())
"""


def test_a_table_made_again_by_another_process_is_not_answered_from_old_vectors(tmp_path):
    rng = np.random.default_rng(9)

    async def before():
        index = EmbeddedIndex(tmp_path, refresh_s=0.0, exact_cache_min_floats=0)
        vectors = _unit(rng, 40)
        # Many versions, so the new table's first versions sit below the ones this process saw.
        for start in range(0, 40, 4):
            await index.upsert(
                SPACE, [(_product(i, 20.0), f"h{i}", vectors[i]) for i in range(start, start + 4)]
            )
        _, hits = await index.search(vectors[3], SPACE, build_filters(), 3)
        assert hits[0].product.id == "p3"
        return index

    index = asyncio.run(before())
    subprocess.run([sys.executable, "-c", _RECREATE, str(tmp_path)], cwd=REPO, check=True, timeout=120)

    async def after():
        query = np.zeros(16, np.float32)
        query[0] = 1.0
        _, hits = await index.search(query, SPACE, build_filters(), 3)
        return [(h.product.id, h.score) for h in hits]

    # The new table's one row sits at an address the old table's first row had: its score
    # must come from its own vector (equal to the query), not from the one held for the old row.
    (pid, score), *rest = asyncio.run(after())
    assert pid == "fresh" and score == pytest.approx(1.0, abs=1e-6)
    assert [s for _, s in rest] == pytest.approx([-1.0, -1.0], abs=1e-6)


def test_top_k_ranks_ties_by_row_and_never_drops_a_tied_row():
    vectors = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [-1, 0]], np.float32)
    rowids = np.array([50, 10, 40, 30, 20], np.uint64)
    cache = RowVectorCache(dim=2, budget_bytes=1 << 20)
    cache.add(rowids, vectors)
    # Scored from everything held (all five rows asked) and from a copy of the rows (two asked).
    distances = cache.distances(cache.lookup(rowids), np.array([[2.0, 0.0], [0.0, 1.0]]))
    assert cache.distances(cache.lookup(rowids[:2]), np.array([[2.0, 0.0]])).ravel().tolist() == [0.0, 1.0]
    queries, rows, distances = top_k(distances, rowids, 2)
    assert queries.tolist() == [0, 0, 1, 1]
    assert rows.tolist() == [30, 40, 10, 20]
    assert distances.tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0])


def test_the_cache_looks_up_what_it_holds_and_nothing_else():
    cache = RowVectorCache(dim=2, budget_bytes=4 * 2 * 3)
    assert cache.max_rows == 3 and cache.fits(3) and not cache.fits(4)
    cache.add(np.array([7 << 32, 5], np.uint64), np.array([[3, 4], [0, 0]], np.float32))
    slots = cache.lookup(np.array([5, 6, 7 << 32, 8 << 32], np.uint64))
    assert (slots >= 0).tolist() == [True, False, True, False]
    assert np.allclose(cache.vectors(slots[[2]]), [[0.6, 0.8]])  # held as a unit vector
    assert cache.vectors(slots[[0]]).tolist() == [[0.0, 0.0]]  # a zero vector stays zero
    cache.clear()
    assert len(cache) == 0 and (cache.lookup(np.array([5], np.uint64)) == -1).all()
