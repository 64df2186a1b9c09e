"""`looksync ingest-worker`: consume catalog events from a Redis Streams consumer group.

At-least-once and idempotent:
- a message is acknowledged only after its index write returned (durable), so a crash at any
  point leaves it pending; XAUTOCLAIM hands pending messages of dead consumers to live ones;
- every write carries the event's stream position (event_seq): replays and late deliveries
  cannot overwrite newer state, and a delete leaves a tombstone;
- poison messages (bad schema; an image that cannot be fetched or decoded after `max_tries`
  deliveries) go to `catalog-updates:dead` with the reason, and the stream keeps flowing.

Metadata updates and deletes are applied at once; new images are fetched and embedded in
batches in the background, so a slow Triton never holds back a price change. Within one worker,
events of the same product are applied in stream order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from gateway.errors import LookSyncError
from gateway.index.base import CatalogIndex, EmbeddingSpace
from gateway.indexer import Indexer, IndexReport, IngestItem
from gateway.ingest.events import DEAD_LETTERS, GROUP, STREAM, Event, PoisonEvent, parse_event
from gateway.ingest.fetch import FetchError, FetchPolicy, fetch
from gateway.observability import log

logger = logging.getLogger("looksync.ingest")
EVENTS = Counter("looksync_ingest_events_total", "Events processed", ["type", "outcome"])
DEAD = Counter("looksync_ingest_dead_letters_total", "Events sent to the dead-letter stream", ["reason"])
LAG = Gauge("looksync_ingest_lag", "Entries in the stream not yet delivered to the group")
PENDING = Gauge("looksync_ingest_pending", "Delivered but not yet acknowledged entries")
BATCH_SECONDS = Histogram("looksync_ingest_batch_seconds", "Time to write one batch of new products")


@dataclass
class WorkerSettings:
    batch_size: int = 64
    block_ms: int = 1000
    claim_idle_ms: int = 30_000  # a message pending this long is taken from its consumer
    max_tries: int = 5
    embed_batches_in_flight: int = 2


class IngestWorker:
    def __init__(
        self,
        redis,
        make_indexer,
        index: CatalogIndex,
        space: EmbeddingSpace,
        fetch_policy: FetchPolicy,
        settings: WorkerSettings,
        consumer: str | None = None,
        stream: str = STREAM,
    ):
        self.redis = redis
        self.make_indexer = make_indexer  # space -> Indexer
        self._indexers: dict[EmbeddingSpace, Indexer] = {}
        self.index = index
        self.space = space
        self.fetch_policy = fetch_policy
        self.settings = settings
        self.stream = stream
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._chains: dict[str, asyncio.Task] = {}  # product id -> its last scheduled operation
        self._inflight: set[asyncio.Task] = set()
        self._embed_slots = asyncio.Semaphore(settings.embed_batches_in_flight)
        self.report = IndexReport(space=space)

    # --- the loop -------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except Exception as exc:  # BUSYGROUP: it exists, which is the normal case
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        await self.ensure_group()
        log(
            logger,
            logging.INFO,
            "ingest worker started",
            consumer=self.consumer,
            stream=self.stream,
            space=str(self.space),
        )
        backoff = 0.5
        while not stop.is_set():
            try:
                await self.step()
                backoff = 0.5
            except LookSyncError as exc:  # Triton or the index down: messages stay pending
                log(
                    logger,
                    logging.WARNING,
                    "dependency unavailable; retrying",
                    error=str(exc),
                    sleep_s=backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception as exc:  # Redis down: pause, then resume where the group left off
                if "redis" not in type(exc).__module__ and "Connection" not in type(exc).__name__:
                    raise
                log(logger, logging.WARNING, "redis unavailable; pausing", error=str(exc), sleep_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
        await self.drain()

    async def targets(self) -> list[EmbeddingSpace]:
        """Where writes go: the alias's index first (it decides acks), then any index being
        rebuilt for a model swap, so that it misses nothing written during the rebuild."""
        primary = await self.index.space() or self.space
        extra = await self.index.write_targets()
        return [primary] + [s for s in extra if s != primary]

    def indexer(self, space: EmbeddingSpace) -> Indexer:
        if space not in self._indexers:
            self._indexers[space] = self.make_indexer(space)
        return self._indexers[space]

    async def step(self) -> int:
        """One round: reclaim stuck messages, read new ones, start processing them."""
        _, claimed, _ = await self.redis.xautoclaim(
            self.stream,
            GROUP,
            self.consumer,
            min_idle_time=self.settings.claim_idle_ms,
            start_id="0-0",
            count=self.settings.batch_size,
        )
        messages = [(m[0], m[1]) for m in claimed if m[1] is not None]
        block = None if messages else self.settings.block_ms
        read = await self.redis.xreadgroup(
            GROUP, self.consumer, {self.stream: ">"}, count=self.settings.batch_size, block=block
        )
        for _, entries in read or []:
            messages.extend(entries)
        if messages:
            await self.process(messages)
        else:
            self._reap()
        await self._update_gauges()
        return len(messages)

    async def drain(self) -> None:
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    # --- per message ------------------------------------------------------------------------

    async def process(self, messages) -> None:
        events, upserts = [], []
        for raw_id, fields in messages:
            stream_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            entry = {
                (k.decode() if isinstance(k, bytes) else k): (
                    v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                )
                for k, v in fields.items()
            }
            try:
                event = parse_event(stream_id, entry)
            except PoisonEvent as exc:
                await self.dead_letter(stream_id, entry.get("event", ""), str(exc), "invalid")
                continue
            if event.type == "product.upsert":
                upserts.append(event)
            else:
                events.append(event)
        if upserts:
            self._chain([e.product_id for e in upserts], lambda: self._apply_upserts(upserts))
        if events:
            self._chain([e.product_id for e in events], lambda: self._apply_small(events))
        # Let the quick operations run now; new-image batches continue in the background,
        # up to a bound, so a slow Triton applies back-pressure instead of growing memory.
        await asyncio.sleep(0)
        while True:
            self._reap()
            if len(self._inflight) <= self.settings.embed_batches_in_flight * 4:
                break
            await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)

    def _reap(self) -> None:
        """Forget finished operations; re-raise the first failure (its messages stay pending)."""
        for task in [t for t in self._inflight if t.done()]:
            self._inflight.discard(task)
            if task.exception():
                raise task.exception()

    def _chain(self, product_ids: list[str], work) -> None:
        """Run `work` after every earlier operation on these products has finished."""
        before = [self._chains[p] for p in set(product_ids) if p in self._chains]

        async def run():
            if before:
                await asyncio.gather(*before, return_exceptions=True)
            await work()

        task = asyncio.create_task(run())
        self._inflight.add(task)
        for pid in product_ids:
            self._chains[pid] = task
        task.add_done_callback(
            lambda t: [self._chains.pop(p) for p in product_ids if self._chains.get(p) is t]
        )

    async def _apply_small(self, events: list[Event]) -> None:
        """Metadata updates and deletes of one read, in one index write per target index:
        the serving one decides the outcome; an index being rebuilt gets them too."""
        ops = [
            ("delete" if e.type == "product.delete" else "update", e.product_id, e.seq, e.fields)
            for e in events
        ]
        primary, *others = await self.targets()
        outcomes = await self.index.apply_events(primary, ops)
        for space in others:
            # "missing" there is fine: the rebuild has not reached the product yet, and its
            # snapshot write is older than this event, so it will not undo it.
            await self.index.apply_events(space, ops)
        for event, outcome in zip(events, outcomes):
            if outcome == "missing":
                # Maybe its upsert is still on its way (another worker, or not yet published):
                # leave it pending; after max_tries deliveries it is dead-lettered.
                await self._retry_or_dead(
                    event, "unknown_product", f"product {event.product_id!r} is not in the index"
                )
            else:
                await self._ack(event.stream_id, event.type, outcome)

    async def _apply_upserts(self, upserts: list[Event]) -> None:
        async with self._embed_slots:
            start = time.perf_counter()
            images = await asyncio.gather(
                *(fetch(e.record["image_url"], self.fetch_policy) for e in upserts), return_exceptions=True
            )
            items, by_ref = [], {}
            for event, image in zip(upserts, images):
                if isinstance(image, FetchError):
                    await self._retry_or_dead(event, f"fetch_{image.reason}", str(image))
                    continue
                if isinstance(image, BaseException):
                    raise image
                items.append(IngestItem(event.record, image, event.seq, ref=event.stream_id))
                by_ref[event.stream_id] = event
            if items:
                primary, *others = await self.targets()
                outcome = await self.indexer(primary).write_batch(items, self.report)
                for space in others:
                    await self.indexer(space).write_batch(items, IndexReport(space=space))
                # A swap may have added a target while this batch was embedding: write it
                # there too before acking, so that the rebuilt index misses nothing.
                for space in await self.targets():
                    if space != primary and space not in others:
                        await self.indexer(space).write_batch(items, IndexReport(space=space))
                for ref, error in outcome.items():
                    if error is None:
                        await self._ack(ref, "product.upsert", "applied")
                    else:
                        await self.dead_letter(
                            ref,
                            json.dumps(
                                {"schema": 1, "type": "product.upsert", "product": by_ref[ref].record}
                            ),
                            error,
                            "invalid_record",
                        )
            BATCH_SECONDS.observe(time.perf_counter() - start)

    # --- bookkeeping ------------------------------------------------------------------------

    async def _ack(self, stream_id: str, kind: str, outcome: str) -> None:
        await self.redis.xack(self.stream, GROUP, stream_id)
        EVENTS.labels(kind, outcome).inc()

    async def _retry_or_dead(self, event: Event, reason: str, detail: str) -> None:
        info = await self.redis.xpending_range(
            self.stream, GROUP, min=event.stream_id, max=event.stream_id, count=1
        )
        deliveries = int(info[0]["times_delivered"]) if info else 1
        if deliveries >= self.settings.max_tries:
            payload = {"schema": 1, "type": event.type, "id": event.product_id}
            if event.record is not None:
                payload["product"] = event.record
            if event.fields is not None:
                payload["fields"] = event.fields
            await self.dead_letter(
                event.stream_id, json.dumps(payload), f"{detail} (after {deliveries} tries)", reason
            )
        else:
            EVENTS.labels(event.type, "retry").inc()
            log(
                logger, logging.INFO, "will retry", stream_id=event.stream_id, reason=reason, tries=deliveries
            )

    async def dead_letter(self, stream_id: str, event: str, reason: str, kind: str) -> None:
        """Copy to the dead-letter stream, then acknowledge: never dropped silently."""
        await self.redis.xadd(
            DEAD_LETTERS,
            {"event": event, "reason": reason, "stream_id": stream_id, "consumer": self.consumer},
        )
        await self.redis.xack(self.stream, GROUP, stream_id)
        DEAD.labels(kind).inc()
        EVENTS.labels("any", "dead_letter").inc()
        log(logger, logging.WARNING, "dead letter", stream_id=stream_id, reason=reason)

    async def _update_gauges(self) -> None:
        try:
            for group in await self.redis.xinfo_groups(self.stream):
                name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
                if name == GROUP:
                    LAG.set(group.get("lag") or 0)
                    PENDING.set(group.get("pending") or 0)
        except Exception:
            pass
