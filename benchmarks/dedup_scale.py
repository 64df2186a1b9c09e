"""`looksync dedup` at catalog scale on the embedded index: a full run over N listings, then the
ingestion path (1,000 new listings placed as they arrive) and an incremental run; wall time,
peak memory, and pairwise precision/recall against the planted truth.

    python -m benchmarks.dedup_scale [--n 1000000] [--dim 64]

Listings are synthetic (no images): each item has a unit vector, and its 1-4 listings are that
vector plus noise (a re-shot photo), with the item's title words, brand and category, and shop
filler around the title. Items of one category and brand share words often, as real ones do.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import itertools
import os
import random
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import append_results, markdown_table, write_json
from gateway.catalog import Product
from gateway.dedup import Dedup
from gateway.index.base import EmbeddingSpace
from gateway.index.embedded import EmbeddedIndex, wall_clock_seq
from gateway.taxonomy import CATEGORIES

WORDS = [
    "red",
    "blue",
    "green",
    "black",
    "white",
    "navy",
    "beige",
    "grey",
    "pink",
    "striped",
    "checked",
    "dotted",
    "floral",
    "plain",
    "linen",
    "wool",
]
LINES = [f"line{i}" for i in range(400)]
BRANDS = [f"brand{i}" for i in range(50)]
WRAPS = ("{t}", "New: {t}", "{t} - official store", "{t} (women)")


def synthesize(n: int, dim: int, seed: int = 7):
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    cats = sorted(CATEGORIES)
    products, vectors, truth = [], [], {}
    while len(products) < n:
        base = rng.normal(size=dim).astype(np.float32)
        base /= np.linalg.norm(base)
        words = " ".join(pick.sample(WORDS, 2))
        category, brand, line = pick.choice(cats), pick.choice(BRANDS), pick.choice(LINES)
        title = f"{words} {category} {line}"
        item = f"p{len(products):07d}"
        for _ in range(pick.choice((1, 1, 1, 2, 3, 4))):
            pid = f"p{len(products):07d}"
            v = base + rng.normal(scale=0.35 / np.sqrt(dim), size=dim).astype(np.float32)
            products.append(
                Product(
                    pid,
                    pick.choice(WRAPS).format(t=title),
                    brand,
                    category,
                    "women",
                    "US",
                    round(pick.uniform(10, 200), 2),
                    "USD",
                    ["M"],
                    True,
                    f"{pid}.jpg",
                    f"shop{pick.randrange(20)}",
                    f"https://shop.example/{pid}",
                )  # fmt: skip
            )
            vectors.append(v / np.linalg.norm(v))
            truth[pid] = item
            if len(products) == n:
                break
    return products, np.stack(vectors), truth


async def bulk_load(index: EmbeddedIndex, space: EmbeddingSpace, products, vectors) -> None:
    """Straight into the table (a benchmark fixture; catalogs go through `looksync index`)."""
    await index.ensure(space)
    table = await index._table(space.index_name, strong=True)
    schema = await table.schema()
    seq = wall_clock_seq()
    for at in range(0, len(products), 20_000):
        rows = []
        for p, v in zip(products[at : at + 20_000], vectors[at : at + 20_000]):
            row = {**p.to_dict(), "image_hash": f"h{p.id}", "vector": v, "deleted": False, "deleted_seq": 0}
            row |= {"field_seqs": {}, "event_seq": seq, "row_version": 1}
            rows.append(row)
        await table.add(index._batch(space, schema, rows))
    await index.optimize(space)


class PeakRss:
    """The process's resident memory sampled every 0.2 s while a block runs: the job's own
    peak above what the process held before it (ru_maxrss would count the synthetic world)."""

    def __enter__(self):
        self.before = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def pairwise(found: dict[str, str], truth: dict[str, str]) -> tuple[float, float]:
    def pairs(of):
        groups: dict[str, list[str]] = {}
        for pid, item in of.items():
            groups.setdefault(item, []).append(pid)
        return {p for g in groups.values() for p in itertools.combinations(sorted(g), 2)}

    t, f = pairs(truth), pairs({p: found[p] for p in truth if p in found})
    return len(t & f) / max(1, len(f)), len(t & f) / max(1, len(t))


async def run(n: int, dim: int) -> dict:
    space = EmbeddingSpace("synthetic", 1, dim)
    products, vectors, truth = synthesize(n + 500, dim)
    # 1,000 new listings: 500 more shops' listings of existing items, 500 of new items.
    rng = np.random.default_rng(11)
    relisted_p, relisted_v = [], []
    for j, at in enumerate(rng.choice(n, 500, replace=False)):
        p, v = products[at], vectors[at] + rng.normal(scale=0.35 / np.sqrt(dim), size=dim).astype(np.float32)
        relisted_p.append(Product(**{**p.to_dict(), "id": f"r{j:06d}", "retailer": "newshop"}))
        relisted_v.append(v / np.linalg.norm(v))
        truth[f"r{j:06d}"] = truth[p.id]
    new_products = products[n:] + relisted_p
    new_vectors = np.concatenate([vectors[n:], np.stack(relisted_v)])
    order = rng.permutation(len(new_products))
    new_products, new_vectors = [new_products[i] for i in order], new_vectors[order]
    products, vectors = products[:n], vectors[:n]
    largest_category = max(collections.Counter(p.category for p in products).values())
    with tempfile.TemporaryDirectory() as tmp:
        index = EmbeddedIndex(Path(tmp), refresh_s=0.0)
        try:
            start = time.perf_counter()
            await bulk_load(index, space, products, vectors)
            load_s = time.perf_counter() - start
            del products, vectors  # the world's own copy: what is left is the job's
            gc.collect()
            start = time.perf_counter()
            with PeakRss() as rss:
                full = await Dedup(index, space).run(full=True, progress=True)
            full_s = time.perf_counter() - start
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            precision, recall = pairwise(full.items_of, {p: truth[p] for p in full.items_of})
            # The ingestion path: 1,000 new listings written and placed in batches of 64.
            placed, place_s, start = 0, 0.0, time.perf_counter()
            for at in range(0, len(new_products), 64):
                chunk = list(
                    zip(
                        new_products[at : at + 64],
                        [f"h{p.id}" for p in new_products[at : at + 64]],
                        new_vectors[at : at + 64],
                    )
                )
                await index.upsert(space, chunk)
                t0 = time.perf_counter()
                placed += await Dedup(index, space).place([p.id for p, _, _ in chunk])
                place_s += time.perf_counter() - t0
            ingest_s = time.perf_counter() - start
            start = time.perf_counter()
            incremental = await Dedup(index, space).run(progress=False)
            incremental_s = time.perf_counter() - start
            final = {s.product.id: s.product.item_id async for b in index.scan(space) for s in b}
            final_precision, final_recall = pairwise(final, truth)
        finally:
            await index.close()
    return {
        "listings": n,
        "dim": dim,
        "load_s": load_s,
        "full_s": full_s,
        "full_items": full.items,
        "peak_rss_mb": peak_mb,
        "rss_before_job_mb": rss.before,
        "job_rss_mb": rss.peak - rss.before,
        "largest_category": largest_category,
        "precision": precision,
        "recall": recall,
        "new_listings": len(new_products),
        "place_on_ingest_s": ingest_s,
        "place_only_s": place_s,
        "placed_on_ingest": placed,
        "incremental_s": incremental_s,
        "incremental_written": incremental.written,
        "final_precision": final_precision,
        "final_recall": final_recall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args()
    r = asyncio.run(run(args.n, args.dim))
    print(r)
    write_json(f"dedup_scale_{args.n}", r)
    table = markdown_table(
        ["listings", "dim", "full run s", "job's memory MB (peak above before)", "largest category",
         "precision", "recall",
         "1,000 new: write + place s", "of which placing s", "placed on ingest", "incremental run s"],
        [[r["listings"], r["dim"], f"{r['full_s']:.0f}", f"{r['job_rss_mb']:.0f}", f"{r['largest_category']:,}",
          f"{r['precision']:.3f}",
          f"{r['recall']:.3f}", f"{r['place_on_ingest_s']:.1f}", f"{r['place_only_s']:.1f}",
          r["placed_on_ingest"], f"{r['incremental_s']:.0f}"]],
    )  # fmt: skip
    final_precision, final_recall = r["final_precision"], r["final_recall"]
    append_results(
        f"Dedup at scale: {r['listings']:,} listings (embedded index)",
        table,
        f"After ingestion and the incremental run: precision {final_precision:.3f}, recall "
        f"{final_recall:.3f} over all {r['listings'] + r['new_listings']:,} listings. Process RSS before the "
        f"job {r['rss_before_job_mb']:.0f} MB; peak RSS of the whole benchmark (world synthesis included) "
        f"{r['peak_rss_mb']:.0f} MB.",
    )


if __name__ == "__main__":
    main()
