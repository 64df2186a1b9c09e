"""Compose a look: a simple full-length figure wearing given catalog garments.

Garments are drawn where `BodyZoneLocalizer` expects them, so the fallback path can be tested
end to end without real models. (A richer synthetic world with varied looks is its own issue.)
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw

from gateway.look.localizer import BODY_ZONES, zone_box

LOOK_SIZE = (192, 576)


def compose_look(
    garments: dict[str, Path | Image.Image], size=LOOK_SIZE, background=(238, 236, 232)
) -> bytes:
    """garments: zone ("upper" | "lower" | "feet") -> product image. Returns JPEG bytes."""
    width, height = size
    look = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(look)
    skin = (224, 182, 150)
    head_r = int(0.06 * height)
    draw.ellipse(
        (width / 2 - head_r * 0.8, 0.01 * height, width / 2 + head_r * 0.8, 0.01 * height + 2 * head_r),
        fill=skin,
    )
    for zone, image in garments.items():
        if zone not in BODY_ZONES:
            raise ValueError(f"unknown zone {zone!r}; zones: {', '.join(BODY_ZONES)}")
        img = image if isinstance(image, Image.Image) else Image.open(image)
        left, top, right, bottom = zone_box(zone, width, height)
        look.paste(img.convert("RGB").resize((right - left, bottom - top), Image.BICUBIC), (left, top))
    buf = io.BytesIO()
    look.save(buf, "JPEG", quality=92)
    return buf.getvalue()
