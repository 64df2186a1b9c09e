"""Garments found by name: Florence-2 grounds a phrase to a box, SAM2 masks it, we cut it out.

`FlorenceSam2Localizer.regions_for(look_bytes, {"topwear": "t-shirt", ...}, timeout_s)` returns
one `Region` per layer whose phrase was found: the garment alone on a white background,
cropped to its mask, as PNG (what the CLIP image tower is then shown). A layer whose grounding
returns no box is absent from the result; that is an answer, not an error.

Per look it costs two Triton round trips, both under one deadline: every phrase is grounded
concurrently (`florence2_ground`, one request per layer, which Triton's dynamic batcher decodes
together), then one `sam2_mask` request carries all boxes of all layers, so the SAM2 image
encoder runs once per look. When a phrase yields several boxes (a pair of shoes), their masks
are united. When SAM2 returns an empty mask inside a box, the box itself is used: grounding
found the garment, and a rectangular crop is a better query than none.

It also implements the synchronous `Localizer` protocol (`regions(look)`) with one generic
phrase per layer, for callers that have no phrases; that path runs its own event loop in a
worker thread and needs the Triton URL.
"""

from __future__ import annotations

import asyncio
import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tritonclient.grpc.aio as triton
from PIL import Image
from tritonclient.utils import InferenceServerException

from export.triton.preprocess import DEFAULT_MAX_PIXELS, InvalidImage, decode_image
from gateway.embedder import _CHANNEL_ARGS, _translate
from gateway.errors import DeadlineExceeded, InvalidArgument, Unavailable
from gateway.look.types import Region
from gateway.taxonomy import categories_of_layer

# What to ask Florence-2 for when the caller has no phrase of its own (the sync protocol).
DEFAULT_PHRASES: dict[str, str] = {
    "topwear": "top",
    "outerwear": "jacket",
    "dress": "dress",
    "bottomwear": "trousers",
    "footwear": "shoes",
}
GROUNDING = "<CAPTION_TO_PHRASE_GROUNDING>"
WHITE = (255, 255, 255)


def _version(v: int | None) -> str:
    return "" if v is None else str(int(v))


def cut_out(look: Image.Image, mask: np.ndarray) -> tuple[tuple[int, int, int, int], bytes] | None:
    """The masked pixels on white, cropped to the mask's bounding box, as PNG; None if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    alpha = Image.fromarray((mask > 0).astype(np.uint8) * 255, "L")
    white = Image.new("RGB", look.size, WHITE)
    cut = Image.composite(look.convert("RGB"), white, alpha).crop(box)
    buf = io.BytesIO()
    cut.save(buf, "PNG", compress_level=1)  # sent on to Triton at once: speed over size
    return box, buf.getvalue()


def box_mask(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """A mask that fills the given boxes (the fallback when SAM2 finds nothing inside them)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float32).reshape(-1, 4):
        left, top = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        right, bottom = min(width, int(np.ceil(x1))), min(height, int(np.ceil(y1)))
        mask[top:bottom, left:right] = 1
    return mask


class FlorenceSam2Localizer:
    name = "florence2_sam2"

    def __init__(
        self,
        client: triton.InferenceServerClient | str,
        ground_model: str = "florence2_ground",
        ground_version: int | None = None,
        mask_model: str = "sam2_mask",
        mask_version: int | None = None,
        default_timeout_s: float = 10.0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        phrases: dict[str, str] | None = None,
        url: str | None = None,
    ):
        if isinstance(client, str):
            # Created on first use: a grpc.aio channel belongs to the event loop that makes it.
            self.url, self._client, self._owns_client = client, None, True
        else:
            # `url` is needed only by the synchronous regions().
            self.url, self._client, self._owns_client = url or "", client, False
        self.ground_model, self.ground_version = ground_model, _version(ground_version)
        self.mask_model, self.mask_version = mask_model, _version(mask_version)
        self.default_timeout_s = default_timeout_s
        self.max_pixels = max_pixels
        self.default_phrases = dict(phrases or DEFAULT_PHRASES)

    @property
    def client(self) -> triton.InferenceServerClient:
        if self._client is None:
            self._client = triton.InferenceServerClient(self.url, channel_args=_CHANNEL_ARGS)
        return self._client

    async def close(self) -> None:
        if self._owns_client and self._client is not None:
            await self._client.close()
            self._client = None

    async def _infer(self, model: str, version: str, inputs, outputs: list[str], deadline: float):
        remaining = deadline - time.monotonic()
        what = f"{model} v{version or 'latest'}"
        if remaining <= 0:
            raise DeadlineExceeded(f"{what}: no time left in the request's deadline")
        try:
            result = await self.client.infer(
                model,
                inputs,
                model_version=version,
                outputs=[triton.InferRequestedOutput(o) for o in outputs],
                client_timeout=remaining,
            )
        except InferenceServerException as exc:
            raise _translate(exc, self.url or "triton", what) from None
        except TimeoutError:
            raise DeadlineExceeded(f"{what}: Triton did not answer within the deadline") from None
        return [result.as_numpy(o) for o in outputs]

    @staticmethod
    def _bytes_input(name: str, values: list[bytes]) -> triton.InferInput:
        data = np.array(values, dtype=np.object_).reshape(1, -1)
        tensor = triton.InferInput(name, list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        return tensor

    async def ground(self, look_bytes: bytes, phrase: str, deadline: float) -> np.ndarray:
        """(N, 4) boxes in look pixels for one phrase (N may be 0)."""
        inputs = [
            self._bytes_input("image", [look_bytes]),
            self._bytes_input("phrase", [phrase.encode("utf-8")]),
            self._bytes_input("task", [GROUNDING.encode()]),
        ]
        (boxes,) = await self._infer(self.ground_model, self.ground_version, inputs, ["boxes"], deadline)
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)

    async def masks(self, look_bytes: bytes, boxes: np.ndarray, deadline: float) -> np.ndarray:
        """(N, H, W) uint8 masks, one per box, at the look's size."""
        data = np.ascontiguousarray(boxes, dtype=np.float32).reshape(1, -1, 4)
        box_input = triton.InferInput("boxes", list(data.shape), "FP32")
        box_input.set_data_from_numpy(data)
        inputs = [self._bytes_input("image", [look_bytes]), box_input]
        (masks,) = await self._infer(self.mask_model, self.mask_version, inputs, ["masks"], deadline)
        return np.asarray(masks).reshape(-1, *masks.shape[-2:])

    async def regions_for(
        self, look_bytes: bytes, phrases: dict[str, str], timeout_s: float
    ) -> dict[str, Region]:
        """One Region per layer whose phrase was found in the look; layers not found are absent."""
        deadline = time.monotonic() + timeout_s
        if timeout_s <= 0:
            raise DeadlineExceeded("localizer: no time left in the request's deadline")
        try:
            look = await asyncio.to_thread(decode_image, look_bytes, self.max_pixels)
        except InvalidImage as exc:
            raise InvalidArgument(f"image: {exc}") from None
        wanted = {layer: " ".join(p.split()) for layer, p in phrases.items() if p and p.strip()}
        if not wanted:
            return {}
        layers = list(wanted)
        found = await asyncio.gather(*(self.ground(look_bytes, wanted[layer], deadline) for layer in layers))
        per_layer = {layer: boxes for layer, boxes in zip(layers, found) if len(boxes)}
        if not per_layer:
            return {}
        all_boxes = np.concatenate(list(per_layer.values()))
        masks = await self.masks(look_bytes, all_boxes, deadline)
        if masks.shape != (len(all_boxes), look.height, look.width):
            raise Unavailable(f"{self.mask_model}: masks of shape {masks.shape} for {len(all_boxes)} boxes")
        return await asyncio.to_thread(self._cut_layers, look, per_layer, masks)

    def _cut_layers(
        self, look: Image.Image, per_layer: dict[str, np.ndarray], masks: np.ndarray
    ) -> dict[str, Region]:
        out, start = {}, 0
        for layer, boxes in per_layer.items():
            mask = masks[start : start + len(boxes)].max(axis=0)
            start += len(boxes)
            if not mask.any():
                mask = box_mask(boxes, look.width, look.height)
            cut = cut_out(look, mask)
            if cut is None:  # boxes of zero area after clipping to the look
                continue
            box, png = cut
            out[layer] = Region(layer, box, png, tuple(categories_of_layer(layer)))
        return out

    # The synchronous Localizer protocol: generic phrases, its own loop and connection.
    def regions(self, look: Image.Image) -> list[Region]:
        if not self.url:
            raise RuntimeError("regions() needs the Triton URL: construct the localizer with a URL")
        buf = io.BytesIO()
        look.convert("RGB").save(buf, "PNG")

        async def run() -> dict[str, Region]:
            other = FlorenceSam2Localizer(
                self.url,
                self.ground_model,
                int(self.ground_version) if self.ground_version else None,
                self.mask_model,
                int(self.mask_version) if self.mask_version else None,
                self.default_timeout_s,
                self.max_pixels,
            )
            try:
                return await other.regions_for(buf.getvalue(), self.default_phrases, self.default_timeout_s)
            finally:
                await other.close()

        with ThreadPoolExecutor(max_workers=1) as pool:  # works inside a running event loop too
            found = pool.submit(asyncio.run, run()).result()
        return list(found.values())
