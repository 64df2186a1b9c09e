"""Ingestion throughput: events/s through the real worker for new products (fetch + embed +
index) and for metadata-only updates, with the tiny test model on the CPU Triton target.

    python -m benchmarks.ingest_throughput [--quick] [--products 1000]

Starts its own Triton, Redis, image server and worker on loopback ports; stops them after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis

from benchmarks.common import append_results, markdown_table, write_json
from clients.sample_catalog import generate
from gateway.ingest.events import STREAM
from gateway.tritonserver import TritonServer

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def drain_time(client, start: float, timeout_s: float = 900) -> float:
    while True:
        groups = client.xinfo_groups(STREAM) if client.exists(STREAM) else []
        if groups and groups[0]["lag"] == 0 and groups[0]["pending"] == 0:
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(groups)
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--updates", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="200 products, 1000 updates (< 1 min)")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.products, args.updates = 200, 1000
    work = Path(tempfile.mkdtemp(prefix="looksync-bench-ingest-"))
    procs = []
    try:
        print(f"[bench] exporting the tiny model and generating {args.products} products", flush=True)
        from export.clip import ExportRequest, export_clip

        export_clip(ExportRequest(arch="looksync-tiny", version=1, repository=work / "repo"))
        catalog = generate(work / "catalog", n=args.products, seed=3)
        triton = TritonServer(work / "repo", free_port(), free_port(), free_port(), work_dir=work / "triton")
        triton.start(log_file=open(work / "triton.log", "w"))
        rport = free_port()
        procs.append(
            subprocess.Popen(
                ["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
            )
        )
        time.sleep(0.3)
        http = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(catalog.parent)))
        threading.Thread(target=http.serve_forever, daemon=True).start()
        env = {
            **os.environ,
            "LOOKSYNC_TRITON_URL": f"127.0.0.1:{triton.grpc_port}",
            "LOOKSYNC_DATA_DIR": str(work / "data"),
            "LOOKSYNC_REDIS_URL": f"redis://127.0.0.1:{rport}/0",
            "LOOKSYNC_FETCH_ALLOW_LOOPBACK": "true",
            "LOOKSYNC_WORKER_METRICS_PORT": "0",
        }
        client = redis.Redis(port=rport)
        records = [json.loads(line) for line in catalog.read_text().splitlines()]
        worker = subprocess.Popen(
            [sys.executable, "-m", "clients.cli", "ingest-worker", "--log-level", "WARNING"],
            env=env,
            cwd=REPO,
            stdout=open(work / "worker.log", "w"),
            stderr=subprocess.STDOUT,
        )
        procs.append(worker)
        time.sleep(2.0)  # worker start-up (imports, group creation) is not ingestion time

        pipe = client.pipeline()
        for rec in records:
            rec["image_url"] = f"http://127.0.0.1:{http.server_port}/{rec['image_url']}"
            pipe.xadd(STREAM, {"event": json.dumps({"schema": 1, "type": "product.upsert", "product": rec})})
        start = time.monotonic()
        pipe.execute()
        new_s = drain_time(client, start)
        print(f"[bench] {len(records)} new products in {new_s:.1f}s", flush=True)

        rng = random.Random(0)
        pipe = client.pipeline()
        for i in range(args.updates):
            rec = rng.choice(records)
            pipe.xadd(
                STREAM,
                {
                    "event": json.dumps(
                        {
                            "schema": 1,
                            "type": "product.update",
                            "id": rec["id"],
                            "fields": {"price": round(rng.uniform(5, 500), 2), "in_stock": i % 3 != 0},
                        }
                    )
                },
            )
        start = time.monotonic()
        pipe.execute()
        upd_s = drain_time(client, start)
        print(f"[bench] {args.updates} metadata updates in {upd_s:.1f}s", flush=True)
        figures = {
            "new_products_per_s": round(len(records) / new_s, 1),
            "metadata_updates_per_s": round(args.updates / upd_s, 1),
            "new_products": len(records),
            "metadata_updates": args.updates,
        }
        write_json("ingest_throughput" + ("_quick" if args.quick else ""), figures)
        table = markdown_table(
            ["events", "count", "seconds", "events/s"],
            [
                [
                    "product.upsert (fetch over loopback HTTP, embed, index)",
                    len(records),
                    f"{new_s:.1f}",
                    figures["new_products_per_s"],
                ],
                [
                    "product.update (metadata only, no Triton call)",
                    args.updates,
                    f"{upd_s:.1f}",
                    figures["metadata_updates_per_s"],
                ],
            ],
        )
        print(table)
        if not args.no_record:
            append_results(
                "Ingestion throughput (tiny CLIP, CPU Triton, embedded index, one worker)",
                table,
                "Publishing happens in one Redis pipeline before timing starts; the clock stops when "
                "the consumer group has no lag and nothing pending (every event acknowledged after "
                "its durable index write).",
            )
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        triton.stop()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
