"""ViT-H/14 (random weights) tower throughput on a CUDA GPU, against the FLOP limit.

    python -m benchmarks.gpu_vith14 [--quick] [--compile]

For fp16 and bf16 (autocast; PyTorch's SDPA attention) at several batch sizes: image tower
(224 px, 334.6 GFLOP per image) and text tower (77 tokens, 47.1 GFLOP per query) images or
texts per second, achieved TFLOP/s, and the fraction of this device's measured dense bf16 matmul
rate. Optional torch.compile. Needs a GPU; on a machine without one it says so and exits 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks.common import append_results, markdown_table, write_json

IMAGE_GFLOP, TEXT_GFLOP = 334.6, 47.1


def matmul_tflops(torch, dtype, n: int = 8192, repeat: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeat / (time.perf_counter() - start) / 1e12


def rate(torch, fn, make_input, batch: int, seconds: float) -> float:
    x = make_input(batch)
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(x)
        n += 1
    torch.cuda.synchronize()
    return n * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: run this on a GPU host (see /work/.library/device on lent machines)")
        sys.exit(2)
    import open_clip

    device = torch.cuda.get_device_name()
    peak = matmul_tflops(torch, torch.bfloat16)
    print(f"[bench] {device}: dense bf16 matmul {peak:.0f} TFLOP/s", flush=True)
    model = open_clip.create_model("ViT-H-14", pretrained=None).cuda().eval()
    batches = (1, 8, 32) if args.quick else (1, 8, 32, 64, 128, 256)
    seconds = 1.0 if args.quick else 3.0
    rows, figures = [], {"matmul_bf16_tflops": round(peak, 1)}
    variants = [("eager", lambda f: f)] + ([("compiled", torch.compile)] if args.compile else [])
    for dtype_name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        for variant, wrap in variants:
            image = wrap(lambda x: model.encode_image(x, normalize=True))
            text = wrap(lambda x: model.encode_text(x, normalize=True))
            for tower, fn, gflop, make in (
                ("image", image, IMAGE_GFLOP, lambda b: torch.randn(b, 3, 224, 224, device="cuda")),
                ("text", text, TEXT_GFLOP, lambda b: torch.randint(1, 49407, (b, 77), device="cuda")),
            ):
                for batch in batches:
                    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                        per_s = rate(torch, fn, make, batch, seconds)
                    tflops = per_s * gflop / 1000
                    rows.append(
                        [
                            tower,
                            dtype_name,
                            variant,
                            batch,
                            f"{per_s:,.0f}",
                            f"{tflops:.0f}",
                            f"{tflops / peak:.2f}",
                        ]
                    )
                    figures[f"{tower}_{dtype_name}_{variant}_b{batch}_per_s"] = round(per_s, 1)
                    print(
                        f"[bench] {tower} {dtype_name} {variant} batch {batch}: {per_s:,.0f}/s "
                        f"({tflops / peak:.0%} of matmul)",
                        flush=True,
                    )
    table = markdown_table(["tower", "dtype", "mode", "batch", "items/s", "TFLOP/s", "of matmul rate"], rows)
    print(table)
    write_json("gpu_vith14", figures)
    if not args.no_record:
        append_results(
            f"ViT-H/14 towers on {device} (PyTorch, random weights)",
            table,
            f"Dense bf16 matmul on this device: {peak:.0f} TFLOP/s. FLOPs per item from open_clip's "
            f"profile: image {IMAGE_GFLOP} GFLOP, text {TEXT_GFLOP} GFLOP.",
        )


if __name__ == "__main__":
    main()
