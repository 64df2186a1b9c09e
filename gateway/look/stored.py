"""Look answers kept as ids and scores (the result cache, offline look matches) made current.

    stored layers -> products re-read from the index by id (deleted ones are gone)
        -> the request's hard filters applied to them as they are now (sold out, repriced)
        -> one hit per item with its current offers (gateway/items.py)

Product state is never stored with an answer, so a served answer is never older than the
catalog, only its ranking is.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.filters import SearchFilters
from gateway.index.base import CatalogIndex, EmbeddingSpace, ScoredProduct
from gateway.items import group_by_item
from gateway.look.types import Candidate, LayerOutcome, LayerQuery, Region


def to_stored(outcomes: list[LayerOutcome]) -> list[dict]:
    """Each layer's query and where it was, and its candidates' ids and scores."""
    return [
        {
            "query": {
                "layer": o.query.layer,
                "categories": list(o.query.categories),
                "query": o.query.query,
                "source": o.query.source,
                "gender": o.query.gender,
                "box": list(o.query.region.box) if o.query.region else None,
                "region_source": o.query.region.source if o.query.region else "",
            },
            "rerank_source": o.rerank_source,
            "candidates": [
                {
                    "id": c.hit.product.id,
                    "score": float(c.hit.score),
                    "duplicates": c.duplicates,
                    "item_id": c.hit.product.item_id,
                }
                for c in o.candidates
            ],
        }
        for o in outcomes
    ]


@dataclass
class Restored:
    layers: list[LayerOutcome]
    candidates: int  # stored, over all layers
    dropped: int  # deleted, or excluded by the filters now
    current: dict  # id -> StoredProduct: the stored candidates still in the index


def _query(q: dict) -> LayerQuery:
    query = LayerQuery(q["layer"], tuple(q["categories"]), q["query"], q["source"], q.get("gender"))
    if q.get("box"):  # where the garment was: the response says it again
        query.region = Region(
            q["layer"], tuple(q["box"]), b"", query.categories, q.get("region_source", "zones")
        )
    return query


async def restore(
    index: CatalogIndex,
    space: EmbeddingSpace,
    stored: list[dict],
    filters: SearchFilters,
    k: int | None = None,
) -> Restored:
    """The stored layers as they read now: per layer, the candidates whose product still
    exists and passes `filters`, in stored order, one per item, at most k."""
    ids = list(dict.fromkeys(c["id"] for layer in stored for c in layer["candidates"]))
    current = await index.get(space, ids) if ids else {}
    layers, total, dropped = [], 0, 0
    for layer in stored:
        total += len(layer["candidates"])
        passing = [
            Candidate(ScoredProduct(current[c["id"]].product, c["score"]), c["duplicates"])
            for c in layer["candidates"]
            if c["id"] in current and filters.matches(current[c["id"]].product)
        ]
        dropped += len(layer["candidates"]) - len(passing)
        # Offers are current too: the item's listings as they are now.
        want = len(passing) if k is None else min(k, len(passing))
        hits = await group_by_item(index, space, [c.hit for c in passing], filters, want)
        by_id = {c.hit.product.id: c for c in passing}
        candidates = [Candidate(h, _duplicates(h, by_id)) for h in hits]
        layers.append(LayerOutcome(_query(layer["query"]), candidates, layer["rerank_source"]))
    return Restored(layers, total, dropped, current)


def _duplicates(hit: ScoredProduct, by_id: dict[str, Candidate]) -> int:
    """The stored duplicate count of the listing the hit came from (its product, or one of its
    offers when another listing of the item is the best now)."""
    for p in (hit.product, *hit.offers):
        if p.id in by_id:
            return by_id[p.id].duplicates
    return 0
