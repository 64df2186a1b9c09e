"""`looksync loadtest` (clients/loadtest.py): against the real gateway, and a stub server for timing."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from clients.cli import main as cli_main
from clients.loadtest import LatencyHistogram, LoadConfig, parse_mix, read_images, run_load
from gateway.api import looksync_pb2 as pb
from gateway.api import looksync_pb2_grpc as pb_grpc
from tests.conftest import REPO, free_port

QUERIES = ["red summer dress", "black leather jacket", "white sneakers", "blue jeans", "wool coat"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, catalog, products):
    """A queries file and an images folder holding a few catalog images."""
    root = tmp_path_factory.mktemp("loadtest-inputs")
    queries = root / "queries.txt"
    queries.write_text("\n".join(QUERIES) + "\n\n")
    images = root / "images"
    images.mkdir()
    for product in products[:: len(products) // 5][:5]:
        shutil.copy(catalog.parent / product.image_url, images / f"{product.id}.jpg")
    return queries, images


def _assert_sane(summary: dict) -> None:
    keys = ["min", "p50", "p90", "p95", "p99", "max"]
    values = [summary[k] for k in keys]
    assert all(v is not None and v > 0 for v in values), summary
    assert values == sorted(values), summary


# ------------------------------------------------------------------------------ histogram


@pytest.mark.parametrize("dist", ["lognormal", "uniform", "exponential", "bimodal"])
def test_histogram_percentiles_are_within_1_percent(dist):
    rng = np.random.default_rng(3)
    data = {
        "lognormal": lambda: rng.lognormal(np.log(0.01), 1.0, 100_000),
        "uniform": lambda: rng.uniform(1e-4, 2.0, 100_000),
        "exponential": lambda: rng.exponential(0.005, 100_000),
        "bimodal": lambda: np.concatenate(
            [rng.normal(0.004, 0.0005, 88_000), rng.normal(0.250, 0.02, 12_000)]
        ),
    }[dist]()
    data = np.abs(data)
    hist = LatencyHistogram()
    hist.record_many(data)
    ps = [1, 10, 25, 50, 75, 90, 95, 99, 99.9]
    got = np.array(hist.percentiles(ps))
    for method in ("linear", "inverted_cdf", "nearest"):
        reference = np.percentile(data, ps, method=method)
        assert np.abs(got / reference - 1).max() <= 0.01, (method, got, reference)
    assert hist.count == data.size and hist.max_s == data.max() and hist.min_s == data.min()
    assert hist.percentile(100) == data.max()
    assert hist.mean_s == pytest.approx(data.mean())

    # One value at a time, and in two halves merged, give the same buckets.
    one_by_one = LatencyHistogram()
    for v in data[:5000].tolist():
        one_by_one.record(v)
    vectorised = LatencyHistogram()
    vectorised.record_many(data[:5000])
    assert one_by_one.counts == vectorised.counts
    left, right = LatencyHistogram(), LatencyHistogram()
    left.record_many(data[: data.size // 2])
    right.record_many(data[data.size // 2 :])
    merged = left.merge(right)
    assert merged.counts == hist.counts and merged.count == hist.count
    assert merged.percentiles(ps) == hist.percentiles(ps)
    # It survives JSON.
    again = LatencyHistogram.from_dict(json.loads(json.dumps(hist.to_dict())))
    assert again.percentiles(ps) == hist.percentiles(ps)


def test_empty_histogram_and_config_errors():
    empty = LatencyHistogram()
    assert all(math.isnan(v) for v in empty.percentiles([50, 99]))
    assert empty.summary_ms()["p99"] is None
    assert parse_mix("text=0.6, image=0.3,look=0.1") == {"text": 0.6, "image": 0.3, "look": 0.1}
    for bad in ("video=1", "text", "text=lots"):
        with pytest.raises(ValueError):
            parse_mix(bad)
    with pytest.raises(ValueError, match="no image payloads"):
        LoadConfig(texts=["a"], mix={"text": 1, "image": 1}).validate()
    with pytest.raises(ValueError, match="nothing to send"):
        LoadConfig().validate()
    with pytest.raises(ValueError, match="concurrency"):
        LoadConfig(texts=["a"], concurrency=1, processes=2).validate()


# ------------------------------------------------------------------------------ real gateway


def test_closed_loop_mix_against_the_gateway(gateway, inputs):
    queries, images = inputs
    cfg = LoadConfig(
        address=gateway.address,
        concurrency=4,
        requests=40,
        texts=QUERIES,
        images=read_images(images),
        mix=parse_mix("text=0.6,image=0.4"),
        k=5,
        server_timings=True,
        timeout_s=10.0,
    )
    report = asyncio.run(run_load(cfg))
    data = report.to_dict()
    assert (data["sent"], data["ok"], data["errors"]) == (40, 40, {})
    assert data["throughput_rps"] > 0 and data["elapsed_s"] > 0
    _assert_sane(data["latency_ms"])
    assert data["latency_ms"]["count"] == 40
    rpcs = data["rpcs"]
    # The mix is interleaved exactly (smooth weighted round robin).
    assert abs(rpcs["SearchText"]["sent"] - 24) <= 1 and abs(rpcs["SearchImage"]["sent"] - 16) <= 1
    for rpc, stages in (
        ("SearchText", {"embed_text", "retrieve"}),
        ("SearchImage", {"validate_image", "embed"}),
    ):
        _assert_sane(rpcs[rpc]["latency_ms"])
        timings = rpcs[rpc]["server_timings"]
        assert timings["responses"] == rpcs[rpc]["ok"]
        assert stages <= set(timings["stages_mean_ms"])
        total = sum(timings["stages_mean_ms"].values())
        assert timings["stages_total_mean_ms"] == pytest.approx(total)
        assert 0 < total < timings["end_to_end_mean_ms"]
        assert timings["gateway_overhead_mean_ms"] > 0
        # Each response's overhead is its own end to end minus its own stages: spread around the mean.
        spread = timings["gateway_overhead_ms"]
        assert 0 < spread["p50"] <= spread["p90"] <= spread["p99"] < timings["end_to_end_mean_ms"] * 10
    workers = data["generator"]["workers"]
    assert len(workers) == 1 and 0 < workers[0]["cpu_share"] <= 1.5
    assert sum(w["ok"] for w in data["timeline"]) == 40
    text = report.format_table()
    assert "SearchText" in text and "SearchImage" in text and "gateway overhead" in text


def test_open_loop_holds_the_target_rate(gateway, inputs):
    # A rate a busy 2-core machine serves with room to spare: this checks the generator, not
    # the server's speed (benchmarks/ does that).
    cfg = LoadConfig(
        address=gateway.address,
        rate=10.0,
        schedule="fixed",
        duration_s=3.0,
        texts=QUERIES,
        images=read_images(inputs[1]),
        k=5,
        timeout_s=30.0,
    )
    report = asyncio.run(run_load(cfg))
    # Send i is due at start + i / rate: exactly rate x duration sends fall in the window.
    assert report.sent == 30 and report.ok == report.sent, report.errors
    worker = report.to_dict()["generator"]["workers"][0]
    assert worker["mean_send_lag_ms"] < 250, worker  # sends kept to their schedule
    # Answers may trail the last send, never outpace the schedule.
    assert 5.0 < report.throughput <= 30 / 2.9 + 0.01  # 30 answers span at least 29 gaps
    _assert_sane(report.latency.summary_ms())
    # From the scheduled send time, never less than from the actual one.
    for p in (50, 90, 99):
        assert report.latency.percentile(p) >= report.service.percentile(p)


def test_bad_images_are_counted_by_status_code(gateway, inputs, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(inputs[1], images)
    (images / "empty.jpg").write_bytes(b"")
    (images / "not-an-image.png").write_bytes(b"<html>hello</html>")
    cfg = LoadConfig(address=gateway.address, concurrency=3, requests=30, images=read_images(images), k=5)
    report = asyncio.run(run_load(cfg))
    assert report.sent == 30
    assert set(report.errors) == {"INVALID_ARGUMENT"}
    assert 0 < report.errors["INVALID_ARGUMENT"] < 30
    assert report.ok + report.errors["INVALID_ARGUMENT"] == 30
    assert report.rpcs["SearchImage"].errors == report.errors
    assert report.latency.count == report.ok  # only OK calls go into the latency histogram
    assert "INVALID_ARGUMENT" in report.format_table()


def test_cli_with_two_processes_writes_json_and_plot(gateway, inputs, tmp_path, capsys):
    queries, images = inputs
    out, plot = tmp_path / "results.json", tmp_path / "latency.png"
    code = cli_main(
        [
            "loadtest",
            "--gateway",
            gateway.address,
            "--text-queries",
            str(queries),
            "--images",
            str(images),
            "--mix",
            "text=1,image=1",
            "--requests",
            "20",
            "--concurrency",
            "2",
            "--processes",
            "2",
            "-k",
            "3",
            "--category",
            "dress",
            "--server-timings",
            "--out",
            str(out),
            "--plot",
            str(plot),
        ]
    )
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "SearchText" in stdout and "generator CPU" in stdout
    data = json.loads(out.read_text())
    assert (data["sent"], data["ok"]) == (20, 20)
    assert data["rpcs"]["SearchText"]["sent"] == 10 and data["rpcs"]["SearchImage"]["sent"] == 10
    assert data["config"]["filters"]["categories"] == ["dress"]
    assert len(data["generator"]["workers"]) == 2
    assert all(0 < w["cpu_share"] <= 1.5 for w in data["generator"]["workers"])
    _assert_sane(data["latency_ms"])
    merged = LatencyHistogram()
    for h in data["histograms"].values():
        merged.merge(LatencyHistogram.from_dict(h))
    assert merged.count == 20
    with Image.open(plot) as img:
        assert img.format == "PNG" and img.size[0] >= 800


# ------------------------------------------------------------------------------ stub server


class _SlowText(pb_grpc.LookSearchServicer):
    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    async def SearchText(self, request, context):
        await asyncio.sleep(self.delay_s)
        return pb.SearchResponse(request_id="stub")


async def _with_stub(delay_s: float, cfg: LoadConfig):
    server = grpc.aio.server()
    pb_grpc.add_LookSearchServicer_to_server(_SlowText(delay_s), server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    try:
        cfg.address = f"127.0.0.1:{port}"
        return await run_load(cfg)
    finally:
        await server.stop(0)


def test_open_loop_charges_queueing_to_the_schedule():
    # Capacity 50/s (20 ms, one at a time), offered 100/s: a closed-loop or naive generator
    # would report ~20 ms; measured from the schedule, latency grows with the backlog.
    cfg = LoadConfig(rate=100.0, schedule="fixed", duration_s=0.5, max_inflight=1, texts=["x"], timeout_s=5)
    report = asyncio.run(_with_stub(0.02, cfg))
    assert report.ok == 50
    assert report.service.percentile(50) < 0.1
    assert report.latency.percentile(50) > 0.15
    # One server at 20 ms a request finishes the 49th request no earlier than 0.98 s after the
    # start, 0.48 s after its slot: a lower bound that a stall on a busy machine only raises
    # (a ratio to the service p99 did not hold: one 0.63 s stall made the service p99 the stall).
    assert report.latency.percentile(99) > 0.45
    assert report.throughput < 70
    assert report.to_dict()["generator"]["workers"][0]["max_send_lag_ms"] > 100


def test_requests_never_sent_by_the_hard_stop_count_as_unsent():
    # 15 requests scheduled over 0.3 s, one at a time, each cut at its 0.1 s deadline: most
    # are still waiting to be sent at the hard stop (0.3 + 0.1 + 0.1 s).
    cfg = LoadConfig(
        rate=50.0, schedule="fixed", duration_s=0.3, max_inflight=1, texts=["x"], timeout_s=0.1, grace_s=0.1
    )
    t0 = time.monotonic()
    report = asyncio.run(_with_stub(5.0, cfg))
    assert time.monotonic() - t0 < 2
    assert report.errors["UNSENT"] >= 5 and report.ok == 0
    assert report.sent + report.errors["UNSENT"] == 15
    assert "never sent" in report.format_table()


def test_deadlines_and_time_bounds_stop_the_run():
    cfg = LoadConfig(concurrency=2, requests=4, texts=["x"], timeout_s=0.2)
    t0 = time.monotonic()
    report = asyncio.run(_with_stub(5.0, cfg))
    assert time.monotonic() - t0 < 3
    assert report.errors == {"DEADLINE_EXCEEDED": 4} and report.ok == 0
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert data["latency_ms"]["p50"] is None and data["throughput_rps"] == 0
    assert "DEADLINE_EXCEEDED 4" in report.format_table()

    # A count far beyond what fits in the duration: the duration ends it.
    cfg = LoadConfig(concurrency=4, requests=10**9, duration_s=0.5, texts=["x"], timeout_s=1)
    t0 = time.monotonic()
    report = asyncio.run(_with_stub(0.005, cfg))
    assert time.monotonic() - t0 < 3
    assert report.ok > 20 and not report.errors


def test_the_cli_prints_a_line_per_interval_while_it_runs(gateway, inputs):
    queries, _ = inputs
    run = subprocess.run(
        [sys.executable, "-m", "clients.cli", "loadtest", "--gateway", gateway.address,
         "--text-queries", str(queries), "--mix", "text=1", "--concurrency", "1",
         "--duration", "2.5", "--window", "1", "-k", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("[loadtest p0")]
    assert len(lines) >= 2, run.stderr  # one per finished second, before the final table
    assert all("ok/s" in line and "p99" in line and "errors 0" in line for line in lines)


# ------------------------------------------------------------------------------ TLS and --space


def test_space_and_connection_options_are_parsed(monkeypatch, tmp_path, capsys):
    from clients.loadtest import parse_space

    assert parse_space(None) is None and parse_space("clip:0") == ("clip", 0)
    for bad in ("clip", "clip:", ":1", "clip:v2"):
        with pytest.raises(ValueError, match="MODEL:VERSION"):
            parse_space(bad)
    # Local errors are one line and exit 2, before any connection.
    assert cli_main(["loadtest", "--gateway", "127.0.0.1:1", "--space", "clip"]) == 2
    assert capsys.readouterr().err.startswith("error: --space 'clip'")
    missing = tmp_path / "no-ca.pem"
    assert cli_main(["loadtest", "--gateway", "127.0.0.1:1", "--ca-file", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_space_pins_every_request(gateway, inputs):
    queries, images = inputs
    cfg = LoadConfig(
        address=gateway.address,
        texts=QUERIES,
        images=read_images(images),
        requests=8,
        concurrency=2,
        k=3,
        space=("clip", 1),
    )
    report = asyncio.run(run_load(cfg))
    assert report.ok == 8 and not report.errors, report.errors
    assert report.to_dict()["config"]["space"] == "clip:1"
    # A space the gateway does not serve: every request refused, none answered from another.
    cfg = LoadConfig(address=gateway.address, texts=QUERIES, requests=4, concurrency=1, space=("clip", 7))
    report = asyncio.run(run_load(cfg))
    assert report.ok == 0 and report.errors == {"FAILED_PRECONDITION": 4}, report.errors


@pytest.fixture(scope="module")
def tls_gateway(triton, indexed, tmp_path_factory):
    """A gateway serving TLS only, with a self-signed certificate for localhost (its own CA)."""
    from tests.conftest import looksync_env, start_gateway, wait_for

    root = tmp_path_factory.mktemp("loadtest-tls")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    env = looksync_env(triton, indexed, LOOKSYNC_TLS_CERT_FILE=str(cert), LOOKSYNC_TLS_KEY_FILE=str(key))
    gw = start_gateway(env, root / "gateway.log", wait_serving=False, probe=False)
    from clients.client import LookSyncClient

    with LookSyncClient(gw.address, root_certificates=cert.read_bytes(), server_name="localhost") as secure:

        def answers():
            try:
                return secure.search_text("dress", k=1, timeout_s=5)
            except grpc.RpcError:
                return None

        wait_for(answers, what="the TLS gateway")
    yield gw, cert
    gw.stop()


def test_the_cli_loadtests_a_tls_gateway_with_the_connection_options(tls_gateway, inputs, tmp_path):
    gw, cert = tls_gateway
    queries, _ = inputs
    out = tmp_path / "tls.json"
    # Two processes: each spawned load process opens its own TLS channel from the config.
    run = subprocess.run(
        [sys.executable, "-m", "clients.cli", "loadtest", "--gateway", gw.address, "--ca-file", str(cert),
         "--server-name", "localhost", "--space", "clip:1", "--text-queries", str(queries), "--mix", "text=1",
         "--requests", "10", "--concurrency", "2", "--processes", "2", "-k", "3", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert f"loadtest {gw.address} (TLS), space clip:1" in run.stdout
    data = json.loads(out.read_text())
    assert (data["sent"], data["ok"]) == (10, 10)
    assert data["config"]["tls"] and data["config"]["private_ca"] and data["config"]["space"] == "clip:1"
    assert cert.read_text() not in out.read_text()  # the report names the CA, never carries it


def test_loadtest_without_tls_options_does_not_reach_a_tls_gateway(tls_gateway):
    gw, cert = tls_gateway
    cfg = LoadConfig(address=gw.address, texts=QUERIES, requests=1, connect_timeout_s=2)
    with pytest.raises(ConnectionError, match="plaintext"):
        asyncio.run(run_load(cfg))
    # The private CA without the name in the certificate fails the handshake (the address is
    # 127.0.0.1, which the certificate also names: override to a name it lacks).
    cfg = LoadConfig(
        address=gw.address,
        texts=QUERIES,
        requests=1,
        connect_timeout_s=2,
        root_certificates=cert.read_bytes(),
        server_name="elsewhere.example",
    )
    with pytest.raises(ConnectionError, match="over TLS"):
        asyncio.run(run_load(cfg))
