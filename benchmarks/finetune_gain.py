"""What fine-tuning on a new world buys, and what WiSE-FT keeps of the old one (demo model).

    python -m benchmarks.finetune_gain [--quick] [--steps 400] [--no-record]

The demo CLIP (export/weights/looksync-demo.pt, trained on the base palette and on easy looks'
body zones) is exported as version 1, next to the garment detector. A second world uses colours
and patterns it never saw (clients/world.py, palette "novel"), and its looks come as they really
do (difficulty "mixed": half drawn anywhere in the frame, cut off, layered, with accessories).
`python -m export finetune`'s own steps train once on the novel world's catalog and on its looks'
garments as the detector cuts them (with distillation towards the base); the fine-tuned weights
are then mixed with the base at several WiSE-FT ratios, each exported as a version (parity gate)
and evaluated from its served files on two held-out worlds: the novel palette and the original
one. Ratio 0 is the base. Then the base and the chosen ratio are served for real (Triton, both
held-out worlds indexed in both spaces, dedup calibrated per space, the gateway over gRPC) and
compared with the quality harness. Wall time of the whole loop is recorded. Writes
results/finetune_gain.json and .png and a RESULTS.md section.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import append_results, markdown_table, write_json

REPO = Path(__file__).resolve().parent.parent
RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small worlds and few steps: checks the script")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--distill", type=float, default=0.2)
    parser.add_argument("--looks", type=int, default=400, help="looks in the training world")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    import torch

    from benchmarks.quality import summarise
    from clients.world import write_world
    from export.clip import ExportRequest, export_clip
    from export.detector import DetectorExport, export_detector
    from export.finetune import FinetuneRequest, base_model, train, training_pairs, version_meta, wise_ft
    from export.finetune_eval import ServedVersion, mean_r5, served_ranks

    products, looks, steps = (80, 16, 20) if args.quick else (400, args.looks, args.steps)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="looksync-bench-ft-") as tmp:
        root = Path(tmp)
        novel_train = root / "novel-train"
        novel = {"palette": "novel", "difficulty": "mixed", "graded": True}
        write_world(novel_train, products, looks, seed=11, **novel)
        held_looks = 4 if args.quick else 50
        write_world(root / "novel-heldout", products // 2, held_looks, seed=12, **novel)
        write_world(root / "base-heldout", products // 2, held_looks, seed=13, difficulty="mixed")
        repo = root / "repo"
        weights = REPO / "export" / "weights" / "looksync-demo.pt"
        export_clip(ExportRequest(arch="looksync-demo", checkpoint=str(weights), version=1, repository=repo))
        export_detector(DetectorExport(repository=repo))
        req = FinetuneRequest(
            from_version=1, world=novel_train, repository=repo, steps=steps, batch=128, lr=args.lr,
            distill=args.distill, seed=0,
        )  # fmt: skip
        meta, _ = version_meta(repo, "clip", 1)
        model = base_model(req, meta)
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        images, ids, _ = training_pairs(novel_train, repo, "clip", 1, max_looks=looks)
        t_train = time.monotonic()
        tuned = train(model, images, ids, req).state_dict()
        train_s = time.monotonic() - t_train
        rows, figures = [], {"steps": steps, "pairs": len(images), "train_s": round(train_s, 1), "ratios": {}}
        for version, ratio in enumerate(RATIOS, start=1):
            if ratio > 0:
                ckpt = root / f"wise-{ratio}.pt"
                torch.save(wise_ft(base_state, tuned, ratio), ckpt)
                export_clip(
                    ExportRequest(
                        arch="looksync-demo", checkpoint=str(ckpt), version=version, repository=repo
                    )
                )
            served = ServedVersion(repo, "clip", version)
            result = {}
            for world in ("novel-heldout", "base-heldout"):
                summary = summarise(served_ranks(served, root / world))
                result[world] = {task: summary[task]["all"] for task in ("text", "image", "look")}
                result[world]["mean_R@5"] = mean_r5(summary)
            figures["ratios"][str(ratio)] = result
            n, b = result["novel-heldout"], result["base-heldout"]
            rows.append([ratio, f"{n['text']['R@5']:.3f}", f"{n['look']['R@5']:.3f}", f"{n['image']['R@5']:.3f}",
                         f"{b['text']['R@5']:.3f}", f"{b['look']['R@5']:.3f}", f"{b['image']['R@5']:.3f}"])  # fmt: skip
            print(f"[bench] WiSE-FT {ratio}: novel {n['mean_R@5']:.3f}, base {b['mean_R@5']:.3f}", flush=True)
        figures["loop_s"] = round(time.monotonic() - start, 1)
        chosen = choose_ratio(figures["ratios"])
        figures["chosen_ratio"] = chosen
        print(f"[bench] serving the base and WiSE-FT {chosen} through Triton and the gateway", flush=True)
        served_table, figures["served"] = served_comparison(root, weights, root / f"wise-{chosen}.pt")
    table = markdown_table(
        ["WiSE-FT ratio (0 = base)", "novel text R@5", "novel look R@5", "novel image R@5",
         "original text R@5", "original look R@5", "original image R@5"],
        rows,
    )  # fmt: skip
    table += (
        f"\n\n{figures['pairs']} training pairs, {steps} steps of 128 in {figures['train_s']} s; the whole loop "
        f"(worlds, train, {len(RATIOS) - 1} exports, 10 evaluations) {figures['loop_s']} s.\n\n"
        f"Served through Triton and the gateway (gRPC), base v1 and WiSE-FT {figures['chosen_ratio']} as v2, "
        f"each held-out world indexed in both spaces:\n\n{served_table}"
    )
    print(table)
    if not args.no_record:
        write_json("finetune_gain" + ("_quick" if args.quick else ""), figures)
        if not args.quick:
            plot(figures, Path(__file__).resolve().parent / "results" / "finetune_gain.png")
            append_results(
                "Fine-tuning the demo CLIP on a new world, and the WiSE-FT trade-off",
                table + "\n\n![plot](results/finetune_gain.png)",
            )


def choose_ratio(ratios: dict, budget: float = 0.02) -> float:
    """The WiSE-FT ratio with the best novel-world mean R@5 among those that lose at most
    `budget` of the original world's text and look R@5."""
    base = ratios["0.0"]["base-heldout"]
    ok = [
        float(r)
        for r, res in ratios.items()
        if float(r) > 0
        and all(res["base-heldout"][t]["R@5"] >= base[t]["R@5"] - budget for t in ("text", "look"))
    ]
    return max(
        ok or [min(float(r) for r in ratios if float(r) > 0)],
        key=lambda r: ratios[str(r)]["novel-heldout"]["mean_R@5"],
    )


def served_comparison(root: Path, base_ckpt: Path, tuned_ckpt: Path) -> tuple[str, dict]:
    """Base (v1) and fine-tuned (v2) served by Triton; each held-out world indexed in both
    spaces with their calibrated dedup thresholds; the quality harness through the gateway."""
    import os
    import subprocess
    import sys

    from benchmarks.quality import Queries, compare_spaces
    from export.clip import ExportRequest, export_clip
    from export.detector import DetectorExport, export_detector
    from gateway.tritonserver import TritonServer
    from tests.conftest import free_port, start_gateway

    repo = root / "served-repo"
    for version, ckpt in ((1, base_ckpt), (2, tuned_ckpt)):
        export_clip(
            ExportRequest(arch="looksync-demo", checkpoint=str(ckpt), version=version, repository=repo)
        )
    export_detector(DetectorExport(repository=repo))
    triton = TritonServer(repo, free_port(), free_port(), free_port(), work_dir=root / "triton")
    triton.start(log_file=open(root / "triton.log", "w"))
    tables, figures = [], {}
    try:
        for world in ("novel-heldout", "base-heldout"):
            env = {
                **os.environ,
                "LOOKSYNC_TRITON_URL": f"127.0.0.1:{triton.grpc_port}",
                "LOOKSYNC_DATA_DIR": str(root / f"data-{world}"),
                "LOOKSYNC_CACHE": "off",
            }
            for version in (1, 2):
                for command in (
                    ["index", str(root / world / "catalog.jsonl"), "--version", str(version), "--quiet"],
                    ["calibrate-dedup", "--model", "clip", "--version", str(version)],
                ):
                    subprocess.run(
                        [sys.executable, "-m", "clients.cli", *command], env=env, cwd=REPO, check=True
                    )
            gw = start_gateway(env, root / f"gateway-{world}.log")
            try:
                table, _, figs = compare_spaces(
                    gw.address, Queries(root / world, 200), [("clip", 1), ("clip", 2)]
                )
            finally:
                gw.stop()
            tables.append(f"{world}:\n\n{table}")
            figures[world] = figs
    finally:
        triton.stop()
    return "\n\n".join(tables), figures


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [float(r) for r in figures["ratios"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    for world, style in (("novel-heldout", "-"), ("base-heldout", "--")):
        for task, marker in (("text", "o"), ("look", "s")):
            ax.plot(ratios, [figures["ratios"][str(r)][world][task]["R@5"] for r in ratios], style,
                    marker=marker, label=f"{world.split('-')[0]} world, {task} R@5")  # fmt: skip
    ax.set_xlabel("WiSE-FT ratio (0 = base, 1 = fine-tuned)")
    ax.set_ylabel("R@5 (held out)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Demo CLIP fine-tuned on the novel palette")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
