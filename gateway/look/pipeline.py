"""SearchLook, top to bottom:

    1 queries    LLM: one descriptive query per garment layer   -- fails/slow --> localizer + CLIP
    2 vectors    Triton: text embedding of each query (and the region crop's image embedding)
    3 retrieve   per layer, concurrently: kNN with the layer's categories + the request's filters
    3b dedup     near-duplicates collapse into the best one
    4 rerank     LLM over the top-k of each layer            -- fails/slow --> region-embedding cosine

One deadline covers the request; each stage gets a share of what is left, and the LLM stages
always leave room for their fallbacks, so a slow LLM costs quality, not the answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np
from prometheus_client import Counter

from gateway.embedder import TritonEmbedder
from gateway.errors import LookSyncError
from gateway.filters import SearchFilters
from gateway.index.base import CatalogIndex, EmbeddingSpace
from gateway.items import OVERFETCH, group_by_item
from gateway.llm import LLMError
from gateway.look.dedup import dedup
from gateway.look.querygen import (
    FallbackQueryGenerator,
    LLMQueryGenerator,
    decode_look_async,
    llm_image,
    source_box,
)
from gateway.look.rerank import LLMReranker, embedding_rerank
from gateway.look.stored import restore, to_stored
from gateway.look.types import Candidate, LayerOutcome, LayerQuery
from gateway.observability import log
from gateway.search import Deadline, Timings, check_image, request_space

FALLBACKS = Counter("looksync_fallbacks_total", "LLM stages answered by their fallback", ["stage", "reason"])
logger = logging.getLogger("looksync.look")

# Least time kept back from the LLM stages for their fallbacks (measured on an idle 2-core CPU
# target with the tiny model: fallback query generation ~40 ms, retrieval ~20 ms). A busy host
# is slower, so the reserve grows with what the fallbacks recently took (`Reserve`).
FALLBACK_RESERVE_S = 0.12
RERANK_RESERVE_S = 0.03


class Reserve:
    """Time an LLM stage leaves for its fallback: the floor, or 1.5x the slowest of the last
    runs of that fallback when the host is slower than the floor assumes. Without it, a loaded
    machine turns "the LLM was slow" into "the answer was late"."""

    def __init__(self, floor_s: float, window: int = 32):
        self.floor_s = floor_s
        self.recent: deque[float] = deque(maxlen=window)

    def observe(self, seconds: float) -> None:
        self.recent.append(seconds)

    def seconds(self, left: float | None = None) -> float:
        """The reserve; never more than half of `left`, so one slow outlier (a cold start)
        cannot starve the LLM of every budget for the next window of requests."""
        reserve = max(self.floor_s, 1.5 * max(self.recent, default=0.0))
        return reserve if left is None else min(reserve, max(left / 2, self.floor_s))


@dataclass
class LookSettings:
    k_per_layer_max: int = 50
    candidates_per_layer: int = 30  # retrieved before dedup and rerank
    dedup_threshold: float = 0.97
    llm_timeout_s: float = 8.0


@dataclass
class LookResult:
    layers: list[LayerOutcome]
    space: EmbeddingSpace
    timings: Timings
    cached: bool = False
    source: str = "online"  # "precomputed": read from the offline look matches
    computed_at: float = field(default_factory=time.time)
    look_id: str = ""
    requeued: bool = False


class LookSearcher:
    def __init__(
        self,
        embedder: TritonEmbedder,
        index: CatalogIndex,
        fallback_queries: FallbackQueryGenerator,
        llm_queries: LLMQueryGenerator | None,
        llm_reranker: LLMReranker | None,
        settings: LookSettings,
        max_image_pixels: int,
        triton_timeout_s: float,
        result_cache,
        text_cache,
        segmenter=None,
    ):
        self.embedder = embedder
        self.index = index
        self.fallback_queries = fallback_queries
        self.llm_queries = llm_queries
        self.llm_reranker = llm_reranker
        self.settings = settings
        self.max_image_pixels = max_image_pixels
        self.triton_timeout_s = triton_timeout_s
        self.result_cache = result_cache
        self.text_cache = text_cache
        self.segmenter = segmenter  # FlorenceSam2Localizer: garment masks for the rerank fallback
        self.query_reserve = Reserve(FALLBACK_RESERVE_S)  # fallback queries + embed + retrieve
        self.rerank_reserve = Reserve(RERANK_RESERVE_S)  # fallback rerank

    async def search_look(
        self,
        image: bytes,
        filters: SearchFilters,
        k: int,
        deadline: Deadline,
        space: EmbeddingSpace | None = None,
    ) -> LookResult:
        timings = Timings()
        with timings.stage("validate_image"):
            check_image(image, self.max_image_pixels)
        space = await request_space(self.index, space)
        cache_key = _cache_key(image, filters, k, space)
        cached = await self.result_cache.get(cache_key)
        if cached is not None:
            with timings.stage("cache_recheck"):
                layers = await self._fresh(cached, space, filters)
            if layers is not None:
                return LookResult(layers, space, timings, cached=True)
        with timings.stage("decode"):
            look = await decode_look_async(image, self.max_image_pixels, deadline)
            # The LLM sees the look reduced and re-encoded once, labelled with its true type,
            # never the client's original (up to 16 MB) inlined into each of up to 9 calls.
            llm_look = (
                await asyncio.to_thread(llm_image, look) if self.llm_queries or self.llm_reranker else b""
            )

        # 1 queries
        with timings.stage("queries"):
            queries, fallback_started = await self._queries(image, llm_look, look, space, deadline)
        # 2 vectors
        with timings.stage("embed"):
            await self._embed_queries(queries, look, space, deadline)
        # 3 retrieve + 3b dedup, all layers at once
        with timings.stage("retrieve"):
            outcomes = await asyncio.gather(
                *(self._retrieve(q, space, filters, deadline, k) for q in queries)
            )
        if fallback_started is not None:
            self.query_reserve.observe(time.monotonic() - fallback_started)
        # 4 rerank, all layers at once; segmentation (if configured) runs once, for whichever
        # layers fall back
        segmented = _Once(lambda: self._segment(image, outcomes, space, deadline))
        with timings.stage("rerank"):
            await asyncio.gather(
                *(self._rerank(llm_look, o, deadline, segmented, str(i)) for i, o in enumerate(outcomes))
            )
        mapped = set()
        for outcome in outcomes:
            outcome.candidates = outcome.candidates[:k]
            query = outcome.query
            if query.region is not None and id(query) not in mapped:
                # Found on the working copy of the look; answered in the look's own pixels.
                query.region = replace(query.region, box=source_box(query.region.box, look))
                mapped.add(id(query))
        await self.result_cache.set(cache_key, to_stored(outcomes))
        return LookResult(list(outcomes), space, timings)

    async def _fresh(
        self, cached, space: EmbeddingSpace, filters: SearchFilters
    ) -> list[LayerOutcome] | None:
        """A cached answer made current (gateway/look/stored.py); None: unusable, search
        again. Unlike a precomputed look, a cached answer is all or nothing: anything that
        left since (sold out, repriced, deleted, grouped into one item) means searching again
        rather than answering with fewer."""
        try:
            restored = await restore(self.index, space, cached, filters)
        except (KeyError, TypeError, ValueError) as exc:  # an entry of another shape: a miss
            log(logger, logging.WARNING, "unusable cached look result; searching again", error=str(exc))
            return None
        stored = sum(len(layer["candidates"]) for layer in cached)
        if restored.dropped or sum(len(o.candidates) for o in restored.layers) < stored:
            return None
        return restored.layers

    async def _queries(self, image, llm_look, look, space, deadline) -> tuple[list[LayerQuery], float | None]:
        """The layer queries, and when the fallback started (None: the LLM answered)."""
        if self.llm_queries is not None:
            left = deadline.left()
            budget = min(self.settings.llm_timeout_s, left - self.query_reserve.seconds(left))
            try:
                return await self.llm_queries.generate(llm_look, budget), None
            except LLMError as exc:
                FALLBACKS.labels("query_generation", exc.reason).inc()
                log(
                    logger, logging.WARNING, "LLM query generation failed; using the fallback", error=str(exc)
                )
        else:
            FALLBACKS.labels("query_generation", "no_llm").inc()
        started = time.monotonic()
        queries = await self.fallback_queries.generate(
            look, space, deadline.left(self.triton_timeout_s), image
        )
        return queries, started

    async def _embed_queries(self, queries: list[LayerQuery], look, space, deadline) -> None:
        """Text vectors for every query (cached) and, for LLM queries, the image vector of the
        garment's zone, all in one round: the rerank fallback then needs no further Triton call,
        so it still fits when the LLM rerank uses up its budget."""
        missing = []
        for q in queries:
            if not space.has_text:  # image-only space: the garment's pixels are the query
                continue
            cached = await self.text_cache.get(f"{space.model}:{space.version}:{q.query}")
            q.text_vector = None if cached is None else np.asarray(cached, dtype=np.float32)
            if q.text_vector is None:
                missing.append(q)
        zones = []
        if any(q.region is None for q in queries):
            zones = await self.fallback_queries.localizer.regions(look, deadline.left(self.triton_timeout_s))
        # Each query takes a garment region of its layer, a free one first (two tops, two crops).
        need_region, taken = [], set()
        for q in queries:
            if q.region is not None:
                continue
            fits = [i for i, r in enumerate(zones) if set(q.categories) & set(r.categories)]
            free = [i for i in fits if i not in taken]
            if fits:
                pick = (free or fits)[0]
                taken.add(pick)
                need_region.append((q, zones[pick]))
        timeout = deadline.left(self.triton_timeout_s)
        calls = []
        if missing:
            calls.append(
                self.embedder.embed_texts(space.model, space.version, [q.query for q in missing], timeout)
            )
        if need_region:
            calls.append(
                self.embedder.embed_images(
                    space.model, space.version, [r.image for _, r in need_region], timeout
                )
            )
        results = await asyncio.gather(*calls)
        if missing:
            vectors, _ = results.pop(0)
            for q, v in zip(missing, vectors):
                q.text_vector = v
                await self.text_cache.set(f"{space.model}:{space.version}:{q.query}", v.tolist())
        if need_region:
            for (q, region), v in zip(need_region, results.pop(0)):
                q.region, q.region_vector = region, v

    async def _retrieve(
        self, query: LayerQuery, space, filters: SearchFilters, deadline, k: int = 0
    ) -> LayerOutcome:
        """kNN for one layer, at least `k` candidates (the request's k_per_layer) or the
        configured candidates when more. A region embedding (the garment itself) leads when
        there is one; the text query alone is the LLM path's vector."""
        wanted = max(self.settings.candidates_per_layer, k)
        vector = query.text_vector
        if vector is None:  # image-only space
            vector = query.region_vector
            if vector is None:  # no zone of the look fits this layer
                return LayerOutcome(query)
        elif query.region_vector is not None and query.source == "fallback":
            vector = 0.8 * query.region_vector + 0.2 * query.text_vector
            vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        categories = query.categories
        if filters.categories:
            categories = tuple(c for c in categories if c in filters.categories)
            if not categories:
                return LayerOutcome(query)
        gender = filters.gender or query.gender
        layer_filters = replace(filters, categories=categories, gender=gender)
        vector_space = EmbeddingSpace(space.model, space.version, int(vector.shape[0]))
        _, hits = await self.index.search(
            vector,
            vector_space,
            layer_filters,
            wanted * OVERFETCH,
            with_vectors=True,
            timeout_s=deadline.left(),
        )
        # One candidate per item (offers attached); listings the dedup job has not grouped yet
        # are collapsed by image similarity.
        hits = await group_by_item(self.index, vector_space, hits, layer_filters, wanted)
        # The space's calibrated threshold when it has one (looksync calibrate-dedup).
        threshold = space.dedup_threshold or self.settings.dedup_threshold
        candidates = dedup([Candidate(h) for h in hits], threshold)
        return LayerOutcome(query, candidates)

    async def _segment(self, image: bytes, outcomes, space, deadline) -> dict[str, np.ndarray]:
        """CLIP vectors of each garment cut out by Florence-2 + SAM2, by the position of its
        outcome; {} on failure."""
        if self.segmenter is None:
            return {}
        # Keyed by the outcome's position: two garments of one layer are grounded apart.
        phrases = {str(i): o.query.query for i, o in enumerate(outcomes) if len(o.candidates) > 1}
        try:
            regions = await self.segmenter.regions_for(image, phrases, deadline.left(self.triton_timeout_s))
            if not regions:
                return {}
            keys = list(regions)
            vectors = await self.embedder.embed_images(
                space.model,
                space.version,
                [regions[key].image for key in keys],
                deadline.left(self.triton_timeout_s),
            )
        except LookSyncError as exc:
            FALLBACKS.labels("segmentation", type(exc).__name__).inc()
            log(logger, logging.WARNING, "segmentation failed; using body-zone regions", error=str(exc))
            return {}
        return dict(zip(keys, vectors))

    async def _rerank(
        self, llm_look: bytes, outcome: LayerOutcome, deadline, segmented=None, key: str = ""
    ) -> None:
        if len(outcome.candidates) < 2:
            return
        if self.llm_reranker is not None:
            left = deadline.left()
            budget = min(self.settings.llm_timeout_s, left - self.rerank_reserve.seconds(left))
            try:
                outcome.candidates = await self.llm_reranker.rerank(
                    llm_look, outcome.query, outcome.candidates, budget
                )
                outcome.rerank_source = "llm"
                return
            except LLMError as exc:
                FALLBACKS.labels("rerank", exc.reason).inc()
                log(
                    logger,
                    logging.WARNING,
                    "LLM rerank failed; using the fallback",
                    layer=outcome.query.layer,
                    error=str(exc),
                )
        else:
            FALLBACKS.labels("rerank", "no_llm").inc()
        started = time.monotonic()
        try:
            await self._fallback_rerank(outcome, segmented, key)
        finally:
            self.rerank_reserve.observe(time.monotonic() - started)

    async def _fallback_rerank(self, outcome: LayerOutcome, segmented, key: str) -> None:
        if segmented is not None and self.segmenter is not None:
            vector = (await segmented.get()).get(key)
            if vector is not None:
                outcome.candidates = embedding_rerank(vector, outcome.candidates)
                outcome.rerank_source = "segmentation"
                return
        if outcome.query.region_vector is None:
            return  # no zone shows this layer (bag, eyewear...): keep the retrieval order ("none")
        outcome.candidates = embedding_rerank(outcome.query.region_vector, outcome.candidates)
        outcome.rerank_source = "embedding"


class _Once:
    """Run an async function at most once, on first demand, and share its result."""

    def __init__(self, fn):
        self.fn = fn
        self.task: asyncio.Task | None = None

    async def get(self):
        if self.task is None:
            self.task = asyncio.ensure_future(self.fn())
        return await self.task


def _cache_key(image: bytes, filters: SearchFilters, k: int, space: EmbeddingSpace) -> str:
    # repr, not hash(): string hashes differ between processes, and Redis is shared by them.
    digest = hashlib.sha256(image + repr(filters).encode()).hexdigest()[:40]
    return f"look:{space.model}:{space.version}:{k}:{digest}"
