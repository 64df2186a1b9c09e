"""The catalog index interface that both backends implement (embedded LanceDB, Elasticsearch)."""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from gateway.catalog import Product
from gateway.errors import DeadlineExceeded, FailedPrecondition
from gateway.filters import SearchFilters


def index_name(model: str, version: int) -> str:
    return f"products-{model}-v{version}"


@dataclass(frozen=True)
class EmbeddingSpace:
    """Which model made a vector. Vectors of different spaces are never compared.

    `family` (clip | siglip | dinov2) and `modalities` (what the space can embed: image, and
    text unless it is image-only) describe the space; they follow from (model, version), so
    they take no part in equality."""

    model: str
    version: int
    dim: int
    family: str = field(default="clip", compare=False)
    modalities: tuple[str, ...] = field(default=("image", "text"), compare=False)
    # The image cosine at which SearchLook collapses near-duplicate candidates, calibrated for
    # this space (`looksync calibrate-dedup`): a model whose renders of distinct products are
    # near-identical needs a higher one than real CLIP. None: the gateway's setting.
    dedup_threshold: float | None = field(default=None, compare=False)

    @property
    def has_text(self) -> bool:
        return "text" in self.modalities

    def record(self) -> dict:
        """The identity as stored with an index (manifest entry, Elasticsearch _meta)."""
        return {
            "model": self.model,
            "version": self.version,
            "dim": self.dim,
            "family": self.family,
            "modalities": list(self.modalities),
            **({} if self.dedup_threshold is None else {"dedup_threshold": self.dedup_threshold}),
        }

    @classmethod
    def from_record(cls, r: dict) -> EmbeddingSpace:
        """Indexes written before families existed record no family: they are CLIP."""
        return cls(
            str(r["model"]),
            int(r["version"]),
            int(r["dim"]),
            str(r.get("family", "clip")),
            tuple(r.get("modalities", ("image", "text"))),
            None if r.get("dedup_threshold") is None else float(r["dedup_threshold"]),
        )

    @property
    def index_name(self) -> str:
        return index_name(self.model, self.version)

    def __str__(self) -> str:
        only = "" if self.has_text else ", image-only"
        return f"{self.model} v{self.version} ({self.dim}-d{only})"


@dataclass
class ScoredProduct:
    product: Product
    score: float
    vector: np.ndarray | None = None
    # The item's other listings that pass the request's filters, cheapest first (gateway/items.py).
    offers: list[Product] = field(default_factory=list)


@dataclass
class StoredProduct:
    product: Product
    image_hash: str
    vector: np.ndarray


def check_query(vector: np.ndarray, query_space: EmbeddingSpace, index_space: EmbeddingSpace) -> None:
    """Refuse a query vector from another space, or of the wrong shape, before it can match."""
    if (query_space.model, query_space.version) != (index_space.model, index_space.version):
        raise FailedPrecondition(f"query vector is from {query_space} but the index holds {index_space}")
    if vector.ndim != 1 or vector.shape[0] != index_space.dim:
        raise FailedPrecondition(
            f"query vector has shape {tuple(vector.shape)}, the index holds {index_space.dim}-d vectors"
        )


@contextlib.asynccontextmanager
async def within(timeout_s: float | None, what: str):
    """The request's remaining deadline around one index call."""
    if timeout_s is None:
        yield
        return
    try:
        async with asyncio.timeout(max(timeout_s, 0.0)):
            yield
    except TimeoutError:
        raise DeadlineExceeded(f"{what} did not finish within the request's deadline") from None


class CatalogIndex(ABC):
    """A product index whose vectors all belong to one embedding space per physical index,
    read through an alias that names the serving one."""

    # Other processes re-read the alias and the write targets at most every refresh_s.
    refresh_s: float = 0.5

    @property
    def settle_s(self) -> float:
        """How long until every process has seen a change of the swap state: one refresh
        interval for the cache, one for a batch that read it just before, and a margin."""
        return 2 * self.refresh_s + 0.25

    @abstractmethod
    async def space(self) -> EmbeddingSpace | None:
        """The space of the index the alias points at; None when there is none yet."""

    @abstractmethod
    async def search(
        self,
        vector: np.ndarray,
        space: EmbeddingSpace,
        filters: SearchFilters,
        k: int,
        with_vectors: bool = False,
        index: str | None = None,
        timeout_s: float | None = None,
    ) -> tuple[EmbeddingSpace, list[ScoredProduct]]:
        """kNN over the space's index (or the one named) with the filters applied before
        ranking. `timeout_s`: what is left of the request's deadline; past it the search is
        abandoned with DeadlineExceeded (never an answer after the client has given up)."""

    async def search_many(
        self,
        vectors: list[np.ndarray],
        space: EmbeddingSpace,
        filters: SearchFilters,
        k: int,
        with_vectors: bool = False,
    ) -> list[list[ScoredProduct]]:
        """kNN for several query vectors (batch jobs); per vector, its hits. Backends that can
        send them as one request override this."""
        found = await asyncio.gather(*(self.search(v, space, filters, k, with_vectors) for v in vectors))
        return [hits for _, hits in found]

    async def neighbours(
        self, vectors: list[np.ndarray], space: EmbeddingSpace, filters: SearchFilters, k: int
    ) -> list[list[tuple[str, float]]]:
        """Per vector, the (product id, score) of its k nearest, for batch jobs that hold the
        products already (the dedup self-join); a backend may search with more recall than its
        serving path and skip the product fields."""
        found = await self.search_many(vectors, space, filters, k)
        return [[(h.product.id, h.score) for h in hits] for hits in found]

    async def listings(self, space: EmbeddingSpace, item_ids: list[str]) -> dict[str, list[Product]]:
        """The live listings of these items (the dedup job's groups), by item id."""
        raise NotImplementedError(f"{type(self).__name__} does not group listings into items")

    async def scan(self, space: EmbeddingSpace, batch_size: int = 2048, category: str | None = None):
        """Every live product (of one category when given) with its image hash and vector, in
        batches of StoredProduct (an async iterator; the dedup job reads the catalog with it)."""
        raise NotImplementedError(f"{type(self).__name__} cannot scan its products")
        yield  # pragma: no cover  (makes this an async generator)

    async def categories(self, space: EmbeddingSpace) -> dict[str, int]:
        """Live products per category: the dedup job reads and groups one category at a time."""
        raise NotImplementedError(f"{type(self).__name__} cannot count its categories")

    async def assign_items(self, space: EmbeddingSpace, items: dict[str, tuple[str, str]]) -> list[str]:
        """product id -> (item id, the image hash it was grouped on); outcomes as apply_ops."""
        from gateway.index.lww import Op

        return await self.apply_ops(
            space,
            [Op("item", pid, 0, {"item_id": item, "image_hash": h}) for pid, (item, h) in items.items()],
        )

    @abstractmethod
    async def ensure(self, space: EmbeddingSpace, make_current_if_none: bool = True) -> str:
        """Create the physical index for a space if missing; return its name."""

    # -- swap state (gateway/models.py): which indexes exist, which one serves, which ones
    # live ingestion also writes while a new one is built, and where a rollback goes.

    @abstractmethod
    async def indexes(self) -> dict[str, EmbeddingSpace]:
        """Every physical index and its space, by name."""

    @abstractmethod
    async def space_of(self, name: str) -> EmbeddingSpace | None:
        """The space of one physical index; None when there is no such index."""

    @abstractmethod
    async def alias_target(self) -> str | None:
        """The index the read alias names now (read fresh, not from the cache)."""

    @abstractmethod
    async def set_current(self, space: EmbeddingSpace) -> str:
        """Point the read alias at the index of `space` in one atomic step and remember the
        index it left as the previous target."""

    @abstractmethod
    async def previous_target(self) -> str | None:
        """The index the alias named before its last move (where a rollback goes)."""

    @abstractmethod
    async def write_targets(self) -> list[EmbeddingSpace]:
        """Indexes live ingestion writes besides the alias target (one being rebuilt)."""

    @abstractmethod
    async def set_write_targets(self, spaces: list[EmbeddingSpace]) -> None: ...

    @abstractmethod
    async def set_dedup_threshold(self, space: EmbeddingSpace, threshold: float | None) -> None:
        """Record the space's calibrated near-duplicate threshold with its index (None: clear)."""

    @abstractmethod
    async def drop(self, space: EmbeddingSpace) -> None:
        """Delete a physical index; refused while the read alias names it."""

    async def optimize(self, space: EmbeddingSpace) -> bool:
        """After a bulk (re)build: whatever makes the index fast to search. Returns whether an
        ANN structure exists afterwards."""
        return False

    async def compact(self, space: EmbeddingSpace) -> None:
        """After many small writes (a dedup run's item ids): merge them so that reads by id
        and searches stay fast. Cheaper than `optimize`: no index is rebuilt from scratch."""
        return None  # Elasticsearch merges its segments itself

    async def upkeep(self, space: EmbeddingSpace, max_unindexed_rows: int, max_fragments: int) -> dict | None:
        """Compact when writes since the last compaction left at least `max_unindexed_rows` rows
        outside the table's indexes or `max_fragments` fragments (the ingest workers call it
        now and then). Returns what was found and whether it compacted; None: nothing to keep
        up (Elasticsearch merges its segments itself)."""
        return None

    @abstractmethod
    async def upsert(self, space: EmbeddingSpace, items: list[tuple]) -> None:
        """Insert or replace by id: items are (product, image content hash, vector[, event_seq]).
        event_seq orders writes of one product (see gateway/ingest/events.py); a write older
        than the stored one is skipped."""

    @abstractmethod
    async def update_fields(
        self, space: EmbeddingSpace, product_id: str, fields: dict, event_seq: int | None = None
    ) -> str:
        """Metadata-only change (no vector sent): "applied", "missing" or "stale" (a newer
        event already wrote this product)."""

    @abstractmethod
    async def delete(self, space: EmbeddingSpace, ids: list[str], event_seq: int | None = None) -> None:
        """Remove products; an event older than the stored state changes nothing."""

    async def apply_events(
        self, space: EmbeddingSpace, events: list[tuple[str, str, int, dict]]
    ) -> list[str]:
        """Metadata updates and deletes as one write where the backend can: (kind, product id,
        event_seq, fields) with kind "update" | "delete"; returns each one's outcome."""
        out = []
        for kind, pid, seq, fields in events:
            if kind == "delete":
                await self.delete(space, [pid], seq)
                out.append("applied")
            else:
                out.append(await self.update_fields(space, pid, fields, seq))
        return out

    @abstractmethod
    async def get(self, space: EmbeddingSpace, ids: list[str]) -> dict[str, StoredProduct]:
        """Stored products by id (ids not present are absent from the result)."""

    async def products(self, space: EmbeddingSpace, ids: list[str]) -> dict[str, Product]:
        """Live products by id, without vectors (the read path of stored answers); backends
        override it with a lighter read than `get`."""
        return {pid: stored.product for pid, stored in (await self.get(space, ids)).items()}

    async def serving_read(
        self, space: EmbeddingSpace, ids: list[str], item_ids: list[str]
    ) -> tuple[dict[str, Product], dict[str, list[Product]]]:
        """Live products by id, and the live listings of these items (a stored answer's
        candidates and their offers), in as few reads as the backend can."""
        products = await self.products(space, ids) if ids else {}
        return products, (await self.listings(space, item_ids) if item_ids else {})

    @abstractmethod
    async def count(self, space: EmbeddingSpace) -> int: ...

    @property
    def look_matches(self):
        """The store of offline look matches beside this catalog (gateway/index/look_matches.py):
        put / get / scan / count / optimize."""
        raise NotImplementedError(f"{type(self).__name__} does not store look matches")

    @abstractmethod
    async def close(self) -> None: ...
