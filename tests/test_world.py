"""The synthetic fashion world: deterministic for a seed, ground truth consistent."""

import hashlib
import json

from clients.world import KINDS, look_crops, make_catalog, make_looks, render, render_look, write_world
from gateway.ingest.enrich import vendor_category


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_world_other_seed_other_world(tmp_path):
    a = write_world(tmp_path / "a", products=60, looks=8, seed=3)
    b = write_world(tmp_path / "b", products=60, looks=8, seed=3)
    c = write_world(tmp_path / "c", products=60, looks=8, seed=4)
    assert a == b and a != c
    for rel in ("catalog.jsonl", "images/w00007.png", "looks/look0003.png"):
        assert _digest(tmp_path / "a" / rel) == _digest(tmp_path / "b" / rel)
    assert _digest(tmp_path / "a" / "looks/look0003.png") != _digest(tmp_path / "c" / "looks/look0003.png")


def test_ground_truth_is_consistent(tmp_path):
    manifest = write_world(tmp_path, products=80, looks=20, seed=5)
    records = {
        json.loads(line)["id"]: json.loads(line)
        for line in (tmp_path / "catalog.jsonl").read_text().splitlines()
    }
    for look in manifest["looks"]:
        assert (tmp_path / look["image"]).is_file()
        zones = set(look["garments"])
        assert zones in ({"upper", "lower", "feet"}, {"dress", "feet"})
        for zone, pid in look["garments"].items():
            kind = manifest["attributes"][pid]["kind"]
            assert KINDS[kind][0] == zone
            worn = look["styles"][zone]
            # A variation: same garment, never the identical rendering.
            assert (worn["kind"], worn["colour"], worn["pattern"]) == (
                kind,
                manifest["attributes"][pid]["colour"],
                manifest["attributes"][pid]["pattern"],
            )
            assert worn["hue_shift"] != 0 or worn["pattern_scale"] != 1.0
    # Vendor category words all map to the standard category by enrichment.
    for pid, rec in records.items():
        assert vendor_category(rec["category"]) == manifest["attributes"][pid]["kind"], rec["category"]


def test_look_garments_differ_from_their_catalog_images():
    catalog = make_catalog(40, seed=2)
    look = make_looks(catalog, 1, seed=9)[0]
    img = render_look(look, seed=2)
    crops = look_crops(img)
    source = next(p for p in catalog if p.id == look.garments["feet"])
    catalog_img = render(source.style, size=crops["feet"].size[0])
    assert list(crops["feet"].getdata()) != list(catalog_img.getdata())


def test_the_novel_palette_has_only_colours_and_patterns_the_base_never_uses(tmp_path):
    from clients.world import COLOURS, NOVEL_COLOURS, NOVEL_PATTERNS, PATTERNS

    manifest = write_world(tmp_path / "novel", products=60, looks=6, seed=3, palette="novel")
    attrs = manifest["attributes"].values()
    assert {a["colour"] for a in attrs} <= set(NOVEL_COLOURS) and {a["pattern"] for a in attrs} <= set(
        NOVEL_PATTERNS
    )
    assert len({a["pattern"] for a in attrs}) == len(NOVEL_PATTERNS)  # every new pattern is drawn
    assert not set(NOVEL_COLOURS) & set(COLOURS) and not set(NOVEL_PATTERNS) & set(PATTERNS)
    for p in make_catalog(20, seed=3, palette="novel"):
        # Each pattern is visibly drawn: a second colour covers part of the garment.
        colours = render(p.style, size=96).getcolors(96 * 96)
        assert len(colours) > 2, p.style
    base = write_world(tmp_path / "base", products=60, looks=6, seed=3)
    assert base["palette"] == "base" and {a["colour"] for a in base["attributes"].values()} <= set(COLOURS)
