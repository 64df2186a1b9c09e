"""GetLookMatches: a look matched offline, read by id and made current.

look id -> stored record (gateway/index/look_matches.py)
    miss, or matched in another space -> SearchLook when the request has the image
                                         (source "online"), else NOT_FOUND
    hit -> candidates re-read from the catalog, the request's filters applied now, one
           per item with current offers, k per garment (gateway/look/stored.py)
        -> a large share of the candidates gone (deleted, or out of the look's own
           filters): the look is queued to be matched again (best effort, after answering)
"""

from __future__ import annotations

import asyncio
import logging

from gateway.errors import InvalidArgument, NotFound
from gateway.filters import AllOf, SearchFilters, build_filters
from gateway.index.base import CatalogIndex, EmbeddingSpace, within
from gateway.look.pipeline import LookResult, LookSearcher
from gateway.look.stored import restore
from gateway.observability import log
from gateway.search import Deadline, Timings, request_space

logger = logging.getLogger("looksync.offline")


class LookMatchReader:
    def __init__(
        self, index: CatalogIndex, look_searcher: LookSearcher, redis_url: str, requeue_share: float
    ):
        self.index = index
        self.look_searcher = look_searcher
        self.redis_url = redis_url
        self.requeue_share = requeue_share
        self._redis = None
        self._tasks: set[asyncio.Task] = set()

    async def get(
        self,
        look_id: str,
        filters: SearchFilters,
        k: int,
        deadline: Deadline,
        requested: EmbeddingSpace | None = None,
        image: bytes = b"",
    ) -> LookResult:
        if not look_id.strip() or len(look_id) > 256:
            raise InvalidArgument("look_id: a non-empty id of at most 256 characters is required")
        timings = Timings()
        space = await request_space(self.index, requested)
        with timings.stage("read"):
            async with within(deadline.left(), "reading the look's matches"):
                record = (await self.index.look_matches.get([look_id])).get(look_id)
        if record is not None and not record.in_space(space) and space == await self.index.space():
            # Matched before a swap: queue it for the serving space (once, however often read).
            self._background(self._requeue(record.request, f"matched in {record.space}", "space"))
        if record is None or not record.in_space(space):
            if not image:
                why = "was never matched" if record is None else f"was matched in {record.space}, not {space}"
                raise NotFound(f"look {look_id!r} {why}; send the image to search it online")
            result = await self.look_searcher.search_look(image, filters, k, deadline, space)
            result.look_id = look_id
            return result
        own = build_filters(**record.request.filters)
        with timings.stage("restore"):
            # The look's own preferences (market, sizes...) hold as well as the request's.
            async with within(deadline.left(), "reading the look's products"):
                restored = await restore(self.index, space, record.layers, AllOf((own, filters)), k)
        # Judged on the candidates read (the head of each list, what users see).
        gone = sum(
            1 for i in restored.read if i not in restored.current or not own.matches(restored.current[i])
        )
        requeued = bool(restored.read) and gone / len(restored.read) >= self.requeue_share
        if requeued:
            why = f"{gone} of {len(restored.read)} candidates read are gone"
            self._background(self._requeue(record.request, why, "gone"))
        return LookResult(
            restored.layers,
            space,
            timings,
            source="precomputed",
            computed_at=record.computed_at,
            look_id=look_id,
            requeued=requeued,
        )

    def _background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _requeue(self, request, why: str, reason: str) -> None:
        from gateway.offline.worker import requeue_look

        try:
            if self._redis is None:  # no await before the assignment: one client however many race
                import redis.asyncio as redis

                self._redis = redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=1)
            await requeue_look(self._redis, request, reason)
            log(logger, logging.INFO, "stale look re-queued", look_id=request.look_id, why=why)
        except Exception as exc:  # Redis away: the next read tries again
            log(
                logger,
                logging.WARNING,
                "re-queueing a stale look failed",
                look_id=request.look_id,
                error=str(exc),
            )

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
