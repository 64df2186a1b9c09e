"""The committed demo CLIP, exported and served exactly like ViT-H/14, on a held-out world:
look search finds the garments a look wears, and text finds colour x pattern."""

import json
from pathlib import Path

import pytest

from clients.world import PATTERNS, write_world
from tests.conftest import looksync, looksync_env, start_gateway, start_triton

WEIGHTS = Path(__file__).resolve().parent.parent / "export" / "weights" / "looksync-demo.pt"
ZONE_LAYERS = {
    "upper": {"topwear", "outerwear", "dress"},
    "lower": {"bottomwear", "dress"},
    "feet": {"footwear"},
    "dress": {"dress", "topwear", "bottomwear"},
}
# Measured on this held-out world (seed 2001) with the committed weights; see
# export/weights/looksync-demo.json and benchmarks/RESULTS.md. Set a little below the measurement.
LOOK_R5_MIN = 0.85  # measured 0.917 (100/109)
TEXT_PAIR_MIN = 0.8  # measured 0.878 (36/41)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if not WEIGHTS.exists():
        pytest.skip("export/weights/looksync-demo.pt not present")
    from export.clip import ExportRequest, export_clip

    root = tmp_path_factory.mktemp("demo_model")
    export_clip(
        ExportRequest(arch="looksync-demo", version=1, checkpoint=str(WEIGHTS), repository=root / "repo")
    )
    world = root / "world"
    manifest = write_world(world, products=300, looks=40, seed=2001)
    server = start_triton(root / "repo", root / "triton")
    env = looksync_env(server, root / "data", LOOKSYNC_DEDUP_THRESHOLD="0.97")
    assert looksync("index", str(world / "catalog.jsonl"), "--quiet", env=env).returncode == 0
    gw = start_gateway(env, root / "gateway.log")
    yield gw, world, manifest
    gw.stop()
    server.stop()


def test_look_search_finds_the_worn_garments(demo):
    gw, world, manifest = demo
    found = total = 0
    with gw.client() as client:
        for look in manifest["looks"]:
            resp = client.search_look((world / look["image"]).read_bytes(), k_per_layer=5)
            for zone, pid in look["garments"].items():
                total += 1
                found += any(
                    pid in [h.product.id for h in lr.hits]
                    for lr in resp.layers
                    if lr.layer in ZONE_LAYERS[zone]
                )
    recall = found / total
    print(f"look -> garment R@5 through the gateway: {recall:.3f} ({found}/{total})")
    assert recall >= LOOK_R5_MIN


def test_text_queries_find_colour_and_pattern(demo):
    gw, world, manifest = demo
    attrs = manifest["attributes"]
    pairs = sorted({(a["colour"], a["pattern"]) for a in attrs.values() if a["kind"] in ("shirt", "t-shirt")})
    good = 0
    with gw.client() as client:
        for colour, pattern in pairs:
            words = f"{colour} {'' if pattern == 'solid' else pattern + ' '}shirt"
            hits = client.search_text(f"a {words}", k=5).hits
            good += any(
                (attrs[h.product.id]["colour"], attrs[h.product.id]["pattern"]) == (colour, pattern)
                for h in hits
            )
    share = good / len(pairs)
    print(f"colour x pattern pairs with a match in the top 5: {share:.3f} ({good}/{len(pairs)})")
    assert len(pairs) > 20 and set(PATTERNS) >= {p for _, p in pairs}
    assert share >= TEXT_PAIR_MIN


def test_record_of_training_is_committed():
    record = json.loads(WEIGHTS.with_suffix(".json").read_text())
    assert record["steps"] > 100 and record["evaluation_held_out"]["look_to_garment_r5"] > 0.5
