"""CLIP ViT-H/14, SAM2 and Florence-2 at full size through export, Triton and the serving path (CPU target).

    python -m benchmarks.full_size [--models vith14,sam2,florence2] [--quick] [--no-record]

For each model, with random weights (a checkpoint from a local path takes the same path):

1. `python -m export ...` in a process of its own: wall time and that process's peak RSS
   (os.wait4), file sizes of what it wrote, and the parity it recorded against PyTorch;
2. a real `tritonserver` on that repository: time until ready (load), RSS of the server and its
   python-backend stubs afterwards (one copy of the weights or two);
3. per-request latency through Triton next to in-process ONNX Runtime on the same files, one
   request at a time, with the same pre-processing code the Triton models run:
   - ViT-H/14: images (decoded JPEG, 224 px) and texts at batch 1 and 8;
   - SAM2: one look, one box; Florence-2: one grounding prompt (random weights never stop
     early: the decode runs to its max-new-tokens limit, the worst case);
   - SAM2 + Florence-2 together: the gateway's segmentation fallback (FlorenceSam2Localizer)
     once end to end on a look.

`--quick` runs the same steps on the tiny configs (a check of the script, seconds per model).
Results: benchmarks/results/full_size.json and a "Full-size models" section in RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import append_results, markdown_table, write_json

REPO = Path(__file__).resolve().parent.parent
EXPORTS = {
    "vith14": (["clip", "--arch", "ViT-H-14", "--random-init"], ["clip", "--arch", "looksync-tiny"]),
    "sam2": (["sam2", "--random-init", "--size", "base-plus"], ["sam2", "--random-init", "--tiny"]),
    "florence2": (
        ["florence2", "--random-init", "--size", "large", "--max-new-tokens", "64"],
        ["florence2", "--random-init", "--tiny"],
    ),
}
RESULTS_DIR = Path(__file__).resolve().parent / "results"
LABELS = {"vith14": "open_clip ViT-H-14", "sam2": "SAM 2.1 hiera-base-plus", "florence2": "Florence-2-large"}


def _jpeg(width: int, height: int, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _median_ms(fn, repeat: int) -> float:
    fn()  # warm-up (first-call allocations, lazy sessions)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def export(model: str, quick: bool, repo: Path) -> dict:
    """Run the exporter as a user does; wall time, peak RSS, sizes, parameters, parity."""
    args = EXPORTS[model][1 if quick else 0]
    cmd = [sys.executable, "-m", "export", *args, "--version", "1", "--repository", str(repo)]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:
        if line.startswith("[export"):
            print("  " + line.rstrip(), flush=True)
        log.append(line)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"export of {model} failed:\n{''.join(log[-30:])}")
    params = re.search(r"\(([\d.]+) M params", "".join(log))
    return {
        "command": "python -m export " + " ".join(args) + " --version 1",
        "export_s": round(wall, 1),
        "export_peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),  # ru_maxrss is in KiB on Linux
        "params_m": float(params.group(1)) if params else None,
    }


def sizes(repo: Path) -> dict[str, float]:
    """MB per Triton model folder written (version 1)."""
    out = {}
    for folder in sorted(repo.iterdir()):
        version = folder / "1"
        if version.is_dir():
            out[folder.name] = round(
                sum(p.stat().st_size for p in version.rglob("*") if p.is_file()) / 1e6, 1
            )
    return out


def parity(model: str, repo: Path) -> dict[str, float]:
    if model == "vith14":
        return json.loads((repo / "clip_image" / "1" / "preprocess.json").read_text())["parity_min_cosine"]
    meta_file = repo / f"{model}_{'mask' if model == 'sam2' else 'ground'}" / "1" / f"{model}.json"
    return {part: p["min_cosine"] for part, p in json.loads(meta_file.read_text())["parity"].items()}


def tree_rss_gb(pid: int) -> float:
    """RSS of a process and all its descendants (Triton's python backend runs one stub per model
    instance)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return round(total / 2**20, 2)


# The same inputs for Triton and in process: eight 512x640 JPEGs and eight queries.
IMAGES = [_jpeg(512, 640, i) for i in range(8)]
TEXTS = [
    f"a {c} striped summer dress with long sleeves, number {i}" for i, c in enumerate(["red", "blue"] * 4)
]


def clip_latency(client, repeat: int) -> dict[str, dict[str, float]]:
    """ms per request through Triton, batch 1 and 8."""
    import tritonclient.grpc as grpcclient

    def served(model, name, values):
        def call():
            tensor = grpcclient.InferInput(name, [len(values), 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[v] for v in values], dtype=object))
            client.infer(model, [tensor], model_version="1", client_timeout=600)

        return call

    rows: dict[str, dict[str, float]] = {}
    for n in (1, 8):
        rows[f"image batch {n}"] = {
            "triton_ms": _median_ms(served("clip_image", "image", IMAGES[:n]), repeat)
        }
        rows[f"text batch {n}"] = {"triton_ms": _median_ms(served("clip_text", "text", TEXTS[:n]), repeat)}
    return rows


def clip_inprocess(repo: Path, rows: dict, repeat: int) -> None:
    """The same files with the Triton models' own pre-processing and runner, in this process."""
    from export.triton.encoder_runner import InProcessEncoder
    from export.triton.preprocess import ImageSpec, image_bytes_to_pixels
    from export.triton.text_tokenizer import TextTokenizer

    image_meta = json.loads((repo / "clip_image" / "1" / "preprocess.json").read_text())
    spec = ImageSpec.from_meta(image_meta)
    image_enc = InProcessEncoder(str(repo / "clip_image_encoder" / "1" / "model.onnx"), "pixel_values")
    for n in (1, 8):
        rows[f"image batch {n}"]["inprocess_ms"] = _median_ms(
            lambda n=n, enc=image_enc: enc(np.stack([image_bytes_to_pixels(b, spec) for b in IMAGES[:n]])),
            repeat,
        )
    del image_enc  # ViT-H/14: one tower in memory at a time
    tokenizer = TextTokenizer.from_version(repo / "clip_text" / "1")
    text_enc = InProcessEncoder(str(repo / "clip_text_encoder" / "1" / "model.onnx"), "input_ids")
    for n in (1, 8):
        rows[f"text batch {n}"]["inprocess_ms"] = _median_ms(
            lambda n=n: text_enc(tokenizer(TEXTS[:n])[0]), repeat
        )


def vision_latency(model: str, repo: Path, client, repeat: int) -> dict[str, dict[str, float]]:
    import tritonclient.grpc as grpcclient

    look = _jpeg(600, 900, 7)

    def bytes_input(name, value):
        tensor = grpcclient.InferInput(name, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[value]], dtype=object))
        return tensor

    if model == "sam2":
        box = grpcclient.InferInput("boxes", [1, 1, 4], "FP32")
        box.set_data_from_numpy(np.array([[[100, 150, 450, 800]]], dtype=np.float32))
        call = lambda: client.infer("sam2_mask", [bytes_input("image", look), box], client_timeout=600)  # noqa: E731
        return {"sam2_mask: 1 look, 1 box": {"triton_ms": _median_ms(call, repeat)}}
    phrase = bytes_input("phrase", b"a red t-shirt")
    call = lambda: client.infer("florence2_ground", [bytes_input("image", look), phrase], client_timeout=600)  # noqa: E731
    return {"florence2_ground: 1 look, 1 phrase": {"triton_ms": _median_ms(call, max(1, repeat // 2))}}


def vision_inprocess(model: str, repo: Path, rows: dict, repeat: int) -> None:
    """The same runtime classes the Triton models use, in this process."""
    from export.triton_vision.image_ops import square_pixels
    from export.triton_vision.onnx_parts import InProcessParts

    look = Image.open(io.BytesIO(_jpeg(600, 900, 7))).convert("RGB")
    if model == "sam2":
        from export.triton_vision.sam2_runtime import Sam2Masker, Sam2Spec

        folder = repo / "sam2_mask" / "1"
        meta = json.loads((folder / "sam2.json").read_text())
        masker = Sam2Masker(Sam2Spec.from_json(meta), InProcessParts(str(folder), meta["parts"], 0))
        box = np.array([[100, 150, 450, 800]], dtype=np.float32)
        outs = ["image_embeddings_0", "image_embeddings_1", "image_embeddings_2"]

        def run():
            emb = masker.run(
                "image_encoder", {"pixel_values": square_pixels(look, masker.spec.image)[None]}, outs
            )
            masker.masks(emb, 0, box, look.size)

        rows["sam2_mask: 1 look, 1 box"]["inprocess_ms"] = _median_ms(run, repeat)
        return
    from export.triton_vision.bart_tokenizer import BartTokenizer
    from export.triton_vision.florence2_runtime import Florence2Grounder, Florence2Spec

    folder = repo / "florence2_ground" / "1"
    meta = json.loads((folder / "florence2.json").read_text())
    grounder = Florence2Grounder(
        Florence2Spec.from_json(meta),
        BartTokenizer(str(folder / meta["tokenizer"])),
        InProcessParts(str(folder), meta["parts"], 0),
    )
    rows["florence2_ground: 1 look, 1 phrase"]["inprocess_ms"] = _median_ms(
        lambda: grounder.ground([look], ["<CAPTION_TO_PHRASE_GROUNDING>"], ["a red t-shirt"]),
        max(1, repeat // 2),
    )


def fallback_once(url: str) -> dict:
    """The gateway's segmentation fallback (Florence-2 grounding, SAM2 masks) on one look."""
    from gateway.look.segment_localizer import FlorenceSam2Localizer

    async def localize():
        localizer = FlorenceSam2Localizer(url)
        try:
            start = time.perf_counter()
            regions = await localizer.regions_for(
                _jpeg(600, 900, 7), {"topwear": "t-shirt", "bottomwear": "jeans"}, 600
            )
            return time.perf_counter() - start, regions
        finally:
            await localizer.close()

    seconds, regions = asyncio.run(localize())
    return {"seconds": round(seconds, 2), "regions": len(regions)}


def gateway_once(repos: list[Path], work: Path, products: int) -> dict:
    """The models answering through the gateway over gRPC: ViT-H/14 indexes a small catalog, then
    SearchText, SearchImage and SearchLook, the look with the segmentation fallback (Florence-2 +
    SAM2 on the CPU Triton, no LLM)."""
    from benchmarks.look_e2e import looks_from
    from clients.sample_catalog import generate
    from tests.conftest import looksync, looksync_env, start_gateway, start_triton

    merged = work / "merged"
    merged.mkdir(parents=True)
    for repo in repos:
        for folder in repo.iterdir():
            folder.rename(merged / folder.name)
    catalog = generate(work / "catalog", n=products, seed=3)
    server = start_triton(merged, work / "triton-all")
    out: dict = {"triton_rss_gb": tree_rss_gb(server.process.pid)}
    gw = None
    try:
        env = looksync_env(
            server, work / "data", LOOKSYNC_SEGMENTATION="true", LOOKSYNC_TRITON_TIMEOUT_S="600"
        )
        start = time.perf_counter()
        indexed = looksync("index", str(catalog), "--quiet", "--version", "1", env=env, timeout=3600)
        if indexed.returncode != 0:
            raise SystemExit(f"looksync index failed: {indexed.stderr[-2000:]}")
        out["index_products_per_s"] = round(products / (time.perf_counter() - start), 2)
        gw = start_gateway(env, work / "gateway.log")
        record = json.loads(catalog.read_text().splitlines()[0])
        with gw.client() as client:
            t = time.perf_counter()
            text = client.search_text("a red striped t-shirt", k=5, timeout_s=600)
            out["search_text"] = {"ms": round((time.perf_counter() - t) * 1000), "hits": len(text.hits)}
            t = time.perf_counter()
            image = client.search_image(
                (catalog.parent / record["image_url"]).read_bytes(), k=5, timeout_s=600
            )
            out["search_image"] = {
                "ms": round((time.perf_counter() - t) * 1000),
                "hits": len(image.hits),
                "finds_itself_first": bool(image.hits) and image.hits[0].product.id == record["id"],
            }
            t = time.perf_counter()
            look = client.search_look(looks_from(catalog, 1)[0], k_per_layer=5, timeout_s=600)
            out["search_look"] = {
                "ms": round((time.perf_counter() - t) * 1000),
                "layers": len(look.layers),
                "rerank_source": sorted({layer.rerank_source for layer in look.layers}),
                "space": f"{text.space.model} v{text.space.version}",
            }
    finally:
        if gw is not None:
            gw.stop()
        server.stop()
    print(f"[gateway] {out}", flush=True)
    return out


def serve(repo: Path, work: Path, models: list[str], repeat: int) -> tuple[dict, dict, dict]:
    """Load time, resident memory, latency through Triton; then in-process on the same files
    (after the server stopped, so the two never compete for the cores or memory)."""
    import tritonclient.grpc as grpcclient

    from tests.conftest import start_triton

    start = time.perf_counter()
    server = start_triton(repo, work)
    load = {"load_s": round(time.perf_counter() - start, 1), "triton_rss_gb": tree_rss_gb(server.process.pid)}
    latency, extra = {}, {}
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        for model in models:
            if model == "vith14":
                rows = clip_latency(client, repeat)
            else:
                rows = vision_latency(model, repo, client, repeat)
            latency[model] = rows
        if {"sam2", "florence2"} <= set(models):
            extra["fallback_end_to_end"] = fallback_once(f"127.0.0.1:{server.grpc_port}")
        load["triton_rss_after_requests_gb"] = tree_rss_gb(server.process.pid)
        client.close()
    finally:
        server.stop()
    for model in models:
        if model == "vith14":
            clip_inprocess(repo, latency[model], repeat)
        else:
            vision_inprocess(model, repo, latency[model], repeat)
    return load, latency, extra


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="vith14,sam2,florence2")
    parser.add_argument("--quick", action="store_true", help="the tiny configs: checks the script")
    parser.add_argument("--repeat", type=int, default=5, help="requests per latency figure (median)")
    parser.add_argument("--keep", type=Path, help="write the repositories here (default: a temporary folder)")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument(
        "--gateway",
        type=int,
        default=0,
        metavar="N",
        help="then index N catalog products with the CLIP model and search through the gateway",
    )
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the plot from results/full_size.json"
    )
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.loads((RESULTS_DIR / "full_size.json").read_text()), RESULTS_DIR / "full_size.png")
        return
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(models) - set(EXPORTS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; choose from {sorted(EXPORTS)}")

    figures: dict = {"quick": args.quick, "models": {}}
    with tempfile.TemporaryDirectory(prefix="looksync-bench-full-") as tmp:
        root = args.keep or Path(tmp)
        # One repository per model for load time and memory of each alone; SAM2 + Florence-2
        # share one for the fallback path.
        groups = [[m] for m in models if m == "vith14"] + ([[m for m in models if m != "vith14"]] if any(
            m != "vith14" for m in models) else [])  # fmt: skip
        for group in groups:
            repo = root / "_".join(group)
            for model in group:
                figures["models"][model] = export(model, args.quick, repo)
                figures["models"][model]["sizes_mb"] = {
                    k: v
                    for k, v in sizes(repo).items()
                    if k.startswith("clip" if model == "vith14" else model)
                }
                figures["models"][model]["parity_min_cosine"] = parity(model, repo)
            print(f"serving {group} from {repo}", flush=True)
            load, latency, extra = serve(repo, root / f"triton-{'_'.join(group)}", group, args.repeat)
            for model in group:
                figures["models"][model].update(load=load, latency_ms=latency[model])
            figures.update(extra)
            if args.keep is None and not args.gateway:
                import shutil

                shutil.rmtree(repo, ignore_errors=True)  # the next export needs the disk
        if args.gateway:
            figures["gateway"] = gateway_once(
                [root / "_".join(g) for g in groups], root / "gateway", args.gateway
            )
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    for f in figures["models"].values():
        f["measured"] = stamp
    report(figures, args.no_record)


def report(figures: dict, no_record: bool) -> None:
    """Print the tables; record them unless asked not to. Models measured by earlier runs (the
    three take ~40 minutes together) stay in the JSON and the table, each with its date."""
    saved = RESULTS_DIR / "full_size.json"
    if not figures["quick"] and not no_record and saved.exists():
        previous = json.loads(saved.read_text())
        figures = {**previous, **figures, "models": {**previous.get("models", {}), **figures["models"]}}
    rows, lat_rows = [], []
    for model, f in figures["models"].items():
        size_gb = sum(f["sizes_mb"].values()) / 1e3
        rows.append([
            LABELS[model] if not figures["quick"] else f"{model} (tiny)",
            f"{f['params_m']:.0f} M" if f["params_m"] else "—",
            f["export_s"], f["export_peak_rss_gb"], f"{size_gb:.2f}",
            f"{min(f['parity_min_cosine'].values()):.7f}",
            f["load"]["load_s"], f["load"]["triton_rss_gb"], f.get("measured", "?"),
        ])  # fmt: skip
        for what, r in f["latency_ms"].items():
            ratio = r["triton_ms"] / r["inprocess_ms"] if r.get("inprocess_ms") else float("nan")
            lat_rows.append(
                [model, what, f"{r['triton_ms']:.0f}", f"{r.get('inprocess_ms', 0):.0f}", f"{ratio:.2f}"]
            )
    table = markdown_table(
        ["model (random weights)", "params", "export s", "export peak RSS GB", "files GB",
         "parity min cosine", "Triton load s", "Triton RSS GB (loaded)", "measured"],
        rows,
    )  # fmt: skip
    table += "\n\n" + markdown_table(
        ["model", "request", "Triton ms (median)", "in-process ORT ms", "Triton / in-process"], lat_rows
    )
    if "gateway" in figures:
        g = figures["gateway"]
        table += (
            f"\n\nThrough the gateway (gRPC, {g['search_look']['space']}, all three models in one CPU Triton, "
            f"{g['triton_rss_gb']} GB RSS; catalog indexed at {g['index_products_per_s']} products/s): "
            f"SearchText {g['search_text']['ms']} ms ({g['search_text']['hits']} hits), "
            f"SearchImage {g['search_image']['ms']} ms (finds its own product first: "
            f"{g['search_image']['finds_itself_first']}), SearchLook with the segmentation fallback "
            f"{g['search_look']['ms']} ms ({g['search_look']['layers']} layers, rerank "
            f"{', '.join(g['search_look']['rerank_source'])})."
        )
    if "fallback_end_to_end" in figures:
        fb = figures["fallback_end_to_end"]
        table += (
            f"\n\nSegmentation fallback end to end (gateway FlorenceSam2Localizer, 2 phrases, one look): "
            f"{fb['seconds']} s, {fb['regions']} regions."
        )
    table += (
        "\n\nExport commands: " + "; ".join(f"`{f['command']}`" for f in figures["models"].values()) + "."
    )
    print(table)
    if not no_record:
        write_json("full_size" + ("_quick" if figures["quick"] else ""), figures)
        if not figures["quick"]:
            plot(figures, RESULTS_DIR / "full_size.png")
            append_results(
                "Full-size models (CPU target, random weights)", table + "\n\n![plot](results/full_size.png)"
            )


def plot(figures: dict, path: Path) -> None:
    """Per-request latency through Triton next to in-process ONNX Runtime (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, served, local = [], [], []
    for model, f in figures["models"].items():
        for what, r in f["latency_ms"].items():
            labels.append(f"{model}\n{what.split(':')[0]}" if model != "vith14" else f"ViT-H/14\n{what}")
            served.append(r["triton_ms"])
            local.append(r.get("inprocess_ms", 0))
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(x - 0.2, served, 0.4, label="through Triton (gRPC, python backend)")
    ax.bar(x + 0.2, local, 0.4, label="in-process ONNX Runtime, same files")
    for i, (a, b) in enumerate(zip(served, local)):
        if b:
            ax.text(i, max(a, b) * 1.1, f"{a / b:.2f}x", ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("ms per request (median)")
    ax.set_title("Full-size models on the CPU target (2 cores, random weights)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
