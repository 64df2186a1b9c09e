"""Quality harness: Recall@1/5/10, MRR and nDCG@10 for text -> product, image -> product and
look -> garment on the synthetic world, broken down by category and gender; two settings side
by side (served through the gateway vs PyTorch fp32 in process, or two gateways).

    python -m benchmarks.quality [--quick] [--checkpoint export/weights/looksync-demo.pt]

Relevance is the exact catalog item (one relevant item per query): the item a caption was
written for, the item whose image is the query, the item a look garment varies.
"""

from __future__ import annotations

import argparse
import io
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
from clients.world_hard import ZONE_LAYERS, garment_regions, iou  # noqa: E402

ZONE_KINDS = {
    "upper": ("t-shirt", "shirt", "jacket", "dress"),
    "lower": ("trousers", "skirt", "dress"),
    "feet": ("sneakers",),
    "dress": ("dress",),
}
# Look breakdowns: the difficulty tags the world records per look, and the garment's layer.
LOOK_KEYS = ("level", "position", "scale", "crop", "layering", "background", "layer")


def look_tags(look: dict, kind: str) -> dict[str, str]:
    from gateway.taxonomy import CATEGORY_LAYER

    tags = {k: str(v) for k, v in look.get("difficulty", {"level": "easy"}).items() if k in LOOK_KEYS}
    return {**tags, "layer": CATEGORY_LAYER[kind]}


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
                a = q.attrs[pid]
                # The best rank in a result list of a compatible layer whose box overlaps the
                # garment's (a list with no box, from an LLM query without a region, counts too).
                truth_box = look.get("boxes", {}).get(zone)
                ranks = [
                    _rank(lr.hits, pid)
                    for lr in resp.layers
                    if lr.layer in ZONE_LAYERS[zone]
                    and (
                        truth_box is None
                        or not lr.HasField("box")
                        or iou((lr.box.left, lr.box.top, lr.box.right, lr.box.bottom), truth_box) > 0
                    )
                ]
                found = [r for r in ranks if r is not None]
                out["look"].append(
                    (a["kind"], a["gender"], min(found) if found else None, look_tags(look, a["kind"]))
                )
    return out


def _rank(hits, pid):
    ids = [h.product.id for h in hits]
    return ids.index(pid) + 1 if pid in ids else None


def look_regions(img: Image.Image, regions_of=None) -> list:
    """The look's garment regions as SearchLook cuts them: the detector's (`regions_of`, an
    InProcessDetector's `regions`), or the body zones with the kinds each zone may show."""
    if regions_of is not None:
        return regions_of(img)
    from gateway.look.localizer import zone_box
    from gateway.look.types import Region

    out = []
    for zone in ("upper", "lower", "feet"):
        box = zone_box(zone, *img.size)
        buf = io.BytesIO()
        img.crop(box).save(buf, "PNG")
        out.append(Region(zone, box, buf.getvalue(), ZONE_KINDS[zone]))
    return out


def look_rows(q: Queries, regions_of, embed, rank) -> list[tuple]:
    """look -> garment rows: each look cut by `regions_of` (None: body zones), its regions
    embedded by `embed(images)`, and each worn garment ranked by `rank(vector, pid, categories)`
    in every region that fits it (compatible layer, overlapping box); the best rank counts."""
    rows = []
    for look in q.manifest["looks"]:
        regions = look_regions(Image.open(q.world / look["image"]).convert("RGB"), regions_of)
        images = [Image.open(io.BytesIO(r.image)).convert("RGB") for r in regions]
        vector_of = {id(r): v for r, v in zip(regions, embed(images) if images else [])}
        for zone, pid in look["garments"].items():
            a = q.attrs[pid]
            ranks = [
                rank(vector_of[id(r)], pid, r.categories)
                for r in garment_regions(zone, look.get("boxes", {}).get(zone), regions)
            ]
            found = [r for r in ranks if r is not None]
            rows.append((a["kind"], a["gender"], min(found) if found else None, look_tags(look, a["kind"])))
    return rows


def torch_ranks(checkpoint: Path, q: Queries, detector: Path | None = None) -> dict[str, list]:
    """The same queries with the PyTorch fp32 model and exact search in process. Looks are cut
    by the garment detector's ONNX file (`detector`, run in process with the gateway's own
    post-processing), or by body zones when `detector` is None."""
    import open_clip
    import torch

    from export.detector import InProcessDetector
    from export.train_demo import _pixels

    open_clip.add_model_config(REPO / "export" / "configs")
    model = open_clip.create_model("looksync-demo", pretrained=str(checkpoint)).eval()
    tokenizer = open_clip.get_tokenizer("looksync-demo")
    size = model.visual.preprocess_cfg["size"][0]
    regions_of = InProcessDetector(detector.parent).regions if detector else None
    with torch.no_grad():

        def embed(images):
            x = torch.from_numpy(np.stack([_pixels(img.convert("RGB"), size) for img in images]))
            return model.encode_image(x, normalize=True).numpy()

        def embed_texts(texts):
            return model.encode_text(tokenizer(texts), normalize=True).numpy()

        return exact_ranks(q, embed, embed_texts, regions_of)


def exact_ranks(q: Queries, embed_images, embed_texts, regions_of=None, batch: int = 64) -> dict[str, list]:
    """Every task's rows with exact search over the world's catalog, in process: `embed_images`
    (PIL images) and `embed_texts` (strings) give unit vectors; looks are cut by `regions_of`
    (None: body zones) and searched within each region's categories."""
    ids = [r["id"] for r in q.records]
    kinds = np.array([q.attrs[i]["kind"] for i in ids])
    catalog = np.concatenate(
        [
            embed_images(
                [Image.open(q.world / r["image_url"]).convert("RGB") for r in q.records[i : i + batch]]
            )
            for i in range(0, len(q.records), batch)
        ]
    )

    def rank(vec, pid, allowed=None):
        scores = catalog @ vec
        if allowed is not None:
            scores = np.where(np.isin(kinds, allowed), scores, -np.inf)
        top = [ids[i] for i in np.argsort(-scores)[:10]]
        return top.index(pid) + 1 if pid in top else None

    out = defaultdict(list)
    captions = [q.manifest["captions"][r["id"]] for r in q.items]
    texts = np.concatenate([embed_texts(captions[i : i + batch]) for i in range(0, len(captions), batch)])
    for rec, t in zip(q.items, texts):
        a = q.attrs[rec["id"]]
        out["text"].append((a["kind"], a["gender"], rank(t, rec["id"])))
        out["image"].append((a["kind"], a["gender"], rank(catalog[ids.index(rec["id"])], rec["id"])))
    out["look"] = look_rows(q, regions_of, embed_images, rank)
    return out


def summarise(ranks) -> dict:
    """Metrics per task: overall, by category and gender, and for looks by each tag the rows
    carry (difficulty, layer)."""
    out = {}
    for task, rows in ranks.items():
        out[task] = {"all": rank_metrics([row[2] for row in rows])}
        groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        for row in rows:
            groups["category"][row[0]].append(row[2])
            groups["gender"][row[1]].append(row[2])
            for key, value in (row[3] if len(row) > 3 else {}).items():
                groups[key][value].append(row[2])
        for name, by_value in groups.items():
            out[task][name] = {g: rank_metrics(v) for g, v in sorted(by_value.items())}
    return out


TASKS = {"text": "text -> product", "image": "image -> product", "look": "look -> garment"}


def compare_spaces(address: str, q: Queries, spaces: list[tuple[str, int]]) -> tuple[str, str, dict]:
    """Retrieval metrics per embedding space on our own catalog: the same queries and looks through each
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


def difficulty_plot(
    path: Path, labels: list[str], groups: list[tuple[str, str]], looks: dict, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        values = [
            looks[label]["all"]["R@5"] if k == "all" else looks[label].get(k, {}).get(v, {"R@5": 0.0})["R@5"]
            for k, v in groups
        ]
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=label)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([v if k in ("all", "level") else f"{k}:\n{v}" for k, v in groups], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("R@5")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=len(labels))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    parser.add_argument("--looks", type=int, default=120)
    parser.add_argument("--sample", type=int, default=200, help="catalog items used as text/image queries")
    parser.add_argument("--seed", type=int, default=2001, help="world seed (training used seed 1)")
    parser.add_argument(
        "--difficulty",
        choices=["easy", "hard", "mixed"],
        default="mixed",
        help="the world's looks (clients/world.py): easy, hard, or half of each",
    )
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
    from export.detector import WEIGHTS, DetectorExport, export_detector
    from gateway.tritonserver import TritonServer
    from tests.conftest import free_port, start_gateway

    triton = None
    try:
        world = work / "world"
        write_world(world, args.products, args.looks, seed=args.seed, difficulty=args.difficulty)
        q = Queries(world, args.sample)
        export_clip(
            ExportRequest(
                arch="looksync-demo", version=1, checkpoint=str(args.checkpoint), repository=work / "repo"
            )
        )
        detector = (
            export_detector(DetectorExport(repository=work / "repo", checkpoint=WEIGHTS)) / "model.onnx"
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
        # The space's own near-duplicate threshold, measured on another world (calibrate-dedup).
        calibration = json.loads(
            subprocess.run(
                [sys.executable, "-m", "clients.cli", "calibrate-dedup", "--json"],
                env=env,
                cwd=REPO,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        print(f"calibrated near-duplicate threshold: {calibration['threshold']}")
        results = {}
        for localizer, extra, crops in (
            ("garment detector", {}, detector),
            ("body zones", {"LOOKSYNC_LOCALIZER": "zones"}, None),
        ):
            gw = start_gateway({**env, **extra}, work / f"gateway-{len(results)}.log")
            try:
                results[f"served, {localizer}"] = summarise(gateway_ranks(gw.address, q))
            finally:
                gw.stop()
            results[f"fp32, {localizer}"] = summarise(torch_ranks(args.checkpoint, q, crops))
        _report(args, results, calibration["threshold"])
    finally:
        if triton is not None:
            triton.stop()
        shutil.rmtree(work, ignore_errors=True)


def _report(args, results: dict, threshold: float) -> None:
    labels = list(results)
    rows, figures = [], {}
    for task, title in TASKS.items():
        for label in labels:
            m = results[label][task]["all"]
            rows.append(
                [title, label, m["n"]] + [f"{m[k]:.3f}" for k in ("R@1", "R@5", "R@10", "MRR", "nDCG@10")]
            )
            key = label.split(",")[0].lower().replace(" ", "_") + (
                "_" + label.split(", ")[1].replace(" ", "_") if "," in label else ""
            )
            figures[f"{task}_{key}_r5"] = round(m["R@5"], 3)
    table = markdown_table(["task", "setting", "queries", "R@1", "R@5", "R@10", "MRR", "nDCG@10"], rows)
    looks = {label: results[label]["look"] for label in labels}
    breakdown = []
    for key in (*LOOK_KEYS, "category", "gender"):
        values = sorted({v for r in looks.values() for v in r.get(key, {})})
        for value in values:
            cells = []
            for label in labels:
                m = looks[label].get(key, {}).get(value)
                cells.append(f"{m['R@5']:.2f} / {m['MRR']:.2f}" if m else "-")
            n = next(looks[label][key][value]["n"] for label in labels if value in looks[label].get(key, {}))
            breakdown.append([key, value, n, *cells])
            figures[f"look_{key}_{value}_r5"] = {
                label: round(looks[label][key][value]["R@5"], 3)
                for label in labels
                if value in looks[label].get(key, {})
            }
    table2 = markdown_table(
        ["look -> garment by", "value", "garments", *[f"{label}: R@5 / MRR" for label in labels]], breakdown
    )
    print(table + "\n\n" + table2)
    suffix = "_quick" if args.quick else ""
    figures["dedup_threshold"] = threshold
    write_json("quality" + suffix, figures)
    plot = HERE / "results" / f"quality{suffix}.png"
    groups = [("all", "all")] + [
        (k, v)
        for k in ("level", "position", "scale", "crop", "layering", "background")
        for v in sorted(looks[labels[0]].get(k, {}))
    ]
    difficulty_plot(
        plot,
        labels,
        groups,
        looks,
        f"look -> garment R@5 by difficulty ({args.difficulty} world, demo CLIP, no LLM)",
    )
    if not args.no_record:
        append_results(
            "Quality of the demo CLIP on a held-out synthetic world, by look difficulty",
            table + "\n\n" + table2,
            f"Command: `python -m benchmarks.quality --difficulty {args.difficulty}` ({args.products} products, "
            f"{args.looks} looks, seed {args.seed}). Plot: `benchmarks/results/{plot.name}`. Served is the "
            "whole product (SearchLook without an LLM: localizer, zero-shot names, the layer's categories, "
            "dedup, embedding rerank); one run with the garment detector, one with body zones only. Each fp32 "
            "column embeds the same localizer's crops as the served column before it (the detector's ONNX "
            "file run in process with the gateway's post-processing) with PyTorch fp32 and searches exactly. "
            "A garment counts in a result list of a compatible layer whose box overlaps its own. Served "
            "near-duplicate threshold: "
            f"{threshold} (`looksync calibrate-dedup` on another world, recorded with the index).",
        )


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
