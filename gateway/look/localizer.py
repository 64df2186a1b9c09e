"""Garment localizers: where in the look each garment is.

`BodyZoneLocalizer` assumes a full-length, roughly centred figure and cuts fixed body zones. It
knows nothing about the garments: it is what answers when the garment detector
(gateway/look/detector.py) is not served or finds nothing.
"""

from __future__ import annotations

import io
from typing import Protocol

from PIL import Image

from gateway.look.types import Region
from gateway.taxonomy import categories_of_layer

# zone -> (top, bottom) as fractions of the figure's height, and the layers it can show.
BODY_ZONES: dict[str, tuple[float, float, tuple[str, ...]]] = {
    "upper": (0.14, 0.46, ("topwear", "outerwear", "dress")),
    "lower": (0.46, 0.80, ("bottomwear", "dress")),
    "feet": (0.80, 0.98, ("footwear",)),
}


def zone_box(zone: str, width: int, height: int) -> tuple[int, int, int, int]:
    """The square box (centred in the zone) that a garment of that zone occupies; at least one
    pixel, inside the look, however small or thin the look is."""
    top_f, bottom_f, _ = BODY_ZONES[zone]
    top, bottom = int(top_f * height), int(bottom_f * height)
    side = max(1, min(bottom - top, width, height))
    left = (width - side) // 2
    top = min(max(0, top + (bottom - top - side) // 2), height - side)
    return left, top, left + side, top + side


class Localizer(Protocol):
    async def regions(self, look: Image.Image, timeout_s: float) -> list[Region]: ...


class BodyZoneLocalizer:
    name = "body_zones"

    async def regions(self, look: Image.Image, timeout_s: float = 0.0) -> list[Region]:
        out = []
        for zone, (_, _, layers) in BODY_ZONES.items():
            box = zone_box(zone, *look.size)
            buf = io.BytesIO()
            look.crop(box).save(buf, "JPEG", quality=92)  # 10x smaller than PNG, same embedding
            categories = tuple(c for layer in layers for c in categories_of_layer(layer))
            out.append(Region(zone, box, buf.getvalue(), categories))
        return out
