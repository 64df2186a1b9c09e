"""Pixel work shared by the SAM2 and Florence-2 python models: numpy and Pillow only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

if __package__:
    from export.triton.preprocess import DEFAULT_MAX_PIXELS, InvalidImage, decode_image
else:  # flat, next to the model version inside Triton
    from preprocess import DEFAULT_MAX_PIXELS, InvalidImage, decode_image  # noqa: F401

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class SquareSpec:
    """Resize to (height, width) ignoring aspect ratio, scale to [0, 1], normalise per channel."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str = "bilinear"
    rescale: float = 1.0 / 255.0

    @classmethod
    def from_json(cls, meta: dict) -> SquareSpec:
        return cls(
            int(meta["height"]),
            int(meta["width"]),
            tuple(float(v) for v in meta["mean"]),
            tuple(float(v) for v in meta["std"]),
            meta.get("resample", "bilinear"),
            float(meta.get("rescale", 1.0 / 255.0)),
        )

    def to_json(self) -> dict:
        return {
            "height": self.height,
            "width": self.width,
            "mean": list(self.mean),
            "std": list(self.std),
            "resample": self.resample,
            "rescale": self.rescale,
        }


def square_pixels(img: Image.Image, spec: SquareSpec) -> np.ndarray:
    """RGB image -> float32 CHW array of the model's input size."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (spec.width, spec.height):
        img = img.resize((spec.width, spec.height), _RESAMPLE[spec.resample])
    arr = np.asarray(img, dtype=np.float32) * np.float32(spec.rescale)
    arr = (arr - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _axis_weights(n_in: int, n_out: int):
    """Source indices and weights of a bilinear resize along one axis (align_corners=False)."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of the last two axes, as torch's interpolate(align_corners=False) upsamples."""
    x = np.asarray(x, dtype=np.float32)
    r0, r1, rw = _axis_weights(x.shape[-2], height)
    rows = x[..., r0, :] * (1.0 - rw)[:, None] + x[..., r1, :] * rw[:, None]
    c0, c1, cw = _axis_weights(x.shape[-1], width)
    return rows[..., c0] * (1.0 - cw) + rows[..., c1] * cw


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, 4) x0, y0, x1, y1 boxes reordered and clipped to the image."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    x0 = np.clip(np.minimum(boxes[:, 0], boxes[:, 2]), 0, width)
    x1 = np.clip(np.maximum(boxes[:, 0], boxes[:, 2]), 0, width)
    y0 = np.clip(np.minimum(boxes[:, 1], boxes[:, 3]), 0, height)
    y1 = np.clip(np.maximum(boxes[:, 1], boxes[:, 3]), 0, height)
    return np.stack([x0, y0, x1, y1], axis=1)
