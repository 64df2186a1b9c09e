"""Serving efficiency against the limit: CLIP image and text throughput through Triton (CPU
target) at several concurrencies, next to in-process ONNX Runtime on the same ONNX files at the
same batch sizes — one run, reported as ratios. Each serving setting is one row per change:

    bls        the wrapper calls `<model>_<tower>_encoder` through BLS (two python-backend hops;
               the GPU target's layout), dynamic batching on
    inprocess  the wrapper runs the encoder's ONNX file itself (one hop; the CPU default), batching on
    inprocess, batching off
    inprocess, batching on, tritonclient load generator (the others use the raw one, below)

    python -m benchmarks.serving_efficiency [--quick] [--archs looksync-tiny,ViT-B-32] [--rounds 3]

"In-process" does the same work as the Triton model: decode + resize + normalise + encoder for
images, tokenise (the version's tokenizer.json) + encoder for texts.

The load generator shares the machine's 2 cores with the server, so its own CPU is taken from
the server's. It sends each request as ModelInferRequest bytes serialised once, over a plain
gRPC channel, and parses the response (as `perf_analyzer` does in C++); asyncio tritonclient,
which builds and parses every message in Python, is one ablation row. Its CPU share is reported.

Throughput on a shared 2-core VM moves by tens of per cent from minute to minute, so the run is
`--rounds` rounds; each round measures the in-process reference and then every Triton level
for a fixed time, and the tables report the median of the rounds' ratios with their range. A
plot of efficiency against concurrency is written next to the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import resource
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import tritonclient.grpc.aio as triton_aio
from google.protobuf import json_format, text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2, service_pb2

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


def in_process(repo: Path, name: str, images: list[bytes], threads: int, seconds: float) -> dict:
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
            n, start = 0, time.perf_counter()
            while n < 2 or time.perf_counter() - start < seconds:
                fn()
                n += 1
            out[kind][batch] = n * batch / (time.perf_counter() - start)
    return out


@dataclass(frozen=True)
class Setting:
    runner: str  # bls | inprocess
    batching: bool
    generator: str = "raw"  # raw | tritonclient

    @property
    def label(self) -> str:
        text = f"{self.runner}, batching {'on' if self.batching else 'off'}"
        return text + (", tritonclient load generator" if self.generator == "tritonclient" else "")

    @property
    def key(self) -> str:
        return f"{self.runner}_{'on' if self.batching else 'off'}" + (
            "_tritonclient" if self.generator == "tritonclient" else ""
        )


SETTINGS = (
    Setting("bls", True),
    Setting("inprocess", True),
    Setting("inprocess", False),
    Setting("inprocess", True, "tritonclient"),
)


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


def request_bytes(model: str, input_name: str, payload: bytes) -> bytes:
    """One ModelInferRequest carrying a [1, 1] BYTES tensor, serialised (Triton's BYTES wire
    format: each element is a 4-byte little-endian length and its bytes)."""
    req = service_pb2.ModelInferRequest(model_name=model)
    req.inputs.add(name=input_name, datatype="BYTES", shape=[1, 1])
    req.outputs.add(name="embedding")
    req.raw_input_contents.append(struct.pack("<I", len(payload)) + payload)
    return req.SerializeToString()


class RawGenerator:
    """Requests serialised once, sent over a plain gRPC channel; every response is parsed and
    must carry an embedding."""

    def __init__(self, address: str):
        self.channel = grpc.aio.insecure_channel(address)
        self.call = self.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        self.requests: dict[tuple, list[bytes]] = {}

    def sender(self, model: str, kind: str, payloads: list[bytes]):
        key = (model, kind)
        if key not in self.requests:
            self.requests[key] = [request_bytes(model, kind, p) for p in payloads]
        blobs = self.requests[key]

        async def send(i: int) -> None:
            response = service_pb2.ModelInferResponse.FromString(await self.call(blobs[i % len(blobs)]))
            if not response.raw_output_contents or not response.raw_output_contents[0]:
                raise RuntimeError(f"{model}: a response without an embedding")

        return send

    async def close(self) -> None:
        await self.channel.close()


class TritonclientGenerator:
    """asyncio tritonclient: tensors built and the response parsed in Python per request."""

    def __init__(self, client):
        self.client = client

    def sender(self, model: str, kind: str, payloads: list[bytes]):
        async def send(i: int) -> None:
            data = np.array([payloads[i % len(payloads)]], dtype=object).reshape(1, 1)
            tensor = triton_aio.InferInput(kind, [1, 1], "BYTES")
            tensor.set_data_from_numpy(data)
            result = await self.client.infer(
                model, [tensor], outputs=[triton_aio.InferRequestedOutput("embedding")]
            )
            if result.as_numpy("embedding") is None:
                raise RuntimeError(f"{model}: a response without an embedding")

        return send


async def drive(send, concurrency: int, seconds: float) -> dict:
    """Closed loop: `concurrency` requests in flight for `seconds`."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    counter = iter(range(1 << 62))

    async def worker():
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await send(next(counter))
            latencies.append(time.perf_counter() - t0)

    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - wall0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(latencies, 50) * 1000),
        "p99_ms": float(np.percentile(latencies, 99) * 1000),
        "generator_cpu_share": cpu / wall,
    }


async def stats(client, model: str) -> tuple[int, int]:
    s = (await client.get_inference_statistics(model, as_json=True))["model_stats"][0]
    return int(s.get("inference_count", 0)), int(s.get("execution_count", 0))


ECHO_MODEL = """import grpc
import numpy as np
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
    server: TritonServer, repo: Path, name: str, images: list[bytes], seconds: float
) -> dict:
    """One round: every setting, tower and concurrency for `seconds`, then the echo floor."""
    address = f"127.0.0.1:{server.grpc_port}"
    client = triton_aio.InferenceServerClient(address)
    generators = {"raw": RawGenerator(address), "tritonclient": TritonclientGenerator(client)}
    texts = [t.encode() for t in TEXTS]
    out = {}
    try:
        loaded = None
        for setting in SETTINGS:
            if loaded != (setting.runner, setting.batching):
                await configure(client, repo, name, setting.runner, setting.batching)
                loaded = (setting.runner, setting.batching)
            for kind, payloads in (("image", images), ("text", texts)):
                model = f"{name}_{kind}"
                send = generators[setting.generator].sender(model, kind, payloads)
                await drive(send, 4, min(0.5, seconds))  # warm-up
                for c in CONCURRENCY:
                    # Batches are formed at the wrapper; the encoder runs one per execution.
                    inf0, exe0 = await stats(client, model)
                    r = await drive(send, c, seconds)
                    inf1, exe1 = await stats(client, model)
                    r["mean_batch"] = (inf1 - inf0) / max(1, exe1 - exe0)
                    out[(setting, kind, c)] = r
                    print(
                        f"[bench] {name} {kind:5s} {setting.label:55s} c={c:2d}: {r['per_s']:7.1f}/s  "
                        f"p50 {r['p50_ms']:6.1f} ms  mean batch {r['mean_batch']:4.1f}  "
                        f"generator CPU {r['generator_cpu_share']:.2f}",
                        flush=True,
                    )
        if loaded != ("inprocess", True):
            await configure(client, repo, name, "inprocess", True)
        send = generators["raw"].sender("echo", "text", texts)
        await drive(send, 4, min(0.5, seconds))
        for c in CONCURRENCY:
            out[("echo", c)] = await drive(send, c, seconds)
            print(f"[bench] echo (no work) c={c:2d}: {out[('echo', c)]['per_s']:7.1f}/s", flush=True)
    finally:
        await generators["raw"].close()
        await client.close()
    return out


def median_of(rounds: list[dict], key) -> dict:
    """The median round's figures for one key (by rate), with the rates' range."""
    rates = sorted(r[key]["per_s"] for r in rounds)
    pick = sorted(rounds, key=lambda r: r[key]["per_s"])[len(rounds) // 2][key]
    return {**pick, "per_s": float(np.median(rates)), "low": rates[0], "high": rates[-1]}


def plot_efficiency(figures: dict, names: list[str]) -> Path:
    """Efficiency (Triton / in-process, median of the rounds) against concurrency, one panel
    per tower, with the bound the python-backend floor sets (an echo model's rate sharing the
    cores with the work)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), 2, figsize=(11, 4 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        for col, kind in enumerate(("image", "text")):
            ax = axes[row][col]
            limit = [figures[f"in_process_per_s_{name}_{kind}_c{c}"] for c in CONCURRENCY]
            for setting in SETTINGS:
                key = f"{name}_{kind}_{setting.key}"
                ys = [figures[f"serving_efficiency_{key}_c{c}"] for c in CONCURRENCY]
                lows = [figures[f"serving_efficiency_low_{key}_c{c}"] for c in CONCURRENCY]
                highs = [figures[f"serving_efficiency_high_{key}_c{c}"] for c in CONCURRENCY]
                err = [[y - lo for y, lo in zip(ys, lows)], [hi - y for y, hi in zip(ys, highs)]]
                ax.errorbar(
                    CONCURRENCY, ys, yerr=err, marker="o", capsize=3, label=f"Triton, {setting.label}"
                )
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
            ax.set_title(f"{name}: {kind} tower (median of rounds, bars: range)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(__file__).resolve().parent / "results" / "serving_efficiency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def measure(arch: str, work: Path, images: list[bytes], args) -> tuple[list[dict], list[dict]]:
    """Export one family, then `args.rounds` rounds of (in-process reference, Triton levels)."""
    from export.clip import ExportRequest, export_clip

    name = arch.lower().replace("-", "")
    repo = work / name
    export_clip(ExportRequest(arch=arch, version=1, name=name, repository=repo, onnx_threads=args.threads))
    write_echo(repo, Batching().inprocess_queue_delay_us)
    server = TritonServer(repo, free_port(), free_port(), free_port(), work_dir=work / f"t-{name}")
    server.start(log_file=open(work / f"triton-{name}.log", "w"))
    limits, served = [], []
    try:
        for n in range(args.rounds):
            print(f"[bench] {name}: round {n + 1} of {args.rounds}", flush=True)
            # The server is idle while the reference runs (no spinning threads: encoder_runner.py).
            limits.append(in_process(repo, name, images, args.threads, args.seconds))
            served.append(asyncio.run(through_triton(server, repo, name, images, args.seconds)))
    finally:
        server.stop()
    return limits, served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--archs", default="looksync-tiny,ViT-B-32")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per concurrency level")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; tables report the median")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads (in-process and Triton)")
    parser.add_argument("--quick", action="store_true", help="tiny model only, 1.5 s a level")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    archs = ["looksync-tiny"] if args.quick else args.archs.split(",")
    if args.quick:
        args.seconds = min(args.seconds, 1.5)
    work = Path(tempfile.mkdtemp(prefix="looksync-bench-serving-"))
    rows, summary, figures = [], [], {"rounds": args.rounds, "seconds_per_level": args.seconds}
    images = sample_images(8)
    try:
        for arch in archs:
            name = arch.lower().replace("-", "")
            limits, served = measure(arch, work, images, args)
            for kind in ("image", "text"):
                for setting in SETTINGS:
                    for c in CONCURRENCY:
                        ratios = sorted(
                            s[(setting, kind, c)]["per_s"] / lim[kind][c] for s, lim in zip(served, limits)
                        )
                        r = median_of(served, (setting, kind, c))
                        ref = float(np.median([lim[kind][c] for lim in limits]))
                        eff = float(np.median(ratios))
                        rows.append(
                            [
                                arch, kind, setting.label, c, f"{ref:.0f}", f"{r['per_s']:.0f}",
                                f"{eff:.2f}", f"{ratios[0]:.2f}-{ratios[-1]:.2f}", f"{r['mean_batch']:.1f}",
                                f"{r['p50_ms']:.1f}", f"{r['generator_cpu_share']:.2f}",
                            ]
                        )  # fmt: skip
                        key = f"{name}_{kind}_{setting.key}_c{c}"
                        figures[f"serving_efficiency_{key}"] = round(eff, 3)
                        figures[f"serving_efficiency_low_{key}"] = round(ratios[0], 3)
                        figures[f"serving_efficiency_high_{key}"] = round(ratios[-1], 3)
                        figures[f"triton_per_s_{key}"] = round(r["per_s"], 1)
                        figures[f"p50_ms_{key}"] = round(r["p50_ms"], 2)
                    for c in CONCURRENCY:
                        figures[f"in_process_per_s_{name}_{kind}_c{c}"] = round(
                            float(np.median([lim[kind][c] for lim in limits])), 1
                        )
            for c in CONCURRENCY:
                r = median_of(served, ("echo", c))
                rows.append(
                    [arch, "none (echo model)", "python-backend floor, batching on", c, "-", f"{r['per_s']:.0f}",
                     "-", "-", "-", f"{r['p50_ms']:.1f}", f"{r['generator_cpu_share']:.2f}"]
                )  # fmt: skip
                figures[f"echo_per_s_c{c}"] = round(r["per_s"], 1)
            summary += goals_rows(arch, name, figures)
        header = [
            "model", "tower", "setting", "concurrency", "in-process/s (batch = concurrency)", "Triton/s",
            "efficiency (median)", "range over rounds", "mean batch", "p50 ms", "load generator CPU share",
        ]  # fmt: skip
        table = markdown_table(header, rows)
        goals = markdown_table(
            ["model", "tower", "concurrency", "efficiency, CPU default (median, range)", "goal", "met"],
            summary,
        )
        print(table + "\n\n" + goals)
        write_json("serving_efficiency" + ("_quick" if args.quick else ""), figures)
        plot = plot_efficiency(figures, [a.lower().replace("-", "") for a in archs])
        print(f"plot: {plot}")
        if not args.no_record:
            append_results(
                "Serving efficiency: Triton (CPU target, python backend) vs in-process ONNX Runtime",
                table + "\n\n" + goals,
                f"Efficiency = Triton throughput / in-process throughput of the same work (decode, resize, "
                "normalise, encoder; or tokenise, encoder) at batch size = concurrency, same ONNX file, same "
                "onnxruntime thread count. One image or text per request. Server, load generator and the "
                "in-process reference share the machine's 2 cores. "
                f"{args.rounds} rounds of {args.seconds:g} s per level; each round's ratio is its Triton rate "
                "over its own in-process rate, the table gives the median ratio and the range. Settings: "
                "`bls` = the wrapper calls the encoder model through BLS (two python-backend hops), "
                "`inprocess` = the wrapper runs the encoder itself (one hop, the CPU default); the load "
                "generator sends pre-serialised requests over a plain gRPC channel except in the "
                f"tritonclient row. Plot: `benchmarks/results/{plot.name}`.",
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


GOALS = {1: 0.6, 16: 0.8}  # concurrency -> efficiency goal (the serving-efficiency issue)


def goals_rows(arch: str, name: str, figures: dict) -> list[list]:
    rows = []
    for kind in ("image", "text"):
        for c, goal in GOALS.items():
            key = f"{name}_{kind}_inprocess_on_c{c}"
            eff = figures[f"serving_efficiency_{key}"]
            low, high = figures[f"serving_efficiency_low_{key}"], figures[f"serving_efficiency_high_{key}"]
            rows.append(
                [
                    arch,
                    kind,
                    c,
                    f"{eff:.2f} ({low:.2f}-{high:.2f})",
                    f">= {goal}",
                    "yes" if eff >= goal else "no",
                ]
            )
    return rows


if __name__ == "__main__":
    main()
