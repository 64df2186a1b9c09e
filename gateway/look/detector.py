"""Garments found by the garment detector served by Triton (export/detector.py).

The detector gives each cell of a grid over the look a garment layer (or background). Here the
cells become garments: connected cells of one layer are one garment, and parts of one garment
split by what covers them (an open jacket's two halves) merge when they are close. Each
garment gets its box in look pixels and a crop cut out of its background onto the catalog's
plain backdrop, as a product photo shows it; clutter behind a person never reaches the image
tower. Body zones answer when the detector is not served or finds nothing.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from export.detector import letterbox
from gateway.errors import DeadlineExceeded, LookSyncError, Unavailable
from gateway.look.localizer import BodyZoneLocalizer
from gateway.look.types import Region
from gateway.observability import log
from gateway.taxonomy import LAYERS, categories_of_layer

logger = logging.getLogger("looksync.look")
CATALOG_BACKDROP = (246, 246, 244)  # what product photos are shot on (clients/world.py render)
GARMENT_SHARE = 0.84  # a product photo's garment spans about this much of its square
MIN_CELLS = 4  # smaller blobs are noise (a 256-pixel input: 4 cells = 8 x 8 pixels)
MERGE_GAP = 0.35  # parts of one layer closer than this share of the larger part's side merge
MAX_GARMENTS = 8


@dataclass(frozen=True)
class DetectorSpec:
    classes: tuple[str, ...]
    input_size: int
    stride: int


@dataclass
class Detection:
    layer: str
    cells: np.ndarray  # bool grid: the garment's cells
    score: float  # mean probability of its layer over its cells

    @property
    def box(self) -> tuple[int, int, int, int]:
        ys, xs = np.nonzero(self.cells)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a small bool grid (at most 64 x 64: a flood fill is enough)."""
    seen = np.zeros_like(mask)
    out = []
    height, width = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask)
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp[y, x] = True
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        out.append(comp)
    return out


def _gap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    return max(0, max(a[0], b[0]) - min(a[2], b[2]), max(a[1], b[1]) - min(a[3], b[3]))


def detections(logits: np.ndarray, classes: tuple[str, ...]) -> list[Detection]:
    """Garments in one look's (classes, grid, grid) logits, largest first."""
    z = logits - logits.max(0, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(0, keepdims=True)
    winner = probs.argmax(0)
    found: list[Detection] = []
    for c, layer in enumerate(classes):
        if layer not in LAYERS:  # background
            continue
        parts = _components(winner == c)
        merged = True
        while merged and len(parts) > 1:  # close parts of one layer are one garment
            merged = False
            for i in range(len(parts)):
                for j in range(i + 1, len(parts)):
                    bi, bj = Detection(layer, parts[i], 0).box, Detection(layer, parts[j], 0).box
                    side = max(bi[2] - bi[0], bi[3] - bi[1], bj[2] - bj[0], bj[3] - bj[1])
                    if _gap(bi, bj) <= MERGE_GAP * side:
                        parts[i] = parts[i] | parts.pop(j)
                        merged = True
                        break
                if merged:
                    break
        for cells in parts:
            if cells.sum() >= MIN_CELLS:
                found.append(Detection(layer, cells, float(probs[c][cells].mean())))
    found.sort(key=lambda d: -int(d.cells.sum()))
    return found[:MAX_GARMENTS]


def look_mask(det: Detection, spec: DetectorSpec, size: tuple[int, int], scale: float, offset) -> Image.Image:
    """The garment's cells as a mask over the look ("L", 255 inside): up-sampled bilinearly
    (rounding the grid's corners), letterbox padding removed."""
    grid = Image.fromarray(det.cells.astype(np.uint8) * 255)
    full = grid.resize((spec.input_size, spec.input_size), Image.Resampling.BILINEAR)
    w, h = max(1, round(size[0] * scale)), max(1, round(size[1] * scale))
    full = full.crop((offset[0], offset[1], offset[0] + w, offset[1] + h)).resize(
        size, Image.Resampling.BILINEAR
    )
    return full.point(lambda v: 255 if v >= 128 else 0)


def cut_out(look: Image.Image, det: Detection, mask: Image.Image) -> Region | None:
    """The garment's box in look pixels and its crop on the catalog backdrop, square."""
    box = mask.getbbox()
    if box is None:
        return None
    width, height = box[2] - box[0], box[3] - box[1]
    side = int(max(width, height) / GARMENT_SHARE)
    square = Image.new("RGB", (side, side), CATALOG_BACKDROP)
    square.paste(look.crop(box), ((side - width) // 2, (side - height) // 2), mask.crop(box))
    buf = io.BytesIO()
    square.save(buf, "JPEG", quality=92)
    return Region(
        det.layer,
        box,
        buf.getvalue(),
        tuple(categories_of_layer(det.layer)),
        source="detector",
        score=det.score,
    )


def regions_from_logits(
    look: Image.Image, logits: np.ndarray, spec: DetectorSpec, scale: float, offset
) -> list[Region]:
    """One look's garments from its (classes, grid, grid) logits, as Regions in look pixels."""
    found = (
        cut_out(look, det, look_mask(det, spec, look.size, scale, offset))
        for det in detections(logits, spec.classes)
    )
    return [r for r in found if r is not None]


class DetectorLocalizer:
    """Garments from the detector; body zones when it is not served (checked again every
    `retry_s`), is too slow once, or finds nothing in a look. A Triton that cannot be reached
    fails the search (UNAVAILABLE) rather than turning the detector off for `retry_s`."""

    name = "detector"

    def __init__(self, embedder, model: str = "garment_detector", retry_s: float = 30.0):
        self.embedder = embedder
        self.model = model
        self.retry_s = retry_s
        self.fallback = BodyZoneLocalizer()
        self._spec: DetectorSpec | None = None
        self._unavailable_until = 0.0

    async def spec(self, timeout_s: float) -> DetectorSpec | None:
        if self._spec is None and time.monotonic() >= self._unavailable_until:
            try:
                params = await self.embedder.model_parameters(self.model, min(timeout_s, 2.0))
                self._spec = DetectorSpec(
                    tuple(params["classes"].split(",")), int(params["input_size"]), int(params["stride"])
                )
            except Unavailable:
                # Triton itself is unreachable: this search cannot be answered at all, and the
                # next one must ask again rather than settle for zones for `retry_s`.
                raise
            except DeadlineExceeded:
                return None  # slow this once: zones for this look, ask again for the next
            except (LookSyncError, KeyError, ValueError) as exc:
                self._unavailable_until = time.monotonic() + self.retry_s
                log(logger, logging.WARNING, "garment detector not served; using body zones", error=str(exc))
        return self._spec

    async def regions(self, look: Image.Image, timeout_s: float) -> list[Region]:
        spec = await self.spec(timeout_s)
        if spec is None:
            return await self.fallback.regions(look, timeout_s)
        # Resizing, the flood fill and JPEG encoding are CPU work: off the event loop, so other
        # requests keep being served meanwhile.
        pixels, scale, offset = await asyncio.to_thread(letterbox, look, spec.input_size)
        try:
            logits = await self.embedder.infer_array(
                self.model, "pixel_values", pixels[None], "logits", timeout_s
            )
        except LookSyncError as exc:
            if "not loaded" in str(exc):  # unloaded since: zones until it is back
                self._spec, self._unavailable_until = None, time.monotonic() + self.retry_s
                return await self.fallback.regions(look, timeout_s)
            raise
        found = await asyncio.to_thread(regions_from_logits, look, logits[0], spec, scale, offset)
        if not found:
            return await self.fallback.regions(look, timeout_s)
        return sorted(found, key=lambda r: (r.box[1], r.box[0]))  # top to bottom, as worn
