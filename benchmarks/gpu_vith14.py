"""ViT-H/14 (random weights) tower throughput on a CUDA GPU, against the FLOP limit.

    python -m benchmarks.gpu_vith14 [--quick] [--compile] [--onnx] [--out DIR]

Runs from a copy of this repository with nothing but the GPU host's Python and PyTorch: the
towers are defined here in plain PyTorch with open_clip's ViT-H-14 shapes (986.1 M parameters;
tests/test_gpu_bench.py checks the shapes against open_clip's config), so neither open_clip nor
the project's other dependencies are needed. Optional extras when present: matplotlib (the
plot), onnxruntime-gpu (`--onnx`: the same towers exported to ONNX, run by ONNX Runtime's
TensorRT and CUDA providers).

For fp16 and bf16 (autocast; PyTorch's SDPA attention) at batch 1-256: images (224 px,
334.6 GFLOP each) and texts (77 tokens, 47.1 GFLOP each) per second, achieved TFLOP/s, the
fraction of this device's measured dense matmul rate, and the fraction of 2,391 images/s, the
FLOP limit of an H100-class GPU at ~800 dense bf16 TFLOP/s. `--cpu-check` runs the same code on a
narrow model on the CPU (seconds; it checks the script, its numbers mean nothing).
Writes benchmarks/results/gpu_vith14.json (or --out) and a plot; appends RESULTS.md unless
--no-record.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

IMAGE_GFLOP, TEXT_GFLOP = 334.6, 47.1
H100_IMAGES_PER_S = 2391  # 800 TFLOP/s / 334.6 GFLOP
VIT_H14 = dict(
    embed_dim=1024,
    image_size=224,
    patch_size=14,
    vision_width=1280,
    vision_layers=32,
    vision_heads=16,
    context_length=77,
    vocab_size=49408,
    text_width=1024,
    text_layers=24,
    text_heads=16,
)
NARROW = {**VIT_H14, "vision_width": 64, "vision_layers": 2, "vision_heads": 2, "text_width": 64,
          "text_layers": 2, "text_heads": 2, "embed_dim": 32}  # fmt: skip


def build_towers(torch, cfg: dict):
    """open_clip's CLIP towers (pre-norm residual blocks, GELU MLP x4, class token, argmax-EOT
    text pooling under a causal mask), in plain PyTorch."""
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self, width: int, heads: int):
            super().__init__()
            self.heads = heads
            self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
            self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
            self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

        def forward(self, x, causal: bool):
            b, n, w = x.shape
            q, k, v = self.qkv(self.ln_1(x)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            x = x + self.out(a.transpose(1, 2).reshape(b, n, w))
            return x + self.mlp(self.ln_2(x))

    class Vision(nn.Module):
        def __init__(self):
            super().__init__()
            w, p = cfg["vision_width"], cfg["patch_size"]
            grid = cfg["image_size"] // p
            self.conv = nn.Conv2d(3, w, p, p, bias=False)
            self.cls = nn.Parameter(torch.zeros(w))
            self.pos = nn.Parameter(torch.zeros(grid * grid + 1, w))
            self.ln_pre, self.ln_post = nn.LayerNorm(w), nn.LayerNorm(w)
            self.blocks = nn.ModuleList(Block(w, cfg["vision_heads"]) for _ in range(cfg["vision_layers"]))
            self.proj = nn.Parameter(torch.zeros(w, cfg["embed_dim"]))

        def forward(self, pixels):
            x = self.conv(pixels).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], 1, -1).to(x.dtype), x], 1) + self.pos.to(x.dtype)
            x = self.ln_pre(x)
            for block in self.blocks:
                x = block(x, False)
            return F.normalize(self.ln_post(x[:, 0]) @ self.proj, dim=-1)

    class Text(nn.Module):
        def __init__(self):
            super().__init__()
            w = cfg["text_width"]
            self.token = nn.Embedding(cfg["vocab_size"], w)
            self.pos = nn.Parameter(torch.zeros(cfg["context_length"], w))
            self.blocks = nn.ModuleList(Block(w, cfg["text_heads"]) for _ in range(cfg["text_layers"]))
            self.ln_final = nn.LayerNorm(w)
            self.proj = nn.Parameter(torch.zeros(w, cfg["embed_dim"]))

        def forward(self, ids):
            x = self.token(ids) + self.pos
            for block in self.blocks:
                x = block(x, True)
            x = self.ln_final(x)[torch.arange(ids.shape[0], device=ids.device), ids.argmax(-1)]
            return F.normalize(x @ self.proj, dim=-1)

    return Vision(), Text()


def matmul_tflops(torch, device, dtype, n: int = 8192, repeat: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(torch, device)
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    _sync(torch, device)
    return 2 * n**3 * repeat / (time.perf_counter() - start) / 1e12


def _sync(torch, device) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rate(torch, device, fn, x, seconds: float) -> float:
    for _ in range(3):
        fn(x)
    _sync(torch, device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(x)
        n += 1
    _sync(torch, device)
    return n * x.shape[0] / (time.perf_counter() - start)


def onnx_rates(torch, towers, batches, seconds, out_dir: Path) -> list[dict]:
    """The fp16 towers exported to ONNX, run by ONNX Runtime's TensorRT / CUDA providers."""
    try:
        import onnxruntime as ort
    except ImportError:
        print("[bench] onnxruntime is not installed: ONNX rows skipped", flush=True)
        return []
    available = ort.get_available_providers()
    rows = []
    for tower_name, module, make in towers:
        path = out_dir / f"vith14_{tower_name}_fp16.onnx"
        x = make(2)
        torch.onnx.export(module.half(), (x.half() if x.is_floating_point() else x,), str(path),
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
                          opset_version=17, dynamo=False)  # fmt: skip
        for provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
            if provider not in available:
                continue
            opts = [{"trt_fp16_enable": True}] if provider.startswith("Tensorrt") else [{}]
            session = ort.InferenceSession(str(path), providers=[provider], provider_options=opts)
            for batch in batches:
                feed = make(batch)
                feed = (feed.half() if feed.is_floating_point() else feed).cpu().numpy()
                io = session.io_binding()
                io.bind_cpu_input("x", feed)
                io.bind_output("y", "cuda")
                session.run_with_iobinding(io)  # warm-up (TensorRT builds its engine here)
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds:
                    session.run_with_iobinding(io)
                    n += 1
                rows.append({"tower": tower_name, "dtype": "fp16", "mode": f"onnxruntime {provider[:-17]}",
                             "batch": batch, "per_s": n * batch / (time.perf_counter() - start)})  # fmt: skip
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib is not installed: no plot", flush=True)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, tower in zip(axes, ("image", "text")):
        series: dict[str, list] = {}
        for r in rows:
            if r["tower"] == tower:
                series.setdefault(f"{r['dtype']} {r['mode']}", []).append((r["batch"], r["per_s"]))
        for label, points in series.items():
            ax.plot(*zip(*sorted(points)), marker="o", label=label)
        if tower == "image":
            ax.axhline(H100_IMAGES_PER_S, ls="--", c="grey", label="H100-class FLOP limit")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel(f"{tower}s / s")
        ax.set_title(f"ViT-H/14 {tower} tower")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"[bench] plot: {path}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="batches 1, 8, 32, 1 s each")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument(
        "--onnx", action="store_true", help="also ONNX Runtime TensorRT/CUDA (onnxruntime-gpu)"
    )
    parser.add_argument(
        "--cpu-check", action="store_true", help="a narrow model on the CPU: checks the script"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    import torch

    device = "cpu" if args.cpu_check else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU host (or --cpu-check to check the script here)")
        sys.exit(2)
    cfg = NARROW if args.cpu_check else VIT_H14
    name = "CPU (check only)" if args.cpu_check else torch.cuda.get_device_name()
    matmul_dtype = torch.float32 if args.cpu_check else torch.bfloat16
    peak = matmul_tflops(torch, device, matmul_dtype, n=512 if args.cpu_check else 8192)
    print(f"[bench] {name}: dense matmul {peak:.1f} TFLOP/s", flush=True)
    vision, text = build_towers(torch, cfg)
    vision, text = vision.to(device).eval(), text.to(device).eval()
    params = sum(p.numel() for m in (vision, text) for p in m.parameters())
    batches = (1, 2) if args.cpu_check else (1, 8, 32) if args.quick else (1, 8, 32, 64, 128, 256)
    seconds = 0.2 if args.cpu_check else 1.0 if args.quick else 3.0
    side, ctx = cfg["image_size"], cfg["context_length"]
    towers = (
        ("image", vision, lambda b: torch.randn(b, 3, side, side, device=device)),
        ("text", text, lambda b: torch.randint(1, cfg["vocab_size"] - 1, (b, ctx), device=device)),
    )
    rows = []
    variants = [("eager", lambda f: f)] + ([("compiled", torch.compile)] if args.compile else [])
    dtypes = (
        (("bf16", torch.bfloat16),) if args.cpu_check else (("fp16", torch.float16), ("bf16", torch.bfloat16))
    )
    for dtype_name, dtype in dtypes:
        for variant, wrap in variants:
            for tower, module, make in towers:
                fn = wrap(module)
                for batch in batches:
                    with torch.inference_mode(), torch.autocast(device, dtype=dtype):
                        per_s = rate(torch, device, fn, make(batch), seconds)
                    rows.append(
                        {"tower": tower, "dtype": dtype_name, "mode": variant, "batch": batch, "per_s": per_s}
                    )
                    print(f"[bench] {tower} {dtype_name} {variant} batch {batch}: {per_s:,.1f}/s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.onnx and not args.cpu_check:
        rows += onnx_rates(torch, towers, batches, seconds, args.out)
    for r in rows:
        gflop = IMAGE_GFLOP if r["tower"] == "image" else TEXT_GFLOP
        r["tflops"] = r["per_s"] * gflop / 1000
        r["of_matmul"] = r["tflops"] / peak
        r["of_h100_limit"] = r["per_s"] / (H100_IMAGES_PER_S * IMAGE_GFLOP / gflop)
    figures = {"device": name, "params": params, "matmul_tflops": round(peak, 2), "rows": rows}
    stem = "gpu_vith14_cpu_check" if args.cpu_check else "gpu_vith14"
    (args.out / f"{stem}.json").write_text(json.dumps(figures, indent=2) + "\n")
    plot(rows, args.out / f"{stem}.png", f"ViT-H/14 on {name}")
    header = "| tower | dtype | mode | batch | items/s | TFLOP/s | of matmul rate | of H100-class limit |"
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['tower']} | {r['dtype']} | {r['mode']} | {r['batch']} | {r['per_s']:,.0f} | "
                     f"{r['tflops']:.0f} | {r['of_matmul']:.2f} | {r['of_h100_limit']:.2f} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if not args.no_record and not args.cpu_check:
        from benchmarks.common import append_results

        append_results(
            f"ViT-H/14 towers on {name} (PyTorch, random weights)",
            table + f"\n\n![plot](results/{stem}.png)",
            f"Dense bf16 matmul on this device: {peak:.0f} TFLOP/s. FLOPs per item from open_clip's "
            f"profile: image {IMAGE_GFLOP} GFLOP, text {TEXT_GFLOP} GFLOP; the H100-class limit is "
            f"{H100_IMAGES_PER_S} images/s (800 TFLOP/s).",
        )


if __name__ == "__main__":
    main()
