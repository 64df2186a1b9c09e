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
from gateway.items import best_first, group_by_item
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
    read: list[str]  # the stored candidates looked at (all of them when no k was given)
    dropped: int  # of those: deleted, or excluded by the filters now
    current: dict  # id -> Product: the ones read that are still in the index


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
    exists and passes `filters`, in stored order, one per item, at most k. With k, only the
    head of each list is read (three times k), and more only for a layer the filters thin out: a
    look stores 30 candidates per garment and is usually served 5."""
    lists = [layer["candidates"] for layer in stored]
    want = [len(c) if k is None else min(len(c), 3 * k) for c in lists]
    current: dict = {}
    known: dict = {}  # item id -> its live listings (offers)
    read: dict[str, None] = {}

    def live(c: dict):
        """What a stored candidate shows now: its listing when that still passes, else the best
        passing listing of its item (another shop's, in stock, within the price...), else None."""
        p = current.get(c["id"])
        if p is not None and filters.matches(p):
            return p
        item = (p.item_id if p is not None else "") or c.get("item_id", "")
        passing = [listing for listing in known.get(item, []) if filters.matches(listing)]
        return best_first(passing)[0] if passing else None

    while True:
        heads = [c for cands, n in zip(lists, want) for c in cands[:n] if c["id"] not in read]
        ids = list(dict.fromkeys(c["id"] for c in heads))
        # The items the candidates belonged to when stored, read in the same query: their
        # listings are the offers. An item regrouped since is read by group_by_item itself.
        items = list(
            dict.fromkeys(c["item_id"] for c in heads if c.get("item_id") and c["item_id"] not in known)
        )
        if ids or items:
            found, listings = await index.serving_read(space, ids, items)
            current.update(found)
            known.update(listings)
            read.update(dict.fromkeys(ids))
        more = False
        for i, cands in enumerate(lists):
            # Items, not listings: several listings of one item fold into one hit.
            passing = {p.item_id or p.id for p in map(live, cands[: want[i]]) if p is not None}
            if k is not None and len(passing) < k and want[i] < len(cands):
                want[i], more = min(len(cands), 2 * want[i] + k), True
        if not more:
            break
    layers = []
    for layer, cands, n in zip(stored, lists, want):
        shown = [(c, live(c)) for c in cands[:n]]
        by_id = {p.id: c for c, p in shown if p is not None}
        hits = [ScoredProduct(p, c["score"]) for c, p in shown if p is not None]
        # Offers are current too: the item's listings as they are now.
        grouped = await group_by_item(
            index, space, hits, filters, len(hits) if k is None else min(k, len(hits)), known
        )
        candidates = [Candidate(h, _duplicates(h, by_id)) for h in grouped]
        layers.append(LayerOutcome(_query(layer["query"]), candidates, layer["rerank_source"]))
    dropped = sum(1 for i in read if i not in current) + sum(
        1
        for cands, n in zip(lists, want)
        for c in cands[:n]
        if c["id"] in current and not filters.matches(current[c["id"]])
    )
    return Restored(layers, list(read), dropped, current)


def _duplicates(hit: ScoredProduct, by_id: dict[str, dict]) -> int:
    """The stored duplicate count of the listing the hit came from (its product, or one of its
    offers when another listing of the item is the best now)."""
    for p in (hit.product, *hit.offers):
        if p.id in by_id:
            return by_id[p.id]["duplicates"]
    return 0
