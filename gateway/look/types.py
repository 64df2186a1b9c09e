"""Typed values passed between the look-search stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gateway.index.base import ScoredProduct


@dataclass(frozen=True)
class Region:
    """A part of the look image that shows one garment (from a localizer)."""

    zone: str
    box: tuple[int, int, int, int]  # left, top, right, bottom in look pixels
    image: bytes  # the crop, PNG-encoded, ready for the image tower
    categories: tuple[str, ...]  # categories a garment in this zone can have
    # "zones": a fixed body zone, which may show any of several layers (one query per layer);
    # "detector" / "segmentation": one garment, found where it is (one query each).
    source: str = "zones"
    score: float = 1.0


@dataclass
class LayerQuery:
    """What to search for one garment layer, and where it came from ("llm" | "fallback")."""

    layer: str
    categories: tuple[str, ...]
    query: str
    source: str
    gender: str | None = None
    text_vector: np.ndarray | None = None
    region: Region | None = None
    region_vector: np.ndarray | None = None


@dataclass
class Candidate:
    hit: ScoredProduct
    duplicates: int = 0


@dataclass
class LayerOutcome:
    query: LayerQuery
    candidates: list[Candidate] = field(default_factory=list)
    rerank_source: str = "none"
