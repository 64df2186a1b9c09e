"""`looksync calibrate-dedup`: an embedding space's near-duplicate threshold, measured.

SearchLook collapses candidates whose image vectors are nearly identical (gateway/look/dedup.py).
Where "nearly identical" starts depends on the model: real CLIP keeps distinct products well
below 0.97, the small demo model puts distinct products of one kind and colour almost on top of
each other, and a random-weight model puts everything above 0.99. A threshold that suits one
space eats the answers of another, so each space records its own with its index.

The measurement uses a world with planted duplicates (clients/world.py; one is generated when
none is given): for every listing, its most similar listing of *another* item of the same
category (what query-time dedup would wrongly merge), and the similarities between listings of
the same item. The threshold sits just above the `quantile` of the first, so distinct products
almost never merge; the second says how many true duplicates the vector test still catches (the
title test and the offline item job, `looksync dedup`, catch the others).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.embedder import TritonEmbedder
from gateway.index.base import EmbeddingSpace, index_name

CEILING = 0.9999  # above this, float noise decides; a space this crowded gets no vector dedup


@dataclass
class Calibration:
    threshold: float
    quantile: float
    listings: int
    distinct: dict[str, float]  # nearest other item of the same category: p50, p99, max
    duplicates: dict[str, float]  # listings of one item: p50, min, share at or above threshold

    def summary(self) -> str:
        d, u = self.distinct, self.duplicates
        return (
            f"threshold {self.threshold:.4f} ({self.listings} listings): nearest distinct product "
            f"p50 {d['p50']:.4f}, p99 {d['p99']:.4f}, max {d['max']:.4f}; listings of one item "
            f"p50 {u.get('p50', float('nan')):.4f}, {u.get('caught', 0.0):.0%} at or above the threshold"
        )


def default_world(root: Path, seed: int = 4242) -> Path:
    from clients.world import write_world

    world = root / "calibration-world"
    write_world(world, products=300, looks=0, seed=seed, duplicates=0.3)
    return world


async def measure(
    embedder: TritonEmbedder,
    space: EmbeddingSpace,
    world: Path,
    quantile: float = 0.995,
    margin: float = 0.001,
    timeout_s: float = 60.0,
) -> Calibration:
    manifest = json.loads((world / "looks.json").read_text())
    records = [json.loads(line) for line in (world / "catalog.jsonl").read_text().splitlines()]
    items = manifest["items"]
    kinds = np.array([manifest["attributes"][r["id"]]["kind"] for r in records])
    owner = np.array([items[r["id"]] for r in records])
    vectors = []
    for i in range(0, len(records), 32):
        batch = [(world / r["image_url"]).read_bytes() for r in records[i : i + 32]]
        vectors.append(await embedder.embed_images(space.model, space.version, batch, timeout_s))
    v = np.concatenate(vectors)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    sims = v @ v.T
    same_kind = kinds[:, None] == kinds[None, :]
    same_item = owner[:, None] == owner[None, :]
    distinct = np.where(same_kind & ~same_item, sims, -np.inf).max(1)
    distinct = distinct[np.isfinite(distinct)]
    threshold = float(min(CEILING, np.quantile(distinct, quantile) + margin))
    pairs = sims[np.triu(same_item, k=1)]
    dup = (
        {
            "p50": float(np.median(pairs)),
            "min": float(pairs.min()),
            "caught": float(np.mean(pairs >= threshold)),
        }
        if pairs.size
        else {}
    )
    return Calibration(
        threshold=round(threshold, 5),
        quantile=quantile,
        listings=len(records),
        distinct={
            "p50": float(np.median(distinct)),
            "p99": float(np.quantile(distinct, 0.99)),
            "max": float(distinct.max()),
        },
        duplicates=dup,
    )


async def calibrate_dedup(settings, world: Path | None, model: str | None, version: int | None, quantile: float,
                          apply: bool = True) -> tuple[EmbeddingSpace, Calibration]:  # fmt: skip
    """Measure the space (default: the one the alias serves) and record its threshold."""
    from gateway.errors import FailedPrecondition, InvalidArgument
    from gateway.server import open_index

    if world is not None and not all((world / f).is_file() for f in ("catalog.jsonl", "looks.json")):
        raise InvalidArgument(
            f"--world: {world} is not a world (catalog.jsonl and looks.json, clients/world.py)"
        )
    embedder = TritonEmbedder(settings.triton_url)
    index = open_index(settings)
    try:
        if model:
            if version:
                space = await index.space_of(index_name(model, version))
            else:  # the newest index of that model
                same = [s for s in (await index.indexes()).values() if s.model == model]
                space = max(same, key=lambda s: s.version) if same else None
            if space is None:
                wanted = f"{model} v{version}" if version else model
                raise FailedPrecondition(f"no index of {wanted}: index the catalog with it first")
        else:
            space = await index.space()
            if space is None:
                raise FailedPrecondition("the catalog index is empty: run `looksync index CATALOG.jsonl`")
        with tempfile.TemporaryDirectory(prefix="looksync-calibrate-") as tmp:
            result = await measure(embedder, space, world or default_world(Path(tmp)), quantile)
        if apply:
            await index.set_dedup_threshold(space, result.threshold)
        return space, result
    finally:
        await embedder.close()
        await index.close()
