"""`looksync match-worker`: offline look matching shared by workers through Redis Streams.

The same rules as catalog ingestion (gateway/ingest/worker.py):
- a look request is acknowledged only after its result was written to the store, so a worker
  killed at any point leaves its requests pending, and XAUTOCLAIM hands them to a live worker
  after `claim_idle_ms`; the store keeps one record per look id, so a look matched twice is
  still stored once;
- requests in hand are kept fresh in the group (XCLAIM JUSTID), so a slow batch is never taken
  for a dead worker's;
- a look that cannot be matched (bad request, image missing or undecodable; or failing
  `max_tries` deliveries) goes to `look-match-requests:dead` with the reason;
- Redis, Triton or the index being down pauses the worker (requests stay pending), never ends it.

When the serving embedding space changes (a model swap), one worker re-queues every stored
look matched in another space (once per space, across workers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time

from prometheus_client import Counter, Gauge

from gateway.errors import LookSyncError, Unavailable
from gateway.ingest.worker import _one_line, _sid, _sleep_unless, is_redis_outage
from gateway.observability import log
from gateway.offline.matcher import Failure, LookMatcher, parse_manifest_line, stale_looks
from gateway.offline.record import LookRequest

logger = logging.getLogger("looksync.offline")
STREAM = "look-match-requests"
GROUP = "looksync-matchers"
DEAD_LETTERS = "look-match-requests:dead"
REQUEUED = "look-matches:requeued"  # <prefix>:<space> and <prefix>:look:<id>: once-only markers
LAG = Gauge("looksync_match_queue_lag", "Look requests in the stream not yet delivered to a worker")
PENDING = Gauge("looksync_match_queue_pending", "Look requests delivered but not yet acknowledged")
REQUEUES = Counter("looksync_match_requeued_total", "Looks queued to be matched again", ["reason"])
READY = Gauge("looksync_match_worker_ready", "1 while Redis, the index and Triton answer")


async def enqueue(redis, looks: list[LookRequest], reason: str = "manifest") -> int:
    """Add look requests to the stream (in pipelined chunks)."""
    for start in range(0, len(looks), 1000):
        pipe = redis.pipeline(transaction=False)
        for req in looks[start : start + 1000]:
            pipe.xadd(STREAM, {"look": json.dumps(req.to_dict()), "reason": reason})
        await pipe.execute()
    return len(looks)


async def requeue_look(redis, req: LookRequest, why: str, ttl_s: int = 600) -> bool:
    """Queue one look again unless it was queued within ttl_s (a look read a thousand times
    while stale is queued once)."""
    return await requeue_looks(redis, [req], why, ttl_s) == 1


async def requeue_looks(redis, looks: list[LookRequest], why: str, ttl_s: int = 600, scope: str = "") -> int:
    """Queue the looks not queued within ttl_s (per look and `scope`, e.g. the new space, so
    several workers re-queueing after one swap queue each look once). Returns how many."""
    queued = 0
    for start in range(0, len(looks), 1000):
        chunk = looks[start : start + 1000]
        pipe = redis.pipeline(transaction=False)
        for req in chunk:
            pipe.set(f"{REQUEUED}:look:{req.look_id}{scope}", why, nx=True, ex=ttl_s)
        fresh = [req for req, ok in zip(chunk, await pipe.execute()) if ok]
        if not fresh:
            continue
        try:
            await enqueue(redis, fresh, why)
        except Exception:
            # Not queued after all: let the next reader or worker try again.
            await redis.delete(*[f"{REQUEUED}:look:{req.look_id}{scope}" for req in fresh])
            raise
        queued += len(fresh)
    REQUEUES.labels(why.split(" ")[0]).inc(queued)
    return queued


class MatchWorker:
    def __init__(
        self,
        redis,
        matcher: LookMatcher,
        batch_looks: int = 32,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        max_tries: int = 3,
        consumer: str | None = None,
        dead_letters_max: int = 100_000,
    ):
        self.redis = redis
        self.matcher = matcher
        self.batch_looks = batch_looks
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.max_tries = max_tries
        self.dead_letters_max = dead_letters_max
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._held: set[str] = set()
        self._space_checked = None
        self._stop = asyncio.Event()
        self._written_since_optimize = 0
        self._optimized_at = time.monotonic()
        self.optimize_every_s = 600.0

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except Exception as exc:  # BUSYGROUP: it exists
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        READY.set(0)
        keep_alive = asyncio.create_task(self._keep_alive(stop))
        backoff = 0.5
        log(logger, logging.INFO, "match worker started", consumer=self.consumer, stream=STREAM)
        try:
            while not stop.is_set():
                try:
                    await self.ensure_group()
                    await self.step()
                    READY.set(1)
                    backoff = 0.5
                    continue
                except LookSyncError as exc:  # Triton or the index down: requests stay pending
                    what = "dependency unavailable; retrying"
                    error = _one_line(exc)
                except Exception as exc:
                    if not is_redis_outage(exc):
                        raise
                    what, error = "redis unavailable; pausing", _one_line(exc)
                READY.set(0)
                log(logger, logging.WARNING, what, error=error, sleep_s=backoff)
                await _sleep_unless(stop, backoff)
                backoff = min(backoff * 2, 10.0)
        finally:
            keep_alive.cancel()

    async def step(self) -> int:
        """One round: re-queue after a swap, reclaim stuck requests, read new ones, match them."""
        await self._requeue_after_swap()
        _, claimed, _ = await self.redis.xautoclaim(
            STREAM,
            GROUP,
            self.consumer,
            min_idle_time=self.claim_idle_ms,
            start_id="0-0",
            count=self.batch_looks,
        )
        messages = [(m[0], m[1]) for m in claimed if m[1] is not None]
        room = self.batch_looks - len(messages)
        if room > 0:
            read = await self.redis.xreadgroup(
                GROUP, self.consumer, {STREAM: ">"}, count=room, block=None if messages else self.block_ms
            )
            for _, entries in read or []:
                messages.extend(entries)
        if messages:
            await self.process(messages)
        else:
            await self._optimize_store()  # when idle
        await self._update_gauges()
        return len(messages)

    async def process(self, messages) -> None:
        by_look: dict[str, LookRequest] = {}
        ids_of: dict[str, list[str]] = {}
        for raw_id, fields in messages:
            stream_id = _sid(raw_id)
            raw = fields.get(b"look", fields.get("look", b""))
            try:
                # Checked again as a manifest line is: a queued message may be hand-made.
                settings = self.matcher.settings
                req = parse_manifest_line(
                    raw.decode("utf-8") if isinstance(raw, bytes) else raw,
                    None,
                    settings.match_keep,
                    settings.max_k_per_layer,
                )
            except Exception as exc:  # a hand-made or foreign message: dead, never a crash
                await self.dead_letter(stream_id, _sid(raw)[:10_000], "invalid_request", _one_line(exc))
                continue
            by_look[req.look_id] = req  # the same look queued twice: matched once
            ids_of.setdefault(req.look_id, []).append(stream_id)
        if not by_look:
            return
        held = [i for ids in ids_of.values() for i in ids]
        self._held.update(held)
        try:
            outcome = await self._match_held(list(by_look.values()))
            if outcome is None:
                return  # stopped while a dependency was down: the requests stay pending
            self._written_since_optimize += len(outcome.records)
            for look_id, ids in ids_of.items():
                failure = outcome.failures.get(look_id)
                if failure is None:
                    await self.redis.xack(STREAM, GROUP, *ids)
                else:
                    await self._retry_or_dead(by_look[look_id], ids, failure)
        finally:
            self._held.difference_update(held)

    async def _match_held(self, looks: list[LookRequest]):
        """Match the batch in hand; while Triton or the index is down, keep it (kept fresh in
        the group) and try again, so an outage costs no delivery attempts. None: stopped."""
        backoff = 0.5
        while True:
            try:
                return await self.matcher.match(looks)
            except Unavailable as exc:
                READY.set(0)
                log(
                    logger, logging.WARNING, "dependency unavailable; holding the batch", error=_one_line(exc)
                )
            await _sleep_unless(self._stop, backoff)
            if self._stop.is_set():
                return None
            backoff = min(backoff * 2, 10.0)

    async def _retry_or_dead(self, req: LookRequest, ids: list[str], failure: Failure) -> None:
        info = await self.redis.xpending_range(STREAM, GROUP, min=ids[-1], max=ids[-1], count=1)
        deliveries = int(info[0]["times_delivered"]) if info else 1
        if failure.permanent or deliveries >= self.max_tries:
            detail = failure.detail if failure.permanent else f"{failure.detail} (after {deliveries} tries)"
            for stream_id in ids:
                await self.dead_letter(stream_id, json.dumps(req.to_dict()), failure.reason, detail)
        else:  # left pending: XAUTOCLAIM delivers it again after claim_idle_ms
            log(
                logger,
                logging.INFO,
                "will retry",
                look_id=req.look_id,
                reason=failure.reason,
                tries=deliveries,
            )

    async def dead_letter(self, stream_id: str, look: str, reason: str, detail: str) -> None:
        await self.redis.xadd(
            DEAD_LETTERS,
            {
                "look": look,
                "reason": reason,
                "detail": detail,
                "stream_id": stream_id,
                "consumer": self.consumer,
            },
            maxlen=self.dead_letters_max,
            approximate=True,
        )
        await self.redis.xack(STREAM, GROUP, stream_id)
        log(logger, logging.WARNING, "look dead-lettered", stream_id=stream_id, reason=reason, detail=detail)

    async def _requeue_after_swap(self) -> None:
        """When the serving space is new to this worker: queue the stored looks of other spaces.
        Every worker does it (a crash half-way loses nothing); per-look markers scoped to the
        space make each look queued once, and a later swap back to a space queues them again
        once the markers have expired."""
        space = await self.matcher.index.space()
        if space is None or space == self._space_checked:
            return
        stale = await stale_looks(self.matcher.index, space)
        scope = f":{space.model}:{space.version}"
        queued = await requeue_looks(self.redis, stale, f"space {space.model} v{space.version}", 3600, scope)
        self._space_checked = space  # only once they are all queued
        if queued:
            log(
                logger, logging.INFO, "stored looks of other spaces re-queued", looks=queued, space=str(space)
            )

    async def _optimize_store(self) -> None:
        """The store gets a fragment per batch written: compact and index it now and then."""
        if self._written_since_optimize and time.monotonic() - self._optimized_at > self.optimize_every_s:
            await self.matcher.index.look_matches.optimize()
            self._written_since_optimize, self._optimized_at = 0, time.monotonic()

    async def _keep_alive(self, stop: asyncio.Event) -> None:
        period = max(self.claim_idle_ms / 3000, 0.05)
        while not stop.is_set():
            await _sleep_unless(stop, period)
            held = sorted(self._held)
            if held:
                try:
                    await self.redis.xclaim(STREAM, GROUP, self.consumer, 0, held, justid=True)
                except Exception as exc:  # Redis away: the main loop pauses
                    log(logger, logging.DEBUG, "keep-alive failed", error=_one_line(exc))

    async def _update_gauges(self) -> None:
        try:
            for group in await self.redis.xinfo_groups(STREAM):
                if _sid(group["name"]) == GROUP:
                    LAG.set(group.get("lag") or 0)
                    PENDING.set(group.get("pending") or 0)
        except Exception:
            pass
