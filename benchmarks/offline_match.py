"""Offline look matching vs online SearchLook, and GetLookMatches under load.

    python -m benchmarks.offline_match [--quick] [--looks 160]

One run, one machine, the demo model (CLIP trained on the synthetic world and the garment
detector), no LLM, the embedded index:
  1. online: SearchLook through the gateway, closed loop at several concurrencies, on the
     world's looks (cache off), looks/s and mean stage times;
  2. batch: `looksync match-looks` on the same looks at several batch sizes (gateway stopped),
     looks/s, Triton items per call and per look;
  3. serving: GetLookMatches at a fixed rate with filters, p50/p99;
  4. a projection of 350,000 looks a day from the measured per-look work (Triton items per look)
     and ViT-H/14's profile (GFLOP per image and per text).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path

from benchmarks.common import append_results, markdown_table, write_json
from clients.client import FilterArgs
from clients.loadtest import LoadConfig, run_load
from clients.world import write_world
from tests.conftest import free_port, looksync, start_gateway

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
# ViT-H/14 per item (benchmarks/gpu_vith14.py, from the export's profile): 224 px image, 77 tokens.
IMAGE_GFLOP, TEXT_GFLOP = 334.6, 47.1
LOOKS_PER_DAY = 350_000


def _cli(*args: str, env: dict):
    result = looksync(*args, env=env, timeout=1800)
    if result.returncode:
        raise SystemExit(f"looksync {' '.join(args)} failed: {result.stderr[-2000:]}")
    return result


def _load(address: str, **config) -> dict:
    return asyncio.run(
        run_load(LoadConfig(address=address, timeout_s=30.0, server_timings=True, **config))
    ).to_dict()


def online(env: dict, work: Path, looks: list[bytes], concurrencies, duration: float) -> list[dict]:
    gw = start_gateway(env, work / "gateway.log")
    rows = []
    try:
        for c in concurrencies:
            report = _load(
                gw.address, looks=looks, mix={"look": 1.0}, concurrency=c, duration_s=duration, warmup_s=3.0
            )
            rpc = report["rpcs"]["SearchLook"]
            rows.append(
                {
                    "concurrency": c,
                    "looks_per_s": rpc["throughput_rps"],
                    "ok": rpc["ok"],
                    "errors": sum(rpc["errors"].values()),
                    "p50_ms": rpc["latency_ms"]["p50"],
                    "stages_mean_ms": rpc["server_timings"]["stages_mean_ms"]
                    if rpc["server_timings"]
                    else {},
                }
            )
            print(f"[bench] online c={c}: {rows[-1]['looks_per_s']:.2f} looks/s", flush=True)
    finally:
        gw.stop()
    return rows


def batch(env: dict, manifest: Path, sizes) -> list[dict]:
    rows = []
    for size in sizes:
        result = _cli(
            "match-looks", str(manifest), "--no-resume", "--quiet", "--json",
            env={**env, "LOOKSYNC_MATCH_BATCH_LOOKS": str(size)},
        )  # fmt: skip
        report = json.loads(result.stdout)
        rows.append({"batch_looks": size, **report})
        print(f"[bench] batch {size}: {report['looks_per_s']:.2f} looks/s", flush=True)
    return rows


def serving(env: dict, work: Path, ids: list[str], rate: float, duration: float) -> dict:
    gw = start_gateway(env, work / "gateway.log")
    try:
        filters = FilterArgs(in_stock_only=True, max_price=150.0)
        report = _load(
            gw.address, look_ids=ids, mix={"match": 1.0}, rate=rate, schedule="fixed", duration_s=duration,
            warmup_s=3.0, filters=filters,
        )  # fmt: skip
    finally:
        gw.stop()
    rpc = report["rpcs"]["GetLookMatches"]
    return {
        "rate": rate,
        "ok": rpc["ok"],
        "errors": sum(rpc["errors"].values()),
        "p50_ms": rpc["latency_ms"]["p50"],
        "p99_ms": rpc["latency_ms"]["p99"],
        "stages_mean_ms": rpc["server_timings"]["stages_mean_ms"] if rpc["server_timings"] else {},
    }


def projection(best_batch: dict, looks: int) -> tuple[str, dict]:
    """What 350,000 looks a day needs, from the work the batch measured per look."""
    sizes = best_batch["batch_sizes"]
    images = sizes.get("image", {}).get("items", 0) / looks  # garment crops
    texts = sizes.get("text", {}).get("items", 0) / looks  # zero-shot prompts (once per space) + queries
    gflop = images * IMAGE_GFLOP + texts * TEXT_GFLOP
    per_s = LOOKS_PER_DAY / 86_400
    figures = {
        "images_per_look": round(images, 2),
        "texts_per_look": round(texts, 2),
        "vith14_gflop_per_look": round(gflop, 1),
        "looks_per_s_mean": round(per_s, 2),
        "vith14_tflops_needed_mean": round(per_s * gflop / 1000, 2),
        "cpu_batch_looks_per_s": round(best_batch["looks_per_s"], 2),
        "cpu_machines_demo_model": round(per_s / best_batch["looks_per_s"], 2),
    }
    return (
        f"Per look the batch sent Triton {images:.2f} garment crops and {texts:.2f} texts; with ViT-H/14 "
        f"({IMAGE_GFLOP} GFLOP per image, {TEXT_GFLOP} per text) that is {gflop:.0f} GFLOP per look. "
        f"350,000 looks a day is {per_s:.2f} looks/s on average, {per_s * gflop / 1000:.1f} TFLOP/s of "
        "encoder work"
    ), figures


def plot(online_rows, batch_rows, served, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"online c={r['concurrency']}" for r in online_rows] + [
        f"batch {r['batch_looks']}" for r in batch_rows
    ]
    values = [r["looks_per_s"] for r in online_rows] + [r["looks_per_s"] for r in batch_rows]
    colours = ["tab:blue"] * len(online_rows) + ["tab:orange"] * len(batch_rows)
    a.bar(range(len(values)), values, color=colours)
    a.set_xticks(range(len(values)), labels, rotation=45, ha="right")
    a.set_ylabel("looks/s")
    a.set_title("SearchLook (online) vs match-looks (batch)")
    b.bar(["p50", "p99"], [served["p50_ms"], served["p99_ms"]], color="tab:green")
    b.axhline(20, color="red", linestyle="--", label="goal p99 20 ms")
    b.set_ylabel("ms")
    b.set_title(f"GetLookMatches at {served['rate']:g}/s, filters")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--looks", type=int, default=160)
    parser.add_argument("--products", type=int, default=400)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per online setting")
    parser.add_argument("--rate", type=float, default=50.0, help="GetLookMatches requests/s")
    parser.add_argument("--quick", action="store_true", help="fewer looks and shorter runs")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.looks, args.duration = 48, 8.0
    work = Path(tempfile.mkdtemp(prefix="looksync-bench-offline-"))
    from clients.demo import DEMO_WEIGHTS
    from export.clip import ExportRequest, export_clip
    from export.detector import WEIGHTS, DetectorExport, export_detector
    from gateway.tritonserver import TritonServer

    repo = work / "repo"
    export_clip(ExportRequest(arch="looksync-demo", version=1, checkpoint=str(DEMO_WEIGHTS), repository=repo))
    export_detector(DetectorExport(version=1, repository=repo, checkpoint=WEIGHTS))
    world = work / "world"
    truth = write_world(world, products=args.products, looks=args.looks, seed=2001, difficulty="mixed")
    triton = TritonServer(repo, free_port(), free_port(), free_port(), work_dir=work / "triton")
    triton.start(log_file=open(work / "triton.log", "w"))
    try:
        env = {
            **os.environ,
            "LOOKSYNC_TRITON_URL": f"127.0.0.1:{triton.grpc_port}",
            "LOOKSYNC_DATA_DIR": str(work / "data"),
            "LOOKSYNC_CACHE": "off",
            "LOOKSYNC_MAX_IN_FLIGHT": "256",
        }
        _cli("index", str(world / "catalog.jsonl"), "--quiet", env=env)
        _cli("calibrate-dedup", "--world", str(world), env=env)
        paths = [world / t["image"] for t in truth["looks"]]
        manifest = work / "looks.jsonl"
        manifest.write_text(
            "".join(json.dumps({"look_id": f"look-{i}", "image": str(p)}) + "\n" for i, p in enumerate(paths))
        )
        looks = [p.read_bytes() for p in paths]

        online_rows = online(
            env, work, looks, (1, 2, 4, 8) if args.quick else (1, 2, 4, 8, 16), args.duration
        )
        batch_rows = batch(env, manifest, (8, 32) if args.quick else (8, 32, 64))
        served = serving(env, work, [f"look-{i}" for i in range(len(paths))], args.rate, args.duration)
    finally:
        triton.stop()

    best_online = max(online_rows, key=lambda r: r["looks_per_s"])
    best_batch = max(batch_rows, key=lambda r: r["looks_per_s"])
    ratio = best_batch["looks_per_s"] / best_online["looks_per_s"]
    text, figures = projection(best_batch, len(paths))
    figures.update(
        online_best_looks_per_s=round(best_online["looks_per_s"], 2),
        online_best_concurrency=best_online["concurrency"],
        batch_best_looks_per_s=round(best_batch["looks_per_s"], 2),
        batch_best_size=best_batch["batch_looks"],
        batch_over_online=round(ratio, 2),
        get_p50_ms=round(served["p50_ms"], 2),
        get_p99_ms=round(served["p99_ms"], 2),
        get_rate=served["rate"],
        looks=len(paths),
    )
    rows = [
        [f"SearchLook online, concurrency {r['concurrency']}", f"{r['looks_per_s']:.2f}", r["errors"],
         ", ".join(f"{k} {v:.0f}" for k, v in r["stages_mean_ms"].items())]
        for r in online_rows
    ] + [
        [f"match-looks, {r['batch_looks']} looks at once", f"{r['looks_per_s']:.2f}", len(r["failed"]),
         ", ".join(f"{k} {v['per_call']:g}/call" for k, v in r["batch_sizes"].items())]
        for r in batch_rows
    ]  # fmt: skip
    table = markdown_table(
        ["setting", "looks/s", "errors", "mean stage ms (online) / Triton items per call (batch)"], rows
    )
    table += "\n\n" + markdown_table(
        ["GetLookMatches", "rate", "ok", "errors", "p50 ms", "p99 ms", "mean stage ms"],
        [[
            "in stock, max price 150", f"{served['rate']:g}/s", served["ok"], served["errors"],
            f"{served['p50_ms']:.1f}", f"{served['p99_ms']:.1f}",
            ", ".join(f"{k} {v:.1f}" for k, v in served["stages_mean_ms"].items()),
        ]],
    )  # fmt: skip
    print(table)
    print(f"batch / online: {ratio:.2f}x; {text}")
    write_json("offline_match", {"online": online_rows, "batch": batch_rows, "serving": served, **figures})
    plot(online_rows, batch_rows, served, HERE / "results" / "offline_match.png")
    if not args.no_record:
        append_results(
            f"Offline look matching: batch vs online, GetLookMatches (demo model, {len(paths)} looks, no LLM)",
            table,
            f"Batch / best online: **{ratio:.2f}×**. {text}.\n\n![plot](results/offline_match.png)",
        )


if __name__ == "__main__":
    main()
