"""Serving efficiency against the limit: CLIP image and text throughput through Triton (CPU
target) at several concurrencies, dynamic batching on and off, next to in-process ONNX Runtime
on the same ONNX files at the same batch sizes — one run, reported as ratios.

    python -m benchmarks.serving_efficiency [--quick] [--archs looksync-tiny,ViT-B-32]

"In-process" does the same work as the Triton model: decode + resize + normalise + encoder for
images, tokenise + encoder for texts. The load generator is asyncio tritonclient in this
process; its CPU share is reported, since on a 2-core machine it competes with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import tritonclient.grpc.aio as triton_aio
from google.protobuf import json_format, text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2

from benchmarks.common import append_results, markdown_table, write_json
from export.triton.clip_bpe import ClipTokenizer
from export.triton.preprocess import ImageSpec, image_bytes_to_pixels
from gateway.tritonserver import TritonServer

CONCURRENCY = (1, 4, 16, 64)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_images(n: int, size=(320, 400)) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


TEXTS = [
    "red striped cotton t-shirt with short sleeves",
    "black leather ankle boots",
    "navy pleated midi skirt",
    "oversized beige wool coat with a belt",
    "white low-top canvas sneakers",
    "floral summer dress",
]


def in_process(repo: Path, name: str, images: list[bytes], threads: int, repeat: int) -> dict:
    """Items/s at each batch size for the full image and text paths, in this process."""
    meta = json.loads((repo / f"{name}_image/1/preprocess.json").read_text())
    spec = ImageSpec.from_meta(meta)
    tmeta = json.loads((repo / f"{name}_text/1/preprocess.json").read_text())
    tokenizer = ClipTokenizer(str(repo / f"{name}_text/1" / tmeta["bpe_file"]), tmeta["context_length"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    image_sess = ort.InferenceSession(str(repo / f"{name}_image_encoder/1/model.onnx"), opts)
    text_sess = ort.InferenceSession(str(repo / f"{name}_text_encoder/1/model.onnx"), opts)
    out = {"image": {}, "text": {}}
    for batch in CONCURRENCY:
        blobs = (images * (batch // len(images) + 1))[:batch]
        texts = (TEXTS * (batch // len(TEXTS) + 1))[:batch]

        def run_images(blobs=blobs):
            return image_sess.run(
                None, {"pixel_values": np.stack([image_bytes_to_pixels(b, spec) for b in blobs])}
            )

        def run_texts(texts=texts):
            return text_sess.run(None, {"input_ids": tokenizer(texts)[0]})

        for kind, fn in (("image", run_images), ("text", run_texts)):
            fn()  # warm-up
            n = max(1, repeat // batch)
            start = time.perf_counter()
            for _ in range(n):
                fn()
            out[kind][batch] = n * batch / (time.perf_counter() - start)
    return out


async def set_batching(client, repo: Path, name: str, on: bool) -> None:
    """Reload the family with dynamic batching on or off (explicit model control)."""
    for suffix in ("image_encoder", "text_encoder", "image", "text"):
        model = f"{name}_{suffix}"
        config = text_format.Parse(
            (repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        if not on:
            config.ClearField("dynamic_batching")
        await client.load_model(
            model, config=json_format.MessageToJson(config, preserving_proto_field_name=True)
        )


async def drive(client, model: str, kind: str, payloads: list, concurrency: int, requests: int) -> dict:
    queue = list(range(requests))
    latencies = []

    async def one(i):
        data = np.array([payloads[i % len(payloads)]], dtype=object).reshape(1, 1)
        tensor = triton_aio.InferInput("image" if kind == "image" else "text", [1, 1], "BYTES")
        tensor.set_data_from_numpy(data)
        t0 = time.perf_counter()
        await client.infer(model, [tensor], outputs=[triton_aio.InferRequestedOutput("embedding")])
        latencies.append(time.perf_counter() - t0)

    async def worker():
        while queue:
            await one(queue.pop())

    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - wall0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "per_s": requests / wall,
        "p50_ms": float(np.percentile(latencies, 50) * 1000),
        "p99_ms": float(np.percentile(latencies, 99) * 1000),
        "generator_cpu_share": cpu / wall,
    }


async def stats(client, model: str) -> tuple[int, int]:
    s = (await client.get_inference_statistics(model, as_json=True))["model_stats"][0]
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


async def through_triton(
    server: TritonServer, repo: Path, name: str, images: list[bytes], requests: int
) -> dict:
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    texts = [t.encode() for t in TEXTS]
    out = {}
    try:
        for batching in (True, False):
            await set_batching(client, repo, name, batching)
            for kind, payloads in (("image", images), ("text", texts)):
                model = f"{name}_{kind}"
                await drive(client, model, kind, payloads, 4, 20)  # warm-up
                for c in CONCURRENCY:
                    inf0, exe0 = await stats(client, f"{name}_{kind}_encoder")
                    r = await drive(client, model, kind, payloads, c, requests)
                    inf1, exe1 = await stats(client, f"{name}_{kind}_encoder")
                    r["mean_batch"] = (inf1 - inf0) / max(1, exe1 - exe0)
                    out[(batching, kind, c)] = r
                    print(
                        f"[bench] {name} {kind:5s} batching={'on ' if batching else 'off'} c={c:2d}: "
                        f"{r['per_s']:7.1f}/s  p50 {r['p50_ms']:6.1f} ms  mean batch {r['mean_batch']:4.1f}  "
                        f"generator CPU {r['generator_cpu_share']:.2f}",
                        flush=True,
                    )
        await set_batching(client, repo, name, True)
    finally:
        await client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", default="looksync-tiny,ViT-B-32")
    parser.add_argument("--requests", type=int, default=600, help="requests per concurrency level")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads (in-process and Triton)")
    parser.add_argument("--quick", action="store_true", help="tiny model only, 150 requests a level")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    archs = ["looksync-tiny"] if args.quick else args.archs.split(",")
    requests = 150 if args.quick else args.requests
    work = Path(tempfile.mkdtemp(prefix="looksync-bench-serving-"))
    rows, figures = [], {}
    images = sample_images(8)
    try:
        from export.clip import ExportRequest, export_clip

        for arch in archs:
            name = arch.lower().replace("-", "")
            repo = work / name
            export_clip(
                ExportRequest(arch=arch, version=1, name=name, repository=repo, onnx_threads=args.threads)
            )
            limit = in_process(repo, name, images, args.threads, repeat=256 if args.quick else 512)
            server = TritonServer(repo, free_port(), free_port(), free_port(), work_dir=work / f"t-{name}")
            server.start(log_file=open(work / f"triton-{name}.log", "w"))
            try:
                served = asyncio.run(through_triton(server, repo, name, images, requests))
            finally:
                server.stop()
            for kind in ("image", "text"):
                for c in CONCURRENCY:
                    on, off = served[(True, kind, c)], served[(False, kind, c)]
                    ref = limit[kind][c]
                    rows.append(
                        [
                            arch,
                            kind,
                            c,
                            f"{ref:.0f}",
                            f"{on['per_s']:.0f}",
                            f"{on['per_s'] / ref:.2f}",
                            f"{on['mean_batch']:.1f}",
                            f"{off['per_s']:.0f}",
                            f"{on['per_s'] / off['per_s']:.2f}",
                            f"{on['p50_ms']:.1f}",
                            f"{on['generator_cpu_share']:.2f}",
                        ]
                    )
                    key = f"{name}_{kind}_c{c}"
                    figures[f"serving_efficiency_{key}"] = round(on["per_s"] / ref, 3)
                    figures[f"batching_speedup_{key}"] = round(on["per_s"] / off["per_s"], 3)
                    figures[f"triton_per_s_{key}"] = round(on["per_s"], 1)
        header = [
            "model",
            "tower",
            "concurrency",
            "in-process/s (batch = concurrency)",
            "Triton/s batching on",
            "efficiency",
            "mean batch",
            "Triton/s batching off",
            "batching speed-up",
            "p50 ms (on)",
            "load generator CPU share",
        ]
        table = markdown_table(header, rows)
        print(table)
        write_json("serving_efficiency" + ("_quick" if args.quick else ""), figures)
        if not args.no_record:
            append_results(
                "Serving efficiency: Triton (CPU target, python backend) vs in-process ONNX Runtime",
                table,
                "Efficiency = Triton throughput / in-process throughput of the same work (decode, resize, "
                "normalise, encoder; or tokenise, encoder) at batch size = concurrency, same ONNX file, same "
                "onnxruntime thread count. One image or text per request. Server, load generator and the "
                "in-process reference share the machine's 2 cores.",
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
