"""A synthetic fashion world: a catalog of rendered garments and looks that wear *variations*
of them, with ground truth. Deterministic for a seed; no downloads.

- Products: 8 garment kinds (with sleeve/length variants), 10 colours, 5 patterns, vendor-style
  metadata (brands, prices, sizes, markets, genders, messy vendor category words).
- Looks: a full-length figure wearing a top + bottom + shoes, or a dress + shoes. Each garment
  re-renders a catalog item with a shifted hue, another pattern scale, a slightly different
  shape, background and lighting, so an exact match never exists (like an AI-generated look).
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance

from gateway.look.localizer import BODY_ZONES, zone_box

COLOURS = {
    "red": (200, 30, 40),
    "blue": (40, 80, 200),
    "green": (40, 140, 60),
    "black": (25, 25, 25),
    "white": (238, 238, 232),
    "yellow": (235, 200, 40),
    "pink": (236, 130, 175),
    "beige": (212, 188, 148),
    "grey": (128, 128, 128),
    "brown": (110, 70, 40),
}
PATTERNS = ("solid", "striped", "checked", "dotted", "floral")
# A second palette the demo model never saw (the fine-tuning demo's "new world"): other hues and
# other patterns, on the same garment kinds.
NOVEL_COLOURS = {
    "purple": (110, 40, 150),
    "orange": (240, 120, 20),
    "teal": (20, 130, 130),
    "olive": (120, 120, 30),
    "navy": (20, 30, 90),
    "coral": (250, 110, 100),
}
NOVEL_PATTERNS = ("zigzag", "leopard", "diamond", "wavy")
PALETTES = {"base": (COLOURS, PATTERNS), "novel": (NOVEL_COLOURS, NOVEL_PATTERNS)}
# kind -> (zone, variants, genders, price range, vendor words)
KINDS = {
    "t-shirt": (
        "upper",
        ("short-sleeve",),
        ("women", "men", "unisex"),
        (9, 40),
        ("Tee", "T-Shirts", "camiseta"),
    ),
    "shirt": (
        "upper",
        ("long-sleeve", "short-sleeve"),
        ("women", "men"),
        (25, 90),
        ("Shirts", "Hemd", "chemise"),
    ),
    "jacket": (
        "upper",
        ("long-sleeve",),
        ("women", "men", "unisex"),
        (60, 300),
        ("Jackets", "Blazer", "veste"),
    ),
    "trousers": ("lower", ("long", "cropped"), ("women", "men"), (30, 120), ("Pants", "Hose", "pantalon")),
    "skirt": ("lower", ("mini", "midi"), ("women",), (20, 90), ("Skirts", "Rock", "jupe")),
    "dress": ("dress", ("mini", "midi"), ("women",), (35, 220), ("Dresses", "Kleid", "robe")),
    "sneakers": (
        "feet",
        ("low",),
        ("women", "men", "unisex"),
        (45, 180),
        ("Trainers", "Turnschuhe", "baskets"),
    ),
    "handbag": ("bag", ("tote",), ("women",), (40, 500), ("Bags", "Handtasche", "sac")),
}
# Small accessories: only in catalogs made with `accessories=True` (the hard world), so the base
# world, and the demo model trained on it, stay as they were.
ACCESSORIES = {
    "sunglasses": (
        "eyes",
        ("aviator", "round"),
        ("women", "men", "unisex"),
        (15, 220),
        ("Sunglasses", "Sonnenbrille", "lunettes de soleil"),
    ),
    "hat": ("head", ("bucket", "brimmed"), ("women", "men", "unisex"), (15, 90), ("Hats", "Hut", "chapeau")),
}
ALL_KINDS = {**KINDS, **ACCESSORIES}
BRANDS = ("Nordlys", "Atelier Rue", "Kumo", "Verde & Co", "Halcyon", "Brisa", "Oakline", "Moda Sol")
MARKETS = ("US", "GB", "DE", "FR", "SE")
# Product-line names: a brand's line name travels with the garment to every shop that sells it.
LINES = (
    "Fjord", "Aster", "Loma", "Brio", "Cove", "Dune", "Elm", "Fern", "Gale", "Haven", "Iris", "Juno",
    "Kite", "Lark", "Mesa", "Nova", "Opal", "Pine", "Quill", "Reed", "Sage", "Tide", "Umber", "Vale",
    "Wren", "Yara", "Zephyr", "Alba", "Bay", "Cedar", "Delta", "Ember", "Flint", "Grove", "Heath",
    "Ivy", "Jade", "Knoll", "Linden", "Moss",
)  # fmt: skip
RETAILERS = ("Shopline", "Modehaus", "Closetly", "Boutique Nord", "StyleMart", "Urbanfit")
# Words a shop puts around the same garment's name (title variants of planted duplicates).
_TITLE_WRAPS = ("{t}", "{t} - {r}", "New: {t}", "{r} | {t}", "{t} (women)", "{t} - official store")


@dataclass(frozen=True)
class Style:
    kind: str
    variant: str
    colour: str
    pattern: str
    pattern_scale: float = 1.0
    hue_shift: float = 0.0  # degrees
    shape: float = 0.0  # -1..1 silhouette jitter
    light: float = 1.0

    @property
    def caption(self) -> str:
        pattern = "" if self.pattern == "solid" else f"{self.pattern} "
        return f"a {self.colour} {pattern}{self.variant} {self.kind}"


def _outline(kind: str, variant: str, shape: float, opening: float = 0.01) -> list[list[tuple[float, float]]]:
    """Polygons in the unit square; for a jacket the second one is its front opening
    (`opening`: half its width; a worn open jacket shows the top beneath)."""
    w = 0.04 * shape
    long = variant in ("long-sleeve", "long", "midi")
    if kind in ("t-shirt", "shirt", "jacket"):
        sleeve_y = 0.78 if variant == "long-sleeve" else 0.42
        body = [
            (0.3 - w, 0.2),
            (0.42, 0.14),
            (0.58, 0.14),
            (0.7 + w, 0.2),
            (0.92 + w, sleeve_y),
            (0.8, sleeve_y + 0.05),
            (0.7, 0.45),
            (0.7 + w, 0.9),
            (0.3 - w, 0.9),
            (0.3, 0.45),
            (0.2, sleeve_y + 0.05),
            (0.08 - w, sleeve_y),
        ]
        polys = [body]
        if kind == "jacket":
            o = opening
            polys.append([(0.5 - o, 0.16), (0.5 + o, 0.16), (0.5 + o, 0.9), (0.5 - o, 0.9)])
        return polys
    if kind == "trousers":
        bottom = 0.95 if long else 0.72
        return [
            [
                (0.3 - w, 0.06),
                (0.7 + w, 0.06),
                (0.76 + w, bottom),
                (0.56, bottom),
                (0.5, 0.32),
                (0.44, bottom),
                (0.24 - w, bottom),
            ]
        ]
    if kind == "skirt":
        bottom = 0.9 if long else 0.6
        return [[(0.36, 0.12), (0.64, 0.12), (0.8 + w, bottom), (0.2 - w, bottom)]]
    if kind == "dress":
        bottom = 0.95 if long else 0.7
        return [
            [(0.38, 0.04), (0.62, 0.04), (0.64, 0.36), (0.84 + w, bottom), (0.16 - w, bottom), (0.36, 0.36)]
        ]
    if kind == "sneakers":
        return [[(0.08, 0.5 - w), (0.45, 0.46), (0.62, 0.58), (0.92, 0.63), (0.94, 0.8), (0.08, 0.8)]]
    if kind == "sunglasses":
        lens = 0.2 if variant == "round" else 0.17
        left = [(0.08, 0.38), (0.46, 0.38), (0.44, 0.38 + lens + w), (0.3, 0.42 + lens), (0.12, 0.36 + lens)]
        right = [(1 - x, y) for x, y in reversed(left)]
        return [left, right, [(0.44, 0.38), (0.56, 0.38), (0.56, 0.44), (0.44, 0.44)]]
    if kind == "hat":
        brim = 0.08 if variant == "bucket" else 0.02
        crown = [(0.3, 0.28 + w), (0.7, 0.28 + w), (0.76, 0.6), (0.24, 0.6)]
        return [crown, [(brim, 0.6), (1 - brim, 0.6), (1 - brim - 0.04, 0.72), (brim + 0.04, 0.72)]]
    return [
        [(0.2, 0.4), (0.8, 0.4), (0.86 + w, 0.9), (0.14 - w, 0.9)],
        [
            (0.35, 0.4),
            (0.38, 0.18),
            (0.62, 0.18),
            (0.65, 0.4),
            (0.6, 0.4),
            (0.58, 0.25),
            (0.42, 0.25),
            (0.4, 0.4),
        ],
    ]


def _shift_hue(rgb, degrees: float):
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    r, g, b = colorsys.hsv_to_rgb((h + degrees / 360) % 1.0, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _fill(size: int, style: Style) -> Image.Image:
    base = _shift_hue(COLOURS.get(style.colour) or NOVEL_COLOURS[style.colour], style.hue_shift)
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    second = tuple(255 - c if sum(base) < 384 else max(c - 120, 0) for c in base)
    step = max(4, int(size / 10 * style.pattern_scale))
    if style.pattern == "striped":
        for y in range(0, size, step):
            draw.rectangle((0, y, size, y + step // 2 - 1), fill=second)
    elif style.pattern == "checked":
        for y in range(0, size, step):
            for x in range(0, size, step):
                if (x // step + y // step) % 2:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=second)
    elif style.pattern == "dotted":
        r = max(1, step // 5)
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=second)
    elif style.pattern == "floral":
        r = max(2, step // 3)
        for y in range(step // 2, size, step + 2):
            for x in range((y // step % 2) * step // 2, size, step + 2):
                for a in range(5):
                    px, py = x + r * math.cos(a * 1.256), y + r * math.sin(a * 1.256)
                    draw.ellipse((px - r / 2, py - r / 2, px + r / 2, py + r / 2), fill=second)
                draw.ellipse((x - 1, y - 1, x + 1, y + 1), fill=(240, 210, 60))
    elif style.pattern == "zigzag":
        for y in range(0, size + step, step):
            points = [
                (x, y + (step // 2 if (x // (step // 2 or 1)) % 2 else 0))
                for x in range(0, size + step, step // 2 or 1)
            ]
            draw.line(points, fill=second, width=max(1, step // 4))
    elif style.pattern == "leopard":
        spots = random.Random(f"{style.kind}-{style.colour}-{style.pattern_scale:.3f}")
        for _ in range(int((size / step) ** 2 * 1.5)):
            x, y, r = spots.uniform(0, size), spots.uniform(0, size), spots.uniform(step / 6, step / 3)
            draw.ellipse((x - r, y - r * 0.7, x + r, y + r * 0.7), outline=second, width=max(1, step // 6))
    elif style.pattern == "diamond":
        for y in range(0, size + step, step):
            for x in range(0, size + step, step):
                h = step // 2
                draw.polygon([(x, y - h), (x + h, y), (x, y + h), (x - h, y)], fill=second)
    elif style.pattern == "wavy":
        for y in range(0, size + step, step):
            points = [(x, y + step / 4 * math.sin(x / max(1, step) * math.pi)) for x in range(0, size + 2, 2)]
            draw.line(points, fill=second, width=max(1, step // 3))
    return img


def garment(
    style: Style, size: int, opening: float = 0.01, lit: bool = True
) -> tuple[Image.Image, Image.Image]:
    """The garment's pixels and its mask ("L", 255 where it is), on a size x size square."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for n, poly in enumerate(_outline(style.kind, style.variant, style.shape, opening)):
        draw.polygon(
            [(x * size, y * size) for x, y in poly], fill=255 if n == 0 or style.kind != "jacket" else 0
        )
    pixels = _fill(size, style)
    if lit and style.light != 1.0:
        pixels = ImageEnhance.Brightness(pixels).enhance(style.light)
    return pixels, mask


def render(style: Style, size: int = 96, background=(246, 246, 244)) -> Image.Image:
    canvas = Image.new("RGB", (size, size), background)
    pixels, mask = garment(style, size, lit=False)
    canvas.paste(pixels, (0, 0), mask)
    if style.light != 1.0:  # the whole square is lit, background included
        canvas = ImageEnhance.Brightness(canvas).enhance(style.light)
    return canvas


@dataclass
class Product:
    id: str
    style: Style
    record: dict
    # A planted duplicate: another retailer's listing of `dup_of`, photographed again
    # (dx, dy shift in pixels, crop fraction kept, JPEG quality).
    dup_of: str | None = None
    reshoot: tuple[int, int, float, int] | None = None


@dataclass
class Look:
    id: str
    garments: dict[str, str]  # zone -> source product id
    styles: dict[str, Style] = field(default_factory=dict)  # zone -> the varied style worn


def make_catalog(
    n: int, seed: int, duplicates: float = 0.0, palette: str = "base", accessories: bool = False
) -> list[Product]:
    """n products; with `duplicates` > 0, that share of them is also listed by 1-3 other
    retailers (appended after the n originals, ids w<n>... on): the same garment re-shot
    (shifted, cropped, re-compressed), under another title wrapping, price and market.
    `palette`: "base", or "novel" (colours and patterns the demo model never saw).
    `accessories`: hats and sunglasses too (the hard world's catalog)."""
    kind_table = ALL_KINDS if accessories else KINDS
    colours, patterns = PALETTES[palette]
    rng = random.Random(seed)
    shops = random.Random(f"{seed}-retailers")  # a stream of its own: the rest is unchanged
    products = []
    kinds = list(kind_table)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        zone, variants, genders, (lo, hi), vendor_words = kind_table[kind]
        style = Style(
            kind,
            rng.choice(variants),
            rng.choice(list(colours)),
            rng.choice(patterns),
            pattern_scale=rng.uniform(0.8, 1.2),
            shape=rng.uniform(-1, 1),
        )
        pid = f"w{i:05d}"
        record = {
            "id": pid,
            "title": style.caption[2:].capitalize(),
            "brand": rng.choice(BRANDS),
            # Vendors' own words half of the time: enrichment standardises them.
            "category": rng.choice(vendor_words) if rng.random() < 0.5 else kind,
            "gender": rng.choice(genders),
            "market": rng.choice(MARKETS),
            "price": round(rng.uniform(lo, hi), 2),
            "currency": "USD",
            "sizes": ["one size"]
            if kind in ("handbag", "sunglasses", "hat")
            else (
                [str(s) for s in range(36, 46) if rng.random() < 0.6]
                if kind == "sneakers"
                else [s for s in ("XS", "S", "M", "L", "XL") if rng.random() < 0.7] or ["M"]
            ),
            "in_stock": rng.random() < 0.85,
            "image_url": f"images/{pid}.png",
        }
        record["title"] = f"{record['title']} {shops.choice(LINES)}"
        record["retailer"] = shops.choice(RETAILERS)
        record["product_url"] = f"https://{record['retailer'].lower().replace(' ', '')}.example/p/{pid}"
        products.append(Product(pid, style, record))
    return products + _plant_duplicates(products, duplicates, random.Random(f"{seed}-duplicates"))


def _plant_duplicates(products: list[Product], share: float, rng: random.Random) -> list[Product]:
    out: list[Product] = []
    for original in products:
        if rng.random() >= share:
            continue
        others = [r for r in RETAILERS if r != original.record["retailer"]]
        for retailer in rng.sample(others, rng.randint(1, 3)):
            pid = f"w{len(products) + len(out):05d}"
            title = rng.choice(_TITLE_WRAPS).format(t=original.record["title"], r=retailer)
            record = {
                **original.record,
                "id": pid,
                "title": title,
                "price": round(original.record["price"] * rng.uniform(0.8, 1.2), 2),
                "market": rng.choice(MARKETS),
                "in_stock": rng.random() < 0.85,
                "image_url": f"images/{pid}.jpg",
                "retailer": retailer,
                "product_url": f"https://{retailer.lower().replace(' ', '')}.example/p/{pid}",
            }
            reshoot = (rng.randint(-3, 3), rng.randint(-3, 3), rng.uniform(0.92, 1.0), rng.randint(70, 92))
            out.append(Product(pid, original.style, record, original.id, reshoot))
    return out


def render_listing(product: Product, size: int = 128) -> Image.Image:
    """A listing's photo; a planted duplicate re-shoots its original's."""
    img = render(product.style, size=size)
    if product.reshoot is None:
        return img
    dx, dy, keep, _ = product.reshoot
    bg = img.getpixel((0, 0))
    moved = Image.new("RGB", img.size, bg)
    moved.paste(img, (dx, dy))
    margin = int(size * (1 - keep) / 2)
    return moved.crop((margin, margin, size - margin, size - margin)).resize((size, size))


def vary(style: Style, rng: random.Random) -> Style:
    """The same garment as a look generator would draw it: never pixel-identical."""
    return Style(
        style.kind,
        style.variant,
        style.colour,
        style.pattern,
        pattern_scale=style.pattern_scale * rng.uniform(0.8, 1.25),
        hue_shift=rng.uniform(-8, 8),
        shape=max(-1.0, min(1.0, style.shape + rng.uniform(-0.5, 0.5))),
        light=rng.uniform(0.85, 1.12),
    )


def make_looks(products: list[Product], n: int, seed: int) -> list[Look]:
    rng = random.Random(seed)
    by_zone: dict[str, list[Product]] = {}
    for p in products:
        by_zone.setdefault(KINDS[p.style.kind][0], []).append(p)
    looks = []
    for i in range(n):
        if rng.random() < 0.3:
            chosen = {"dress": rng.choice(by_zone["dress"]), "feet": rng.choice(by_zone["feet"])}
        else:
            chosen = {z: rng.choice(by_zone[z]) for z in ("upper", "lower", "feet")}
        looks.append(
            Look(
                f"look{i:04d}",
                {z: p.id for z, p in chosen.items()},
                {z: vary(p.style, rng) for z, p in chosen.items()},
            )
        )
    return looks


LOOK_SIZE = (192, 576)


def render_look(look: Look, seed: int) -> Image.Image:
    rng = random.Random(f"{seed}-{look.id}")
    bg = tuple(int(rng.uniform(200, 250)) for _ in range(3))
    width, height = LOOK_SIZE
    img = Image.new("RGB", LOOK_SIZE, bg)
    draw = ImageDraw.Draw(img)
    r = int(0.06 * height)
    draw.ellipse(
        (width / 2 - r * 0.8, 0.01 * height, width / 2 + r * 0.8, 0.01 * height + 2 * r), fill=(224, 182, 150)
    )
    for zone, style in look.styles.items():
        if zone == "dress":  # a dress spans the upper and lower zones
            top = zone_box("upper", width, height)
            bottom = zone_box("lower", width, height)
            box = (top[0], top[1], top[2], bottom[3])
            side = (box[2] - box[0], box[3] - box[1])
            garment = render(style, size=max(side), background=bg).resize(side)
        else:
            box = zone_box(zone, width, height)
            garment = render(style, size=box[2] - box[0], background=bg)
        img.paste(garment, box[:2])
    return img


def look_crops(look_img: Image.Image) -> dict[str, Image.Image]:
    """The body-zone crops the fallback localizer takes (what the demo model trains on)."""
    return {z: look_img.crop(zone_box(z, *look_img.size)) for z in BODY_ZONES}


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def easy_boxes(look: Look) -> dict[str, list[int]]:
    """Where the easy renderer puts each garment (the body zones; a dress spans two)."""
    width, height = LOOK_SIZE
    boxes = {}
    for zone in look.garments:
        if zone == "dress":
            top, bottom = zone_box("upper", width, height), zone_box("lower", width, height)
            boxes[zone] = [top[0], top[1], top[2], bottom[3]]
        else:
            boxes[zone] = list(zone_box(zone, width, height))
    return boxes


def grade(img: Image.Image, rng: random.Random) -> Image.Image:
    """A generator's look: a colour cast (warm or cool), lifted blacks, soft focus and grain."""
    import numpy as np
    from PIL import ImageFilter

    cast = rng.choice(((1.12, 1.0, 0.82), (0.85, 0.97, 1.15), (1.08, 0.92, 1.05)))
    x = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 1.6))), dtype=np.float32)
    x = x * np.array(cast, dtype=np.float32) * rng.uniform(0.8, 0.9) + rng.uniform(20, 40)
    x += np.random.default_rng(rng.randrange(1 << 30)).normal(0, 6, x.shape)
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def write_world(
    out: Path,
    products: int = 400,
    looks: int = 60,
    seed: int = 1,
    duplicates: float = 0.0,
    palette: str = "base",
    difficulty: str = "easy",
    graded: bool = False,
) -> dict:
    """catalog.jsonl + images/, looks/*.png + looks.json (ground truth); returns the manifest.
    `duplicates`: the share of products also listed by other retailers (manifest "items": each
    listing's item, the original's id). `difficulty`: "easy" (a centred full-length figure
    drawn where the body-zone localizer cuts) or "hard" (clients/world_hard.py: the figure
    anywhere, cut off, layered, with bags and accessories; the catalog has hats and
    sunglasses too) or "mixed" (half of each). Each look's truth has its garments' boxes and
    its difficulty. `graded`: looks come colour-graded, softened and grainy, as an image
    generator renders them (catalog photos stay clean), a domain gap the demo model never saw."""
    if difficulty not in ("easy", "hard", "mixed"):
        raise ValueError(f"difficulty: 'easy', 'hard' or 'mixed', not {difficulty!r}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "looks").mkdir(exist_ok=True)
    catalog = make_catalog(products, seed, duplicates, palette, accessories=difficulty != "easy")
    with open(out / "catalog.jsonl", "w") as fh:
        for p in catalog:
            if p.reshoot is None:
                render_listing(p).save(out / p.record["image_url"])
            else:
                render_listing(p).save(out / p.record["image_url"], "JPEG", quality=p.reshoot[3])
            fh.write(json.dumps(p.record) + "\n")
    truth = []
    originals = [p for p in catalog if p.dup_of is None]
    n_hard = {"easy": 0, "hard": looks, "mixed": looks // 2}[difficulty]
    wearable = [p for p in originals if p.style.kind in KINDS]  # easy looks wear no accessories
    drawn = [
        (look, render_look(look, seed), easy_boxes(look), {"level": "easy"})
        for look in make_looks(wearable, looks - n_hard, seed + 1)
    ]
    if n_hard:
        from clients.world_hard import make_hard_looks, render_hard_look

        for look in make_hard_looks(originals, n_hard, seed + 2):
            look.id = f"look{len(drawn):04d}"
            img, _ = render_hard_look(look)
            drawn.append((look, img, look.boxes, look.frame.difficulty("outer" in look.styles)))
    for look, img, boxes, level in drawn:
        if graded:
            img = grade(img, random.Random(f"grade-{seed}-{look.id}"))
        img.save(out / "looks" / f"{look.id}.png")
        truth.append(
            {
                "id": look.id,
                "image": f"looks/{look.id}.png",
                "garments": look.garments,
                "boxes": boxes,
                "difficulty": level,
                "styles": {z: asdict(s) for z, s in look.styles.items()},
            }
        )
    manifest = {
        "seed": seed,
        "palette": palette,
        "difficulty": difficulty,
        "graded": graded,
        "products": products,
        "looks": truth,
        "captions": {p.id: p.style.caption for p in catalog},
        "items": {p.id: p.dup_of or p.id for p in catalog},
        "attributes": {
            p.id: {
                "kind": p.style.kind,
                "colour": p.style.colour,
                "pattern": p.style.pattern,
                "gender": p.record["gender"],
            }
            for p in catalog
        },
    }
    (out / "looks.json").write_text(json.dumps(manifest, indent=1))
    return manifest
