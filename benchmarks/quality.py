"""Quality harness: Recall@1/5/10, MRR and nDCG@10 for text -> product, image -> product and
look -> garment on the synthetic world, broken down by category and gender; two settings side
by side (served through the gateway vs PyTorch fp32 in process, or two gateways).

    python -m benchmarks.quality [--quick] [--checkpoint export/weights/looksync-demo.pt]

Relevance is the exact catalog item (one relevant item per query): the item a caption was
written for, the item whose image is the query, the item a look garment varies.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from benchmarks.common import HERE, append_results, markdown_table, write_json
from clients.world import write_world

REPO = HERE.parent
ZONE_LAYERS = {
    "upper": {"topwear", "outerwear", "dress"},
    "lower": {"bottomwear", "dress"},
    "feet": {"footwear"},
    "dress": {"dress", "topwear", "bottomwear"},
}
ZONE_KINDS = {
    "upper": ("t-shirt", "shirt", "jacket", "dress"),
    "lower": ("trousers", "skirt", "dress"),
    "feet": ("sneakers",),
    "dress": ("dress",),
}


def rank_metrics(ranks: list[int | None]) -> dict[str, float]:
    """ranks: 1-based rank of the relevant item, None when not in the top 10."""
    n = max(1, len(ranks))
    found = [r for r in ranks if r is not None]
    return {
        "R@1": sum(r <= 1 for r in found) / n,
        "R@5": sum(r <= 5 for r in found) / n,
        "R@10": sum(r <= 10 for r in found) / n,
        "MRR": sum(1 / r for r in found) / n,
        "nDCG@10": sum(1 / math.log2(r + 1) for r in found) / n,
        "n": len(ranks),
    }


class Queries:
    """Every query of the world once, with its relevant item and breakdown keys."""

    def __init__(self, world: Path, sample: int):
        self.world = world
        self.manifest = json.loads((world / "looks.json").read_text())
        self.records = [json.loads(line) for line in (world / "catalog.jsonl").read_text().splitlines()]
        step = max(1, len(self.records) // sample)
        self.items = self.records[::step][:sample]
        self.attrs = self.manifest["attributes"]


def gateway_ranks(
    address: str, q: Queries, space: tuple[str, int] | None = None
) -> dict[str, list[tuple[str, str, int | None]]]:
    """Ranks through a gateway; `space` names the embedding space to search (default: the
    alias's). An image-only space has no text -> product task."""
    from clients.client import LookSyncClient

    out = defaultdict(list)
    with LookSyncClient(address, timeout_s=30) as client:
        first = client.search_image((q.world / q.items[0]["image_url"]).read_bytes(), k=1, space=space)
        has_text = "text" in first.space.modalities or not first.space.modalities
        for rec in q.items:
            a = q.attrs[rec["id"]]
            if has_text:
                hits = client.search_text(q.manifest["captions"][rec["id"]], k=10, space=space).hits
                out["text"].append((a["kind"], a["gender"], _rank(hits, rec["id"])))
            hits = client.search_image((q.world / rec["image_url"]).read_bytes(), k=10, space=space).hits
            out["image"].append((a["kind"], a["gender"], _rank(hits, rec["id"])))
        for look in q.manifest["looks"]:
            resp = client.search_look((q.world / look["image"]).read_bytes(), k_per_layer=10, space=space)
            for zone, pid in look["garments"].items():
                layer = next(
                    (
                        lr
                        for lr in resp.layers
                        if lr.layer in ZONE_LAYERS[zone] and pid in [h.product.id for h in lr.hits]
                    ),
                    None,
                )
                hits = layer.hits if layer else []
                a = q.attrs[pid]
                out["look"].append((a["kind"], a["gender"], _rank(hits, pid)))
    return out


def _rank(hits, pid):
    ids = [h.product.id for h in hits]
    return ids.index(pid) + 1 if pid in ids else None


def torch_ranks(checkpoint: Path, q: Queries) -> dict[str, list[tuple[str, str, int | None]]]:
    """The same queries with the PyTorch fp32 model and exact search in process."""
    import open_clip
    import torch

    from clients.world import look_crops
    from export.train_demo import _pixels

    open_clip.add_model_config(REPO / "export" / "configs")
    model = open_clip.create_model("looksync-demo", pretrained=str(checkpoint)).eval()
    tokenizer = open_clip.get_tokenizer("looksync-demo")
    size = model.visual.preprocess_cfg["size"][0]
    ids = [r["id"] for r in q.records]
    kinds = np.array([q.attrs[i]["kind"] for i in ids])
    with torch.no_grad():
        cat = model.encode_image(
            torch.from_numpy(
                np.stack(
                    [_pixels(Image.open(q.world / r["image_url"]).convert("RGB"), size) for r in q.records]
                )
            ),
            normalize=True,
        ).numpy()

        def ranked(vec, allowed=None):
            scores = cat @ vec
            if allowed is not None:
                scores = np.where(np.isin(kinds, allowed), scores, -np.inf)
            return [ids[i] for i in np.argsort(-scores)[:10]]

        out = defaultdict(list)
        for rec in q.items:
            a = q.attrs[rec["id"]]
            t = model.encode_text(tokenizer([q.manifest["captions"][rec["id"]]]), normalize=True).numpy()[0]
            top = ranked(t)
            out["text"].append(
                (a["kind"], a["gender"], top.index(rec["id"]) + 1 if rec["id"] in top else None)
            )
            top = ranked(cat[ids.index(rec["id"])])
            out["image"].append(
                (a["kind"], a["gender"], top.index(rec["id"]) + 1 if rec["id"] in top else None)
            )
        for look in q.manifest["looks"]:
            crops = look_crops(Image.open(q.world / look["image"]).convert("RGB"))
            for zone, pid in look["garments"].items():
                crop = crops["upper" if zone == "dress" else zone]
                v = model.encode_image(torch.from_numpy(_pixels(crop, size)[None]), normalize=True).numpy()[0]
                top = ranked(v, ZONE_KINDS[zone])
                a = q.attrs[pid]
                out["look"].append((a["kind"], a["gender"], top.index(pid) + 1 if pid in top else None))
    return out


def summarise(ranks) -> dict:
    out = {}
    for task, rows in ranks.items():
        out[task] = {"all": rank_metrics([r for _, _, r in rows])}
        for key_index, name in ((0, "category"), (1, "gender")):
            groups = defaultdict(list)
            for row in rows:
                groups[row[key_index]].append(row[2])
            out[task][name] = {g: rank_metrics(v) for g, v in sorted(groups.items())}
    return out


TASKS = {"text": "text -> product", "image": "image -> product", "look": "look -> garment"}


def compare_spaces(address: str, q: Queries, spaces: list[tuple[str, int]]) -> tuple[str, str, dict]:
    """The paper's Table 1 on our own catalog: the same queries and looks through each
    embedding space served by one gateway, side by side. Returns (overall table, R@5 by
    category and gender, figures)."""
    results = {f"{m} v{v}": summarise(gateway_ranks(address, q, (m, v))) for m, v in spaces}
    rows, figures = [], {}
    for task, label in TASKS.items():
        for name, result in results.items():
            if task not in result:
                rows.append([label, name, 0] + ["n/a"] * 5)  # image-only space: no text tower
                continue
            m = result[task]["all"]
            rows.append(
                [label, name, m["n"]] + [f"{m[k]:.3f}" for k in ("R@1", "R@5", "R@10", "MRR", "nDCG@10")]
            )
            figures[f"{task}_{name.replace(' ', '_')}_r5"] = round(m["R@5"], 3)
    table = markdown_table(["task", "space", "queries", "R@1", "R@5", "R@10", "MRR", "nDCG@10"], rows)
    names = list(results)
    breakdown = []
    for group in ("category", "gender"):
        values = sorted({g for r in results.values() for g in r["look"][group]})
        for g in values:
            cells = []
            for name in names:
                m = results[name]["look"][group].get(g)
                cells.append(f"{m['R@5']:.2f}" if m else "-")
            breakdown.append([group, g] + cells)
    table2 = markdown_table(["look -> garment R@5 by", "value"] + names, breakdown)
    return table, table2, figures


def bar_plot(path: Path, labels: list[str], series: dict[str, list[float]], title: str) -> None:
    width, height, margin = 900, 420, 60
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((margin, 10), title, fill="black")
    colours = [(52, 101, 164), (237, 125, 49), (112, 173, 71)]
    group_w = (width - 2 * margin) / max(1, len(labels))
    bar_w = group_w / (len(series) + 1)
    d.line((margin, height - margin, width - margin, height - margin), fill="black")
    for t in range(0, 11, 2):
        y = height - margin - t / 10 * (height - 2 * margin)
        d.text((10, y - 6), f"{t / 10:.1f}", fill="black")
        d.line((margin - 4, y, width - margin, y), fill=(225, 225, 225))
    for si, (name, values) in enumerate(series.items()):
        for li, v in enumerate(values):
            x0 = margin + li * group_w + si * bar_w + bar_w / 2
            y0 = height - margin - v * (height - 2 * margin)
            d.rectangle((x0, y0, x0 + bar_w - 2, height - margin), fill=colours[si % 3])
        d.rectangle((width - 230, 30 + 18 * si, width - 218, 42 + 18 * si), fill=colours[si % 3])
        d.text((width - 212, 30 + 18 * si), name, fill="black")
    for li, label in enumerate(labels):
        d.text((margin + li * group_w + 4, height - margin + 8), label, fill="black")
    img.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=REPO / "export" / "weights" / "looksync-demo.pt")
    parser.add_argument("--products", type=int, default=400)
    parser.add_argument("--looks", type=int, default=80)
    parser.add_argument("--sample", type=int, default=200, help="catalog items used as text/image queries")
    parser.add_argument("--seed", type=int, default=2001, help="world seed (training used seed 1)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--gateway", help="compare spaces on a running gateway (with --world, --space)")
    parser.add_argument("--world", type=Path, help="a world (clients/world.py) indexed in every --space")
    parser.add_argument("--space", action="append", default=[], help="MODEL:VERSION, two or more")
    args = parser.parse_args()
    if args.quick:
        args.products, args.looks, args.sample = 200, 30, 60
    if args.gateway:
        return _compare_main(args)
    work = Path(tempfile.mkdtemp(prefix="looksync-quality-"))
    from export.clip import ExportRequest, export_clip
    from gateway.tritonserver import TritonServer
    from tests.conftest import free_port, start_gateway

    triton = None
    try:
        world = work / "world"
        write_world(world, args.products, args.looks, seed=args.seed)
        q = Queries(world, args.sample)
        export_clip(
            ExportRequest(
                arch="looksync-demo", version=1, checkpoint=str(args.checkpoint), repository=work / "repo"
            )
        )
        triton = TritonServer(work / "repo", free_port(), free_port(), free_port(), work_dir=work / "triton")
        triton.start(log_file=open(work / "triton.log", "w"))
        env = {
            **os.environ,
            "LOOKSYNC_TRITON_URL": f"127.0.0.1:{triton.grpc_port}",
            "LOOKSYNC_DATA_DIR": str(work / "data"),
            "LOOKSYNC_CACHE": "off",
        }
        subprocess.run(
            [sys.executable, "-m", "clients.cli", "index", str(world / "catalog.jsonl"), "--quiet"],
            env=env,
            cwd=REPO,
            check=True,
        )
        gw = start_gateway(env, work / "gateway.log")
        try:
            served = summarise(gateway_ranks(gw.address, q))
        finally:
            gw.stop()
        fp32 = summarise(torch_ranks(args.checkpoint, q))
        rows, figures = [], {}
        for task in ("text", "image", "look"):
            for label, result in (("PyTorch fp32, exact", fp32), ("ONNX via Triton + gateway", served)):
                m = result[task]["all"]
                rows.append(
                    [
                        {"text": "text -> product", "image": "image -> product", "look": "look -> garment"}[
                            task
                        ],
                        label,
                        m["n"],
                    ]
                    + [f"{m[k]:.3f}" for k in ("R@1", "R@5", "R@10", "MRR", "nDCG@10")]
                )
                figures[f"{task}_{'fp32' if 'fp32' in label else 'served'}_r5"] = round(m["R@5"], 3)
        table = markdown_table(["task", "model", "queries", "R@1", "R@5", "R@10", "MRR", "nDCG@10"], rows)
        breakdown = []
        for group in ("category", "gender"):
            for g, m in served["look"][group].items():
                breakdown.append([group, g, m["n"], f"{m['R@1']:.2f}", f"{m['R@5']:.2f}", f"{m['MRR']:.2f}"])
        table2 = markdown_table(["look -> garment by", "value", "garments", "R@1", "R@5", "MRR"], breakdown)
        print(table + "\n\n" + table2)
        write_json("quality" + ("_quick" if args.quick else ""), figures)
        plot = HERE / "results" / ("quality_quick.png" if args.quick else "quality.png")
        bar_plot(
            plot,
            ["text R@5", "image R@5", "look R@5", "look MRR"],
            {
                "PyTorch fp32": [
                    fp32["text"]["all"]["R@5"],
                    fp32["image"]["all"]["R@5"],
                    fp32["look"]["all"]["R@5"],
                    fp32["look"]["all"]["MRR"],
                ],
                "served (ONNX, Triton, gateway)": [
                    served["text"]["all"]["R@5"],
                    served["image"]["all"]["R@5"],
                    served["look"]["all"]["R@5"],
                    served["look"]["all"]["MRR"],
                ],
            },
            "demo CLIP on a held-out world",
        )
        if not args.no_record:
            append_results(
                "Quality of the demo CLIP on a held-out synthetic world",
                table + "\n\n" + table2,
                f"Plot: `benchmarks/results/{plot.name}`. The gateway path is the whole product: "
                "text/image search and SearchLook without an LLM (body-zone crops, zero-shot names, "
                "category per zone, dedup, embedding rerank). The fp32 column embeds the same crops and "
                "searches exactly with the zone's categories, in process.",
            )
    finally:
        if triton is not None:
            triton.stop()
        shutil.rmtree(work, ignore_errors=True)


def _compare_main(args) -> None:
    if not args.world or len(args.space) < 2:
        raise SystemExit("--gateway needs --world and two or more --space MODEL:VERSION")
    spaces = [(m, int(v)) for m, _, v in (x.partition(":") for x in args.space)]
    table, table2, figures = compare_spaces(args.gateway, Queries(args.world, args.sample), spaces)
    print(table + "\n\n" + table2)
    write_json("quality_spaces", figures)
    names = [f"{m} v{v}" for m, v in spaces]
    plot = HERE / "results" / "quality_spaces.png"
    bar_plot(
        plot,
        ["text R@5", "image R@5", "look R@5"],
        {
            n: [figures.get(f"{t}_{n.replace(' ', '_')}_r5", 0.0) for t in ("text", "image", "look")]
            for n in names
        },
        "embedding spaces side by side (text R@5 is 0 for image-only spaces)",
    )
    if not args.no_record:
        append_results(
            "Embedding spaces side by side",
            table + "\n\n" + table2,
            f"Plot: `benchmarks/results/{plot.name}`.",
        )


if __name__ == "__main__":
    main()
