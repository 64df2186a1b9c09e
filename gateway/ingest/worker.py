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
import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import LockError

from gateway.dedup import Dedup, DedupSettings
from gateway.errors import DeadlineExceeded, LookSyncError, ModelNotLoaded, Unavailable
from gateway.index.base import CatalogIndex, EmbeddingSpace
from gateway.indexer import Indexer, IndexReport, IngestItem
from gateway.ingest.events import DEAD_LETTERS, GROUP, HOLDS, STREAM, Event, PoisonEvent, parse_event
from gateway.ingest.fetch import FetchError, FetchPolicy, fetch
from gateway.observability import log

logger = logging.getLogger("looksync.ingest")
EVENTS = Counter("looksync_ingest_events_total", "Events processed", ["type", "outcome"])
DEAD = Counter("looksync_ingest_dead_letters_total", "Events sent to the dead-letter stream", ["reason"])
LAG = Gauge("looksync_ingest_lag", "Entries in the stream not yet delivered to the group")
PENDING = Gauge("looksync_ingest_pending", "Delivered but not yet acknowledged entries")
BATCH_SECONDS = Histogram("looksync_ingest_batch_seconds", "Time to write one batch of new products")
READY = Gauge("looksync_ingest_ready", "1 while Redis, the index and Triton answer; 0 while waiting")
UNINDEXED = Gauge("looksync_index_unindexed_rows", "Rows outside the embedded index's indexes", ["index"])
COMPACTIONS = Counter(
    "looksync_index_compactions_total", "Compactions of the embedded index by workers", ["index"]
)
COMPACT_LOCK = "looksync:compact-lock:"  # + index name: one worker compacts an index at a time


@dataclass
class WorkerSettings:
    batch_size: int = 64
    block_ms: int = 1000
    claim_idle_ms: int = 30_000  # a message pending this long is taken from its consumer
    max_tries: int = 5
    embed_batches_in_flight: int = 2
    drain_timeout_s: float = 30.0  # SIGTERM: time to finish the operations in hand
    trim_every_s: float = 30.0  # how often the stream, dead letters and consumers are tidied
    dead_letters_max: int = 100_000
    consumer_idle_s: float = 3600.0  # a consumer with nothing pending, idle this long, is removed
    # Embedded index upkeep: every write leaves a fragment, and rows written or rewritten since
    # the indexes were built are brute-forced by every search (gateway/index/embedded.py).
    compact_every_s: float = 300.0  # how often to check (0: never)
    compact_unindexed_rows: int = 10_000
    compact_fragments: int = 256
    dedup: DedupSettings | None = None  # new listings join existing items (None: left to `looksync dedup`)


def is_redis_outage(exc: BaseException) -> bool:
    """Redis unreachable, restarting, still loading its data, out of memory (`maxmemory` with
    noeviction refuses writes) or a read-only replica after a failover: wait, never give up."""
    import redis.exceptions as rx

    return isinstance(
        exc,
        rx.ConnectionError
        | rx.TimeoutError
        | rx.OutOfMemoryError
        | rx.ReadOnlyError
        | ConnectionError
        | TimeoutError,
    )


def is_dependency_down(exc: BaseException) -> bool:
    """Redis, Triton (or one of its models, unloaded or still loading) or the index not
    answering: the messages stay pending, no try is counted against them."""
    return is_redis_outage(exc) or isinstance(exc, Unavailable | DeadlineExceeded | ModelNotLoaded)


class IngestWorker:
    def __init__(
        self,
        redis,
        make_indexer,
        index: CatalogIndex,
        space,
        fetch_policy: FetchPolicy,
        settings: WorkerSettings,
        consumer: str | None = None,
        stream: str = STREAM,
    ):
        """`space`: the embedding space to write when no alias names one yet, or an async
        function that finds it (asks Triton), called until it succeeds."""
        self.redis = redis
        self.make_indexer = make_indexer  # space -> Indexer
        self._indexers: dict[EmbeddingSpace, Indexer] = {}
        self.index = index
        self._resolve_space = space if callable(space) else None
        self.space: EmbeddingSpace | None = None if callable(space) else space
        self.fetch_policy = fetch_policy
        self.settings = settings
        self.stream = stream
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._chains: dict[str, asyncio.Task] = {}  # product id -> its last scheduled operation
        # Stream ids this worker is working on now. Kept fresh in the group (`_keep_alive`) so
        # no consumer, this one included, reclaims them as stuck, and skipped if reclaimed anyway.
        self._held: set[str] = set()
        self._inflight: set[asyncio.Task] = set()
        self._embed_slots = asyncio.Semaphore(settings.embed_batches_in_flight)
        self.report = IndexReport(space=self.space)

    # --- the loop -------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except Exception as exc:  # BUSYGROUP: it exists, which is the normal case
            if "BUSYGROUP" not in str(exc):
                raise

    async def start(self, stop: asyncio.Event) -> bool:
        """Wait, with backoff, until Redis answers and the embedding space is known (an index
        behind the alias, or a READY model in Triton). A worker started before its dependencies
        stays up and not ready (`looksync_ingest_ready` 0) instead of exiting. False: stopped."""
        backoff = 0.5
        while not stop.is_set():
            waiting_for = "redis"
            try:
                await self.ensure_group()
                if self.space is None:
                    waiting_for = "embedding space"
                    self.space = await self.index.space() or await self._resolve_space()
                    self.report = IndexReport(space=self.space)
                READY.set(1)
                return True
            except Exception as exc:
                if not (is_redis_outage(exc) or isinstance(exc, LookSyncError)):
                    raise
                log(
                    logger,
                    logging.WARNING,
                    "waiting for a dependency",
                    dependency=waiting_for,
                    error=_one_line(exc),
                    sleep_s=backoff,
                )
            await _sleep_unless(stop, backoff)
            backoff = min(backoff * 2, 10.0)
        return False

    async def run(self, stop: asyncio.Event) -> None:
        READY.set(0)
        if not await self.start(stop):
            return
        log(
            logger,
            logging.INFO,
            "ingest worker started",
            consumer=self.consumer,
            stream=self.stream,
            space=str(self.space),
        )
        keep_alive_stop = asyncio.Event()  # refreshes go on through the drain
        helpers = [
            asyncio.create_task(self._keep_alive(keep_alive_stop)),
            asyncio.create_task(self._tidy(stop)),
        ]
        try:
            await self._loop(stop)
            await self.drain()
        finally:
            keep_alive_stop.set()
            for task in helpers:
                task.cancel()

    async def _loop(self, stop: asyncio.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                await self.step()
                backoff = 0.5
                READY.set(1)
                continue
            except LookSyncError as exc:  # Triton or the index down: messages stay pending
                log(
                    logger,
                    logging.WARNING,
                    "dependency unavailable; retrying",
                    error=_one_line(exc),
                    sleep_s=backoff,
                )
            except Exception as exc:  # Redis down: pause, then resume where the group left off
                if "NOGROUP" in str(exc):  # Redis came back without its data: start the group again
                    log(logger, logging.WARNING, "consumer group missing; creating it", error=_one_line(exc))
                    await self.ensure_group()
                    continue
                if not is_redis_outage(exc):
                    raise
                log(
                    logger,
                    logging.WARNING,
                    "redis unavailable; pausing",
                    error=_one_line(exc),
                    sleep_s=backoff,
                )
            READY.set(0)
            await _sleep_unless(stop, backoff)
            backoff = min(backoff * 2, 10.0)

    async def _keep_alive(self, stop: asyncio.Event) -> None:
        """Reset the idle time of the entries in hand, well before `claim_idle_ms`, so a slow
        batch is never mistaken for a dead consumer's. JUSTID: no delivery is counted, so
        `times_delivered` grows only when an entry really is delivered again (a failure
        left it pending, or its consumer died)."""
        period = max(self.settings.claim_idle_ms / 3000, 0.05)
        while not stop.is_set():
            await _sleep_unless(stop, period)
            held = sorted(self._held)
            for i in range(0, len(held), 500):
                try:
                    await self.redis.xclaim(
                        self.stream, GROUP, self.consumer, 0, held[i : i + 500], justid=True
                    )
                except Exception as exc:  # Redis away: the main loop pauses; nothing to refresh
                    log(logger, logging.DEBUG, "keep-alive failed", error=_one_line(exc))
                    break

    async def _tidy(self, stop: asyncio.Event) -> None:
        """Keep Redis bounded while the worker runs (several workers doing it is harmless)."""
        checked = time.monotonic()
        while not stop.is_set():
            try:
                await self.tidy()
            except Exception as exc:  # Redis away: the main loop reports it; try next round
                log(logger, logging.DEBUG, "tidy failed", error=_one_line(exc))
            every = self.settings.compact_every_s
            if every > 0 and time.monotonic() - checked >= every:
                checked = time.monotonic()
                try:
                    await self.upkeep()
                except Exception as exc:  # Redis or the index away: next round
                    log(logger, logging.WARNING, "index upkeep failed", error=_one_line(exc))
            await _sleep_unless(stop, self.settings.trim_every_s)

    async def upkeep(self) -> list[dict]:
        """Compact each write target that needs it (CatalogIndex.upkeep), one worker at a time
        per index (a redis-py lock: the compaction holds the table's writer lock, so the other
        workers' writes wait, and a second compaction would only repeat it)."""
        done = []
        for space in await self.targets():
            name = space.index_name
            lock = self.redis.lock(COMPACT_LOCK + name, timeout=3600, blocking=False)
            if not await lock.acquire():
                continue
            try:
                start = time.monotonic()
                found = await self.index.upkeep(
                    space, self.settings.compact_unindexed_rows, self.settings.compact_fragments
                )
            finally:
                with contextlib.suppress(LockError):  # held past its timeout: another may hold it now
                    await lock.release()
            if found is None:
                continue
            # A compaction holds the writer lock and brings the indexes up to date: none left.
            UNINDEXED.labels(name).set(0 if found["compacted"] else found["unindexed_rows"])
            if found["compacted"]:
                COMPACTIONS.labels(name).inc()
                log(
                    logger,
                    logging.INFO,
                    "index compacted",
                    index=name,
                    seconds=round(time.monotonic() - start, 2),
                    **found,
                )
            done.append({"index": name, **found})
        return done

    async def tidy(self) -> dict:
        """Trim the stream below the oldest entry anyone still needs, and forget consumers
        that are gone. Needed: entries pending in any group, entries no group has read yet,
        and any stream id held in HOLDS (a swap's catch-up point). So the stream holds what is
        in flight, not its history; dead letters are capped at XADD."""
        keep = []
        for group in await self.redis.xinfo_groups(self.stream):
            name = _sid(group["name"])
            keep.append(_sid(group["last-delivered-id"]))
            if group.get("pending"):
                summary = await self.redis.xpending(self.stream, name)
                if summary.get("min"):  # None if acknowledged in between
                    keep.append(_sid(summary["min"]))
        now_ms = int(time.time() * 1000)
        for holder, value in (await self.redis.hgetall(HOLDS)).items():
            stream_id, _, expires = _sid(value).partition("@")
            if expires and int(expires) < now_ms:  # a swap that died without releasing it
                await self.redis.hdel(HOLDS, holder)
                log(logger, logging.WARNING, "expired stream hold removed", holder=_sid(holder))
                continue
            keep.append(stream_id)
        trimmed = 0
        if keep:
            # min by stream-id order; XTRIM MINID keeps `floor` itself and everything newer.
            floor = min(keep, key=lambda i: tuple(int(p) for p in i.split("-")))
            trimmed = await self.redis.xtrim(self.stream, minid=floor, approximate=False)
        idle_ms = self.settings.consumer_idle_s * 1000
        gone = [
            _sid(c["name"])
            for c in await self.redis.xinfo_consumers(self.stream, GROUP)
            if c["pending"] == 0 and c["idle"] > idle_ms and _sid(c["name"]) != self.consumer
        ]
        removed = await self._forget_consumers(keys=[self.stream, GROUP], args=gone) if gone else 0
        if trimmed or removed:
            log(logger, logging.INFO, "tidied", trimmed_entries=trimmed, removed_consumers=removed)
        return {"trimmed": trimmed, "removed_consumers": removed}

    @property
    def _forget_consumers(self):
        # Check and delete in one step: a consumer that took an entry in between keeps it
        # (DELCONSUMER drops a consumer's pending entries, which would lose them).
        if not hasattr(self, "_forget_script"):
            self._forget_script = self.redis.register_script(
                """
                local removed = 0
                for _, name in ipairs(ARGV) do
                  if #redis.call('XPENDING', KEYS[1], KEYS[2], '-', '+', 1, name) == 0 then
                    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], KEYS[2], name)
                    removed = removed + 1
                  end
                end
                return removed
                """
            )
        return self._forget_script

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
        messages = [(m[0], m[1]) for m in claimed if m[1] is not None and _sid(m[0]) not in self._held]
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
        """SIGTERM: finish the operations in hand, up to `drain_timeout_s`; what is cut off
        stays pending (an index write is idempotent, an ack comes only after it)."""
        if not self._inflight:
            return
        done, cut = await asyncio.wait(self._inflight, timeout=self.settings.drain_timeout_s)
        for task in cut:
            task.cancel()
        if cut:
            await asyncio.wait(cut)
        log(logger, logging.INFO, "drained", finished=len(done), left_pending=len(cut))

    # --- per message ------------------------------------------------------------------------

    async def process(self, messages) -> None:
        events, upserts = [], []
        for raw_id, fields in messages:
            stream_id = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            entry, undecodable = _decoded(fields)
            try:
                if undecodable:
                    raise PoisonEvent(undecodable)
                event = parse_event(stream_id, entry)
            except PoisonEvent as exc:
                await self.dead_letter(stream_id, _as_sent(entry), str(exc), "invalid")
                continue
            except Exception as exc:  # anything else a hostile payload trips is poison too
                await self.dead_letter(stream_id, _as_sent(entry), _one_line(exc), "invalid")
                continue
            if event.type == "product.upsert":
                upserts.append(event)
            else:
                events.append(event)
        if upserts:
            self._chain(upserts, self._apply_upserts)
        if events:
            self._chain(events, self._apply_small)
        # Let the quick operations run now; new-image batches continue in the background,
        # up to a bound, so a slow Triton applies back-pressure instead of growing memory.
        await asyncio.sleep(0)
        while True:
            self._reap()
            if len(self._inflight) <= self.settings.embed_batches_in_flight * 4:
                break
            await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)

    def _reap(self) -> None:
        """Forget finished operations; re-raise the first failure (its messages stay pending).
        Every finished one's outcome is read, so none is reported as never retrieved."""
        failure = None
        for task in [t for t in self._inflight if t.done()]:
            self._inflight.discard(task)
            exc = None if task.cancelled() else task.exception()
            failure = failure or exc
        if failure is not None:
            raise failure

    def _chain(self, events: list[Event], apply) -> None:
        """Run `apply(events)` after every earlier operation on these products has finished.
        Events of a product whose earlier operation is waiting for a dependency stay pending
        with it (applied now, an update would find its product missing, or overtake it); the
        others are applied."""
        product_ids = [e.product_id for e in events]
        before = {p: self._chains[p] for p in set(product_ids) if p in self._chains}
        self._held.update(e.stream_id for e in events)

        async def run():
            try:
                ready, down = events, None
                if before:
                    done = dict(zip(before, await asyncio.gather(*before.values(), return_exceptions=True)))
                    waiting = {
                        p for p, r in done.items() if isinstance(r, BaseException) and is_dependency_down(r)
                    }
                    if waiting:
                        down = done[next(iter(waiting))]
                        ready = [e for e in events if e.product_id not in waiting]
                if ready:
                    await self._isolated(ready, apply)
                if down is not None:
                    raise Unavailable(f"held behind an earlier event of the same product: {_one_line(down)}")
            finally:
                self._held.difference_update(e.stream_id for e in events)

        task = asyncio.create_task(run())
        self._inflight.add(task)
        for pid in product_ids:
            self._chains[pid] = task
        task.add_done_callback(
            lambda t: [self._chains.pop(p) for p in product_ids if self._chains.get(p) is t]
        )

    async def _isolated(self, events: list[Event], apply) -> None:
        """Apply a batch; when it fails for a reason other than a dependency being down, apply
        its events one by one, so one bad event is retried (and in the end dead-lettered with
        the error) without holding back, or ending, anything else."""
        try:
            await apply(events)
        except Exception as exc:
            if is_dependency_down(exc):
                raise  # a dependency is down: messages stay pending; the loop pauses and retries
            if len(events) > 1:
                for event in events:
                    await self._isolated([event], apply)
                return
            logger.exception("event failed", extra={"fields": {"stream_id": events[0].stream_id}})
            await self._retry_or_dead(events[0], "internal_error", _one_line(exc))

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
        # Fetching happens outside the embed slots: a slow vendor host must not hold Triton's
        # share of the worker (each fetch has one overall deadline).
        start = time.perf_counter()
        images = await asyncio.gather(
            *(fetch(e.record["image_url"], self.fetch_policy) for e in upserts), return_exceptions=True
        )
        async with self._embed_slots:
            items, by_ref = [], {}
            for event, image in zip(upserts, images):
                if isinstance(image, BaseException):
                    if not isinstance(image, FetchError):  # fetch() converts everything; belt and braces
                        image = FetchError("failed", _one_line(image))
                    await self._retry_or_dead(event, f"fetch_{image.reason}", str(image))
                    continue
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
                written = [by_ref[ref].product_id for ref, error in outcome.items() if error is None]
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
                if written and self.settings.dedup is not None:
                    await self._place_in_items(primary, written)
            BATCH_SECONDS.observe(time.perf_counter() - start)

    async def _place_in_items(self, space: EmbeddingSpace, ids: list[str]) -> None:
        """Best effort, after the acks: a listing not placed here keeps no item until the next
        `looksync dedup` run, and search shows it as an item of its own meanwhile."""
        try:
            await Dedup(self.index, space, self.settings.dedup).place(ids)
        except Exception as exc:  # never a reason to fail or redeliver the upserts
            log(logger, logging.WARNING, "placing new listings into items failed", error=_one_line(exc))

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
        """Copy to the dead-letter stream, then acknowledge: never dropped silently. The copy
        is cut to DEAD_LETTER_EVENT_CHARS (saying how much was cut): the stream caps entries by
        count, and a 20 MB poison event kept whole would be 20 MB of Redis memory each."""
        if len(event) > DEAD_LETTER_EVENT_CHARS:
            event = f"{event[:DEAD_LETTER_EVENT_CHARS]}... [cut: {len(event)} characters in all]"
        await self.redis.xadd(
            DEAD_LETTERS,
            {"event": event, "reason": reason[:2000], "stream_id": stream_id, "consumer": self.consumer},
            maxlen=self.settings.dead_letters_max,
            approximate=True,
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


# How much of a poison event its dead letter keeps (the reason says what was wrong with it).
DEAD_LETTER_EVENT_CHARS = 64 * 1024


def _decoded(fields: dict) -> tuple[dict, str]:
    """A stream entry's fields as text, and what was wrong with its event's bytes ("" when
    nothing): an event is JSON text, so bytes that are not UTF-8 make it poison, never text with
    replacement characters. Other fields (a producer's own) are not read."""
    entry, problem = {}, ""
    for k, v in fields.items():
        key = k.decode("utf-8", "replace") if isinstance(k, bytes) else k
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError as exc:
                if key == "event":
                    problem = f"event: not UTF-8 ({exc.reason} at byte {exc.start})"
                v = v.decode("utf-8", "replace")
        entry[key] = v
    return entry, problem


def _as_sent(entry: dict) -> str:
    """What a dead letter keeps of an entry: its event, or every field when it has none."""
    event = entry.get("event")
    return event if isinstance(event, str) else json.dumps(entry, ensure_ascii=False)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


async def run_until_signalled(run) -> None:
    """`run(stop)` with `stop` set by SIGTERM or SIGINT (the workers' commands)."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(stop)


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, but wake at once on SIGTERM."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


def _sid(raw) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw
