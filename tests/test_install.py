"""A gateway-only install: the serving core and the `lancedb` extra, nothing else.

A fresh virtual environment gets the project as a deployment installs it (`pip install -c
constraints.txt ".[lancedb]"` from a copy of the sources, as deploy/Dockerfile does) and runs
`looksync serve` from outside the checkout, so the installed package is what runs. The gateway
serves text, image and look searches (no LLM configured: the look fallback) against the tests'
Triton and an index built by `looksync index`; torch, elasticsearch, openai and the other
extras' packages are neither installed nor imported (`PYTHONPROFILEIMPORTTIME` logs every
import the serving process makes).

Cold (nothing cached), the venv takes about 20 s on the 2-core development machine and 533 MB,
so it is built anew on every run and removed afterwards, never cached: what it tests is a fresh
install.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from tests.conftest import REPO, free_port, looksync_env

pytestmark = pytest.mark.slow

EXTRAS = "lancedb"
# Top-level modules of other extras (and of export) that a gateway-only install must not have.
ABSENT = (
    "torch",
    "torchvision",
    "open_clip",
    "transformers",
    "onnx",
    "onnxruntime",
    "elasticsearch",
    "elastic_transport",
    "aiohttp",
    "openai",
    "httpx2",
    "matplotlib",
    "regex",
    "ftfy",
)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def gateway_venv(tmp_path_factory):
    """A venv holding looksync[lancedb] at constraints.txt's versions, built from a copy of the
    sources (what deploy/Dockerfile copies), so pip writes no build output into the checkout."""
    root = tmp_path_factory.mktemp("gateway-only")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("gateway", "clients", "export"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = root / "venv"
    started = time.monotonic()
    _run([sys.executable, "-m", "venv", str(venv)])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-c",
            str(REPO / "constraints.txt"),
            f"{src}[{EXTRAS}]",
        ],
        cwd=root,
        env=env,
        timeout=900,
    )
    print(f"gateway-only venv built in {time.monotonic() - started:.0f} s")
    yield venv
    shutil.rmtree(root, ignore_errors=True)


def test_gateway_only_install_has_no_other_extras(gateway_venv):
    probe = (
        "import importlib.util, json, sys; "
        f"print(json.dumps([m for m in {ABSENT!r} if importlib.util.find_spec(m)]))"
    )
    out = _run([str(gateway_venv / "bin" / "python"), "-c", probe], cwd=gateway_venv).stdout
    assert out.strip() == "[]", f"installed in a core + {EXTRAS} venv: {out.strip()}"
    # What runs there is the installed package, not the checkout.
    where = _run(
        [str(gateway_venv / "bin" / "python"), "-c", "import gateway; print(gateway.__file__)"],
        cwd=gateway_venv,
    ).stdout
    assert Path(where.strip()).is_relative_to(gateway_venv), where
    # The project's pins hold there too: every installed distribution is at constraints.txt's version.
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement and '< "3.11"' not in requirement:
            name, _, version = requirement.split(";")[0].strip().partition("==")
            pins[canonicalize_name(name)] = version
    freeze = _run([str(gateway_venv / "bin" / "python"), "-m", "pip", "freeze"], cwd=gateway_venv).stdout
    off = {}
    for line in freeze.splitlines():
        name, sep, version = line.partition("==")
        name = canonicalize_name(name)
        if sep and name != "looksync" and pins.get(name) != version:
            off[name] = (version, pins.get(name))
    assert not off, f"installed vs constraints.txt: {off}"


def _start_gateway(venv: Path, env: dict[str, str], log: Path, cwd: Path):
    """`looksync serve` of the venv, from outside the checkout; returns (process, address)."""
    from clients.client import LookSyncClient

    port = free_port()
    env = {
        **env,
        "LOOKSYNC_GRPC_HOST": "127.0.0.1",
        "LOOKSYNC_GRPC_PORT": str(port),
        "LOOKSYNC_METRICS_PORT": str(free_port()),
    }
    proc = subprocess.Popen(
        [str(venv / "bin" / "looksync"), "serve"],
        env=env,
        cwd=cwd,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    with LookSyncClient(address) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"the gateway-only install exited: {log.read_text()[-3000:]}")
            try:
                if client.health() == "SERVING":
                    return proc, address
            except Exception:
                pass
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the gateway-only install is not serving after 60 s: {log.read_text()[-3000:]}")


def test_gateway_only_install_serves(gateway_venv, triton, indexed, catalog, products, tmp_path):
    from clients.client import LookSyncClient

    env = looksync_env(triton, indexed, PYTHONPROFILEIMPORTTIME="1")
    for name in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(name, None)
    log = tmp_path / "gateway.log"
    proc, address = _start_gateway(gateway_venv, env, log, cwd=tmp_path)
    try:
        with LookSyncClient(address, timeout_s=30) as client:
            product = products[0]
            image = (catalog.parent / product.image_url).read_bytes()
            assert client.search_text("red dress", k=3).hits
            assert client.search_image(image, k=3).hits[0].product.id == product.id
            look = client.search_look(image, k_per_layer=2)
            assert look.layers and {layer.query_source for layer in look.layers} == {"fallback"}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = log.read_text()
    # -X importtime lines: "import time: <self us> | <cumulative us> | <indent><module>"
    modules = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*([A-Za-z0-9_.]+)\s*$", text, re.M)
    imported = {m.split(".")[0] for m in modules}
    assert {"gateway.server", "gateway.index.embedded", "gateway.look.pipeline"} <= set(modules), (
        "the import log lacks the gateway's own modules"
    )
    assert {"lancedb", "grpc", "tritonclient"} <= imported
    assert not imported & set(ABSENT), f"the gateway imported {sorted(imported & set(ABSENT))}"
