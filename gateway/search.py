"""The search path for SearchText and SearchImage, top to bottom:

    validate -> resolve the index's embedding space -> embed (Triton) -> retrieve (kNN + filters)

Each stage is timed; timings go back to the caller and into the stage histogram.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from export.triton.preprocess import InvalidImage, probe_image
from gateway.embedder import TritonEmbedder
from gateway.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from gateway.filters import SearchFilters
from gateway.index.base import CatalogIndex, EmbeddingSpace, ScoredProduct, index_name
from gateway.items import OVERFETCH, group_by_item

# Longer text cannot change the embedding (the model sees 77 tokens, and a token is at least
# one character), so cut it before it costs tokenizer time; the response says it was cut.
MAX_TEXT_CHARS = 4000
DEFAULT_TEXT_WEIGHT = 0.3


@dataclass
class Timings:
    stages: list[tuple[str, float]] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages.append((name, (time.perf_counter() - start) * 1000.0))


@dataclass
class SearchResult:
    hits: list[ScoredProduct]
    space: EmbeddingSpace
    timings: Timings
    text_truncated: bool = False


@dataclass
class Deadline:
    """An absolute deadline; each remote call gets what is left of it."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def left(self, cap: float | None = None) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the request's deadline passed before the search finished")
        return min(left, cap) if cap is not None else left


def _visible(text: str) -> bool:
    """Whether the text has a letter, digit, punctuation mark or symbol: only spaces, zero-width
    and other format or control characters is as empty as "" to a text encoder."""
    return any(unicodedata.category(ch)[0] in "LNPS" for ch in text)


def check_k(k: int, max_k: int, field_name: str = "k") -> int:
    # proto3 cannot tell an unset k from 0; a silent default would hide client bugs.
    if k < 1 or k > max_k:
        raise InvalidArgument(f"{field_name}: {k} is out of range; set it to 1..{max_k}")
    return k


def check_text(text: str, field_name: str, required: bool = True) -> tuple[str, bool]:
    text = text.strip()
    if required and not _visible(text):
        raise InvalidArgument(f"{field_name}: empty text")
    if len(text) > MAX_TEXT_CHARS:
        return text[:MAX_TEXT_CHARS], True
    return text, False


def check_image(data: bytes, max_pixels: int) -> None:
    """Header-only checks (format, dimensions); full decoding happens once, in Triton."""
    try:
        probe_image(data, max_pixels)
    except InvalidImage as exc:
        raise InvalidArgument(f"image: {exc}") from None


def need_text(space: EmbeddingSpace, field: str) -> None:
    if not space.has_text:
        raise FailedPrecondition(
            f"{field}: {space.model} v{space.version} is an image-only ({space.family}) space and "
            "cannot embed text; search it by image, or name a space with a text tower"
        )


_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


async def request_space(index: CatalogIndex, requested: EmbeddingSpace | None) -> EmbeddingSpace:
    """The space a request searches. Unset: the one behind the alias. A model and version:
    that space's index. A model with version 0: the alias's version when the alias serves
    that model, otherwise the newest finished index of it (one still being rebuilt for a swap,
    i.e. a write target, is not offered). Several spaces are served at once this way; a
    request never gets another space than the one it named."""
    current = await index.space()
    if requested is None:
        if current is None:
            raise FailedPrecondition("the catalog index is empty: run `looksync index CATALOG.jsonl`")
        return current
    if not _MODEL_NAME.match(requested.model):
        raise InvalidArgument(f"space.model: {requested.model!r} is not a model name ([a-z0-9_-], up to 64)")
    if requested.version < 0:
        raise InvalidArgument(f"space.version: {requested.version} is negative (0 = the newest)")
    if requested.dim < 0:
        raise InvalidArgument(f"space.dim: {requested.dim} is negative (0 = any)")
    wanted = f"{requested.model} v{requested.version}" if requested.version else requested.model
    if current is not None and requested.model == current.model and requested.version in (0, current.version):
        space = current
    elif requested.version:
        space = await index.space_of(index_name(requested.model, requested.version))
    else:
        building = set(await index.write_targets())
        same = [
            s for s in (await index.indexes()).values() if s.model == requested.model and s not in building
        ]
        space = max(same, key=lambda s: s.version) if same else None
    if space is None:
        names = ", ".join(await index.indexes()) or "none"
        raise FailedPrecondition(f"space: no index holds {wanted} (indexes: {names})")
    if requested.dim and requested.dim != space.dim:
        raise FailedPrecondition(
            f"space: the request expects {requested.dim}-d vectors, {space} has {space.dim}"
        )
    return space


def blend(image_vec: np.ndarray, text_vec: np.ndarray, text_weight: float) -> np.ndarray:
    vec = (1.0 - text_weight) * image_vec + text_weight * text_vec
    return vec / max(float(np.linalg.norm(vec)), 1e-12)


class Searcher:
    def __init__(
        self, embedder: TritonEmbedder, index: CatalogIndex, triton_timeout_s: float, max_image_pixels: int
    ):
        self.embedder = embedder
        self.index = index
        self.triton_timeout_s = triton_timeout_s
        self.max_image_pixels = max_image_pixels

    async def _space(self, requested: EmbeddingSpace | None) -> EmbeddingSpace:
        return await request_space(self.index, requested)

    async def _retrieve(self, vector, space, filters, k, timings, deadline) -> tuple[EmbeddingSpace, list]:
        """kNN, then one hit per item with its offers (gateway/items.py)."""
        with timings.stage("retrieve"):
            index_space, hits = await self.index.search(
                vector, space, filters, k * OVERFETCH, timeout_s=deadline.left()
            )
        with timings.stage("items"):
            return index_space, await group_by_item(self.index, index_space, hits, filters, k)

    async def _embed_text(self, space, text, deadline) -> tuple[np.ndarray, bool]:
        emb, truncated = await self.embedder.embed_texts(
            space.model, space.version, [text], deadline.left(self.triton_timeout_s)
        )
        return emb[0], bool(truncated[0])

    async def search_text(
        self,
        text: str,
        filters: SearchFilters,
        k: int,
        deadline: Deadline,
        expected: EmbeddingSpace | None = None,
    ) -> SearchResult:
        timings = Timings()
        text, cut = check_text(text, "text")
        space = await self._space(expected)
        need_text(space, "text")
        with timings.stage("embed_text"):
            vector, truncated = await self._embed_text(space, text, deadline)
        space = EmbeddingSpace(space.model, space.version, int(vector.shape[0]))
        index_space, hits = await self._retrieve(vector, space, filters, k, timings, deadline)
        return SearchResult(hits, index_space, timings, text_truncated=cut or truncated)

    async def search_image(
        self,
        image: bytes,
        text_modifier: str,
        text_weight: float,
        filters: SearchFilters,
        k: int,
        deadline: Deadline,
        expected: EmbeddingSpace | None = None,
    ) -> SearchResult:
        timings = Timings()
        with timings.stage("validate_image"):
            check_image(image, self.max_image_pixels)
        modifier, cut = check_text(text_modifier, "text_modifier", required=False)
        if math.isnan(text_weight) or not 0.0 <= text_weight <= 1.0:
            raise InvalidArgument(f"text_weight: {text_weight} is not in [0, 1]")
        if modifier and text_weight == 0.0:
            text_weight = DEFAULT_TEXT_WEIGHT
        space = await self._space(expected)
        if modifier:
            need_text(space, "text_modifier")
        truncated = False
        with timings.stage("embed"):
            image_call = self.embedder.embed_images(
                space.model, space.version, [image], deadline.left(self.triton_timeout_s)
            )
            if modifier:
                (img_emb, (text_vec, truncated)) = await asyncio.gather(
                    image_call, self._embed_text(space, modifier, deadline)
                )
                vector = blend(img_emb[0], text_vec, text_weight)
            else:
                vector = (await image_call)[0]
        space = EmbeddingSpace(space.model, space.version, int(vector.shape[0]))
        index_space, hits = await self._retrieve(vector, space, filters, k, timings, deadline)
        return SearchResult(hits, index_space, timings, text_truncated=cut or truncated)
