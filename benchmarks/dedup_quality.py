"""Cross-retailer dedup quality and cost: pairwise precision and recall of `looksync dedup` on
a held-out synthetic world with planted duplicates, over a grid of thresholds, with the model
served by Triton (the demo CLIP in the project's model repository; `make demo` exports it).

    python -m benchmarks.dedup_quality [--quick] [--products 400] [--share 0.3]

Truth: the world records each listing's item (planted listings: their original's id). A pair
of listings is positive when they share an item. "Look-alike merges" counts pairs of distinct
products of the same kind and colour but another pattern put in one item: the goal is zero.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import HERE, append_results, markdown_table, write_json
from clients.world import write_world
from gateway.dedup import Dedup, DedupSettings
from gateway.embedder import TritonEmbedder
from gateway.index.embedded import EmbeddedIndex
from gateway.indexer import Indexer, index_catalog, resolve_space
from gateway.settings import get_settings
from gateway.tritonserver import TritonServer


def pairs(groups: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {tuple(sorted(p)) for members in groups.values() for p in itertools.combinations(members, 2)}


def score(found: dict[str, str], manifest: dict) -> dict:
    truth_groups: dict[str, set[str]] = {}
    for pid, item in manifest["items"].items():
        truth_groups.setdefault(item, set()).add(pid)
    found_groups: dict[str, set[str]] = {}
    for pid, item in found.items():
        found_groups.setdefault(item, set()).add(pid)
    truth, predicted = pairs(truth_groups), pairs(found_groups)
    attrs = manifest["attributes"]
    items = manifest["items"]

    def look_alike(a, b):  # distinct products of one kind and colour, another pattern
        x, y = attrs[items[a]], attrs[items[b]]
        return (
            items[a] != items[b]
            and (x["kind"], x["colour"]) == (y["kind"], y["colour"])
            and x["pattern"] != y["pattern"]
        )

    return {
        "precision": len(truth & predicted) / max(1, len(predicted)),
        "recall": len(truth & predicted) / max(1, len(truth)),
        "pairs_true": len(truth),
        "pairs_found": len(predicted),
        "look_alike_merges": sum(look_alike(a, b) for a, b in predicted),
        "items": len(found_groups),
    }


async def run(products: int, share: float, grid: list[tuple[float, float]]) -> list[dict]:
    s = get_settings()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        manifest = write_world(world, products=products, looks=1, seed=3001, duplicates=share)
        embedder = TritonEmbedder(s.triton_url)
        index = EmbeddedIndex(Path(tmp) / "index", refresh_s=0.0)
        try:
            space = await resolve_space(embedder, s.embedding_model, None)
            await index_catalog(world / "catalog.jsonl", Indexer(embedder, index, space), progress=False)
            for image_t, title_t in grid:
                start = time.perf_counter()
                report = await Dedup(index, space, DedupSettings(image_t, title_t)).run(
                    full=True, progress=False
                )
                row = {
                    "image_threshold": image_t,
                    "title_threshold": title_t,
                    **score(report.items_of, manifest),
                    "wall_s": time.perf_counter() - start,
                    "listings": report.listings,
                }
                print(json.dumps(row), flush=True)
                out.append(row)
        finally:
            await embedder.close()
            await index.close()
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for title_t in sorted({r["title_threshold"] for r in rows}):
        sel = sorted((r for r in rows if r["title_threshold"] == title_t), key=lambda r: r["image_threshold"])
        x = [r["image_threshold"] for r in sel]
        ax.plot(x, [r["precision"] for r in sel], "o-", label=f"precision (title >= {title_t})")
        ax.plot(x, [r["recall"] for r in sel], "s--", label=f"recall (title >= {title_t})")
    ax.set_xlabel("image cosine threshold")
    ax.set_ylabel("pairwise")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("looksync dedup on planted cross-retailer duplicates")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="120 products, three settings")
    parser.add_argument("--products", type=int, default=400)
    parser.add_argument("--share", type=float, default=0.3, help="share of products sold by other retailers")
    args = parser.parse_args()
    s = get_settings()
    triton = TritonServer(
        s.model_repository, s.triton_http_port, s.triton_grpc_port, s.triton_metrics_port,
        work_dir=s.data_dir / "triton",
    )  # fmt: skip
    started = not triton.ready()
    if started:
        triton.start(log_file=open(s.data_dir / "triton.log", "a"))
    try:
        image_ts = [0.3, 0.5, 0.6, 0.7, 0.8, 0.9] if not args.quick else [0.5, 0.8]
        title_ts = [0.75, 0.9] if not args.quick else [0.9]
        grid = [(i, t) for t in title_ts for i in image_ts]
        rows = asyncio.run(run(120 if args.quick else args.products, args.share, grid))
    finally:
        if started:
            triton.stop()
    write_json("dedup_quality", {"rows": rows})
    figure = HERE / "results" / "dedup_quality.png"
    plot(rows, figure)
    table = markdown_table(
        ["image ≥", "title ≥", "precision", "recall", "look-alike merges", "items", "listings", "wall s"],
        [
            [
                r["image_threshold"], r["title_threshold"], f"{r['precision']:.3f}", f"{r['recall']:.3f}",
                r["look_alike_merges"], r["items"], r["listings"], f"{r['wall_s']:.1f}",
            ]
            for r in rows
        ],
    )  # fmt: skip
    append_results(
        "Cross-retailer dedup: pairwise precision and recall on planted duplicates",
        table,
        f"Held-out world (seed 3001), demo CLIP served by Triton (CPU). Plot: "
        f"`benchmarks/results/{figure.name}`.",
    )


if __name__ == "__main__":
    main()
