"""Separate processes sharing the index, and Triton going away under a running gateway."""

import json
import time

import grpc
import pytest

from clients.sample_catalog import generate
from tests.conftest import free_port, looksync, looksync_env, start_gateway, start_triton, wait_for


def test_products_indexed_while_the_gateway_runs_become_searchable(gateway, triton, indexed, tmp_path):
    extra = generate(tmp_path / "new", n=12, seed=99)
    # New ids, so they are new products rather than updates of the session catalog's.
    lines = [json.loads(line) for line in extra.read_text().splitlines()]
    for rec in lines:
        rec["id"] = "new-" + rec["id"]
    extra.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    target = lines[5]
    image = (extra.parent / target["image_url"]).read_bytes()

    with gateway.client() as client:
        assert client.search_image(image, k=1).hits[0].product.id != target["id"]
        result = looksync("index", str(extra), "--quiet", env=looksync_env(triton, indexed))
        assert result.returncode == 0, result.stderr
        assert "indexed 12 products (12 embedded" in result.stdout
        deadline = time.monotonic() + 10
        while client.search_image(image, k=1).hits[0].product.id != target["id"]:
            assert time.monotonic() < deadline, "new product not visible to the running gateway"
            time.sleep(0.2)


def test_reindexing_an_unchanged_catalog_embeds_nothing(triton, catalog, indexed):
    result = looksync("index", str(catalog), "--quiet", env=looksync_env(triton, indexed))
    assert result.returncode == 0, result.stderr
    assert "(0 embedded, 200 unchanged)" in result.stdout


@pytest.fixture()
def own_stack(tiny_repo, catalog, tmp_path):
    """Triton and a gateway of this test's own, because the test stops Triton."""
    server = start_triton(tiny_repo, tmp_path / "triton")
    env = looksync_env(server, tmp_path / "data", LOOKSYNC_TRITON_TIMEOUT_S="2")
    assert looksync("index", str(catalog), "--quiet", env=env).returncode == 0
    gw = start_gateway(env, tmp_path / "gateway.log")
    yield server, gw, tmp_path
    gw.stop()
    server.stop()


def test_triton_down_gives_unavailable_fast_and_recovers(own_stack):
    server, gw, tmp_path = own_stack
    with gw.client() as client:
        assert len(client.search_text("dress", k=3).hits) == 3
        server.kill()
        for _ in range(3):
            # "Fast" is against the request's own deadline: the gateway says UNAVAILABLE long
            # before it (a refused connection), instead of waiting the deadline out.
            deadline_s = 30.0
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                client.search_text("dress", k=3, timeout_s=deadline_s)
            elapsed = time.monotonic() - start
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
            assert "Triton" in err.value.details()
            assert elapsed < deadline_s / 3, f"took {elapsed:.1f}s to report Triton down"

        # Same ports again: the gateway's channel reconnects on its own.
        server.start(timeout_s=120, log_file=open(tmp_path / "triton-again.log", "a"))

        def answers():
            try:
                return len(client.search_text("dress", k=3).hits) == 3
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                return False

        wait_for(answers, what="the gateway to recover after Triton came back")
        assert gw.process.poll() is None, "the gateway must not have restarted"


def test_an_unreadable_index_is_unavailable_and_the_gateway_recovers(triton, catalog, tmp_path):
    import shutil

    env = looksync_env(triton, tmp_path / "data")
    assert looksync("index", str(catalog), "--quiet", env=env).returncode == 0
    gw = start_gateway(env, tmp_path / "gateway.log")
    table = tmp_path / "data" / "index" / "products-clip-v1.lance"
    try:
        with gw.client() as client:
            assert len(client.search_text("dress", k=3).hits) == 3
            shutil.move(table, tmp_path / "moved-away")
            with pytest.raises(grpc.RpcError) as err:
                client.search_text("dress", k=3)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "cannot be read" in err.value.details()
            shutil.move(tmp_path / "moved-away", table)
            assert len(client.search_text("dress", k=3).hits) == 3
    finally:
        gw.stop()


def test_a_gateway_started_before_triton_is_not_ready_then_serves(tiny_repo, indexed, tmp_path):
    from gateway.tritonserver import TritonServer

    late = TritonServer(tiny_repo, free_port(), free_port(), free_port(), work_dir=tmp_path / "triton")
    gw = start_gateway(looksync_env(late, indexed), tmp_path / "gateway.log", wait_serving=False)
    try:
        with gw.client() as client:
            # Up, answering, and saying it is not ready: no crash, no hang.
            assert client.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as err:
                client.search_text("dress", k=3, timeout_s=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "Triton" in err.value.details()
            late.start(timeout_s=120, log_file=open(tmp_path / "triton.log", "a"))
            wait_for(lambda: client.health() == "SERVING", what="the gateway to become ready")
            assert len(client.search_text("dress", k=3).hits) == 3
            assert gw.process.poll() is None
    finally:
        gw.stop()
        late.stop()
