"""Fixtures that start real things: a tiny CLIP export, tritonserver, the gateway over gRPC.

Everything is session-scoped and on free loopback ports, so one Triton and one gateway serve
most tests; tests that break a server (stop Triton, ...) start their own.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from gateway.tritonserver import TritonServer

REPO = Path(__file__).resolve().parent.parent


# `make test` runs two xdist workers, each taking whole modules in the order collected
# (--dist loadfile --no-loadscope-reorder). The modules that take minutes go first, longest
# first (summed --durations of a run under load), so the run does not end with one worker
# still on a long module while the other has nothing left.
LONG_MODULES = (
    "test_admin_jobs.py",
    "test_ingest.py",
    "test_finetune.py",
    "test_swap.py",
    "test_offline.py",
    "test_look.py",
    "test_demo_model.py",
    "test_install.py",
    "test_cache.py",
    "test_external_data.py",
    "test_live_and_faults.py",
    "test_hardening.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> Path:
    """A model repository holding version 1 of the tiny CLIP config (random weights)."""
    from export.clip import ExportRequest, export_clip

    repo = tmp_path_factory.mktemp("model_repository")
    export_clip(ExportRequest(arch="looksync-tiny", version=1, repository=repo))
    return repo


def start_triton(repo: Path, work: Path) -> TritonServer:
    server = TritonServer(repo, free_port(), free_port(), free_port(), work_dir=work)
    server.start(timeout_s=120, log_file=open(work.parent / f"triton-{server.grpc_port}.log", "a"))
    return server


@pytest.fixture(scope="session")
def triton(tiny_repo, tmp_path_factory):
    server = start_triton(tiny_repo, tmp_path_factory.mktemp("triton"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def catalog(tmp_path_factory) -> Path:
    from clients.sample_catalog import generate

    return generate(tmp_path_factory.mktemp("catalog"), n=200, seed=11)


def looksync_env(triton: TritonServer, data_dir: Path, **extra) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        LOOKSYNC_TRITON_URL=f"127.0.0.1:{triton.grpc_port}",
        LOOKSYNC_DATA_DIR=str(data_dir),
        LOOKSYNC_MODEL_REPOSITORY=str(triton.repository),
        LOOKSYNC_INDEX_REFRESH_S="0.2",
        # The tiny random-weight model puts all images within cosine ~0.99 of each other, so
        # only exact duplicates (same image bytes, cosine 1.0) may collapse in tests.
        LOOKSYNC_DEDUP_THRESHOLD="0.99999",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def llm_env(triton: TritonServer, data_dir: Path, llm, **extra) -> dict[str, str]:
    """A gateway's settings with a scripted LLM (tests/llm_stub.py) and no result cache, so
    that every request runs the pipeline."""
    return looksync_env(
        triton,
        data_dir,
        LOOKSYNC_LLM_BASE_URL=llm.base_url,
        LOOKSYNC_LLM_MODEL="stub-vision",
        LOOKSYNC_CACHE="off",
        **extra,
    )


def looksync(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clients.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def metric(port: int, name: str, **labels: str) -> float:
    """One sample from a process's Prometheus endpoint on loopback (0 when absent)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_for(condition, timeout_s: float = 60.0, what: str = "condition", interval_s: float = 0.1):
    """Poll until `condition()` is truthy and return its value; fail after a generous timeout.
    Tests order events with this, never with a fixed sleep."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


@dataclass
class Gateway:
    process: subprocess.Popen
    address: str
    metrics_port: int
    env: dict[str, str]
    log: Path

    def client(self, timeout_s: float = 10.0):
        from clients.client import LookSyncClient

        return LookSyncClient(self.address, timeout_s=timeout_s)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_gateway(env: dict[str, str], log: Path, wait_serving: bool = True, probe: bool = True) -> Gateway:
    port, metrics = free_port(), free_port()
    env = {
        **env,
        "LOOKSYNC_GRPC_PORT": str(port),
        "LOOKSYNC_METRICS_PORT": str(metrics),
        "LOOKSYNC_GRPC_HOST": "127.0.0.1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "clients.cli", "serve"],
        env=env,
        cwd=REPO,
        stdout=open(log, "a"),
        stderr=subprocess.STDOUT,
    )
    gw = Gateway(proc, f"127.0.0.1:{port}", metrics, env, log)
    deadline = time.monotonic() + 60
    if not probe:  # e.g. TLS: the caller checks readiness with its own credentials
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return gw
            time.sleep(0.2)
    with gw.client() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {log.read_text()[-2000:]}")
            try:
                status = client.health()
                if status == "SERVING" or (not wait_serving and status):
                    return gw
            except Exception:
                pass
            time.sleep(0.2)
    gw.stop()
    raise RuntimeError(f"gateway not serving after 60s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def indexed(triton, catalog, tmp_path_factory):
    """A data dir whose embedded index holds the sample catalog, indexed by `looksync index`."""
    data_dir = tmp_path_factory.mktemp("data")
    env = looksync_env(triton, data_dir)
    result = looksync("index", str(catalog), "--quiet", env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    return data_dir


@pytest.fixture(scope="session")
def gateway(triton, indexed, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "gateway.log"
    gw = start_gateway(looksync_env(triton, indexed), log)
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def client(gateway):
    with gateway.client() as c:
        yield c


@pytest.fixture(scope="session")
def products(catalog):
    import json

    from gateway.catalog import parse_record

    with open(catalog) as fh:
        return [parse_record(json.loads(line)) for line in fh]


def start_redis(port: int, workdir: Path, durable: bool = False):
    """A real redis-server on loopback; durable = append-only with fsync on every write (what
    production runs), so a crash keeps the stream. Returns (process, client)."""
    args = ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
    proc = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(workdir),
            *args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return proc, client
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    port = free_port()
    proc, client = start_redis(port, tmp_path_factory.mktemp("redis"))
    client.close()
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size and carries almost no data: a decompression bomb's first bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


# `/held/<file>` answers only once this is set: a test keeps image fetches in flight while it
# acts (kills Redis, ...) instead of hoping they are still running after a sleep.
HELD_IMAGES = threading.Event()
HELD_REQUESTS: list[str] = []  # paths of /held/ requests received, in order


def psd_bytes() -> bytes:
    """A valid Photoshop header ("8BPS", version 1, 3 channels, 10x10, depth 8, RGB)."""
    return (
        b"8BPS"
        + (1).to_bytes(2, "big")
        + bytes(6)
        + (3).to_bytes(2, "big")
        + (10).to_bytes(4, "big") * 2
        + (8).to_bytes(2, "big")
        + (3).to_bytes(2, "big")
        + bytes(64)
    )


def eps_bytes() -> bytes:
    """A minimal encapsulated PostScript header: Pillow's EPS plugin would hand it to Ghostscript."""
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


def _encoded(fmt: str, size=(256, 192)) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    noise = np.random.default_rng(4).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, fmt)
    return buf.getvalue()


# Whole transfers of images that are not acceptable: truncated data, formats outside
# JPEG/PNG/WebP/GIF (Photoshop, PostScript, TIFF, BMP).
ODD_IMAGES = {
    "/half.jpg": lambda: (lambda b: b[: len(b) // 2])(_encoded("JPEG")),
    "/half.png": lambda: (lambda b: b[: len(b) // 2])(_encoded("PNG")),
    "/half.webp": lambda: (lambda b: b[: len(b) // 2])(_encoded("WEBP")),
    "/photoshop.jpg": lambda: psd_bytes(),
    "/postscript.jpg": lambda: eps_bytes(),
    "/scan.jpg": lambda: _encoded("TIFF", (32, 32)),
    "/bitmap.jpg": lambda: _encoded("BMP", (32, 32)),
}


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/held/"):
            HELD_REQUESTS.append(self.path)
            HELD_IMAGES.wait(120)
            self.path = self.path[len("/held") :]
            super().do_GET()
        elif self.path.startswith("/redirect?to="):
            self.send_response(302)
            self.send_header("Location", urllib.parse.unquote(self.path[len("/redirect?to=") :]))
            self.end_headers()
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif self.path == "/trickle.jpg":  # one byte at a time, forever (until the client leaves)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(600):
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
        elif self.path == "/cut.jpg":  # promises 50 kB, sends 100 bytes, hangs up
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "50000")
            self.end_headers()
            self.wfile.write(b"\xff\xd8" + b"\x00" * 98)
            self.close_connection = True
        elif self.path == "/empty.jpg":
            self._send(b"", "image/jpeg")
        elif self.path == "/bomb.png":
            self._send(png_header(60_000, 60_000), "image/png")
        elif self.path == "/redirect-private":
            self.send_response(302)
            self.send_header("Location", "http://10.1.2.3/internal.jpg")
            self.end_headers()
        elif self.path == "/redirect-metadata":
            self.send_response(301)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
        elif self.path == "/huge.jpg":
            body = b"\xff" * (3 << 20)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/page.jpg":
            self._send(b"<html>hi</html>", "text/html")
        elif self.path == "/garbage.jpg":
            self._send(b"\x00\x01" * 500, "image/jpeg")
        elif self.path in ODD_IMAGES:  # served whole, labelled image/jpeg
            self._send(ODD_IMAGES[self.path](), "image/jpeg")
        else:
            super().do_GET()

    def _send(self, body, ctype):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def held_images():
    """The gate of `/held/` images, closed for this test and opened again after it."""
    HELD_IMAGES.clear()
    yield HELD_IMAGES
    HELD_IMAGES.set()


@pytest.fixture(scope="session")
def image_server(catalog):
    HELD_IMAGES.set()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(catalog.parent)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
