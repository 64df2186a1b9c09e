"""Work of many looks in one Triton call, and in one index query.

The batch job runs SearchLook's own pipeline (gateway/look/pipeline.py) for many looks at once.
Each look asks for its own embeddings (its crops, its queries, its detector pass) and its own
kNN per garment; these wrappers gather the calls that arrive within a short window (per model
and version; per space, filters and k) and send them as one request of up to `max_batch`
items. So Triton and the index see full batches without the pipeline knowing: the batch path
and the online path stay one piece of code.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

from gateway.errors import DeadlineExceeded


@dataclass
class _Pending:
    items: list  # texts / images, or the rows of one array
    timeout_s: float
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class _Batcher:
    """Calls of one kind for one model, merged. `call(items, timeout_s)` returns one result row
    per item (a sequence, or a tuple of sequences for several outputs)."""

    def __init__(self, call, max_batch: int, window_s: float):
        self.call, self.max_batch, self.window_s = call, max_batch, window_s
        self.pending: list[_Pending] = []
        self.size = 0
        self.timer: asyncio.TimerHandle | None = None
        self.calls = 0  # Triton requests sent (for the benchmark's batch-size figure)
        self.items = 0

    async def submit(self, items: list, timeout_s: float):
        entry = _Pending(list(items), timeout_s)
        self.pending.append(entry)
        self.size += len(entry.items)
        if self.size >= self.max_batch:
            self._flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.window_s, self._flush)
        return await entry.future

    def _flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch, self.pending, self.size = self.pending, [], 0
        if batch:
            asyncio.ensure_future(self._run(batch))

    async def _run(self, batch: list[_Pending]) -> None:
        items = [x for entry in batch for x in entry.items]
        timeout = max(entry.timeout_s for entry in batch)
        try:
            parts = []
            for start in range(0, len(items), self.max_batch):
                chunk = items[start : start + self.max_batch]
                self.calls += 1
                self.items += len(chunk)
                try:  # one deadline per request, so a stuck call never holds a batch forever
                    parts.append(await asyncio.wait_for(self.call(chunk, timeout), timeout))
                except TimeoutError:
                    raise DeadlineExceeded(f"a merged call did not answer within {timeout:.1f}s") from None
            rows = _concat(parts)
        except BaseException as exc:  # every look of the batch learns what went wrong
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for entry in batch:
            n = len(entry.items)
            if not entry.future.done():  # a look that gave up (cancelled) takes nothing
                entry.future.set_result(_slice(rows, start, start + n))
            start += n


def _concat(parts):
    if isinstance(parts[0], list):
        return [row for part in parts for row in part]
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(p) for p in zip(*parts))
    return np.concatenate(parts)


def _slice(rows, a: int, b: int):
    return tuple(r[a:b] for r in rows) if isinstance(rows, tuple) else rows[a:b]


class CoalescingEmbedder:
    """A TritonEmbedder whose inference calls are merged across concurrent callers; every other
    method is the wrapped embedder's."""

    def __init__(self, embedder, max_batch: int = 64, window_s: float = 0.01):
        self.embedder = embedder
        self.max_batch = max_batch
        self.window_s = window_s
        self.batchers: dict[tuple, _Batcher] = {}

    def __getattr__(self, name):
        return getattr(self.embedder, name)

    async def _batcher(self, key: tuple, triton_model: str, call) -> _Batcher:
        if key not in self.batchers:
            # Never more per request than the model accepts (the detector takes 16).
            limit = await self.embedder.max_batch_size(triton_model) or self.max_batch
            self.batchers.setdefault(key, _Batcher(call, min(limit, self.max_batch), self.window_s))
        return self.batchers[key]

    async def embed_texts(self, model: str, version: int, texts: list[str], timeout_s: float):
        async def call(chunk, timeout):
            # Looks in flight at once ask for the same words ("blue denim jeans") before any
            # of them has cached it: each distinct text is embedded once per request.
            unique = list(dict.fromkeys(chunk))
            emb, truncated = await self.embedder.embed_texts(model, version, unique, timeout)
            where = {t: i for i, t in enumerate(unique)}
            rows = [where[t] for t in chunk]
            return emb[rows], truncated[rows]

        if not texts:
            return await self.embedder.embed_texts(model, version, texts, timeout_s)
        batcher = await self._batcher(("text", model, version), f"{model}_text", call)
        return await batcher.submit(texts, timeout_s)

    async def embed_images(self, model: str, version: int, images: list[bytes], timeout_s: float):
        async def call(chunk, timeout):
            return await self.embedder.embed_images(model, version, chunk, timeout)

        if not images:
            return await self.embedder.embed_images(model, version, images, timeout_s)
        batcher = await self._batcher(("image", model, version), f"{model}_image", call)
        return await batcher.submit(images, timeout_s)

    async def infer_array(self, model: str, name: str, array: np.ndarray, output: str, timeout_s: float):
        async def call(chunk, timeout):
            return await self.embedder.infer_array(model, name, np.stack(chunk), output, timeout)

        batcher = await self._batcher(("array", model, name, output), model, call)
        rows = await batcher.submit(list(array), timeout_s)
        return np.asarray(rows)

    def stats(self) -> dict[str, dict[str, float]]:
        """By kind (text, image, array): Triton requests sent, items in them, and the mean
        batch (what Triton saw)."""
        out: dict[str, dict[str, float]] = {}
        for key, b in self.batchers.items():
            kind = out.setdefault(key[0], {"calls": 0, "items": 0})
            kind["calls"] += b.calls
            kind["items"] += b.items
        for kind in out.values():
            kind["per_call"] = round(kind["items"] / kind["calls"], 1) if kind["calls"] else 0.0
        return out


class CoalescingIndex:
    """A CatalogIndex whose kNN searches with the same space, filters and k are merged across
    concurrent callers into one multi-vector query (`search_many`); every other method is the
    wrapped index's. Measured on the embedded index: 1.5 ms per query merged by 32, 10 ms alone."""

    def __init__(self, index, max_batch: int = 64, window_s: float = 0.01):
        self.index = index
        self.max_batch = max_batch
        self.window_s = window_s
        self.batchers: dict[tuple, _Batcher] = {}

    def __getattr__(self, name):
        return getattr(self.index, name)

    async def search(self, vector, space, filters, k, with_vectors=False, index=None, timeout_s=None):
        if index is not None:  # a named physical index: as asked, alone
            return await self.index.search(vector, space, filters, k, with_vectors, index, timeout_s)
        key = (space.model, space.version, space.dim, filters, k, with_vectors)
        if key not in self.batchers:

            async def call(vectors, timeout):
                return await self.index.search_many(vectors, space, filters, k, with_vectors)

            self.batchers[key] = _Batcher(call, self.max_batch, self.window_s)
        hits = await self.batchers[key].submit([vector], timeout_s or 60.0)
        return space, hits[0]

    def stats(self) -> dict[str, float]:
        calls = sum(b.calls for b in self.batchers.values())
        items = sum(b.items for b in self.batchers.values())
        return {"calls": calls, "items": items, "per_call": round(items / calls, 1) if calls else 0.0}
