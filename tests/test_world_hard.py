"""The hard world: looks as they really come (the figure anywhere, cut off, layered, with bags
and accessories), with each visible garment's box as ground truth."""

import json
from collections import Counter

import numpy as np
from PIL import Image

from clients.world import ALL_KINDS, make_catalog, write_world
from clients.world_hard import DETECTOR_LAYERS, make_hard_looks, render_hard_look
from gateway.ingest.enrich import vendor_category
from gateway.taxonomy import CATEGORY_LAYER


def test_hard_world_is_deterministic_and_its_truth_is_what_is_visible(tmp_path):
    a = write_world(tmp_path / "a", products=120, looks=60, seed=21, difficulty="hard")
    b = write_world(tmp_path / "b", products=120, looks=60, seed=21, difficulty="hard")
    assert a == b
    assert (tmp_path / "a/looks/look0007.png").read_bytes() == (
        tmp_path / "b/looks/look0007.png"
    ).read_bytes()
    kinds = Counter(a["attributes"][pid]["kind"] for pid in a["attributes"])
    assert kinds["hat"] and kinds["sunglasses"]  # accessories are in the catalog
    zones = Counter(z for look in a["looks"] for z in look["garments"])
    # Layers, bags and accessories are worn; frames vary in every dimension the harness reports.
    assert {"outer", "bag", "head", "eyes", "upper", "lower", "dress", "feet"} <= set(zones)
    for key in ("position", "scale", "crop", "layering", "background", "mirrored"):
        assert len({look["difficulty"][key] for look in a["looks"]}) >= 2, key
    cut = [look for look in a["looks"] if look["difficulty"]["crop"] == "waist"]
    assert cut and all("feet" not in look["garments"] for look in cut)  # shoes out of frame: not truth
    for look in a["looks"]:
        img = Image.open(tmp_path / "a" / look["image"])
        assert set(look["boxes"]) == set(look["garments"]) == set(look["styles"])
        for zone, (left, top, right, bottom) in look["boxes"].items():
            assert 0 <= left < right <= img.size[0] and 0 <= top < bottom <= img.size[1]
            kind = a["attributes"][look["garments"][zone]]["kind"]
            assert look["styles"][zone]["kind"] == kind
            assert ALL_KINDS[kind][0] == zone or (zone in ("upper", "outer") and kind == "jacket")
    for line in (tmp_path / "a/catalog.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert vendor_category(rec["category"]) == a["attributes"][rec["id"]]["kind"], rec["category"]


def test_the_class_map_agrees_with_the_boxes():
    catalog = make_catalog(80, seed=4, accessories=True)
    for look in make_hard_looks(catalog, 12, seed=5):
        img, classes = render_hard_look(look)
        assert classes.shape == (img.size[1], img.size[0])
        for zone, (left, top, right, bottom) in look.boxes.items():
            cls = DETECTOR_LAYERS.index(CATEGORY_LAYER[look.styles[zone].kind]) + 1
            inside = classes[top:bottom, left:right] == cls
            assert inside.any()
            # Nothing of this garment's class outside the union of the boxes of its class.
        for cls in np.unique(classes[classes > 0]):
            layer = DETECTOR_LAYERS[cls - 1]
            boxes = [b for z, b in look.boxes.items() if CATEGORY_LAYER[look.styles[z].kind] == layer]
            covered = np.zeros(classes.shape, bool)
            for left, top, right, bottom in boxes:
                covered[top:bottom, left:right] = True
            assert not ((classes == cls) & ~covered).any()


def test_easy_looks_record_their_boxes_and_level(tmp_path):
    manifest = write_world(tmp_path, products=40, looks=6, seed=3)
    for look in manifest["looks"]:
        assert look["difficulty"] == {"level": "easy"}
        assert set(look["boxes"]) == set(look["garments"])


def test_graded_looks_differ_only_in_how_they_are_rendered(tmp_path):
    plain = write_world(tmp_path / "plain", products=30, looks=4, seed=9, difficulty="mixed")
    graded = write_world(tmp_path / "graded", products=30, looks=4, seed=9, difficulty="mixed", graded=True)
    assert plain["looks"] == graded["looks"] and graded["graded"] and not plain["graded"]
    for rel in ("catalog.jsonl", "images/w00003.png"):
        assert (tmp_path / "plain" / rel).read_bytes() == (tmp_path / "graded" / rel).read_bytes()
    for look in plain["looks"]:
        a = np.asarray(Image.open(tmp_path / "plain" / look["image"]), dtype=np.float32)
        b = np.asarray(Image.open(tmp_path / "graded" / look["image"]), dtype=np.float32)
        assert a.shape == b.shape and np.abs(a - b).mean() > 5  # a visible cast, same picture
