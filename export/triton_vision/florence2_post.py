"""Florence-2 location tokens -> boxes: a pure function over the generated text.

Florence-2 writes a box as four location tokens `<loc_x0><loc_y0><loc_x1><loc_y1>`, each a bin
of 1000 along the image's width (x) or height (y), after the phrase it belongs to:

    "t-shirt<loc_120><loc_200><loc_480><loc_610>jeans<loc_...>x4"

A bin `b` stands for the pixel coordinate `(b + 0.5) * size / 1000` (the centre of the bin, as
in transformers' Florence2PostProcessor). The parser is deliberately forgiving and never raises
on model output; what it does with malformed text:

- a run of loc tokens whose length is not a multiple of 4: the whole groups of 4 are boxes, the
  leftover 1-3 tokens are ignored;
- a bin outside 0..bins-1 (e.g. `<loc_1000>`): that box is dropped;
- corners in the wrong order: they are reordered (x0 <= x1, y0 <= y1);
- a box of zero width or height (both corners in the same bin): dropped;
- a box with no phrase before it: kept, with the label "" (the caller knows what it asked for);
- other tags (`<s>`, `</s>`, `<pad>`, `<od>`, `<ground>`, ...) are removed from phrases.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LOC_BINS = 1000
_ITEM = re.compile(r"<loc_(\d+)>|<[^<>]*>|[^<]+|<")


@dataclass(frozen=True)
class Box:
    label: str
    x0: float
    y0: float
    x1: float
    y1: float

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


def dequantize(bin_index: int, size: int, bins: int = LOC_BINS) -> float:
    """Centre of a location bin, in pixels of an axis `size` pixels long."""
    return (bin_index + 0.5) * size / bins


def _box(label: str, bins4: list[int], width: int, height: int, bins: int) -> Box | None:
    if any(b < 0 or b >= bins for b in bins4):
        return None
    bx0, by0, bx1, by1 = bins4
    bx0, bx1 = min(bx0, bx1), max(bx0, bx1)
    by0, by1 = min(by0, by1), max(by0, by1)
    if bx0 == bx1 or by0 == by1:
        return None
    return Box(
        label,
        dequantize(bx0, width, bins),
        dequantize(by0, height, bins),
        dequantize(bx1, width, bins),
        dequantize(by1, height, bins),
    )


def parse_location_text(text: str, image_size: tuple[int, int], bins: int = LOC_BINS) -> list[Box]:
    """All boxes in Florence-2 output text, in pixel coordinates of an image of `image_size` (w, h)."""
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    boxes: list[Box] = []
    phrase: list[str] = []
    run: list[int] = []

    def flush_run() -> None:
        label = " ".join("".join(phrase).split())
        for start in range(0, len(run) - len(run) % 4, 4):
            box = _box(label, run[start : start + 4], width, height, bins)
            if box is not None:
                boxes.append(box)
        run.clear()
        phrase.clear()

    for match in _ITEM.finditer(text):
        loc = match.group(1)
        if loc is not None:
            run.append(int(loc))
            continue
        if run:
            flush_run()
        token = match.group(0)
        if token.startswith("<") and token.endswith(">") and len(token) > 1:
            phrase.append(" ")  # a tag separates words, it is never part of a phrase
        else:
            phrase.append(token)
    if run:
        flush_run()
    return boxes


def boxes_to_arrays(boxes: list[Box]):
    """(N, 4) float32 boxes and a list of N labels, the shapes Triton returns."""
    import numpy as np

    arr = np.asarray([b.as_tuple() for b in boxes], dtype=np.float32).reshape(-1, 4)
    return arr, [b.label for b in boxes]
