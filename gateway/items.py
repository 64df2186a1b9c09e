"""One answer per item: search hits folded into the items the dedup job grouped them into
(gateway/dedup.py), each shown as its best listing with the others as offers.

    hits (ranked, over-fetched) -> item of each hit (its own id while ungrouped)
        -> the item's live listings that pass the request's hard filters *now*
        -> best listing (in stock first, then lowest price, then id) = the hit's product,
           the rest = its offers (cheapest first); the item keeps its best-ranked score
        -> the first k items

Listings are read from the index at request time, so a sold-out, repriced or deleted listing
never shows as an offer, and deleting an item's best listing promotes the next one.
"""

from __future__ import annotations

from gateway.catalog import Product
from gateway.filters import SearchFilters
from gateway.index.base import ScoredProduct

# How many hits to fetch per item wanted: several listings of one item may rank together.
OVERFETCH = 3


def best_first(listings: list[Product]) -> list[Product]:
    """The order in which an item's listings are offered: in stock, cheapest, then by id."""
    return sorted(listings, key=lambda p: (not p.in_stock, p.price, p.id))


async def group_by_item(
    index, space, hits: list[ScoredProduct], filters: SearchFilters, k: int, known: dict | None = None
) -> list[ScoredProduct]:
    """At most one hit per item, at most k, in the order of each item's best hit. `known`:
    listings by item already read (several lists served at once read them in one call)."""
    # An ungrouped listing is its own item, keyed apart from item ids: a listing that left its
    # item (a new image) keeps the id the item is named after, and must not take its place.
    order: list[tuple[bool, str]] = []
    best: dict[tuple[bool, str], ScoredProduct] = {}
    for hit in hits:
        item = (True, hit.product.item_id) if hit.product.item_id else (False, hit.product.id)
        if item not in best:
            order.append(item)
            best[item] = hit
    order = order[:k]
    grouped = [i for grouped, i in order if grouped]
    missing = [i for i in grouped if known is None or i not in known]
    listings = {**(known or {}), **(await index.listings(space, missing) if missing else {})}
    out = []
    for item in order:
        hit = best[item]
        passing = [p for p in (listings.get(item[1], []) if item[0] else []) if filters.matches(p)]
        if not any(p.id == hit.product.id for p in passing):
            passing.append(hit.product)  # the search itself applied the filters to it
        ranked = best_first(passing)
        out.append(ScoredProduct(ranked[0], hit.score, hit.vector, offers=ranked[1:]))
    return out
