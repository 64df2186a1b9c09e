"""Model versions and swaps (docs/ARCHITECTURE.md, "Model versions and swaps").

    activate N+1:  load N+1 in Triton (N stays) -> create products-<model>-v<N+1> and have live
                   ingestion write to it too -> re-embed the catalog into it (bulk path,
                   resumable) -> validate (document counts; golden-query overlap) -> move the
                   read alias atomically -> after a grace period unload N in Triton
    rollback:      load N again if needed -> move the alias back

Requests resolve their embedding space once, at their start, and search that space's own
index, so a request in flight during the move finishes on the old pair (still loaded during
the grace period) and no request ever mixes spaces.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import tritonclient.grpc.aio as triton
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from gateway.embedder import TritonEmbedder
from gateway.errors import FailedPrecondition, Unavailable
from gateway.filters import build_filters
from gateway.index.base import EmbeddingSpace
from gateway.indexer import Indexer, IngestItem, index_catalog, resolve_space
from gateway.ingest.events import HOLDS, STREAM, PoisonEvent, parse_event, redis_time_ms, snapshot_seq
from gateway.ingest.fetch import FetchPolicy, fetch


class TritonModels:
    """Which versions of one model family Triton serves, through its repository API.

    A version is its wrappers (`<model>_image`, `<model>_text`) plus the encoders they call,
    named per version in the wrapper's preprocess.json: `<model>_<tower>_encoder` (ONNX) or
    `<model>_<tower>_encoder_trt` (a TensorRT version, export/trt.py). Loading a set of
    versions loads each Triton model with the versions that need it and unloads the models no
    requested version needs, so an ONNX version never depends on a TensorRT model loading."""

    def __init__(self, url: str, repository: Path, model: str):
        self.client = triton.InferenceServerClient(url)
        self.repository = Path(repository)
        self.model = model
        # Image-only families (DINOv2) have no text models.
        self.wrappers = [
            f"{model}_{t}" for t in ("image", "text") if (self.repository / f"{model}_{t}").is_dir()
        ]
        self.wrappers = self.wrappers or [f"{model}_image", f"{model}_text"]

    @property
    def names(self) -> list[str]:
        """Every Triton model of the family, encoders first (wrappers call them)."""
        encoders = {e for v in self._wrapper_versions() for e in self.models_for(v) if e not in self.wrappers}
        return sorted(encoders) + self.wrappers

    def _wrapper_versions(self) -> set[int]:
        sets = []
        for name in self.wrappers:
            folder = self.repository / name
            sets.append(
                {int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()}
                if folder.is_dir()
                else set()
            )
        return set.intersection(*sets) if sets else set()

    def models_for(self, version: int) -> list[str]:
        """The Triton models version `version` runs on: its encoders, then its wrappers."""
        encoders = []
        for wrapper in self.wrappers:
            tower = wrapper.rsplit("_", 1)[1]
            meta_file = self.repository / wrapper / str(version) / "preprocess.json"
            meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
            encoders.append(meta.get(f"{tower}_encoder") or f"{wrapper}_encoder")
        return encoders + self.wrappers

    def on_disk(self) -> list[int]:
        """Versions exported completely: every wrapper and the encoders it names."""
        return sorted(
            v
            for v in self._wrapper_versions()
            if all((self.repository / name / str(v)).is_dir() for name in self.models_for(v))
        )

    async def loaded(self, attempts: int = 3) -> dict[str, list[int]]:
        # A swap runs for minutes: one slow answer from a busy Triton must not abort it.
        for attempt in range(attempts):
            try:
                index = await self.client.get_model_repository_index(as_json=True, client_timeout=10)
                break
            except InferenceServerException as exc:
                if attempt == attempts - 1:
                    raise Unavailable(f"Triton: {exc.message()}") from None
                await asyncio.sleep(2**attempt)
        out: dict[str, list[int]] = {name: [] for name in self.names}
        for m in index.get("models", []):
            if m.get("name") in out and m.get("state") == "READY" and m.get("version"):
                out[m["name"]].append(int(m["version"]))
        return {k: sorted(v) for k, v in out.items()}

    async def serve_versions(self, versions: list[int], timeout_s: float = 300) -> None:
        """Load exactly these versions (explicit model control: the repository's config with its
        version policy replaced for this load); models none of them needs are unloaded."""
        missing = sorted(set(versions) - set(self.on_disk()))
        if missing:
            raise FailedPrecondition(f"{self.model} versions {missing} are not exported in {self.repository}")
        needed: dict[str, list[int]] = {}
        for version in sorted(versions):
            for name in self.models_for(version):
                needed.setdefault(name, []).append(version)
        for name in self.names:
            if name not in needed:
                continue
            config = text_format.Parse(
                (self.repository / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
            )
            config.version_policy.Clear()
            config.version_policy.specific.versions.extend(needed[name])
            body = json_format.MessageToJson(config, preserving_proto_field_name=True)
            try:
                await self.client.load_model(name, config=body, client_timeout=timeout_s)
            except InferenceServerException as exc:
                raise Unavailable(f"Triton could not load {name} {needed[name]}: {exc.message()}") from None
        loaded = await self.loaded()
        for name in self.names:
            if name not in needed and loaded.get(name):
                try:
                    await self.client.unload_model(name, client_timeout=timeout_s)
                except InferenceServerException as exc:
                    raise Unavailable(f"Triton could not unload {name}: {exc.message()}") from None

    async def close(self) -> None:
        await self.client.close()


@dataclass
class SwapReport:
    old: EmbeddingSpace | None
    new: EmbeddingSpace
    reindex_s: float = 0.0
    counts: tuple[int, int] = (0, 0)
    overlap: float | None = None
    failed: int = 0  # catalog products the rebuild could not embed
    steps: list[tuple[str, float]] = field(default_factory=list)


async def golden_overlap(
    index, embedder: TritonEmbedder, old: EmbeddingSpace, new: EmbeddingSpace, queries: list[str], k: int = 10
) -> float:
    """Mean overlap@k of the two indexes' answers to the same text queries, each embedded
    by its own model version: a swap should not change what users see beyond reason."""
    if not queries:
        return 1.0
    old_vecs, _ = await embedder.embed_texts(old.model, old.version, queries, 30)
    new_vecs, _ = await embedder.embed_texts(new.model, new.version, queries, 30)
    total = 0.0
    for a, b in zip(old_vecs, new_vecs):
        _, hits_a = await index.search(a, old, build_filters(), k)
        _, hits_b = await index.search(b, new, build_filters(), k)
        ids_a, ids_b = {h.product.id for h in hits_a}, {h.product.id for h in hits_b}
        total += len(ids_a & ids_b) / max(1, min(len(ids_a), len(ids_b)))
    return total / len(queries)


def golden_queries(catalog: Path, n: int = 20) -> list[str]:
    titles = []
    with open(catalog, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                titles.append(json.loads(line).get("title", ""))
    step = max(1, len(titles) // n)
    return [t for t in titles[::step] if t][:n]


async def catch_up(
    index,
    space: EmbeddingSpace,
    redis_url: str,
    since_ms: int,
    stream: str = STREAM,
    release: str | None = None,
    upserts=None,
) -> int:
    """Re-apply to a rebuilt index the events published since its rebuild began. While the
    rebuild has not reached a product, live ingestion's update of it finds nothing to update
    there; once the snapshot has written the product, the event (newer than the snapshot)
    applies. Replays are harmless: writes are ordered by event_seq. Upserts go to
    `await upserts(events)` (they need the new model's embedding), each chunk's before its
    updates and deletes, so an update of a product new since the file finds it: a worker wrote
    an upsert acknowledged before the new index was a write target (between the file's export
    and the swap's start, or while Triton loaded the new version) to the old index only.
    Returns how many events were re-applied."""
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    client = aioredis.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=5)
    start, applied = f"{since_ms}-0", 0
    try:
        while True:
            entries = await client.xrange(stream, min=start, max="+", count=500)
            if not entries:
                if release:  # done: trimming may pass the swap's start now
                    await client.hdel(HOLDS, release)
                return applied
            ops, new = [], []
            for raw_id, fields in entries:
                stream_id = raw_id.decode()
                entry = {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}
                try:
                    event = parse_event(stream_id, entry)
                except PoisonEvent:
                    continue  # the worker dead-letters it
                if event.type == "product.upsert":
                    new.append(event)
                else:
                    kind = "delete" if event.type == "product.delete" else "update"
                    ops.append((kind, event.product_id, event.seq, event.fields))
            if new and upserts is not None:
                applied += await upserts(new)
            if ops:
                await index.apply_events(space, ops)
                applied += len(ops)
            start = f"({entries[-1][0].decode()}"
    except RedisError as exc:
        raise Unavailable(f"catch-up from Redis at {redis_url} failed: {exc}") from None
    finally:
        await client.aclose()


HOLD_TTL_MS = 24 * 3600 * 1000  # a swap's hold on the stream lapses if the swap dies


class Swap:
    """The activation steps, callable one by one (tests publish events between them)."""

    def __init__(
        self,
        index,
        embedder: TritonEmbedder,
        models: TritonModels,
        version: int,
        batch_size: int = 32,
        progress: bool = True,
        redis_url: str | None = None,
        fetch_timeout_s: float = 10.0,
        fetch_policy=None,
    ):
        self.fetch_timeout_s = fetch_timeout_s
        # Upserts replayed from the stream are vendor feed entries: the workers' hardened fetch.
        self.fetch_policy = fetch_policy or FetchPolicy(timeout_s=fetch_timeout_s)
        self.redis_url = redis_url  # live ingestion's stream, for the catch-up after the rebuild
        self._hold = f"swap:{models.model}:{version}"
        self._since_ms = 0
        self.index = index
        self.embedder = embedder
        self.models = models
        self.version = version
        self.batch_size = batch_size
        self.progress = progress
        self.report: SwapReport | None = None
        self._t0 = time.perf_counter()

    async def _stream_now_ms(self) -> int:
        """The swap's start on the stream's clock (Redis TIME), this host's clock without Redis."""
        if not self.redis_url:
            return int(time.time() * 1000)
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        client = aioredis.Redis.from_url(self.redis_url, socket_timeout=10, socket_connect_timeout=5)
        try:
            now_ms = await redis_time_ms(client)
            # Workers trim the stream; keep what the catch-up will read until it has run. The
            # hold expires (HOLD_TTL_MS) so that a swap that dies cannot pin the stream forever.
            await client.hset(HOLDS, self._hold, f"{now_ms}-0@{now_ms + HOLD_TTL_MS}")
            return now_ms
        except RedisError as exc:
            raise Unavailable(f"Redis at {self.redis_url} (the swap's catch-up clock): {exc}") from None
        finally:
            await client.aclose()

    async def _hold_stream_from(self, since_ms: int) -> None:
        """Before the rebuild: hold the stream from `since_ms`, and refuse when it has already
        been trimmed past it (the catch-up could not see every update and delete since the
        catalog file was exported; export a newer one)."""
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        client = aioredis.Redis.from_url(self.redis_url, socket_timeout=10, socket_connect_timeout=5)
        try:
            now_ms = await redis_time_ms(client)
            await client.hset(HOLDS, self._hold, f"{since_ms}-0@{now_ms + HOLD_TTL_MS}")
            if not await client.exists(STREAM):
                return
            info = await client.xinfo_stream(STREAM)
            trimmed = info.get("max-deleted-entry-id") or b"0-0"
            trimmed = trimmed.decode() if isinstance(trimmed, bytes) else str(trimmed)
            if int(trimmed.split("-")[0]) >= since_ms:
                await client.hdel(HOLDS, self._hold)
                raise FailedPrecondition(
                    f"the event stream was trimmed up to {trimmed}, after the catalog file's snapshot "
                    f"time ({since_ms} ms): updates and deletes since then can no longer be replayed "
                    "into the new index; export a newer catalog file and run the swap again"
                )
        except RedisError as exc:
            raise Unavailable(f"Redis at {self.redis_url} (the swap's catch-up): {exc}") from None
        finally:
            await client.aclose()

    def _step(self, name: str) -> None:
        self.report.steps.append((name, time.perf_counter() - self._t0))
        if self.progress:
            print(f"[swap {time.perf_counter() - self._t0:6.1f}s] {name}", flush=True)

    async def prepare(self) -> SwapReport:
        self._since_ms = await self._stream_now_ms()
        old = await self.index.space()
        loaded = (await self.models.loaded())[f"{self.models.model}_image"]
        await self.models.serve_versions(sorted(set(loaded) | {self.version}))
        new = await resolve_space(self.embedder, self.models.model, self.version)
        if old is not None and new == old:
            raise FailedPrecondition(f"{new} is already the serving space")
        self.report = SwapReport(old, new)
        self._step(f"Triton serves {self.models.model} versions {sorted(set(loaded) | {self.version})}")
        await self.index.ensure(new, make_current_if_none=False)
        await self.index.set_write_targets([new])
        # Workers cache the write targets: the rebuild starts once all of them write both.
        await asyncio.sleep(self.index.settle_s)
        self._step(f"created {new.index_name}; live ingestion now writes to it too")
        return self.report

    async def reindex(self, catalog: Path, on_progress=None, confine_to: Path | None = None) -> None:
        start = time.perf_counter()
        indexer = Indexer(self.embedder, self.index, self.report.new, batch_size=self.batch_size)
        # The file is a snapshot: its writes are as old as the file, so live events written to
        # the new index meanwhile (newer) win field by field, deletes included.
        as_of = snapshot_seq(catalog)
        # The catch-up replays from the earlier of the snapshot and the swap's start: an event
        # between the two is newer than the file and was written to the old index only.
        since_ms = min(self._since_ms, as_of // 1_000_000)
        if self.redis_url:
            await self._hold_stream_from(since_ms)
        result = await index_catalog(
            catalog,
            indexer,
            progress=self.progress,
            as_of_seq=as_of,
            on_progress=on_progress,
            confine_to=confine_to,
            fetch_timeout_s=self.fetch_timeout_s,
        )
        if self.redis_url:
            n = await catch_up(
                self.index,
                self.report.new,
                self.redis_url,
                since_ms,
                release=self._hold,
                upserts=lambda events: self._replay_upserts(indexer, events, result),
            )
            self._step(f"caught up {n} upserts, updates and deletes published since the catalog file")
        if self.report.old is not None:
            carried = await carry_items(self.index, self.report.old, self.report.new)
            self._step(f"carried the item ids of {carried} listings over from {self.report.old.index_name}")
        await self.index.optimize(self.report.new)
        self.report.reindex_s = time.perf_counter() - start
        self.report.failed = len(result.failed)
        self._step(
            f"re-embedded {result.written} products ({result.embedded} embedded, "
            f"{result.unchanged} already done, {len(result.failed)} failed)"
        )

    async def _replay_upserts(self, indexer: Indexer, events, report) -> int:
        """Stream upserts into the new index, embedded by the new version, at their own stream
        positions (a newer write of the product wins field by field, as everywhere)."""
        images = await asyncio.gather(
            *(fetch(e.record["image_url"], self.fetch_policy) for e in events), return_exceptions=True
        )
        items = []
        for event, image in zip(events, images):
            if isinstance(image, BaseException):  # its worker dead-letters it the same way
                report.failed.append((f"stream {event.stream_id}", str(image)))
                continue
            items.append(
                IngestItem(event.record, image, event_seq=event.seq, ref=f"stream {event.stream_id}")
            )
        for start in range(0, len(items), indexer.batch_size):
            await indexer.write_batch(items[start : start + indexer.batch_size], report)
        return len(items)

    async def validate(self, catalog: Path, min_overlap: float, force: bool) -> None:
        old, new = self.report.old, self.report.new
        counts = (await self.index.count(old) if old else 0, await self.index.count(new))
        self.report.counts = counts
        problems = []
        if old is not None and counts[0] != counts[1]:
            problems.append(
                f"document counts differ: {old.index_name} {counts[0]}, {new.index_name} {counts[1]}"
            )
        if old is not None and old.has_text and new.has_text:
            self.report.overlap = await golden_overlap(
                self.index, self.embedder, old, new, golden_queries(catalog)
            )
            if self.report.overlap < min_overlap:
                problems.append(f"golden-query overlap@10 {self.report.overlap:.2f} < {min_overlap}")
        if problems and not force:
            raise FailedPrecondition("validation failed: " + "; ".join(problems) + " (--force to override)")
        self._step(
            "validated"
            + (
                f" (overridden: {'; '.join(problems)})"
                if problems
                else f": counts {counts}, overlap {self.report.overlap}"
            )
        )

    async def switch(self, grace_s: float) -> None:
        await self.move()
        await self.unload_old(grace_s)

    async def move(self) -> None:
        """The commit point: the alias moves to the new index."""
        old, new = self.report.old, self.report.new
        await move_alias(self.index, new, [old] if old else [])
        self._step(f"alias {self.index.alias} -> {new.index_name}")

    async def unload_old(self, grace_s: float) -> None:
        """After the grace period (requests in flight finish on the old pair), Triton serves
        the new version only."""
        if self.report.old is not None and self.report.old.version != self.version:
            await asyncio.sleep(grace_s)
            await self.models.serve_versions([self.version])
            self._step(
                f"grace period over: Triton unloaded {self.report.old.model} v{self.report.old.version}"
            )


async def carry_items(index, old: EmbeddingSpace, new: EmbeddingSpace, chunk: int = 1000) -> int:
    """Item ids (which listings are one item across retailers, `looksync dedup`) are catalog
    facts, not the model's: the catalog file has none, so a rebuilt index would serve every
    listing as its own item until dedup ran again. Each id is written on the image hash it was
    grouped on, so a listing whose image changed since stays ungrouped, as after ingestion."""
    carried, items = 0, {}
    async for batch in index.scan(old):
        for stored in batch:
            if stored.product.item_id:
                items[stored.product.id] = (stored.product.item_id, stored.image_hash)
        if len(items) >= chunk:
            carried += sum(o == "applied" for o in await index.assign_items(new, items))
            items = {}
    if items:
        carried += sum(o == "applied" for o in await index.assign_items(new, items))
    return carried


async def restore(
    index, models: TritonModels, alias_target: str | None, write_targets, indexes, loaded, new_index: str = ""
) -> None:
    """Back to a state noted before a swap began (not past its alias move): the alias target,
    the write targets and Triton's loaded versions as they were, the swap's new index dropped
    when it did not exist before."""
    spaces = await index.indexes()
    if alias_target and await index.alias_target() != alias_target:
        await index.set_current(spaces[alias_target])
    await index.set_write_targets([spaces[n] for n in write_targets if n in spaces])
    if new_index and new_index not in indexes and new_index in spaces:
        await drop_index(index, spaces[new_index])
    if loaded and (await models.loaded())[f"{models.model}_image"] != loaded:
        await models.serve_versions(loaded)


async def rollback(index, models: TritonModels) -> EmbeddingSpace:
    previous = await index.previous_target()
    if previous is None:
        raise FailedPrecondition("nothing to roll back to: the alias has not moved")
    space = (await index.indexes())[previous]
    loaded = (await models.loaded())[f"{models.model}_image"]
    if space.version not in loaded:
        await models.serve_versions(sorted(set(loaded) | {space.version}))
    current = await index.space()
    await move_alias(index, space, [current] if current else [])
    return space


async def move_alias(index, space: EmbeddingSpace, keep_writing: list[EmbeddingSpace]) -> None:
    """Point the alias at `space`; afterwards live ingestion also keeps writing `keep_writing`
    (the index rolled away from, so that a rollback stays cheap and complete).

    Every process caches the alias and the write targets separately for up to refresh_s, so
    during the move a worker may combine the old alias with the new targets or the reverse.
    Both indexes are write targets from before the move until it has settled everywhere."""
    await index.set_write_targets(keep_writing + [space])
    await asyncio.sleep(index.settle_s)
    await index.set_current(space)
    await asyncio.sleep(index.settle_s)
    await index.set_write_targets(keep_writing)


async def drop_index(index, space: EmbeddingSpace) -> None:
    """Delete an index nobody serves from. It first leaves the write targets and the change
    settles: a worker still writing into it after the delete would re-create it (Elasticsearch
    auto-creates indexes on write) without our mapping."""
    if space.index_name == await index.alias_target():
        raise FailedPrecondition(f"{space.index_name} is still behind the alias {index.alias}")
    targets = await index.write_targets()
    if space in targets:
        await index.set_write_targets([t for t in targets if t != space])
        await asyncio.sleep(index.settle_s)
    await index.drop(space)
