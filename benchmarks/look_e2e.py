"""Look search end to end at a fixed rate, and text search's gateway overhead.

    python -m benchmarks.look_e2e [--quick] [--rate 2] [--llm-latency-ms 400]

Starts Triton (tiny CLIP and the garment detector), indexes the sample catalog, then for each
setting starts a gateway and drives it open-loop (fixed schedule) with distinct looks composed
from catalog garments:
  - no LLM (fallback query generation and embedding rerank), body zones
  - no LLM, the garment detector (what the detector costs per look)
  - a scripted OpenAI-compatible LLM answering after a fixed latency (tests/llm_stub.py)
and SearchText at a fixed rate for the gateway overhead (end to end minus the stages, per
response), next to the floor gRPC itself sets on this machine: a health check (grpcio's own
servicer, no LookSync code) on the same gateway at the same rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import append_results, markdown_table, write_json
from clients.loadtest import LatencyHistogram, LoadConfig, run_load
from clients.looks import compose_look
from clients.sample_catalog import generate
from tests.conftest import free_port, start_gateway
from tests.llm_stub import Reply, ScriptedLLM, candidate_ids

REPO = Path(__file__).resolve().parent.parent
ZONES = {
    "upper": ("t-shirt", "shirt", "sweater", "jacket"),
    "lower": ("trousers", "jeans", "skirt", "shorts"),
    "feet": ("sneakers", "boots"),
}


def looks_from(catalog: Path, n: int) -> list[bytes]:
    records = [json.loads(line) for line in catalog.read_text().splitlines()]
    rng = random.Random(0)
    out = []
    for _ in range(n):
        garments = {
            z: catalog.parent / rng.choice([r for r in records if r["category"] in cats])["image_url"]
            for z, cats in ZONES.items()
        }
        out.append(compose_look(garments))
    return out


def llm_script(latency_s: float):
    answer = {
        "garments": [
            {
                "layer": "topwear",
                "category": "t-shirt",
                "gender": "unisex",
                "query": "navy striped cotton t-shirt",
            },
            {
                "layer": "bottomwear",
                "category": "jeans",
                "gender": "unisex",
                "query": "straight blue denim jeans",
            },
            {
                "layer": "footwear",
                "category": "sneakers",
                "gender": "unisex",
                "query": "white leather sneakers",
            },
        ]
    }

    def script(kind, body):
        if kind == "QueryAnswer":
            return Reply(answer, delay_s=latency_s)
        return Reply({"ranking": list(reversed(candidate_ids(body)))}, delay_s=latency_s)

    return script


def measure(address: str, rate: float, duration: float, **payloads) -> dict:
    config = LoadConfig(
        address=address,
        rate=rate,
        schedule="fixed",
        duration_s=duration,
        warmup_s=2.0,
        timeout_s=5.0,
        server_timings=True,
        **payloads,
    )
    return asyncio.run(run_load(config)).to_dict()


async def grpc_floor(address: str, rate: float, duration: float) -> dict:
    """Round trip of a gRPC health check on the gateway at a fixed rate: what any unary call costs
    here (client and server gRPC, loopback, event loops) before the gateway's code runs."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="")
        for _ in range(20):  # warm the channel
            await stub.Check(request, timeout=5.0)
        loop = asyncio.get_running_loop()
        # The load tester's histogram: the same percentiles as the overhead it is compared with.
        start, times = loop.time(), LatencyHistogram()
        for i in range(int(rate * duration)):
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))  # the fixed schedule
            sent = time.perf_counter()
            await stub.Check(request, timeout=5.0)
            times.record(time.perf_counter() - sent)
    p50, p99 = times.percentiles((50, 99))
    return {"p50": p50 * 1e3, "p99": p99 * 1e3, "n": times.count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=2.0, help="looks per second")
    parser.add_argument("--text-rate", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--llm-latency-ms", type=float, default=400.0)
    parser.add_argument("--quick", action="store_true", help="10 s per setting")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--text-only", action="store_true", help="only SearchText and the gRPC floor")
    args = parser.parse_args()
    duration = 10.0 if args.quick else args.duration
    work = Path(tempfile.mkdtemp(prefix="looksync-bench-look-"))
    from export.clip import ExportRequest, export_clip
    from gateway.tritonserver import TritonServer

    stub = ScriptedLLM(script=llm_script(args.llm_latency_ms / 1000)).start()
    triton = None
    try:
        export_clip(ExportRequest(arch="looksync-tiny", version=1, repository=work / "repo"))
        from export.detector import DetectorExport, export_detector

        export_detector(DetectorExport(repository=work / "repo"))
        catalog = generate(work / "catalog", n=300, seed=7)
        triton = TritonServer(work / "repo", free_port(), free_port(), free_port(), work_dir=work / "triton")
        triton.start(log_file=open(work / "triton.log", "w"))
        env = {
            "LOOKSYNC_TRITON_URL": f"127.0.0.1:{triton.grpc_port}",
            "LOOKSYNC_DATA_DIR": str(work / "data"),
            "LOOKSYNC_DEDUP_THRESHOLD": "0.9999",
            "LOOKSYNC_CACHE": "off",
            "LOOKSYNC_REQUEST_TIMEOUT_S": "5",
        }
        import os

        env = {**os.environ, **env}
        subprocess.run(
            [sys.executable, "-m", "clients.cli", "index", str(catalog), "--quiet"],
            env=env,
            cwd=REPO,
            check=True,
        )
        looks = looks_from(catalog, int(args.rate * (duration + 3)) + 5)  # distinct: no cache hits
        texts = [json.loads(line)["title"] for line in catalog.read_text().splitlines()]
        rows, figures = [], {}
        settings = [
            ("fallback", "no LLM (fallbacks), body zones", {"LOOKSYNC_LOCALIZER": "zones"}),
            ("detector", "no LLM (fallbacks), garment detector", {}),
            (
                "llm",
                f"LLM stub, {args.llm_latency_ms:.0f} ms per call",
                {"LOOKSYNC_LLM_BASE_URL": stub.base_url, "LOOKSYNC_LLM_MODEL": "stub"},
            ),
        ]
        for key, label, extra in [] if args.text_only else settings:
            gw = start_gateway({**env, **extra}, work / "gateway.log")
            try:
                report = measure(gw.address, args.rate, duration, looks=looks, mix={"look": 1.0})
            finally:
                gw.stop()
            look = report["rpcs"]["SearchLook"]
            stages = look["server_timings"]["stages_mean_ms"] if look["server_timings"] else {}
            rows.append(
                [
                    label,
                    f"{args.rate:g}/s",
                    look["ok"],
                    sum(look["errors"].values()),
                    f"{look['latency_ms']['p50']:.0f}",
                    f"{look['latency_ms']['p99']:.0f}",
                    ", ".join(f"{k} {v:.0f}" for k, v in stages.items()),
                ]
            )
            figures[f"look_{key}_p50_ms"] = round(look["latency_ms"]["p50"], 1)
            figures[f"look_{key}_p99_ms"] = round(look["latency_ms"]["p99"], 1)
            print(
                f"[bench] {label}: p50 {look['latency_ms']['p50']:.0f} ms, p99 {look['latency_ms']['p99']:.0f} ms",
                flush=True,
            )
        gw = start_gateway(env, work / "gateway.log")
        try:
            text = measure(gw.address, args.text_rate, duration, texts=texts, mix={"text": 1.0})
            floor = asyncio.run(grpc_floor(gw.address, args.text_rate, duration))
        finally:
            gw.stop()
        st = text["rpcs"]["SearchText"]["server_timings"]
        overhead = st["gateway_overhead_ms"]["p50"]
        figures["text_gateway_overhead_p50_ms"] = round(overhead, 2)
        figures["text_gateway_overhead_mean_ms"] = round(st["gateway_overhead_mean_ms"], 2)
        figures["grpc_floor_p50_ms"] = round(floor["p50"], 2)
        figures["text_p50_ms"] = round(text["latency_ms"]["p50"], 1)
        rows.append(
            [
                f"SearchText (overhead p50 {overhead:.1f} ms = end to end − stages, per response; "
                f"mean {st['gateway_overhead_mean_ms']:.1f})",
                f"{args.text_rate:g}/s",
                text["ok"],
                sum(text["errors"].values()),
                f"{text['latency_ms']['p50']:.0f}",
                f"{text['latency_ms']['p99']:.0f}",
                ", ".join(f"{k} {v:.1f}" for k, v in st["stages_mean_ms"].items()),
            ]
        )
        rows.append(
            [
                "gRPC floor: health check on the same gateway (no LookSync code)",
                f"{args.text_rate:g}/s",
                floor["n"],
                0,
                f"{floor['p50']:.1f}",
                f"{floor['p99']:.1f}",
                "-",
            ]
        )
        table = markdown_table(
            ["setting", "rate", "ok", "errors", "p50 ms", "p99 ms", "mean ms per stage"], rows
        )
        print(table)
        write_json(
            "look_e2e" + ("_text" if args.text_only else "") + ("_quick" if args.quick else ""), figures
        )
        if not args.no_record:
            append_results(
                "Look search end to end at a fixed rate (tiny CLIP, CPU Triton, embedded index)",
                table,
                "Open loop on a fixed schedule; latency from the scheduled send time. Every look is distinct "
                "(the result cache is off). The LLM stub answers query generation and each layer's rerank after "
                "the stated delay (reranks run concurrently); its regions come from the garment detector. The "
                "detector row against the body-zones row is what finding garments costs per look (the "
                "`queries` stage: letterbox, one detector call, cut-outs). Gateway overhead = client-measured "
                "time minus the stages the gateway reports (gRPC, serialisation, servicer glue), per response; "
                "the health-check row is what gRPC alone costs on this machine, the part of it no gateway "
                "code can remove.",
            )
    finally:
        stub.stop()
        if triton is not None:
            triton.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
