"""Ingestion throughput: events/s through the real worker for new products (fetch + embed +
index) and for metadata-only updates, with the tiny test model on the CPU Triton target,
for one and for several workers side by side in one run; and Redis memory per event in flight.

    python -m benchmarks.ingest_throughput [--quick] [--products 1000] [--workers 1,3]

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

from benchmarks.common import HERE, append_results, markdown_table, write_json
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


def wait_started(logs: list[Path], timeout_s: float = 120) -> None:
    """Worker start-up (imports, group creation, Triton probe) is not ingestion time."""
    deadline = time.monotonic() + timeout_s
    while not all(p.exists() and "ingest worker started" in p.read_text() for p in logs):
        if time.monotonic() > deadline:
            raise TimeoutError("the workers did not start")
        time.sleep(0.1)


def publish(client, events) -> None:
    pipe = client.pipeline(transaction=False)
    for event in events:
        pipe.xadd(STREAM, {"event": json.dumps(event)})
    pipe.execute()


def redis_bytes_per_event(client, events) -> float:
    """Memory of the stream per event held in it (published, not yet acknowledged)."""
    client.delete("memory-probe")
    pipe = client.pipeline(transaction=False)
    for event in events:
        pipe.xadd("memory-probe", {"event": json.dumps(event)})
    pipe.execute()
    used = client.memory_usage("memory-probe", samples=0)
    client.delete("memory-probe")
    return used / len(events)


def run_workers(n, env, work, client, upserts, updates) -> tuple[float, float]:
    client.flushdb()
    env = {**env, "LOOKSYNC_DATA_DIR": str(work / f"data-{n}")}
    logs = [work / f"worker-{n}-{i}.log" for i in range(n)]
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clients.cli",
                "ingest-worker",
                "--log-level",
                "INFO",
                "--consumer",
                f"w{i}",
            ],
            env=env,
            cwd=REPO,
            stdout=open(logs[i], "w"),
            stderr=subprocess.STDOUT,
        )
        for i in range(n)
    ]
    try:
        wait_started(logs)
        start = time.monotonic()
        publish(client, upserts)
        new_s = drain_time(client, start)
        start = time.monotonic()
        publish(client, updates)
        upd_s = drain_time(client, start)
        print(
            f"[bench] {n} worker(s): {len(upserts)} new products in {new_s:.1f}s, "
            f"{len(updates)} updates in {upd_s:.1f}s",
            flush=True,
        )
        return new_s, upd_s
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    counts = [r["workers"] for r in rows]
    width = 0.38
    xs = range(len(rows))
    ax.bar([x - width / 2 for x in xs], [r["new_products_per_s"] for r in rows], width, label="new products")
    ax.bar(
        [x + width / 2 for x in xs],
        [r["metadata_updates_per_s"] for r in rows],
        width,
        label="metadata updates",
    )
    ax.set_xticks(list(xs), [f"{c} worker{'s' if c > 1 else ''}" for c in counts])
    ax.set_ylabel("events/s")
    ax.set_title("Ingestion throughput (tiny CLIP, CPU Triton, embedded index)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--updates", type=int, default=5000)
    parser.add_argument("--workers", default="1,3", help="worker counts to compare in one run")
    parser.add_argument("--quick", action="store_true", help="200 products, 1000 updates (< 1 min)")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.products, args.updates = 200, 1000
    counts = [int(c) for c in args.workers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="looksync-bench-ingest-"))
    procs = []
    try:
        print(f"[bench] exporting the tiny model and generating {args.products} products", flush=True)
        from export.clip import ExportRequest, export_clip

        export_clip(ExportRequest(arch="looksync-tiny", version=1, repository=work / "repo"))
        catalog = generate(work / "catalog", n=args.products, seed=3)
        triton = TritonServer(work / "repo", free_port(), free_port(), free_port(), work_dir=work / "triton")
        triton.start(log_file=open(work / "triton.log", "w"))
        procs.append(triton.process)
        rport = free_port()
        procs.append(
            subprocess.Popen(
                ["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
            )
        )
        client = redis.Redis(port=rport, retry_on_timeout=True)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        http = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(catalog.parent)))
        threading.Thread(target=http.serve_forever, daemon=True).start()
        env = {
            **os.environ,
            "LOOKSYNC_TRITON_URL": f"127.0.0.1:{triton.grpc_port}",
            "LOOKSYNC_REDIS_URL": f"redis://127.0.0.1:{rport}/0",
            "LOOKSYNC_FETCH_ALLOW_LOOPBACK": "true",
            "LOOKSYNC_WORKER_METRICS_PORT": "0",
        }
        records = [json.loads(line) for line in catalog.read_text().splitlines()]
        for rec in records:
            rec["image_url"] = f"http://127.0.0.1:{http.server_port}/{rec['image_url']}"
        upserts = [{"schema": 1, "type": "product.upsert", "product": rec} for rec in records]
        rng = random.Random(0)
        updates = []
        for i in range(args.updates):
            rec = rng.choice(records)
            fields = {"price": round(rng.uniform(5, 500), 2), "in_stock": i % 3 != 0}
            updates.append({"schema": 1, "type": "product.update", "id": rec["id"], "fields": fields})
        per_event = {
            "product.upsert": redis_bytes_per_event(client, upserts),
            "product.update": redis_bytes_per_event(client, updates),
        }
        rows = []
        for n in counts:
            new_s, upd_s = run_workers(n, env, work, client, upserts, updates)
            rows.append(
                {
                    "workers": n,
                    "new_products_per_s": round(len(upserts) / new_s, 1),
                    "metadata_updates_per_s": round(len(updates) / upd_s, 1),
                    "new_s": round(new_s, 2),
                    "updates_s": round(upd_s, 2),
                }
            )
        base = rows[0]
        figures = {
            "rows": rows,
            "new_products": len(upserts),
            "metadata_updates": len(updates),
            "redis_bytes_per_event_in_flight": {k: round(v, 1) for k, v in per_event.items()},
        }
        name = "ingest_throughput" + ("_quick" if args.quick else "")
        write_json(name, figures)
        plot_path = HERE / "results" / f"{name}.png"
        plot(rows, plot_path)
        table = markdown_table(
            [
                "workers",
                "new products/s (fetch, embed, index)",
                "vs 1 worker",
                "metadata updates/s",
                "vs 1 worker",
            ],
            [
                [
                    r["workers"],
                    r["new_products_per_s"],
                    f"{r['new_products_per_s'] / base['new_products_per_s']:.2f}",
                    r["metadata_updates_per_s"],
                    f"{r['metadata_updates_per_s'] / base['metadata_updates_per_s']:.2f}",
                ]
                for r in rows
            ],
        )
        memory = ", ".join(
            f"{kind} {b:.0f} B ({b * 1e6 / 2**20:.0f} MiB per million in flight)"
            for kind, b in per_event.items()
        )
        print(table)
        print(f"[bench] Redis memory per event held in the stream: {memory}")
        if not args.no_record:
            append_results(
                "Ingestion throughput by number of workers (tiny CLIP, CPU Triton, embedded index)",
                table + f"\n\n![ingestion throughput](results/{plot_path.name})",
                f"{len(upserts)} new products, then {len(updates)} metadata updates, each published in one "
                "Redis pipeline after the workers are reading; the clock stops when the consumer group "
                "has no lag and nothing pending (every event acknowledged after its durable index "
                "write). Workers, Triton and Redis share the machine's cores. Redis memory per event "
                f"held in the stream (MEMORY USAGE): {memory}.",
            )
        triton.stop()
    except BaseException:
        print(f"[bench] failed; logs kept in {work}", flush=True)
        raise
    else:
        shutil.rmtree(work, ignore_errors=True)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


if __name__ == "__main__":
    main()
