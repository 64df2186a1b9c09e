"""Embedded index (LanceDB) at scale: build time, disk, query latency and recall@10 against exact
search, for flat scan and an IVF-HNSW-SQ index, unfiltered and with 5 % and 0.5 % filters.

    python -m benchmarks.index_scale [--quick] [--sizes 100000,1000000] [--dim 1024]

Vectors are clustered like real embeddings (a mixture of 2,000 Gaussian clusters on the unit
sphere, not uniform noise); queries are perturbed catalog vectors, as a look crop is to its
product. Exact top-10 comes from numpy over all vectors with the same filter.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
from lancedb.index import IvfHnswSq

from benchmarks.common import append_results, markdown_table, write_json


def clustered(n: int, dim: int, seed: int, clusters: int = 2000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        which = rng.integers(0, clusters, m)
        out[start : start + m] = centres[which] + 0.35 * rng.standard_normal((m, dim)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def table_batches(vectors: np.ndarray, bucket: np.ndarray, size: int = 50_000):
    dim = vectors.shape[1]
    schema = pa.schema([("id", pa.int64()), ("bucket", pa.int32()), ("vector", pa.list_(pa.float32(), dim))])
    for start in range(0, len(vectors), size):
        v = vectors[start : start + size]
        yield pa.table(
            {
                "id": np.arange(start, start + len(v)),
                "bucket": bucket[start : start + len(v)],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), dim),
            },
            schema=schema,
        )


def exact_top10(vectors, bucket, query, allowed) -> set[int]:
    scores = vectors @ query
    if allowed is not None:
        scores = np.where(bucket < allowed, scores, -np.inf)
    return set(np.argpartition(-scores, 10)[:10].tolist())


async def run_size(n: int, dim: int, queries: int, work: Path) -> list[dict]:
    vectors = clustered(n, dim, seed=n)
    rng = np.random.default_rng(7)
    # bucket in [0, 1000): "bucket < 50" keeps 5 %, "bucket < 5" keeps 0.5 %
    bucket = rng.integers(0, 1000, n).astype(np.int32)
    db = await lancedb.connect_async(str(work / f"db{n}"))
    t0 = time.perf_counter()
    table = None
    for i, batch in enumerate(table_batches(vectors, bucket)):
        if table is None:
            table = await db.create_table("products", data=batch)
        else:
            await table.add(batch)
        print(f"[bench] n={n}: wrote {(i + 1) * 50_000:,} rows", flush=True)
    load_s = time.perf_counter() - t0
    await table.create_index("bucket", config=lancedb.index.BTree())
    t1 = time.perf_counter()
    parts = max(1, int(np.sqrt(n) / 2))
    await table.create_index("vector", config=IvfHnswSq(distance_type="cosine", num_partitions=parts))
    index_s = time.perf_counter() - t1
    disk_gb = sum(f.stat().st_size for f in (work / f"db{n}").rglob("*") if f.is_file()) / 1e9
    picks = rng.integers(0, n, queries)
    qs = vectors[picks] + 0.2 * rng.standard_normal((queries, dim)).astype(np.float32) / np.sqrt(dim) * 10
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    rows = []
    for label, allowed in (("none", None), ("5 %", 50), ("0.5 %", 5)):
        truth = [exact_top10(vectors, bucket, q, allowed) for q in qs]
        for mode in ("flat", "ivf_hnsw_sq"):
            latencies, recalls = [], []
            for q, t in zip(qs, truth):
                query = table.query().nearest_to(q).distance_type("cosine").limit(10).select(["id"])
                if allowed is not None:
                    query = query.where(f"bucket < {allowed}")
                if mode == "flat":
                    query = query.bypass_vector_index()
                else:
                    query = query.nprobes(max(8, parts // 10)).refine_factor(2)
                s = time.perf_counter()
                got = await query.to_arrow()
                latencies.append((time.perf_counter() - s) * 1000)
                recalls.append(len(set(got.column("id").to_pylist()) & t) / 10)
            rows.append(
                {
                    "n": n,
                    "filter": label,
                    "mode": mode,
                    "p50_ms": float(np.percentile(latencies, 50)),
                    "p99_ms": float(np.percentile(latencies, 99)),
                    "recall@10": float(np.mean(recalls)),
                    "load_s": load_s,
                    "index_s": index_s,
                    "disk_gb": disk_gb,
                }
            )
            print(
                f"[bench] n={n:,} filter={label:5s} {mode:12s} p50 {rows[-1]['p50_ms']:7.1f} ms "
                f"p99 {rows[-1]['p99_ms']:7.1f} ms recall@10 {rows[-1]['recall@10']:.3f}",
                flush=True,
            )
    del vectors
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="20,000 vectors, 20 queries")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    sizes = [20_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    queries = 20 if args.quick else args.queries
    work = Path(tempfile.mkdtemp(prefix="looksync-bench-index-"))
    try:
        rows = []
        for n in sizes:
            rows += asyncio.run(run_size(n, args.dim, queries, work))
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        table = markdown_table(
            [
                "vectors",
                "filter",
                "search",
                "p50 ms",
                "p99 ms",
                "recall@10",
                "load s",
                "ANN build s",
                "disk GB",
            ],
            [
                [
                    f"{r['n']:,}",
                    r["filter"],
                    r["mode"],
                    f"{r['p50_ms']:.1f}",
                    f"{r['p99_ms']:.1f}",
                    f"{r['recall@10']:.3f}",
                    f"{r['load_s']:.0f}",
                    f"{r['index_s']:.0f}",
                    f"{r['disk_gb']:.2f}",
                ]
                for r in rows
            ],
        )
        print(table)
        write_json(
            "index_scale" + ("_quick" if args.quick else ""),
            {
                f"{r['mode']}_{r['n']}_{r['filter'].replace(' ', '').replace('%', 'pct')}_{k}": round(r[k], 3)
                for r in rows
                for k in ("p50_ms", "recall@10")
            },
        )
        if not args.no_record:
            append_results(
                f"Embedded index at scale ({args.dim}-d, LanceDB {lancedb.__version__})",
                table,
                f"Peak RSS of the benchmark process (vectors in numpy for the exact answers "
                f"included): {peak_gb:.1f} GB. Filters are `bucket < x` on a B-tree-indexed column, "
                f"applied before ranking (LanceDB pre-filter). CPU: {os.cpu_count()} cores.",
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
