"""The committed demo CLIP and garment detector, exported and served exactly like ViT-H/14, on
held-out worlds: look search finds the garments a look wears, easy looks and looks as they really
come (the figure anywhere, cut off, layered, with bags and accessories, on busy backgrounds),
and text finds colour x pattern."""

import json
from pathlib import Path

import pytest

from clients.world import PATTERNS, write_world
from clients.world_hard import iou
from tests.conftest import looksync, looksync_env, start_gateway, start_triton

WEIGHTS = Path(__file__).resolve().parent.parent / "export" / "weights" / "looksync-demo.pt"
DETECTOR = WEIGHTS.parent / "garment-detector.pt"
ZONE_LAYERS = {
    "upper": {"topwear", "outerwear", "dress"},
    "lower": {"bottomwear", "dress"},
    "feet": {"footwear"},
    "dress": {"dress", "topwear", "bottomwear"},
    "outer": {"outerwear"},
    "bag": {"bag"},
    "head": {"headwear"},
    "eyes": {"eyewear"},
}
# Measured on this held-out world (seed 2001) with the committed weights; see
# export/weights/looksync-demo.json and benchmarks/RESULTS.md. Set a little below the measurement.
LOOK_R5_MIN = 0.85  # measured 0.927 (101/109) with the detector and the calibrated dedup threshold
TEXT_PAIR_MIN = 0.8  # measured 0.878 (36/41)
# The hard world (seed 2002) through the detector; measured values in the comments.
HARD_R5_MIN = 0.75  # 0.860 (body zones: 0.180)
HARD_GAIN_MIN = 0.5  # 0.68
LAYERED_MIN = 0.6  # 7/8 layered looks: the jacket and the top as two lists, each in place
ACCESSORIES_MIN = 0.75  # bags, hats, sunglasses located: 25/27 (each kind at least 0.4; sunglasses 3/5)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    if not WEIGHTS.exists():
        pytest.skip("export/weights/looksync-demo.pt not present")
    from export.clip import ExportRequest, export_clip
    from export.detector import DetectorExport, export_detector

    root = tmp_path_factory.mktemp("demo_model")
    export_clip(
        ExportRequest(arch="looksync-demo", version=1, checkpoint=str(WEIGHTS), repository=root / "repo")
    )
    export_detector(DetectorExport(repository=root / "repo", checkpoint=DETECTOR))
    world = root / "world"
    manifest = write_world(world, products=300, looks=40, seed=2001)
    server = start_triton(root / "repo", root / "triton")
    env = looksync_env(server, root / "data", LOOKSYNC_DEDUP_THRESHOLD="0.97")
    assert looksync("index", str(world / "catalog.jsonl"), "--quiet", env=env).returncode == 0
    # The operator's step after indexing with a new model: its own near-duplicate threshold
    # (measured on a small world of its own with planted duplicates, shared by both indexes).
    calibration = root / "calibration-world"
    write_world(calibration, products=120, looks=0, seed=4242, duplicates=0.3)
    assert looksync("calibrate-dedup", "--world", str(calibration), env=env).returncode == 0
    gw = start_gateway(env, root / "gateway.log")
    yield gw, world, manifest, server, root
    gw.stop()
    server.stop()


@pytest.fixture(scope="module")
def hard(demo):
    """A held-out hard world, indexed with the same Triton; one gateway with the detector (the
    default) and one that cuts body zones only."""
    _, _, _, server, root = demo
    world = root / "hard-world"
    manifest = write_world(world, products=300, looks=30, seed=2002, difficulty="hard")
    env = looksync_env(server, root / "data-hard", LOOKSYNC_DEDUP_THRESHOLD="0.97", LOOKSYNC_CACHE="off")
    assert looksync("index", str(world / "catalog.jsonl"), "--quiet", env=env).returncode == 0
    assert looksync("calibrate-dedup", "--world", str(root / "calibration-world"), env=env).returncode == 0
    detector = start_gateway(env, root / "gateway-hard.log")
    zones = start_gateway({**env, "LOOKSYNC_LOCALIZER": "zones"}, root / "gateway-zones.log")
    yield detector, zones, world, manifest
    detector.stop()
    zones.stop()


def _box(layer):
    return (layer.box.left, layer.box.top, layer.box.right, layer.box.bottom)


def _hard_run(gw, world, manifest):
    """(garments found in the top 5 of a list of their layer, garments, layered looks whose top
    and jacket came back as two lists where they are, layered looks, responses)."""
    found = total = two_tops = layered = 0
    responses = {}
    with gw.client(timeout_s=30) as client:
        for look in manifest["looks"]:
            resp = client.search_look((world / look["image"]).read_bytes(), k_per_layer=5)
            responses[look["id"]] = resp
            for zone, pid in look["garments"].items():
                total += 1
                found += any(
                    pid in [h.product.id for h in lr.hits][:5]
                    for lr in resp.layers
                    if lr.layer in ZONE_LAYERS[zone]
                )
            if {"outer", "upper"} <= set(look["garments"]):
                layered += 1
                boxes = look["boxes"]
                jacket = [
                    lr
                    for lr in resp.layers
                    if lr.layer == "outerwear" and iou(_box(lr), boxes["outer"]) > 0.4
                ]
                top = [
                    lr for lr in resp.layers if lr.layer == "topwear" and iou(_box(lr), boxes["upper"]) > 0.1
                ]
                two_tops += bool(jacket and top)
    return found, total, two_tops, layered, responses


def test_looks_as_they_really_come_find_their_garments_wherever_they_are(hard):
    detector, zones, world, manifest = hard
    found, total, two_tops, layered, responses = _hard_run(detector, world, manifest)
    zone_found, _, _, _, _ = _hard_run(zones, world, manifest)
    recall, zone_recall = found / total, zone_found / total
    print(
        f"hard looks: look -> garment R@5 {recall:.3f} with the detector, {zone_recall:.3f} with body zones"
    )
    assert recall >= HARD_R5_MIN and recall - zone_recall >= HARD_GAIN_MIN
    # Every list says where its garment is, found by the detector, inside the look.
    for look in manifest["looks"]:
        resp = responses[look["id"]]
        assert resp.layers and all(
            lr.region_source == "detector" and lr.HasField("box") for lr in resp.layers
        )
    # A shirt under an open jacket: two lists, each where its garment is.
    print(f"layered looks answered with a jacket list and a top list in place: {two_tops}/{layered}")
    assert layered >= 4 and two_tops / layered >= LAYERED_MIN
    # Bags and accessories come back as their own layers, where they are.
    placed_all = shown_all = 0
    for zone, layer in (("bag", "bag"), ("head", "headwear"), ("eyes", "eyewear")):
        shown = [look for look in manifest["looks"] if zone in look["garments"]]
        placed = sum(
            any(
                lr.layer == layer and iou(_box(lr), look["boxes"][zone]) > 0.3
                for lr in responses[look["id"]].layers
            )
            for look in shown
        )
        print(f"{layer}: {placed}/{len(shown)} located")
        assert shown and placed / len(shown) >= 0.4, layer
        placed_all, shown_all = placed_all + placed, shown_all + len(shown)
    assert placed_all / shown_all >= ACCESSORIES_MIN


def test_look_search_finds_the_worn_garments(demo):
    gw, world, manifest, _, _ = demo
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


def test_triton_out_of_reach_fails_the_look_and_never_turns_the_detector_off(demo):
    """Triton unreachable is UNAVAILABLE for that look, not 30 s of body zones (and answers
    cached as if they were the detector's best) once it is back."""
    import asyncio

    from PIL import Image

    from gateway.embedder import TritonEmbedder
    from gateway.errors import Unavailable
    from gateway.look.detector import DetectorLocalizer
    from tests.conftest import free_port

    _, world, manifest, server, _ = demo
    look = Image.open(world / manifest["looks"][0]["image"]).convert("RGB")

    async def run():
        localizer = DetectorLocalizer(TritonEmbedder(f"127.0.0.1:{free_port()}"))  # nothing listens
        with pytest.raises(Unavailable):
            await localizer.regions(look, 5.0)
        localizer.embedder = TritonEmbedder(f"127.0.0.1:{server.grpc_port}")  # Triton is back
        return await localizer.regions(look, 30.0)

    regions = asyncio.run(run())
    assert regions and {r.source for r in regions} == {"detector"}


def test_text_queries_find_colour_and_pattern(demo):
    gw, world, manifest, _, _ = demo
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
