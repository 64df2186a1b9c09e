"""Hard looks: the figure anywhere and at any size, cut off at the knees or the waist, mirrored,
on textured or cluttered backgrounds, with an open jacket over the top, a carried bag, a hat
and sunglasses. Ground truth is each visible garment's box.

A look is drawn in two steps. The figure is drawn on its own layer (the easy look's body, with
room for a bag at the hand and a hat above the head) together with a label map saying which
garment each pixel shows; then figure and label map are scaled, mirrored and placed on a
background together. Boxes come from the placed label map, so they are what is visible: shoes
cut off by a waist-up frame are not in the truth, and a top under an open jacket is boxed
where it shows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from clients.world import Look, Product, garment, vary
from gateway.look.localizer import zone_box
from gateway.taxonomy import CATEGORY_LAYER

FIGURE = (288, 616)  # the figure layer
BODY = (48, 40)  # where the easy look's 192 x 576 body sits in it
SKIN = (224, 182, 150)
CANVASES = ((384, 512), (448, 448), (512, 384), (384, 576), (320, 480))
# Share of the figure layer's height a frame keeps, from the top.
CROPS = {"full": 1.0, "knees": (40 + 0.74 * 576) / 616, "waist": (40 + 0.47 * 576) / 616}
# Garments are drawn in this order: later ones cover earlier ones (the jacket over the top).
DRAW_ORDER = ("lower", "dress", "upper", "feet", "outer", "bag", "head", "eyes")
# The classes a garment detector learns: layers, so a shirt and the jacket over it are two.
DETECTOR_LAYERS = ("topwear", "outerwear", "bottomwear", "dress", "footwear", "bag", "headwear", "eyewear")
MIN_VISIBLE = 0.25  # share of a garment that must show for it to be in the truth
MIN_PIXELS = 150


@dataclass
class Frame:
    canvas: tuple[int, int]
    crop: str
    fill: float  # visible figure height / canvas height
    centre_x: float  # body centre / canvas width
    mirrored: bool
    background: str  # plain | texture | clutter
    seed: int
    opening: float = 0.13  # half-width of an open jacket's front

    def difficulty(self, layered: bool) -> dict:
        return {
            "level": "hard",
            "position": "centre" if abs(self.centre_x - 0.5) < 0.12 else "off-centre",
            "scale": "small" if self.fill < 0.7 else "large",
            "crop": self.crop,
            "layering": "layered" if layered else "single",
            "background": self.background,
            "mirrored": self.mirrored,
        }


@dataclass
class HardLook(Look):
    frame: Frame | None = None
    boxes: dict[str, list[int]] = field(default_factory=dict)


def _by_kind(products: list[Product]) -> dict[str, list[Product]]:
    out: dict[str, list[Product]] = {}
    for p in products:
        out.setdefault(p.style.kind, []).append(p)
    return out


def make_hard_looks(products: list[Product], n: int, seed: int) -> list[HardLook]:
    """Looks wearing variations of `products` (a catalog made with accessories), each with its
    frame; a kind the catalog lacks is simply never worn."""
    rng = random.Random(seed)
    kinds = _by_kind(products)

    def pick(*names):
        pool = [p for k in names for p in kinds.get(k, [])]
        return rng.choice(pool) if pool else None

    looks = []
    for i in range(n):
        chosen: dict[str, Product | None] = {}
        if rng.random() < 0.25:
            chosen["dress"] = pick("dress")
        else:
            chosen["lower"] = pick("trousers", "skirt")
        layered = rng.random() < 0.35
        if "lower" in chosen:
            chosen["upper"] = pick("t-shirt", "shirt") if layered else pick("t-shirt", "shirt", "jacket")
        if layered:
            chosen["outer"] = pick("jacket")
        chosen["feet"] = pick("sneakers")
        for zone, kind, share in (("bag", "handbag", 0.4), ("head", "hat", 0.3), ("eyes", "sunglasses", 0.3)):
            if rng.random() < share:
                chosen[zone] = pick(kind)
        chosen = {z: p for z, p in chosen.items() if p is not None}
        crop = rng.choices(list(CROPS), weights=(0.5, 0.25, 0.25))[0]
        frame = Frame(
            canvas=rng.choice(CANVASES),
            crop=crop,
            fill=rng.uniform(0.45, 0.98) if crop == "full" else rng.uniform(0.9, 1.0),
            centre_x=rng.uniform(0.22, 0.78),
            mirrored=rng.random() < 0.5,
            background=rng.choice(("plain", "texture", "clutter")),
            seed=rng.randrange(1 << 30),
            opening=rng.uniform(0.1, 0.16),
        )
        looks.append(
            HardLook(
                f"look{i:04d}",
                {z: p.id for z, p in chosen.items()},
                {z: vary(p.style, rng) for z, p in chosen.items()},
                frame=frame,
            )
        )
    return looks


def _garment_box(zone: str, bag_side: int) -> tuple[int, int, int, int]:
    """Where a zone's garment goes in the figure layer."""
    bx, by = BODY
    if zone in ("upper", "lower", "feet"):
        left, top, right, bottom = zone_box(zone, 192, 576)
        return left + bx, top + by, right + bx, bottom + by
    if zone == "dress":
        upper, lower = _garment_box("upper", 0), _garment_box("lower", 0)
        return upper[0], upper[1], upper[2], lower[3]
    if zone == "outer":  # a little larger than the top, so it covers its shoulders
        left, top, right, bottom = _garment_box("upper", 0)
        grow = (right - left) // 16
        return left - grow, top - grow, right + grow, bottom + grow
    centre = bx + 96
    if zone == "bag":
        cx = centre + bag_side * 104
        cy = by + int(0.44 * 576)
        return cx - 40, cy - 40, cx + 40, cy + 40
    if zone == "head":
        return centre - 42, 6, centre + 42, 90
    if zone == "eyes":
        return centre - 30, 48, centre + 30, 108
    raise ValueError(zone)


def draw_figure(look: HardLook) -> tuple[Image.Image, Image.Image, Image.Image, list[str]]:
    """(pixels, alpha, label map, zones): label value i+1 marks zones[i]'s visible pixels."""
    rng = random.Random(f"figure-{look.frame.seed}")
    pixels = Image.new("RGB", FIGURE, (0, 0, 0))
    alpha = Image.new("L", FIGURE, 0)
    labels = Image.new("L", FIGURE, 0)
    r = 0.06 * 576
    head = (
        BODY[0] + 96 - r * 0.8,
        BODY[1] + 0.01 * 576,
        BODY[0] + 96 + r * 0.8,
        BODY[1] + 0.01 * 576 + 2 * r,
    )
    ImageDraw.Draw(pixels).ellipse(head, fill=SKIN)
    ImageDraw.Draw(alpha).ellipse(head, fill=255)
    zones = [z for z in DRAW_ORDER if z in look.styles]
    bag_side = rng.choice((-1, 1))
    for n, zone in enumerate(zones):
        box = _garment_box(zone, bag_side)
        side = (box[2] - box[0], box[3] - box[1])
        opening = look.frame.opening if zone == "outer" else 0.01
        colour, mask = garment(look.styles[zone], max(side), opening)
        if colour.size != side:
            colour, mask = colour.resize(side), mask.resize(side)
        pixels.paste(colour, box[:2], mask)
        alpha.paste(255, box, mask)
        labels.paste(n + 1, box, mask)
    return pixels, alpha, labels, zones


def _background(frame: Frame) -> Image.Image:
    rng = random.Random(f"background-{frame.seed}")
    width, height = frame.canvas
    base = tuple(int(rng.uniform(170, 250)) for _ in range(3))
    img = Image.new("RGB", frame.canvas, base)
    draw = ImageDraw.Draw(img)
    if frame.background == "texture":  # bands and grain: a wall, a floor, a curtain
        step = rng.randint(6, 40)
        vertical = rng.random() < 0.5
        for i in range(0, max(width, height), step):
            shade = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in base)
            draw.rectangle((i, 0, i + step, height) if vertical else (0, i, width, i + step), fill=shade)
        grain = np.random.default_rng(frame.seed).normal(0, rng.uniform(8, 20), (height, width, 1))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + grain, 0, 255).astype(np.uint8))
    elif frame.background == "clutter":  # objects behind the person, some garment-coloured
        for _ in range(rng.randint(5, 14)):
            w, h = rng.uniform(0.1, 0.35) * width, rng.uniform(0.1, 0.35) * height
            x, y = rng.uniform(-0.1, 1.0) * width, rng.uniform(-0.1, 1.0) * height
            colour = tuple(rng.randint(20, 250) for _ in range(3))
            shape = rng.choice((draw.rectangle, draw.ellipse))
            shape((x, y, x + w, y + h), fill=colour)
    return img


def render_hard_look(look: HardLook) -> tuple[Image.Image, np.ndarray]:
    """The look and its class map (0 background, i+1 for DETECTOR_LAYERS[i]); fills
    `look.boxes` with the visible garments' boxes (and drops the others from the truth)."""
    frame = look.frame
    pixels, alpha, labels, zones = draw_figure(look)
    if frame.mirrored:
        pixels, alpha, labels = (
            im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in (pixels, alpha, labels)
        )
    width, height = frame.canvas
    kept = CROPS[frame.crop] * FIGURE[1]
    scale = frame.fill * height / kept
    size = (max(1, round(FIGURE[0] * scale)), max(1, round(FIGURE[1] * scale)))
    x0 = round(frame.centre_x * width - FIGURE[0] / 2 * scale)
    if frame.crop == "full":
        room = height - FIGURE[1] * scale
        y0 = round(random.Random(f"y-{frame.seed}").uniform(0, max(0.0, room)))
    else:  # the frame's bottom edge cuts the figure where the crop says
        y0 = round(height - kept * scale)
    img = _background(frame)
    img.paste(
        pixels.resize(size, Image.Resampling.BILINEAR), (x0, y0), alpha.resize(size, Image.Resampling.NEAREST)
    )
    placed = Image.new("L", frame.canvas, 0)
    scaled_labels = labels.resize(size, Image.Resampling.NEAREST)
    placed.paste(scaled_labels, (x0, y0))
    placed_np, full_np = np.asarray(placed), np.asarray(scaled_labels)
    classes = np.zeros(placed_np.shape, dtype=np.uint8)
    look.boxes = {}
    for n, zone in enumerate(zones):
        visible = placed_np == n + 1
        count = int(visible.sum())
        if count < MIN_PIXELS or count < MIN_VISIBLE * int((full_np == n + 1).sum()):
            look.garments.pop(zone, None)
            continue
        ys, xs = np.nonzero(visible)
        look.boxes[zone] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        layer = CATEGORY_LAYER[look.styles[zone].kind]
        classes[visible] = DETECTOR_LAYERS.index(layer) + 1
    look.styles = {z: s for z, s in look.styles.items() if z in look.garments}
    return img, classes


# Result layers a truth garment may be found in: its own layer, and for body zones the layers
# that zone can show (a dress is cut in the upper and the lower zone).
ZONE_LAYERS = {
    "upper": {"topwear", "outerwear", "dress"},
    "lower": {"bottomwear", "dress"},
    "feet": {"footwear"},
    "dress": {"dress", "topwear", "bottomwear"},
    "outer": {"outerwear", "topwear"},
    "bag": {"bag"},
    "head": {"headwear"},
    "eyes": {"eyewear"},
}
# What each body zone of the fallback localizer can show (gateway/look/localizer.py BODY_ZONES).
BODY_ZONE_LAYERS = {
    "upper": {"topwear", "outerwear", "dress"},
    "lower": {"bottomwear", "dress"},
    "feet": {"footwear"},
}


def iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def garment_regions(zone: str, truth_box, regions) -> list:
    """The localizer regions (`.zone`: a layer, or a body zone's name; `.box`) a worn garment
    may be found in: of a compatible layer and overlapping its box, the best overlap first."""
    fits = []
    for region in regions:
        layers = BODY_ZONE_LAYERS.get(region.zone, {region.zone})
        overlap = 1.0 if truth_box is None else iou(region.box, truth_box)
        if layers & ZONE_LAYERS[zone] and overlap > 0:
            fits.append((overlap, region))
    return [r for _, r in sorted(fits, key=lambda t: -t[0])]
