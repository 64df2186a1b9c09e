"""Embedded index (LanceDB) at scale: build time, disk, query latency and recall@10 against exact
search, for flat scan and an IVF-HNSW-SQ index, unfiltered and with 5 % and 0.5 % filters.

    python -m benchmarks.index_scale [--quick] [--sizes 100000,1000000] [--dim 1024]
    python -m benchmarks.index_scale --sweep [--sizes 1000000] [--indexes ivf_hnsw_sq,ivf_pq]

`--sweep` builds each index kind in turn on one dataset and sweeps the query knobs (partitions
probed, refine factor, HNSW ef), unfiltered and at 5 % and 0.5 % filters, and measures the
serving path's own plan (gateway/index/ann_plan.py) on the index it builds; it writes a table
and a recall-vs-latency plot.

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
from gateway.index.ann_plan import index_config, partitions_for, plan_search
from gateway.index.exact_cache import RowVectorCache, exact_search
from gateway.settings import Settings

EXACT_MAX_ROWS = Settings.model_fields["exact_max_rows"].default


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


async def dataset(n: int, dim: int, folder: Path):
    """Clustered vectors, a filter column and a LanceDB table of both (B-tree on the column):
    (vectors, bucket, table, rng, load seconds)."""
    vectors = clustered(n, dim, seed=n)
    rng = np.random.default_rng(7)
    # bucket in [0, 1000): "bucket < 50" keeps 5 %, "bucket < 5" keeps 0.5 %
    bucket = rng.integers(0, 1000, n).astype(np.int32)
    db = await lancedb.connect_async(str(folder))
    t0 = time.perf_counter()
    table = None
    for i, batch in enumerate(table_batches(vectors, bucket)):
        if table is None:
            table = await db.create_table("products", data=batch)
        else:
            await table.add(batch)
        if (i + 1) % 4 == 0 or (i + 1) * 50_000 >= n:
            print(f"[bench] n={n:,}: wrote {min(n, (i + 1) * 50_000):,} rows", flush=True)
    load_s = time.perf_counter() - t0
    await table.create_index("bucket", config=lancedb.index.BTree())
    return vectors, bucket, table, rng, load_s


async def run_size(n: int, dim: int, queries: int, work: Path) -> list[dict]:
    vectors, bucket, table, rng, load_s = await dataset(n, dim, work / f"db{n}")
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


# -- the knob sweep (--sweep): one dataset, each index built in turn, query knobs swept ----------

INDEXES = {"ivf_hnsw_sq": "hnsw_sq", "ivf_pq": "pq"}  # name: builder kind


def knob_grid(kind: str, nprobes: list[int], refine: list[int], ef: list[int]) -> list[dict]:
    """Query settings to sweep; 0 = off (refine, ef) or all partitions (nprobes). ef is HNSW's."""
    efs = ef if kind == "hnsw_sq" else [0]
    return [dict(nprobes=p, refine=r or None, ef=e or None) for p in nprobes for r in refine for e in efs]


def build_config(kind: str, partitions: int, dim: int):
    from lancedb.index import IvfPq

    if kind == "hnsw_sq":
        return IvfHnswSq(distance_type="cosine", num_partitions=partitions)
    # 8 dimensions per sub-vector: 1024-d -> 128 bytes per vector (1/32 of float32).
    return IvfPq(distance_type="cosine", num_partitions=partitions, num_sub_vectors=dim // 8)


async def measure(table, qs, truth, allowed, knobs: dict | None, partitions: int) -> dict:
    latencies, recalls = [], []
    if knobs is None and allowed is None:
        qs, truth = qs[:5], truth[:5]  # an unfiltered flat scan of 1 M rows takes seconds
    for q, t in zip(qs, truth):
        query = table.query().nearest_to(q).distance_type("cosine").limit(10).select(["id"])
        if allowed is not None:
            query = query.where(f"bucket < {allowed}")
        if knobs is None:
            query = query.bypass_vector_index()
        else:
            query = query.nprobes(knobs["nprobes"] or partitions)
            if knobs.get("refine"):
                query = query.refine_factor(knobs["refine"])
            if knobs.get("ef"):
                query = query.ef(knobs["ef"])
        s = time.perf_counter()
        got = await query.to_arrow()
        latencies.append((time.perf_counter() - s) * 1000)
        recalls.append(len(set(got.column("id").to_pylist()) & t) / 10)
    return summary(latencies, recalls)


def summary(latencies: list[float], recalls: list[float]) -> dict:
    return {
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "recall@10": float(np.mean(recalls)),
    }


async def measure_in_memory(table, qs, truth, allowed, dim: int) -> dict:
    """Exact search as the gateway runs it (gateway/index/exact_cache.py): row ids from LanceDB,
    vectors from memory. The first query fills the cache; its time is reported apart."""
    cache = RowVectorCache(dim, 8 << 30)
    where = f"bucket < {allowed}" if allowed is not None else None
    s = time.perf_counter()
    await exact_search(table, cache, qs[0], where, 10, ["id"])
    fill_ms = (time.perf_counter() - s) * 1000
    latencies, recalls = [], []
    for q, t in zip(qs, truth):
        s = time.perf_counter()
        got = await exact_search(table, cache, q, where, 10, ["id"])
        latencies.append((time.perf_counter() - s) * 1000)
        recalls.append(len(set(got.column("id").to_pylist()) & t) / 10)
    return {**summary(latencies, recalls), "fill_ms": fill_ms}


def knob_label(knobs: dict | None, partitions: int) -> str:
    if knobs is None:
        return "exact (flat scan)"
    parts = [f"nprobes {knobs['nprobes'] or partitions}"]
    parts.append(f"refine {knobs['refine']}" if knobs.get("refine") else "no refine")
    if knobs.get("ef"):
        parts.append(f"ef {knobs['ef']}")
    return ", ".join(parts)


async def run_sweep(
    n: int, dim: int, queries: int, work: Path, indexes: list[str], knobs: dict
) -> list[dict]:
    vectors, bucket, table, rng, _ = await dataset(n, dim, work / f"sweep{n}")
    picks = rng.integers(0, n, queries)
    qs = vectors[picks] + 0.2 * rng.standard_normal((queries, dim)).astype(np.float32) / np.sqrt(dim) * 10
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    filters = (("none", None), ("5 %", 50), ("0.5 %", 5))
    truth = {label: [exact_top10(vectors, bucket, q, allowed) for q in qs] for label, allowed in filters}
    del vectors
    partitions = max(1, int(np.sqrt(n) / 2))
    rows = []
    for label, allowed in filters:
        r = await measure(table, qs, truth[label], allowed, None, partitions)
        rows.append(
            {"n": n, "index": "none", "filter": label, "knobs": knob_label(None, 0), "build_s": 0.0, **r}
        )
        print(f"[sweep] n={n:,} {label:5s} exact: {r}", flush=True)
        if allowed is not None:  # unfiltered, the whole table would have to be in memory
            r = await measure_in_memory(table, qs, truth[label], allowed, dim)
            knobs_text = f"exact, vectors in memory (first query {r['fill_ms']:.0f} ms: fills)"
            rows.append(
                {"n": n, "index": "memory", "filter": label, "knobs": knobs_text, "build_s": 0.0, **r}
            )
            print(f"[sweep] n={n:,} {label:5s} exact in memory: {r}", flush=True)
    for name in indexes:
        kind = INDEXES[name]
        grid = knob_grid(kind, **knobs)
        t0 = time.perf_counter()
        await table.create_index("vector", config=build_config(kind, partitions, dim), replace=True)
        build_s = time.perf_counter() - t0
        print(f"[sweep] n={n:,} built {name} ({partitions} partitions) in {build_s:.0f} s", flush=True)
        if type(build_config(kind, partitions, dim)) is type(index_config(n)):
            # What the gateway does on this index: its own plan per filter.
            for label, allowed in filters:
                where = f"bucket < {allowed}" if allowed is not None else None
                matching = await table.count_rows(where) if where else n
                plan = plan_search(partitions_for(n), matching, EXACT_MAX_ROWS)
                if plan.exact:  # as the gateway does it: vectors from memory
                    r = await measure_in_memory(table, qs, truth[label], allowed, dim)
                    said = "exact, vectors in memory"
                else:
                    knobs = {"nprobes": plan.nprobes, "refine": plan.refine, "ef": plan.ef}
                    r = await measure(table, qs, truth[label], allowed, knobs, partitions)
                    said = knob_label(knobs, partitions)
                rows.append(
                    {"n": n, "index": "serving", "filter": label, "build_s": build_s,
                     "knobs": f"serving plan on {name}: {said}", **r}
                )  # fmt: skip
                print(f"[sweep] serving {label:5s} {rows[-1]['knobs']:32s} {r}", flush=True)
        for label, allowed in filters:
            for knobs in grid:
                r = await measure(table, qs, truth[label], allowed, knobs, partitions)
                rows.append(
                    {"n": n, "index": name, "filter": label, "knobs": knob_label(knobs, partitions),
                     "build_s": build_s, **r}
                )  # fmt: skip
                print(f"[sweep] {name} {label:5s} {rows[-1]['knobs']:32s} {r}", flush=True)
    return rows


# index: (marker, legend, size, colour); other indexes are the swept ANN kinds.
MARKERS = {
    "none": ("x", "exact (LanceDB flat)", 40, "tab:blue"),
    "memory": ("^", "exact, vectors in memory", 40, "tab:orange"),
    "serving": ("*", "serving plan", 120, "tab:green"),
    "ivf_hnsw_sq": ("o", "ivf_hnsw_sq", 40, "tab:red"),
    "ivf_pq": ("o", "ivf_pq", 40, "tab:purple"),
}


def plot_sweep(rows: list[dict], path: Path) -> Path:
    """Recall@10 against p50 latency, one panel per filter, one series per index."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    filters = list(dict.fromkeys(r["filter"] for r in rows))
    fig, axes = plt.subplots(1, len(filters), figsize=(5 * len(filters), 4.2), squeeze=False)
    for ax, label in zip(axes[0], filters):
        for index in dict.fromkeys(r["index"] for r in rows):
            pts = [r for r in rows if r["filter"] == label and r["index"] == index]
            if not pts:
                continue
            marker, name, size, colour = MARKERS.get(index, ("o", index, 40, "tab:grey"))
            ax.scatter(
                [r["p50_ms"] for r in pts],
                [r["recall@10"] for r in pts],
                marker=marker,
                label=name,
                s=size,
                color=colour,
            )
        ax.axhline(0.95, color="grey", lw=0.8, ls="--")
        ax.axvline(15, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("p50 ms (log)")
        ax.set_ylabel("recall@10")
        ax.set_title(f"filter: {label}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Embedded index, {rows[0]['n']:,} vectors: recall vs latency (goal: upper left of the dashes)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="20,000 vectors, 20 queries")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="sweep index kinds and query knobs")
    parser.add_argument("--indexes", default=",".join(INDEXES), help="--sweep: index kinds to build")
    parser.add_argument("--nprobes", default="8,25,50,100,0", help="--sweep: partitions probed (0 = all)")
    parser.add_argument("--refine", default="0,4,10", help="--sweep: refine factors (0 = none)")
    parser.add_argument("--ef", default="0,300", help="--sweep: HNSW ef (0 = LanceDB's default)")
    args = parser.parse_args()
    if args.sweep:
        return sweep_main(args)
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


def sweep_main(args) -> None:
    sizes = [20_000] if args.quick else [int(x) for x in args.sizes.split(",")]
    if not args.quick and args.sizes == "100000,1000000":
        sizes = [1_000_000]
    queries = 20 if args.quick else args.queries
    work = Path(tempfile.mkdtemp(prefix="looksync-bench-sweep-"))
    try:
        for n in sizes:
            knobs = {k: [int(x) for x in getattr(args, k).split(",")] for k in ("nprobes", "refine", "ef")}
            rows = asyncio.run(run_sweep(n, args.dim, queries, work, args.indexes.split(","), knobs))
            peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
            table = markdown_table(
                ["vectors", "filter", "index", "query settings", "p50 ms", "p99 ms", "recall@10", "build s"],
                [
                    [f"{r['n']:,}", r["filter"], r["index"], r["knobs"], f"{r['p50_ms']:.1f}",
                     f"{r['p99_ms']:.1f}", f"{r['recall@10']:.3f}", f"{r['build_s']:.0f}"]
                    for r in rows
                ],
            )  # fmt: skip
            print(table)
            suffix = "_quick" if args.quick else f"_{n}"
            write_json(f"index_sweep{suffix}", {"rows": rows})
            plot = plot_sweep(rows, Path(__file__).resolve().parent / "results" / f"index_sweep{suffix}.png")
            print(f"plot: {plot}")
            if not args.no_record:
                append_results(
                    f"Embedded index knob sweep ({n:,} x {args.dim}-d, LanceDB {lancedb.__version__})",
                    table,
                    f"{queries} queries per filter (perturbed catalog vectors; exact top-10 from numpy with "
                    f"the same filter). Filters are `bucket < x` on a B-tree-indexed column, applied before "
                    f"ranking. IVF partitions: sqrt(n)/2 = {partitions_for(n)}. `serving` rows are the "
                    f"gateway's own plan (gateway/index/ann_plan.py) on the index `optimize()` builds. "
                    f"Peak RSS {peak_gb:.1f} GB; CPU: {os.cpu_count()} cores. Plot: "
                    f"`benchmarks/results/{plot.name}`.",
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
