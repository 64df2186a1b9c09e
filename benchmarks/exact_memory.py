"""Exact search on a table without an ANN index: LanceDB's scan against the vectors held in memory
(gateway/index/exact_cache.py), by table size and dimension. Sets where the embedded index starts
using the cache on such tables (`EmbeddedIndex.exact_cache_min_floats`, rows x dim).

    python -m benchmarks.exact_memory [--rows 300,1000,3000,10000] [--dims 64,1024] [--queries 30]

`EmbeddedIndex.search`, unfiltered (every row is a candidate), k = 10, the cache filled by warm-up
queries first; both variants read the same table on disk.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import append_results, markdown_table, write_json
from gateway.catalog import Product
from gateway.filters import build_filters
from gateway.index.base import EmbeddingSpace
from gateway.index.embedded import EmbeddedIndex


async def measure(
    root: Path, space: EmbeddingSpace, vectors: np.ndarray, queries: int, from_memory: bool
) -> float:
    index = EmbeddedIndex(root, refresh_s=0.5, exact_cache_min_floats=0 if from_memory else 2**62)
    for q in vectors[:3]:  # opens the table, fills the cache
        await index.search(q, space, build_filters(), 10)
    times = []
    for q in vectors[:queries]:
        start = time.perf_counter()
        await index.search(q, space, build_filters(), 10)
        times.append(time.perf_counter() - start)
    assert bool(index._exact_caches) == from_memory
    return float(np.median(times) * 1000)


async def run(rows: list[int], dims: list[int], queries: int) -> list[dict]:
    out = []
    for dim in dims:
        space = EmbeddingSpace("clip", 1, dim)
        for n in rows:
            root = Path(tempfile.mkdtemp(prefix="looksync-bench-exact-"))
            try:
                rng = np.random.default_rng(n + dim)
                vectors = rng.standard_normal((n, dim)).astype(np.float32)
                writer = EmbeddedIndex(root, refresh_s=0.0)
                for start in range(0, n, 2000):
                    await writer.upsert(
                        space,
                        [
                            (Product(id=f"p{i}", title="t", brand="b", category="dress", gender="women",
                                     market="US", price=1.0, currency="USD", sizes=[], in_stock=True,
                                     image_url=""), "h", vectors[i])
                            for i in range(start, min(n, start + 2000))
                        ],
                    )  # fmt: skip
                scan = await measure(root, space, vectors, queries, from_memory=False)
                memory = await measure(root, space, vectors, queries, from_memory=True)
                out.append({"dim": dim, "rows": n, "scan_ms": scan, "memory_ms": memory})
                print(
                    f"[exact] {dim}-d, {n:,} rows: scan {scan:.1f} ms, from memory {memory:.1f} ms",
                    flush=True,
                )
            finally:
                shutil.rmtree(root, ignore_errors=True)
    return out


def plot(results: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for dim in dict.fromkeys(r["dim"] for r in results):
        pts = [r for r in results if r["dim"] == dim]
        ax.plot([r["rows"] for r in pts], [r["scan_ms"] for r in pts], "o--", label=f"{dim}-d, LanceDB scan")
        ax.plot([r["rows"] for r in pts], [r["memory_ms"] for r in pts], "s-", label=f"{dim}-d, from memory")
    ax.set_xscale("log")
    ax.set_xlabel("rows in the table (no ANN index, unfiltered)")
    ax.set_ylabel("p50 ms per search")
    ax.set_title("Exact search: LanceDB scan vs vectors held in memory")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="300,1000,3000,10000")
    parser.add_argument("--dims", default="64,1024")
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    rows = [int(x) for x in args.rows.split(",")]
    dims = [int(x) for x in args.dims.split(",")]
    results = asyncio.run(run(rows, dims, args.queries))
    table = markdown_table(
        ["dim", "rows", "LanceDB scan p50 ms", "from memory p50 ms", "scan / memory"],
        [
            [r["dim"], f"{r['rows']:,}", f"{r['scan_ms']:.1f}", f"{r['memory_ms']:.1f}",
             f"{r['scan_ms'] / r['memory_ms']:.2f}"]
            for r in results
        ],
    )  # fmt: skip
    print(table)
    write_json("exact_memory", {"rows": results})
    path = plot(results, Path(__file__).resolve().parent / "results" / "exact_memory.png")
    if not args.no_record:
        append_results(
            "Exact search from memory vs LanceDB's scan (tables without an ANN index)",
            table,
            f"`EmbeddedIndex.search`, unfiltered, k = 10, {args.queries} queries, the cache filled "
            f"first. Plot: `benchmarks/results/{path.name}`.",
        )


if __name__ == "__main__":
    main()
