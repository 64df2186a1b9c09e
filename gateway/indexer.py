"""Bulk indexing: catalog records -> images -> Triton embeddings (batched) -> index upsert.

reader (validate records) -> mapper (load images, skip unchanged ones, embed) -> writer (upsert)

Re-running over the same catalog is cheap and safe: a product whose image bytes hash to what
the index already holds keeps its stored vector and only has its metadata rewritten, so an
interrupted run resumes without re-embedding what it finished.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gateway.catalog import (
    Product,
    RecordError,
    content_hash,
    load_local_image,
    parse_record,
    read_jsonl,
)
from gateway.embedder import TritonEmbedder
from gateway.errors import FailedPrecondition, InvalidArgument
from gateway.index.base import CatalogIndex, EmbeddingSpace

MAX_IMAGE_BYTES = 20 << 20


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


def fetch_image(url: str, base: Path, timeout_s: float = 10.0) -> bytes:
    """Operator-run bulk indexing reads local files and plain HTTP(S); the hardened fetcher for
    untrusted vendor feeds is the ingest worker's."""
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            data = resp.read(MAX_IMAGE_BYTES + 1)
        if len(data) > MAX_IMAGE_BYTES:
            raise RecordError(f"image_url: larger than {MAX_IMAGE_BYTES} bytes")
        return data
    return load_local_image(url, base)


async def resolve_space(embedder: TritonEmbedder, model: str, version: int | None) -> EmbeddingSpace:
    """The space to index into: the requested version, else the newest one Triton has ready."""
    ready = await embedder.ready_versions(model)
    if not ready:
        raise FailedPrecondition(f"Triton has no READY version of {model}_image: run `looksync triton`")
    if version is None:
        version = ready[-1]
    elif version not in ready:
        raise FailedPrecondition(f"{model} version {version} is not loaded in Triton (ready: {ready})")
    emb, _ = await embedder.embed_texts(model, version, ["dimension probe"], 30.0)
    return EmbeddingSpace(model, version, int(emb.shape[1]))


class Indexer:
    def __init__(
        self,
        embedder: TritonEmbedder,
        index: CatalogIndex,
        space: EmbeddingSpace,
        batch_size: int = 32,
        in_flight: int = 2,
        timeout_s: float = 60.0,
    ):
        self.embedder = embedder
        self.index = index
        self.space = space
        self.batch_size = batch_size
        self.timeout_s = timeout_s
        self._slots = asyncio.Semaphore(in_flight)

    async def _embed(self, images: list[bytes], report: IndexReport, ids: list[str]) -> list:
        """Vectors for the images; a bad image fails alone (the batch is retried one by one)."""
        try:
            return list(
                await self.embedder.embed_images(self.space.model, self.space.version, images, self.timeout_s)
            )
        except InvalidArgument:
            if len(images) == 1:
                raise
        vectors = []
        for pid, image in zip(ids, images):
            try:
                vectors.append(
                    (
                        await self.embedder.embed_images(
                            self.space.model, self.space.version, [image], self.timeout_s
                        )
                    )[0]
                )
            except InvalidArgument as exc:
                report.failed.append((pid, str(exc)))
                vectors.append(None)
        return vectors

    async def write_batch(self, batch: list[tuple[Product, bytes]], report: IndexReport) -> None:
        async with self._slots:
            t0 = time.perf_counter()
            stored = await self.index.get(self.space, [p.id for p, _ in batch])
            items, todo = [], []
            for product, image in batch:
                digest = content_hash(image)
                old = stored.get(product.id)
                if old is not None and old.image_hash == digest:
                    items.append((product, digest, old.vector))
                else:
                    todo.append((product, digest, image))
            t1 = time.perf_counter()
            if todo:
                vectors = await self._embed([i for _, _, i in todo], report, [p.id for p, _, _ in todo])
                for (product, digest, _), vec in zip(todo, vectors):
                    if vec is not None:
                        items.append((product, digest, np.asarray(vec, dtype=np.float32)))
            t2 = time.perf_counter()
            await self.index.upsert(self.space, items)
            t3 = time.perf_counter()
            report.stage_s["read"] += t1 - t0
            report.stage_s["embed"] += t2 - t1
            report.stage_s["write"] += t3 - t2
            report.embedded += sum(
                1 for p, d, _ in items if stored.get(p.id) is None or stored[p.id].image_hash != d
            )
            report.unchanged += sum(1 for p, d, _ in items if p.id in stored and stored[p.id].image_hash == d)


async def index_catalog(path: Path, indexer: Indexer, progress: bool = True) -> IndexReport:
    report = IndexReport(space=indexer.space)
    start = time.perf_counter()
    base = Path(path).resolve().parent
    with open(path, encoding="utf-8") as fh:
        lines = sum(1 for line in fh if line.strip())
    bar = tqdm(total=lines, unit="product", desc="indexing", disable=not progress)
    tasks: list[asyncio.Task] = []
    batch: list[tuple[Product, bytes]] = []
    seen: set[str] = set()

    async def flush():
        nonlocal batch
        if batch:
            chunk, batch = batch, []
            task = asyncio.create_task(indexer.write_batch(chunk, report))
            task.add_done_callback(lambda t, n=len(chunk): bar.update(n))
            tasks.append(task)
            # Keep a few batches queued: enough to overlap image reads with Triton, and a
            # failure (Triton down) surfaces after a few batches, not at the end.
            while len(pending := [t for t in tasks if not t.done()]) > 4:
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:
                if t.done() and t.exception():
                    raise t.exception()

    for number, raw, error in read_jsonl(path):
        if error:
            report.failed.append((f"line {number}", error))
            bar.update(1)
            continue
        try:
            product = parse_record(raw)
            if product.id in seen:
                raise RecordError(f"id: {product.id!r} appears more than once (first one kept)")
            seen.add(product.id)
            image = await asyncio.to_thread(fetch_image, product.image_url, base)
        except (RecordError, OSError) as exc:
            report.failed.append((f"line {number}", str(exc)))
            bar.update(1)
            continue
        batch.append((product, image))
        if len(batch) >= indexer.batch_size:
            await flush()
    await flush()
    await asyncio.gather(*tasks)
    bar.close()
    report.wall_s = time.perf_counter() - start
    return report
