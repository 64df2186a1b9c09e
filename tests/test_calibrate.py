"""`looksync calibrate-dedup`: the near-duplicate threshold measured for the served space and
recorded with its index; SearchLook then collapses by it instead of the gateway's setting."""

import json

from clients.world import write_world
from tests.conftest import looksync, looksync_env, start_gateway, wait_for


def _lists(client, look: bytes):
    resp = client.search_look(look, k_per_layer=10)
    return [len(lr.hits) for lr in resp.layers], sum(h.duplicates for lr in resp.layers for h in lr.hits)


def test_calibration_stops_dedup_from_eating_a_crowded_space(triton, tmp_path):
    world = tmp_path / "world"
    manifest = write_world(world, products=120, looks=2, seed=33, duplicates=0.2)
    # 0.97 is right for real CLIP; the tiny random-weight model puts every image above it.
    env = looksync_env(triton, tmp_path / "data", LOOKSYNC_DEDUP_THRESHOLD="0.97", LOOKSYNC_CACHE="off")
    assert looksync("index", str(world / "catalog.jsonl"), "--quiet", env=env).returncode == 0
    gw = start_gateway(env, tmp_path / "gateway.log")
    try:
        look = (world / manifest["looks"][0]["image"]).read_bytes()
        with gw.client() as client:
            sizes, absorbed = _lists(client, look)
            assert absorbed > 0 and min(sizes) < 10  # distinct products collapsed into a few

            result = looksync("calibrate-dedup", "--json", env=env)
            assert result.returncode == 0, result.stderr
            report = json.loads(result.stdout)
            assert 0.97 < report["threshold"] <= 0.9999
            assert report["distinct"]["max"] >= report["distinct"]["p99"] >= report["distinct"]["p50"] > 0.97
            recorded = json.loads((tmp_path / "data/index/manifest.json").read_text())["indexes"]
            assert recorded["products-clip-v1"]["dedup_threshold"] == report["threshold"]
            # A named model without a version is its newest index; a dry run records nothing.
            dry = looksync(
                "calibrate-dedup", "--model", "clip", "--world", str(world), "--dry-run", "--json", env=env
            )
            assert dry.returncode == 0, dry.stderr
            assert json.loads(dry.stdout)["space"]["version"] == 1
            bad = looksync("calibrate-dedup", "--world", str(tmp_path / "nowhere"), env=env)
            assert bad.returncode == 2 and "INVALID_ARGUMENT: --world" in bad.stderr

            # The running gateway picks the space's threshold up with the index's metadata.
            wait_for(lambda: _lists(client, look)[1] < absorbed, timeout_s=30, what="calibrated dedup")
            sizes, _ = _lists(client, look)
            assert min(sizes) == 10
    finally:
        gw.stop()
