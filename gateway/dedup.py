"""Offline catalog dedup (`looksync dedup`): the listings of one item, sold by several retailers,
re-photographed or re-compressed, under other titles and prices, grouped into one item.

    scan the index (every live listing with its vector)
      -> candidate pairs: each listing's nearest neighbours in the index's own kNN, within its
         category (never all pairs): `CatalogIndex.neighbours`, ids and scores only, batched,
         with the backend's batch-job recall (the embedded index probes 3x the partitions)
      -> confirmed by the listings' own words and the picture: same category and brand (when
         both name one), title similarity >= title_threshold (content words of the titles, brand
         and retailer names and filler left out: "red striped shirt" vs "red checked shirt"
         differ, a shop's prefix does not) AND image cosine >= image_threshold
      -> items: components of confirmed pairs, merged only when every listing of one matches
         every listing of the other on both signals (no chaining A~B~C into one item when A and
         C differ), and at most MAX_ITEM_LISTINGS listings
      -> item_id = the smallest product id of the item, written as "item" ops (gateway/index/lww.py)

Incremental (the default): only listings without an item (new, or their image changed since,
which clears it) are placed: into the item of a confirmed neighbour, or an item of their own.
`full=True` regroups the whole catalog. Re-running either is harmless: a listing whose item is
unchanged is not written.
"""

from __future__ import annotations

import logging
import re
import time
import unicodedata
from dataclasses import dataclass, field, replace

import numpy as np
from prometheus_client import Counter
from tqdm import tqdm

from gateway.filters import build_filters
from gateway.index.base import EmbeddingSpace, StoredProduct
from gateway.observability import log

logger = logging.getLogger("looksync.dedup")
ASSIGNED = Counter("looksync_dedup_assigned_total", "Listings written with a new item id", ["mode"])

MAX_ITEM_LISTINGS = 16
NEIGHBOURS = 10
BATCH = 128  # listings per kNN request (one multi-vector query where the backend has them)
# Item ids per write. Each write is one LanceDB merge_insert, which joins on `id` over the whole
# table and leaves a fragment: at 1 M listings 500 per write ran at ~40 writes a minute, slowing
# as fragments piled up (every listing of a full run is written: ~50 min for the writes alone).
WRITE_CHUNK = 10_000
_FILLER = {
    "a", "an", "and", "the", "for", "with", "in", "of", "by", "new", "sale", "women", "womens",
    "woman", "men", "mens", "man", "unisex", "ladies", "free", "shipping", "official", "store",
    "shop", "collection", "edition", "item",
}  # fmt: skip


def title_tokens(title: str, names: tuple[str, ...] = ()) -> frozenset[str]:
    """The words of a title that describe the garment: lower-cased, accents off, brand and
    retailer names and filler words dropped."""
    text = unicodedata.normalize("NFKD", title.lower())
    text = "".join(c for c in text if not unicodedata.combining(c))
    for name in names:
        if name:
            text = text.replace(name.lower(), " ")
    return frozenset(t for t in re.findall(r"[a-z0-9]+", text.replace("'", "")) if t not in _FILLER)


def title_similarity(a: frozenset[str], b: frozenset[str]) -> float:
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


@dataclass
class DedupSettings:
    image_threshold: float = 0.5
    title_threshold: float = 0.9
    neighbours: int = NEIGHBOURS


@dataclass
class DedupReport:
    listings: int = 0
    items: int = 0
    grouped_items: int = 0  # items of two or more listings
    written: int = 0
    pairs_confirmed: int = 0
    pairs_refused: int = 0
    wall_s: float = 0.0
    mode: str = "incremental"
    items_of: dict[str, str] = field(default_factory=dict)  # product id -> item id (this run's view)


class _Listing:
    __slots__ = ("id", "category", "brand", "tokens", "vector", "image_hash", "item_id")

    def __init__(self, stored: StoredProduct):
        p = stored.product
        self.id, self.category, self.item_id, self.image_hash = p.id, p.category, p.item_id, stored.image_hash
        self.brand = p.brand.strip().lower()
        self.tokens = title_tokens(p.title, (p.brand, p.retailer))
        v = np.asarray(stored.vector, np.float32)
        self.vector = v / max(float(np.linalg.norm(v)), 1e-12)


class Dedup:
    def __init__(self, index, space: EmbeddingSpace, settings: DedupSettings | None = None):
        self.index, self.space = index, space
        self.s = settings or DedupSettings()
        self.listings: dict[str, _Listing] = {}
        # listing -> its component's root: ("item", item id) or ("listing", listing id)
        self.parent: dict[str, tuple[str, str]] = {}
        self.members: dict[tuple[str, str], list[str]] = {}

    # -- components: keyed by a root id; a listing's parent chain leads to its root ----------

    def _find(self, pid: str) -> tuple[str, str]:
        return self.parent[pid]  # a merge points every member at the kept root directly

    def _matches(self, a: _Listing, b: _Listing) -> bool:
        return (
            a.category == b.category
            and (a.brand == b.brand or not a.brand or not b.brand)
            and float(a.vector @ b.vector) >= self.s.image_threshold
            and title_similarity(a.tokens, b.tokens) >= self.s.title_threshold
        )

    def _merge(self, a: str, b: str, report: DedupReport) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return
        ma, mb = self.members[ra], self.members[rb]
        # Complete linkage: every listing of one item matches every listing of the other.
        if len(ma) + len(mb) > MAX_ITEM_LISTINGS or not all(
            self._matches(self.listings[x], self.listings[y]) for x in ma for y in mb
        ):
            report.pairs_refused += 1
            return
        report.pairs_confirmed += 1
        keep, gone = (ra, rb) if len(ma) >= len(mb) else (rb, ra)
        for pid in self.members[gone]:
            self.parent[pid] = keep
        self.members[keep].extend(self.members.pop(gone))

    # -- ingestion: new listings join existing items as they arrive ------------------------

    async def place(self, ids: list[str]) -> int:
        """Listings among `ids` that have no item join the item of a confirmed neighbour (every
        listing of that item must match). Those that match none stay without an item: the next
        `looksync dedup` run groups them (two shops may list a new item in the same batch).
        A few requests per call, whatever the number of ids. Returns how many were placed."""
        stored = await self.index.get(self.space, list(ids))
        todo = [_Listing(s) for s in stored.values() if not s.product.item_id]
        neighbours: dict[str, list[str]] = {}  # listing -> items of its neighbours, nearest first
        # One multi-vector query for the whole batch, any category (a request per category
        # costs more than it saves); each listing keeps the neighbours of its own category.
        found = (
            await self.index.search_many(
                [me.vector for me in todo], self.space, build_filters(), 3 * self.s.neighbours
            )
            if todo
            else []
        )
        for me, hits in zip(todo, found):
            items = [
                h.product.item_id
                for h in hits
                if h.product.id != me.id and h.product.item_id and h.product.category == me.category
            ]
            neighbours[me.id] = list(dict.fromkeys(items))[: self.s.neighbours]
        wanted = sorted({i for items in neighbours.values() for i in items})
        members = await self.index.listings(self.space, wanted) if wanted else {}
        member_ids = sorted({m.id for ms in members.values() for m in ms})
        known = {pid: _Listing(s) for pid, s in (await self.index.get(self.space, member_ids)).items()}
        writes: dict[str, tuple[str, str]] = {}
        for me in todo:
            for item in neighbours.get(me.id, []):
                others = [known[m.id] for m in members.get(item, []) if m.id in known and m.id != me.id]
                if 0 < len(others) < MAX_ITEM_LISTINGS and all(self._matches(me, o) for o in others):
                    writes[me.id] = (item, me.image_hash)
                    break
        placed = 0
        if writes:
            placed = sum(o == "applied" for o in await self.index.assign_items(self.space, writes))
        ASSIGNED.labels("ingest").inc(placed)
        return placed

    # -- the job ---------------------------------------------------------------------------

    async def run(self, full: bool = False, progress: bool = True) -> DedupReport:
        start = time.perf_counter()
        report = DedupReport(mode="full" if full else "incremental")
        # One category at a time: listings of two categories never match, and the job holds one
        # category's listings instead of the catalog's (12 M x 1024-d vectors alone are ~50 GB).
        counts = await self.index.categories(self.space)
        bar = tqdm(
            total=sum(counts.values()), unit="listing", desc=f"dedup ({report.mode})", disable=not progress
        )
        # The item ids are written once every category is grouped: LanceDB rewrites a changed
        # row outside the ANN index, and at 1 M listings the kNN of the categories after the
        # first's writes ran 7x slower (46 against 340 listings/s) until a compaction.
        writes: dict[str, tuple[str, str]] = {}
        for category in sorted(counts):
            writes |= await self._group(category, full, report, bar)
        bar.close()
        ids = sorted(writes)
        # At 1 M listings the writes and the compaction take ~15 minutes: they get a bar too.
        bar = tqdm(total=len(ids), unit="listing", desc="item ids written", disable=not progress or not ids)
        for start_at in range(0, len(ids), WRITE_CHUNK):
            chunk = {pid: writes[pid] for pid in ids[start_at : start_at + WRITE_CHUNK]}
            outcomes = await self.index.assign_items(self.space, chunk)
            report.written += sum(o == "applied" for o in outcomes)
            bar.update(len(chunk))
        bar.close()
        ASSIGNED.labels(report.mode).inc(report.written)
        if report.written:
            log(logger, logging.INFO, "dedup compacting the index", written=report.written)
            await self.index.compact(self.space)  # the item writes left many small fragments
        report.wall_s = time.perf_counter() - start
        log(
            logger,
            logging.INFO,
            "dedup done",
            mode=report.mode,
            listings=report.listings,
            items=report.items,
            grouped=report.grouped_items,
            written=report.written,
            wall_s=round(report.wall_s, 2),
        )
        return report

    async def _group(self, category: str, full: bool, report: DedupReport, bar) -> dict[str, tuple[str, str]]:
        """Group one category's listings; returns the item ids that change (listing -> (item,
        image hash))."""
        self.listings, self.parent, self.members = {}, {}, {}
        # Only what grouping needs is kept per listing (words, brand, vector): compact records,
        # not products.
        async for batch in self.index.scan(self.space, category=category):
            for stored in batch:
                self.listings[stored.product.id] = _Listing(stored)
        report.listings += len(self.listings)
        # Existing items are the starting components (incremental); a full run starts from
        # singletons.
        # Roots of the two kinds never meet: a listing that left its item keeps the id the item
        # is named after, and must be matched like any other before it joins it again.
        for pid in sorted(self.listings):
            item = self.listings[pid].item_id
            root = ("item", item) if (item and not full) else ("listing", pid)
            self.parent[pid] = root
            self.members.setdefault(root, []).append(pid)
        todo = sorted(p for p, x in self.listings.items() if full or not x.item_id)
        bar.update(len(self.listings) - len(todo))  # nothing to search for these
        # Not build_filters: it refuses categories outside the taxonomy, which an index loaded
        # from elsewhere may hold; they are grouped too.
        same_category = replace(build_filters(), categories=(category,))
        for at in range(0, len(todo), BATCH):
            chunk = todo[at : at + BATCH]
            found = await self.index.neighbours(
                [self.listings[p].vector for p in chunk],
                self.space,
                same_category,
                self.s.neighbours + 1,
            )
            for pid, hits in zip(chunk, found):
                listing = self.listings[pid]
                for other, _ in hits:
                    if (
                        other != pid
                        and other in self.listings
                        and self._matches(listing, self.listings[other])
                    ):
                        self._merge(pid, other, report)
            bar.update(len(chunk))
        # Item ids: an existing item keeps its id; a new one is named after its smallest id that
        # no existing item holds (none: it stays its own, unnamed, until a full run).
        writes: dict[str, tuple[str, str]] = {}
        taken = {root[1] for root in self.members if root[0] == "item"}
        for members in self.members.values():
            kept = sorted({self.listings[m].item_id for m in members} - {""})
            if kept and not full:
                item = kept[0]
            else:
                free = sorted(m for m in members if full or m not in taken)
                item = free[0] if free else ""
            for m in members:
                report.items_of[m] = item
                if self.listings[m].item_id != item:
                    writes[m] = (item, self.listings[m].image_hash)
            report.items += 1
            report.grouped_items += len(members) > 1
        return writes


async def run_dedup(settings, full: bool = False, progress: bool = True) -> DedupReport:
    """`looksync dedup` (and the demo): the job over the index behind the alias."""
    from gateway.server import open_index

    index = open_index(settings)
    try:
        space = await index.space()
        if space is None:
            raise ValueError(f"no index behind the alias {index.alias}: index a catalog first")
        thresholds = DedupSettings(settings.dedup_image_threshold, settings.dedup_title_threshold)
        return await Dedup(index, space, thresholds).run(full=full, progress=progress)
    finally:
        await index.close()
