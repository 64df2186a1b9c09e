"""What a filter costs the embedded index at scale, with and without the scalar indexes
`optimize()` builds on the filter columns: `EmbeddedIndex.search` (the serving path: its where
clause always carries `deleted = false`, its own search plan) at N catalog rows.

    python -m benchmarks.index_filters [--n 1000000] [--dim 64] [--queries 30]

Rows are synthetic listings (benchmarks/dedup_scale.py's generator: 12 categories, one market);
64-d vectors keep the load and the ANN build short, and the filter's cost does not depend on the
vector size. One run measures both settings on the same table: first with every index
`optimize()` builds, then with the filter-column indexes dropped (ids keep theirs).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import append_results, markdown_table, write_json
from benchmarks.dedup_scale import bulk_load, synthesize
from gateway.filters import build_filters
from gateway.index.ann_plan import scalar_indexes
from gateway.index.base import EmbeddingSpace
from gateway.index.embedded import EmbeddedIndex, where_clause

FILTERS = {
    "none (deleted = false only)": build_filters(),
    "category": build_filters(categories=["dress"]),
    "category + in stock + price": build_filters(categories=["dress"], in_stock_only=True, max_price=100),
    "size": build_filters(sizes=["M"]),
}


async def measure(index, space, queries) -> dict[str, dict]:
    out = {}
    for label, f in FILTERS.items():
        await index.search(queries[0], space, f, 10)  # warm
        latencies = []
        for q in queries:
            t0 = time.perf_counter()
            await index.search(q, space, f, 10)
            latencies.append((time.perf_counter() - t0) * 1000)
        out[label] = {
            "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)),
        }
        print(f"[bench] {label:32s} p50 {out[label]['p50_ms']:7.1f} ms  ({where_clause(f)})", flush=True)
    return out


async def run(n: int, dim: int, queries: int) -> dict:
    space = EmbeddingSpace("synthetic", 1, dim)
    products, vectors, _ = synthesize(n, dim)
    products, vectors = products[:n], vectors[:n]
    rng = np.random.default_rng(5)
    qs = vectors[rng.integers(0, n, queries)]
    with tempfile.TemporaryDirectory() as tmp:
        index = EmbeddedIndex(Path(tmp), refresh_s=0.0)
        try:
            t0 = time.perf_counter()
            await bulk_load(index, space, products, vectors)  # ends with optimize()
            print(f"[bench] loaded and optimized {n:,} rows in {time.perf_counter() - t0:.0f} s", flush=True)
            with_indexes = await measure(index, space, qs)
            table = await index._table(space.index_name)
            for info in await table.list_indices():
                if info.columns[0] not in ("id", "item_id", "vector"):
                    await table.drop_index(info.name)
            index._tables.clear()
            without = await measure(index, space, qs)
        finally:
            await index.close()
    return {"with": with_indexes, "without": without}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    r = asyncio.run(run(args.n, args.dim, args.queries))
    rows = [
        [label, f"{r['without'][label]['p50_ms']:.1f}", f"{r['with'][label]['p50_ms']:.1f}",
         f"{r['without'][label]['p50_ms'] / r['with'][label]['p50_ms']:.1f}x", f"{r['with'][label]['p99_ms']:.1f}"]
        for label in FILTERS
    ]  # fmt: skip
    table = markdown_table(
        [
            "filter",
            "p50 ms, no filter-column indexes",
            "p50 ms, optimize()'s indexes",
            "speed-up",
            "p99 ms (indexed)",
        ],
        rows,
    )
    print(table)
    write_json(f"index_filters_{args.n}", r)
    if not args.no_record:
        columns = ", ".join(c for c, _ in scalar_indexes())
        append_results(
            f"Embedded index: what a filter costs at {args.n:,} rows ({args.dim}-d)",
            table,
            f"`EmbeddedIndex.search`, k = 10, {args.queries} queries per filter, the gateway's own plan (ANN: "
            f"8 probes, ef 300, refine 4; the where clause always includes `deleted = false`). Indexed "
            f"columns: {columns}. Without an index LanceDB's pre-filter scans the filter's columns for "
            "every query.",
        )


if __name__ == "__main__":
    main()
