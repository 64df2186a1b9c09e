"""Stage 1: one query per garment layer.

`LLMQueryGenerator` asks a vision LLM; `FallbackQueryGenerator` needs no LLM: a localizer cuts
the garments, their CLIP image embeddings are the queries, and CLIP zero-shot against text
prompts names each one ("a red striped t-shirt") so the response stays readable.
"""

from __future__ import annotations

import asyncio
import io
import os
import weakref
from dataclasses import replace
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from export.triton.preprocess import SWAPS_SIDES, InvalidImage, orientation, probe_image, to_rgb, upright
from gateway.embedder import TritonEmbedder
from gateway.errors import DeadlineExceeded, InvalidArgument, LookSyncError
from gateway.index.base import EmbeddingSpace
from gateway.llm import LLMClient, LLMError, image_part, load_prompt
from gateway.look.localizer import Localizer
from gateway.look.types import LayerQuery, Region
from gateway.taxonomy import CATEGORIES, CATEGORY_LAYER, LAYERS, categories_of_layer

MAX_LAYERS = 8
COLOURS = (
    "red",
    "blue",
    "green",
    "black",
    "white",
    "yellow",
    "pink",
    "beige",
    "grey",
    "navy",
    "brown",
    "orange",
    "purple",
)
PATTERNS = ("solid", "striped", "checked", "dotted", "floral")

Layer = Literal[tuple(LAYERS)]  # type: ignore[valid-type]
Category = Literal[tuple(sorted(CATEGORIES))]  # type: ignore[valid-type]


class Garment(BaseModel):
    layer: Layer
    category: Category
    gender: Literal["women", "men", "unisex"]
    query: str = Field(min_length=3, max_length=400)


class QueryAnswer(BaseModel):
    garments: list[Garment] = Field(min_length=1, max_length=MAX_LAYERS)


class LLMQueryGenerator:
    def __init__(self, llm: LLMClient):
        self.llm = llm
        self.prompt_version, template = load_prompt("query_generation")
        self.system = template.replace("LAYERS", ", ".join(LAYERS)).replace(
            "CATEGORIES", ", ".join(sorted(CATEGORIES))
        )

    async def generate(self, look: bytes, timeout_s: float) -> list[LayerQuery]:
        answer = await self.llm.complete_json(
            QueryAnswer,
            self.system,
            [{"type": "text", "text": "The look:"}, image_part(look)],
            timeout_s,
        )
        # One query per garment: a shirt under an open jacket, or two bags, are two lists.
        queries: dict[tuple[str, str], LayerQuery] = {}
        for g in answer.garments:
            query = " ".join(g.query.split())
            if len(query) < 3:
                raise LLMError("invalid", f"empty query for layer {g.layer}")
            if CATEGORY_LAYER[g.category] != g.layer:
                # The category is the more specific claim; trust it and keep the layer coherent.
                g.layer = CATEGORY_LAYER[g.category]
            queries.setdefault(
                (g.layer, query.lower()),
                LayerQuery(
                    layer=g.layer,
                    categories=tuple(categories_of_layer(g.layer)),
                    query=query,
                    source="llm",
                    gender=g.gender,
                ),
            )
        return list(queries.values())


class ZeroShot:
    """Text-prompt embeddings for naming a garment, computed once per embedding space."""

    def __init__(self, embedder: TritonEmbedder):
        self.embedder = embedder
        self._prompts: dict[tuple[str, int], dict[str, tuple[list[str], np.ndarray]]] = {}

    async def prompts(self, space: EmbeddingSpace, timeout_s: float):
        key = (space.model, space.version)
        if key not in self._prompts:
            groups = {
                "category": sorted(CATEGORIES),
                "colour": list(COLOURS),
                "pattern": list(PATTERNS),
                "gender": ["women", "men", "unisex"],
            }
            texts = [f"a photo of a {c}" for c in groups["category"]]
            texts += [f"a photo of a {c} garment" for c in groups["colour"]]
            texts += [f"a photo of a {p} garment" for p in groups["pattern"]]
            texts += [
                f"a photo of {g}'s clothing" if g != "unisex" else "a photo of unisex clothing"
                for g in groups["gender"]
            ]
            emb, _ = await self.embedder.embed_texts(space.model, space.version, texts, timeout_s)
            out, start = {}, 0
            for name, labels in groups.items():
                out[name] = (labels, emb[start : start + len(labels)])
                start += len(labels)
            self._prompts[key] = out
        return self._prompts[key]


def _best(labels: list[str], vectors: np.ndarray, query: np.ndarray, allowed=None) -> str:
    scores = vectors @ query
    order = np.argsort(-scores)
    for i in order:
        if allowed is None or labels[i] in allowed:
            return labels[i]
    return labels[int(order[0])]


class FallbackQueryGenerator:
    """Queries without an LLM. With a segmenter (Florence-2 + SAM2), each layer's garment is
    grounded by name and cut out; without one, or when it finds nothing, body zones are used."""

    def __init__(self, embedder: TritonEmbedder, localizer: Localizer, zero_shot: ZeroShot, segmenter=None):
        self.embedder = embedder
        self.localizer = localizer
        self.zero_shot = zero_shot
        self.segmenter = segmenter

    async def _segmented(self, image: bytes, timeout_s: float) -> list[Region]:
        from gateway.look.segment_localizer import DEFAULT_PHRASES

        try:
            found = await self.segmenter.regions_for(image, DEFAULT_PHRASES, timeout_s)
        except LookSyncError:
            return []
        # A segmented region belongs to the layer whose phrase found it.
        return [
            replace(region, categories=tuple(categories_of_layer(layer)), source="segmentation")
            for layer, region in found.items()
        ]

    async def generate(
        self, look: Image.Image, space: EmbeddingSpace, timeout_s: float, image: bytes | None = None
    ) -> list[LayerQuery]:
        regions = []
        if self.segmenter is not None and image is not None:
            regions = await self._segmented(image, timeout_s)
        if not regions:
            regions = await self.localizer.regions(look, timeout_s)
        vectors = await self.embedder.embed_images(
            space.model, space.version, [r.image for r in regions], timeout_s
        )
        if not space.has_text:
            return _image_only_queries(regions, vectors)
        prompts = await self.zero_shot.prompts(space, timeout_s)
        queries, used = [], set()
        for region, vector in zip(regions, vectors):
            allowed = _allowed(region, used)
            if not allowed:
                continue
            category = _best(*prompts["category"], vector, allowed=allowed)
            used.add(CATEGORY_LAYER[category])
            colour = _best(*prompts["colour"], vector)
            pattern = _best(*prompts["pattern"], vector)
            words = [colour] + ([] if pattern == "solid" else [pattern]) + [category]
            queries.append(
                LayerQuery(
                    layer=CATEGORY_LAYER[category],
                    # The zone, not the zero-shot guess, bounds the search: a wrong guess then
                    # costs ranking quality, never the right product.
                    categories=region.categories,
                    query=" ".join(words),
                    source="fallback",
                    region=region,
                    region_vector=vector,
                )
            )
        return queries


def _allowed(region: Region, used: set[str]) -> list[str]:
    """Categories a region's query may take. A found garment (detector, segmentation) is one
    query whatever came before it: two tops are two lists. A body zone may show several layers,
    and one already taken by an earlier zone is left out (a dress seen in the upper zone also
    fills the lower one)."""
    if region.source != "zones":
        return list(region.categories)
    return [c for c in region.categories if CATEGORY_LAYER[c] not in used]


def _image_only_queries(regions: list[Region], vectors) -> list[LayerQuery]:
    """An image-only space (DINOv2) cannot name a garment with text prompts: each region
    searches by its own pixels, within the categories its zone allows."""
    queries, used = [], set()
    for region, vector in zip(regions, vectors):
        layers = list(dict.fromkeys(CATEGORY_LAYER[c] for c in _allowed(region, used)))
        if not layers:
            continue
        used.add(layers[0])
        queries.append(
            LayerQuery(
                layer=layers[0],
                categories=region.categories,
                query=f"{region.zone} garment",
                source="fallback",
                region=region,
                region_vector=vector,
            )
        )
    return queries


# Looks are worked on at most this size (longest side): zone crops of a few hundred pixels are
# all the image tower sees (it resizes to its input size), and a 25 MP look decoded in full is
# 75 MB of RGB per request.
LOOK_WORKING_SIDE = 1024
# Decodes of looks at once across the gateway: half the cores (at least one), so that decoding
# big looks never takes every core from the requests already decoded (and from Triton when it
# shares the host); it also bounds decode memory (see max_look_pixels).
LOOK_DECODES_AT_ONCE = max(1, (os.cpu_count() or 2) // 2)
_decode_slots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> semaphore


# Where decode_look records the look's size as sent (upright): garment boxes are given in it.
SOURCE_SIZE = "looksync.source_size"


def decode_look(data: bytes, max_pixels: int) -> Image.Image:
    """The look, decoded, upright (EXIF orientation applied) and reduced to LOOK_WORKING_SIDE: a
    truncated or corrupt file is the client's error. JPEGs decode straight at a reduced scale
    (draft mode: 1/2 to 1/8 in the DCT), so a 25 MP JPEG never exists in memory at full size;
    other formats decode in full, then shrink. `img.info[SOURCE_SIZE]` is the size the client's
    pixels have upright, which `source_box` maps garment boxes back to."""
    try:
        img = probe_image(data, max_pixels)
        width, height = img.size
        if orientation(img) in SWAPS_SIDES:
            width, height = height, width
        img.draft("RGB", (LOOK_WORKING_SIDE, LOOK_WORKING_SIDE))
        img = to_rgb(upright(_load_first_frame(img)))
    except InvalidImage as exc:
        raise InvalidArgument(f"image: {exc}") from None
    if max(img.size) > LOOK_WORKING_SIDE:
        img.thumbnail((LOOK_WORKING_SIDE, LOOK_WORKING_SIDE), Image.Resampling.BICUBIC, reducing_gap=2.0)
    img.info[SOURCE_SIZE] = (width, height)
    return img


def source_box(box: tuple[int, int, int, int], look: Image.Image) -> tuple[int, int, int, int]:
    """A box on the working copy of the look, in the pixels of the look as sent (upright)."""
    width, height = look.info.get(SOURCE_SIZE, look.size)
    sx, sy = width / look.width, height / look.height
    if (sx, sy) == (1.0, 1.0):
        return tuple(box)
    left, top, right, bottom = box
    return (
        min(width, round(left * sx)),
        min(height, round(top * sy)),
        min(width, round(right * sx)),
        min(height, round(bottom * sy)),
    )


def llm_image(look: Image.Image) -> bytes:
    """The look as the LLM gets it: JPEG (what `image_part` labels it), at most
    LOOK_WORKING_SIDE on its longest side, as decode_look left it."""
    buf = io.BytesIO()
    look.convert("RGB").save(buf, "JPEG", quality=88)
    return buf.getvalue()


async def decode_look_async(data: bytes, max_pixels: int, deadline=None) -> Image.Image:
    """decode_look off the event loop (other RPCs keep being served meanwhile), at most
    LOOK_DECODES_AT_ONCE at a time, which bounds the decode memory of the whole gateway.
    With a `deadline` (gateway/search.py), a request whose deadline passes while it queues
    for a slot fails then, never decoding a look nobody waits for any more."""
    loop = asyncio.get_running_loop()
    slots = _decode_slots.setdefault(loop, asyncio.Semaphore(LOOK_DECODES_AT_ONCE))
    try:
        await asyncio.wait_for(slots.acquire(), None if deadline is None else deadline.left())
    except TimeoutError:
        raise DeadlineExceeded("the request's deadline passed while it waited to decode the look") from None
    try:
        if deadline is not None:
            deadline.left()  # raises once it has passed
        return await asyncio.to_thread(decode_look, data, max_pixels)
    finally:
        slots.release()


def _load_first_frame(img: Image.Image) -> Image.Image:
    try:
        img.seek(0)  # animated formats: the first frame
        img.load()
    except Exception as exc:
        raise InvalidImage(f"image data is corrupt or truncated ({exc})") from None
    return img
