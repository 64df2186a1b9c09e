"""A small synthetic catalog: PIL-drawn garments with varied, vendor-like metadata.

Deterministic for a seed, no downloads. Enough products for the demo and the tests to exercise
every hard filter (category, gender, market, brand, size, price, stock).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (200, 30, 40),
    "blue": (30, 70, 190),
    "green": (40, 140, 60),
    "black": (25, 25, 25),
    "white": (235, 235, 230),
    "yellow": (235, 200, 40),
    "pink": (235, 130, 170),
    "beige": (215, 190, 150),
    "grey": (128, 128, 128),
    "navy": (20, 30, 80),
}
PATTERNS = ("solid", "striped", "checked", "dotted")
BRANDS = ("Nordlys", "Atelier Rue", "Kumo", "Verde & Co", "Halcyon", "Brisa", "Oakline", "Moda Sol")
MARKETS = ("US", "GB", "DE", "FR", "SE")
CLOTHING_SIZES = ["XS", "S", "M", "L", "XL"]
SHOE_SIZES = [str(n) for n in range(36, 46)]

# category -> (silhouette, genders it is sold for, price range)
CATEGORIES = {
    "t-shirt": ("top_short", ("women", "men", "unisex"), (9, 40)),
    "shirt": ("top_long", ("women", "men"), (25, 90)),
    "sweater": ("top_long", ("women", "men", "unisex"), (30, 120)),
    "trousers": ("trousers", ("women", "men"), (30, 120)),
    "jeans": ("trousers", ("women", "men", "unisex"), (40, 150)),
    "shorts": ("shorts", ("women", "men"), (15, 60)),
    "skirt": ("skirt", ("women",), (20, 90)),
    "dress": ("dress", ("women",), (35, 220)),
    "jacket": ("jacket", ("women", "men", "unisex"), (60, 300)),
    "coat": ("coat", ("women", "men"), (90, 450)),
    "sneakers": ("shoe", ("women", "men", "unisex"), (45, 180)),
    "boots": ("boot", ("women", "men"), (70, 260)),
    "handbag": ("bag", ("women",), (40, 500)),
    "backpack": ("backpack", ("unisex",), (35, 160)),
}


def _silhouette(kind: str, s: int) -> list[list[tuple[float, float]]]:
    """Polygons (in a unit square scaled to s) that draw the garment's outline."""
    shapes = {
        "top_short": [
            [
                (0.3, 0.2),
                (0.42, 0.15),
                (0.58, 0.15),
                (0.7, 0.2),
                (0.88, 0.35),
                (0.78, 0.45),
                (0.7, 0.38),
                (0.7, 0.85),
                (0.3, 0.85),
                (0.3, 0.38),
                (0.22, 0.45),
                (0.12, 0.35),
            ]
        ],
        "top_long": [
            [
                (0.3, 0.2),
                (0.42, 0.15),
                (0.58, 0.15),
                (0.7, 0.2),
                (0.92, 0.75),
                (0.82, 0.78),
                (0.7, 0.45),
                (0.7, 0.88),
                (0.3, 0.88),
                (0.3, 0.45),
                (0.18, 0.78),
                (0.08, 0.75),
            ]
        ],
        "jacket": [
            [
                (0.28, 0.18),
                (0.45, 0.12),
                (0.5, 0.3),
                (0.55, 0.12),
                (0.72, 0.18),
                (0.93, 0.8),
                (0.82, 0.82),
                (0.72, 0.45),
                (0.72, 0.9),
                (0.28, 0.9),
                (0.28, 0.45),
                (0.18, 0.82),
                (0.07, 0.8),
            ]
        ],
        "coat": [
            [
                (0.3, 0.1),
                (0.45, 0.07),
                (0.5, 0.22),
                (0.55, 0.07),
                (0.7, 0.1),
                (0.9, 0.7),
                (0.8, 0.72),
                (0.72, 0.4),
                (0.76, 0.95),
                (0.24, 0.95),
                (0.28, 0.4),
                (0.2, 0.72),
                (0.1, 0.7),
            ]
        ],
        "trousers": [
            [(0.3, 0.1), (0.7, 0.1), (0.74, 0.92), (0.56, 0.92), (0.5, 0.35), (0.44, 0.92), (0.26, 0.92)]
        ],
        "shorts": [
            [(0.28, 0.25), (0.72, 0.25), (0.78, 0.65), (0.55, 0.68), (0.5, 0.45), (0.45, 0.68), (0.22, 0.65)]
        ],
        "skirt": [[(0.36, 0.2), (0.64, 0.2), (0.8, 0.8), (0.2, 0.8)]],
        "dress": [[(0.38, 0.08), (0.62, 0.08), (0.64, 0.38), (0.84, 0.92), (0.16, 0.92), (0.36, 0.38)]],
        "shoe": [[(0.1, 0.55), (0.45, 0.5), (0.6, 0.6), (0.9, 0.65), (0.92, 0.78), (0.1, 0.78)]],
        "boot": [[(0.3, 0.15), (0.55, 0.15), (0.57, 0.6), (0.88, 0.68), (0.9, 0.85), (0.3, 0.85)]],
        "bag": [
            [(0.2, 0.4), (0.8, 0.4), (0.85, 0.88), (0.15, 0.88)],
            [
                (0.35, 0.4),
                (0.38, 0.2),
                (0.62, 0.2),
                (0.65, 0.4),
                (0.6, 0.4),
                (0.58, 0.26),
                (0.42, 0.26),
                (0.4, 0.4),
            ],
        ],
        "backpack": [
            [(0.25, 0.2), (0.75, 0.2), (0.8, 0.9), (0.2, 0.9)],
            [(0.32, 0.5), (0.68, 0.5), (0.68, 0.75), (0.32, 0.75)],
        ],
    }
    return [[(x * s, y * s) for x, y in poly] for poly in shapes[kind]]


def _pattern(size: int, colour, pattern: str, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), colour)
    draw = ImageDraw.Draw(img)
    second = tuple(255 - c if sum(colour) < 384 else max(c - 110, 0) for c in colour)
    step = rng.choice((8, 10, 12))
    if pattern == "striped":
        for y in range(0, size, step):
            draw.rectangle((0, y, size, y + step // 2 - 1), fill=second)
    elif pattern == "checked":
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=second)
    elif pattern == "dotted":
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=second)
    return img


def render(category: str, colour: str, pattern: str, rng: random.Random, size: int = 128) -> Image.Image:
    kind = CATEGORIES[category][0]
    background = tuple(int(v) for v in (rng.uniform(225, 255), rng.uniform(225, 255), rng.uniform(225, 255)))
    canvas = Image.new("RGB", (size, size), background)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    jitter = rng.uniform(-0.03, 0.03) * size
    for poly in _silhouette(kind, size):
        draw.polygon([(x + jitter, y + jitter) for x, y in poly], fill=255)
    canvas.paste(_pattern(size, COLOURS[colour], pattern, rng), (0, 0), mask)
    return canvas


def generate(out_dir: Path, n: int = 300, seed: int = 7) -> Path:
    """Write `catalog.jsonl` and `images/*.jpg` under out_dir; returns the catalog path."""
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    categories = list(CATEGORIES)
    for i in range(n):
        category = categories[i % len(categories)]
        _, genders, (lo, hi) = CATEGORIES[category]
        colour = rng.choice(list(COLOURS))
        pattern = rng.choice(PATTERNS)
        brand = rng.choice(BRANDS)
        pid = f"p{i:05d}"
        image_path = out_dir / "images" / f"{pid}.jpg"
        render(category, colour, pattern, rng).save(image_path, quality=90)
        if category in ("sneakers", "boots"):
            sizes = sorted(rng.sample(SHOE_SIZES, rng.randint(3, 8)), key=int)
        elif category in ("handbag", "backpack"):
            sizes = ["one size"]
        else:
            sizes = [s for s in CLOTHING_SIZES if rng.random() < 0.7] or ["M"]
        pattern_word = "" if pattern == "solid" else f"{pattern} "
        records.append(
            {
                "id": pid,
                "title": f"{colour.capitalize()} {pattern_word}{category}",
                "brand": brand,
                "category": category,
                "gender": rng.choice(genders),
                "market": rng.choice(MARKETS),
                "price": round(rng.uniform(lo, hi), 2),
                "currency": "USD",
                "sizes": sizes,
                "in_stock": rng.random() < 0.8,
                "image_url": f"images/{pid}.jpg",
            }
        )
    catalog = out_dir / "catalog.jsonl"
    with open(catalog, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    return catalog
