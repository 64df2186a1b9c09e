"""Serving efficiency against the limit: CLIP image and text throughput through Triton (CPU
target) at several concurrencies, next to in-process ONNX Runtime on the same ONNX files at the
same batch sizes — one run, reported as ratios. Each serving setting is one row per change:

    bls        the wrapper calls `<model>_<tower>_encoder` through BLS (two python-backend hops;
               the GPU target's layout), dynamic batching on
    inprocess  the wrapper runs the encoder's ONNX file itself (one hop; the CPU default), batching on
    inprocess, batching off

    python -m benchmarks.serving_efficiency [--quick] [--archs looksync-tiny,ViT-B-32]

"In-process" does the same work as the Triton model: decode + resize + normalise + encoder for
images, tokenise (the version's tokenizer.json) + encoder for texts. The load generator is
asyncio tritonclient in this process; its CPU share is reported, since on a 2-core machine it
competes with the server. A plot of throughput and efficiency against concurrency is written
next to the JSON.
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
from export.triton.preprocess import ImageSpec, image_bytes_to_pixels
from export.triton.text_tokenizer import TextTokenizer
from export.triton_config import Batching
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
    tokenizer = TextTokenizer.from_version(repo / f"{name}_text/1", tmeta)
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


SETTINGS = (("bls", True), ("inprocess", True), ("inprocess", False))  # (runner, batching)


async def configure(client, repo: Path, name: str, runner: str, on: bool) -> None:
    """Reload the family with this runner and dynamic batching on or off (explicit model
    control; the encoders load first, the wrappers call them)."""
    for suffix in ("image_encoder", "text_encoder", "image", "text"):
        model = f"{name}_{suffix}"
        config = text_format.Parse(
            (repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        if not on:
            config.ClearField("dynamic_batching")
        if suffix.endswith("encoder"):
            config.parameters["lazy_session"].string_value = "1" if runner == "inprocess" else "0"
        else:
            # Each runner with the wrapper queue delay export gives it (export/triton_config.py).
            config.parameters["runner"].string_value = runner
            if config.HasField("dynamic_batching"):
                b = Batching()
                delay = b.inprocess_queue_delay_us if runner == "inprocess" else b.max_queue_delay_us
                config.dynamic_batching.max_queue_delay_microseconds = delay
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


ECHO_MODEL = """import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            n = pb_utils.get_input_tensor_by_name(r, "text").as_numpy().shape[0]
            tensor = pb_utils.Tensor("embedding", np.zeros((n, 64), np.float32))
            out.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return out
"""


def write_echo(repo: Path, queue_delay_us: int) -> None:
    """A python model that does no work: what one python-backend hop and the gRPC client cost
    per request on this machine, the floor under any python-backend wrapper."""
    (repo / "echo" / "1").mkdir(parents=True, exist_ok=True)
    (repo / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    (repo / "echo" / "config.pbtxt").write_text(
        'name: "echo"\nbackend: "python"\nmax_batch_size: 64\n'
        'input [ { name: "text" data_type: TYPE_STRING dims: [ 1 ] } ]\n'
        'output [ { name: "embedding" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}\n"
        "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
    )


async def through_triton(
    server: TritonServer, repo: Path, name: str, images: list[bytes], requests: int
) -> dict:
    client = triton_aio.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    texts = [t.encode() for t in TEXTS]
    out = {}
    try:
        for runner, batching in SETTINGS:
            await configure(client, repo, name, runner, batching)
            for kind, payloads in (("image", images), ("text", texts)):
                model = f"{name}_{kind}"
                await drive(client, model, kind, payloads, 4, 20)  # warm-up
                for c in CONCURRENCY:
                    # Batches are formed at the wrapper; the encoder runs one per execution.
                    inf0, exe0 = await stats(client, model)
                    r = await drive(client, model, kind, payloads, c, requests)
                    inf1, exe1 = await stats(client, model)
                    r["mean_batch"] = (inf1 - inf0) / max(1, exe1 - exe0)
                    out[(runner, batching, kind, c)] = r
                    print(
                        f"[bench] {name} {kind:5s} {runner:9s} batching={'on ' if batching else 'off'} c={c:2d}: "
                        f"{r['per_s']:7.1f}/s  p50 {r['p50_ms']:6.1f} ms  mean batch {r['mean_batch']:4.1f}  "
                        f"generator CPU {r['generator_cpu_share']:.2f}",
                        flush=True,
                    )
        await configure(client, repo, name, "inprocess", True)
        texts_in = [t.encode() for t in TEXTS]
        await drive(client, "echo", "text", texts_in, 4, 20)
        for c in CONCURRENCY:
            out[("echo", c)] = await drive(client, "echo", "text", texts_in, c, requests)
            print(f"[bench] echo (no work) c={c:2d}: {out[('echo', c)]['per_s']:7.1f}/s", flush=True)
    finally:
        await client.close()
    return out


def plot_efficiency(figures: dict, names: list[str]) -> Path:
    """Efficiency (Triton / in-process) against concurrency, one panel per tower, with the bound
    the python-backend floor sets (an echo model's rate sharing the cores with the work)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), 2, figsize=(11, 4 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        for col, kind in enumerate(("image", "text")):
            ax = axes[row][col]
            limit = [figures[f"in_process_per_s_{name}_{kind}_c{c}"] for c in CONCURRENCY]
            for runner, batching in SETTINGS:
                key = f"{name}_{kind}_{runner}_{'on' if batching else 'off'}"
                ys = [figures[f"serving_efficiency_{key}_c{c}"] for c in CONCURRENCY]
                label = f"Triton, {runner}, batching {'on' if batching else 'off'}"
                ax.plot(CONCURRENCY, ys, marker="o", label=label)
            if f"echo_per_s_c{CONCURRENCY[0]}" in figures:
                echo = [figures[f"echo_per_s_c{c}"] for c in CONCURRENCY]
                bound = [e / (e + lim) for e, lim in zip(echo, limit)]
                ax.plot(CONCURRENCY, bound, "k:", label="bound: python-backend floor + the work")
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set_ylim(0, 1.05)
            ax.set_xscale("log", base=2)
            ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
            ax.set_xlabel("concurrency (requests in flight)")
            ax.set_ylabel("efficiency (Triton / in-process)")
            ax.set_title(f"{name}: {kind} tower")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(__file__).resolve().parent / "results" / "serving_efficiency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
            write_echo(repo, Batching().inprocess_queue_delay_us)
            server = TritonServer(repo, free_port(), free_port(), free_port(), work_dir=work / f"t-{name}")
            server.start(log_file=open(work / f"triton-{name}.log", "w"))
            try:
                served = asyncio.run(through_triton(server, repo, name, images, requests))
            finally:
                server.stop()
            for kind in ("image", "text"):
                for runner, batching in SETTINGS:
                    for c in CONCURRENCY:
                        r, ref = served[(runner, batching, kind, c)], limit[kind][c]
                        setting = f"{runner}, batching {'on' if batching else 'off'}"
                        rows.append(
                            [
                                arch, kind, setting, c, f"{ref:.0f}", f"{r['per_s']:.0f}",
                                f"{r['per_s'] / ref:.2f}", f"{r['mean_batch']:.1f}", f"{r['p50_ms']:.1f}",
                                f"{r['generator_cpu_share']:.2f}",
                            ]
                        )  # fmt: skip
                        key = f"{name}_{kind}_{runner}_{'on' if batching else 'off'}_c{c}"
                        figures[f"serving_efficiency_{key}"] = round(r["per_s"] / ref, 3)
                        figures[f"triton_per_s_{key}"] = round(r["per_s"], 1)
                        figures[f"p50_ms_{key}"] = round(r["p50_ms"], 2)
                    for c in CONCURRENCY:
                        figures[f"in_process_per_s_{name}_{kind}_c{c}"] = round(limit[kind][c], 1)
            for c in CONCURRENCY:
                r = served[("echo", c)]
                rows.append(
                    [arch, "none (echo model)", "python-backend floor, batching on", c, "-", f"{r['per_s']:.0f}",
                     "-", "-", f"{r['p50_ms']:.1f}", f"{r['generator_cpu_share']:.2f}"]
                )  # fmt: skip
                figures[f"echo_per_s_c{c}"] = round(r["per_s"], 1)
        header = [
            "model", "tower", "setting", "concurrency", "in-process/s (batch = concurrency)", "Triton/s",
            "efficiency", "mean batch", "p50 ms", "load generator CPU share",
        ]  # fmt: skip
        table = markdown_table(header, rows)
        print(table)
        write_json("serving_efficiency" + ("_quick" if args.quick else ""), figures)
        plot = plot_efficiency(figures, [a.lower().replace("-", "") for a in archs])
        print(f"plot: {plot}")
        if not args.no_record:
            append_results(
                "Serving efficiency: Triton (CPU target, python backend) vs in-process ONNX Runtime",
                table,
                "Efficiency = Triton throughput / in-process throughput of the same work (decode, resize, "
                "normalise, encoder; or tokenise, encoder) at batch size = concurrency, same ONNX file, same "
                "onnxruntime thread count. One image or text per request. Server, load generator and the "
                "in-process reference share the machine's 2 cores. Settings: `bls` = the wrapper calls the "
                "encoder model through BLS (two python-backend hops), `inprocess` = the wrapper runs the "
                f"encoder itself (one hop, the CPU default). Plot: `benchmarks/results/{plot.name}`.",
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
