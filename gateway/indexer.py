"""The write path shared by bulk indexing (`looksync index`) and the ingest worker:

    record -> enrich (vendor vocabulary) -> skip unchanged images -> embed (Triton, batched)
           -> zero-shot what the vendor left unknown -> validate -> upsert (ordered by event)

A product whose image bytes hash to what the index already holds keeps its stored vector, so
re-running over a catalog, or replaying events, never re-embeds finished work.
"""

from __future__ import annotations

import asyncio
import io
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from gateway.catalog import RecordError, content_hash, load_local_image, parse_record, read_jsonl
from gateway.embedder import TritonEmbedder
from gateway.errors import FailedPrecondition, InvalidArgument
from gateway.index.base import CatalogIndex, EmbeddingSpace
from gateway.ingest.enrich import standardise, zero_shot_fill
from gateway.ingest.events import snapshot_seq
from gateway.look.querygen import ZeroShot
from gateway.observability import INDEXED

MAX_IMAGE_BYTES = 20 << 20


@dataclass
class IngestItem:
    raw: dict  # a catalog record; vendor vocabulary allowed
    image: bytes
    event_seq: int | None = None
    ref: str = ""  # where it came from (line number, stream id), for reports


@dataclass
class IndexReport:
    space: EmbeddingSpace | None = None
    embedded: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    stage_s: dict[str, float] = field(default_factory=lambda: {"read": 0.0, "embed": 0.0, "write": 0.0})
    wall_s: float = 0.0

    @property
    def written(self) -> int:
        return self.embedded + self.unchanged


def fetch_image(url: str, base: Path, timeout_s: float = 10.0, confine_to: Path | None = None) -> bytes:
    """Operator-run bulk indexing reads local files and plain HTTP(S); untrusted vendor feeds
    go through the ingest worker's hardened fetcher (gateway/ingest/fetch.py). `confine_to`:
    local files must lie under it (a swap started over the Admin API reads the gateway's disk)."""
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            data = resp.read(MAX_IMAGE_BYTES + 1)
        if len(data) > MAX_IMAGE_BYTES:
            raise RecordError(f"image_url: larger than {MAX_IMAGE_BYTES} bytes")
        return data
    return load_local_image(url, base, confine_to)


def _probe_image() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (128, 128, 128)).save(buf, "PNG")
    return buf.getvalue()


PROBE_IMAGE = _probe_image()  # every family has an image tower: the dimension comes from it


async def resolve_space(embedder: TritonEmbedder, model: str, version: int | None) -> EmbeddingSpace:
    """The space to index into: the requested version, else the newest one Triton has ready."""
    ready = await embedder.ready_versions(model)
    if not ready:
        raise FailedPrecondition(f"Triton has no READY version of {model}_image: run `looksync triton`")
    if version is None:
        version = ready[-1]
    elif version not in ready:
        raise FailedPrecondition(f"{model} version {version} is not loaded in Triton (ready: {ready})")
    family, modalities = await embedder.family(model)
    emb = await embedder.embed_images(model, version, [PROBE_IMAGE], 30.0)
    return EmbeddingSpace(model, version, int(emb.shape[1]), family, modalities)


class Indexer:
    def __init__(
        self,
        embedder: TritonEmbedder,
        index: CatalogIndex,
        space: EmbeddingSpace,
        batch_size: int = 32,
        in_flight: int = 2,
        timeout_s: float = 60.0,
        source: str = "bulk",
    ):
        self.embedder = embedder
        self.index = index
        self.space = space
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self.zero_shot = ZeroShot(embedder)
        self.source = source
        self._slots = asyncio.Semaphore(in_flight)

    async def _embed(self, items: list[IngestItem]) -> list[np.ndarray | str]:
        """A vector per image, or the reason it was refused; one bad image fails alone."""
        images = [i.image for i in items]
        try:
            return list(
                await self.embedder.embed_images(self.space.model, self.space.version, images, self.timeout_s)
            )
        except InvalidArgument as exc:
            if len(items) == 1:
                return [str(exc)]
        out = []
        for image in images:
            try:
                out.append(
                    (
                        await self.embedder.embed_images(
                            self.space.model, self.space.version, [image], self.timeout_s
                        )
                    )[0]
                )
            except InvalidArgument as exc:
                out.append(str(exc))
        return out

    async def write_batch(self, items: list[IngestItem], report: IndexReport) -> dict[str, str | None]:
        """Write a batch; returns ref -> None (written) or the reason it cannot be.

        Raises on infrastructure failures (Triton or the index unavailable): nothing of the
        batch may then be treated as done.
        """
        async with self._slots:
            t0 = time.perf_counter()
            outcome: dict[str, str | None] = {}
            enriched = [standardise(item.raw) for item in items]
            ids = [str(item.raw.get("id", "")).strip() for item in items]
            stored = await self.index.get(self.space, [i for i in ids if i])
            vectors: list = [None] * len(items)
            todo = []
            for n, (item, pid) in enumerate(zip(items, ids)):
                old = stored.get(pid)
                if old is not None and old.image_hash == content_hash(item.image):
                    vectors[n] = old.vector
                else:
                    todo.append(n)
            t1 = time.perf_counter()
            if todo:
                for n, vec in zip(todo, await self._embed([items[n] for n in todo])):
                    vectors[n] = vec
            prompts = None
            # Zero-shot naming compares with text prompts: image-only spaces leave gaps as they are.
            if self.space.has_text and any("missing" in sources.values() for _, sources in enriched):
                prompts = await self.zero_shot.prompts(self.space, self.timeout_s)
            t2 = time.perf_counter()
            rows = []
            for n, (item, (record, sources)) in enumerate(zip(items, enriched)):
                if isinstance(vectors[n], str):
                    outcome[item.ref] = vectors[n]
                    continue
                if prompts is not None:
                    zero_shot_fill(record, sources, vectors[n], prompts)
                try:
                    product = parse_record(record)
                except RecordError as exc:
                    outcome[item.ref] = str(exc)
                    continue
                rows.append(
                    (product, content_hash(item.image), np.asarray(vectors[n], np.float32), item.event_seq)
                )
                outcome[item.ref] = None
            await self.index.upsert(self.space, rows)
            t3 = time.perf_counter()
            report.stage_s["read"] += t1 - t0
            report.stage_s["embed"] += t2 - t1
            report.stage_s["write"] += t3 - t2
            fresh = {items[n].ref for n in todo}
            for item in items:
                if outcome.get(item.ref) is None and item.ref in outcome:
                    if item.ref in fresh:
                        report.embedded += 1
                    else:
                        report.unchanged += 1
                elif item.ref in outcome:
                    report.failed.append((item.ref, outcome[item.ref]))
            INDEXED.labels(self.source).inc(len(rows))
            return outcome


async def index_catalog(
    path: Path,
    indexer: Indexer,
    progress: bool = True,
    as_of_seq: int | None = None,
    on_progress=None,
    confine_to: Path | None = None,
    fetch_timeout_s: float = 10.0,
) -> IndexReport:
    """Index a catalog file. `as_of_seq` orders its writes with live catalog events (see
    gateway/ingest/events.py); by default the file's age, so an update or delete that live
    ingestion wrote after the file was exported is not undone by indexing it (again).
    `on_progress(done, total)` is called as products are finished (background jobs report it);
    `fetch_timeout_s`: per image fetched over HTTP (LOOKSYNC_FETCH_TIMEOUT_S)."""
    if as_of_seq is None:
        as_of_seq = snapshot_seq(path)
    report = IndexReport(space=indexer.space)
    start = time.perf_counter()
    base = Path(path).resolve().parent
    with open(path, encoding="utf-8") as fh:
        lines = sum(1 for line in fh if line.strip())
    bar = tqdm(total=lines, unit="product", desc="indexing", disable=not progress)
    done = 0
    if on_progress is not None:
        on_progress(0, lines)  # the total is known before the first batch is written

    def advance(n: int) -> None:
        nonlocal done
        done += n
        bar.update(n)
        if on_progress is not None:
            on_progress(done, lines)

    tasks: list[asyncio.Task] = []
    batch: list[IngestItem] = []
    seen: set[str] = set()

    async def flush():
        nonlocal batch
        if batch:
            chunk, batch = batch, []
            task = asyncio.create_task(indexer.write_batch(chunk, report))
            task.add_done_callback(lambda t, n=len(chunk): advance(n))
            tasks.append(task)
            # Keep a few batches queued: enough to overlap image reads with Triton, and a
            # failure (Triton down) surfaces after a few batches, not at the end.
            while len(pending := [t for t in tasks if not t.done()]) > 4:
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:
                if t.done() and t.exception():
                    raise t.exception()

    try:
        for number, raw, error in read_jsonl(path):
            where = f"line {number}"
            try:
                if error:
                    raise RecordError(error)
                if not isinstance(raw, dict) or not isinstance(raw.get("id"), str) or not raw["id"].strip():
                    raise RecordError("id: missing")
                if raw["id"] in seen:
                    raise RecordError(f"id: {raw['id']!r} appears more than once (first one kept)")
                seen.add(raw["id"])
                if not isinstance(raw.get("image_url"), str) or not raw["image_url"]:
                    raise RecordError("image_url: missing")
                image = await asyncio.to_thread(
                    fetch_image, raw["image_url"], base, fetch_timeout_s, confine_to
                )
            except (RecordError, OSError) as exc:
                report.failed.append((where, str(exc)))
                advance(1)
                continue
            batch.append(IngestItem(raw, image, event_seq=as_of_seq, ref=where))
            if len(batch) >= indexer.batch_size:
                await flush()
        await flush()
        await asyncio.gather(*tasks)
    finally:
        # Cancelled or failed: no batch may still be writing once this returns (a rolled-back
        # swap drops the index; a late write would re-create it). Batches are not cancelled
        # but awaited: a write runs in a thread that a cancellation would not stop.
        await asyncio.gather(*tasks, return_exceptions=True)
    bar.close()
    report.wall_s = time.perf_counter() - start
    return report
