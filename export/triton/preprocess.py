"""Image decoding and CLIP pre-processing with numpy and Pillow only.

This file is copied next to each exported model version and imported by the python-backend
models inside Triton, so it must not import torch, open_clip or anything from the project.
The gateway and the tests import the same file, so "what Triton does" and "what we check
against" can never drift apart.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# Pillow's own bomb guard fires at ~179 MP with an exception and warns from ~89 MP; our limit
# is applied first (from the header, before any pixel is decoded), so silence the warning.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

DEFAULT_MAX_PIXELS = 40_000_000
# Longest side over shortest side. Resizing the shortest side up to the model's input makes
# the long side grow with it: a 164-byte 1 x 20000 PNG became a 224 x 4.5 M image (~3 GB); no
# product photo or look is this elongated.
MAX_ASPECT_RATIO = 100


class InvalidImage(ValueError):
    """The bytes are not an image we can use; the message says why, for the caller."""


@dataclass(frozen=True)
class ImageSpec:
    """How a model family expects its pixels (recorded per version in preprocess.json):

    CLIP (open_clip)   shortest side to `size`, centre crop `size`, CLIP mean/std
    SigLIP (open_clip) "squash": both sides to `size`, no crop, mean/std 0.5
    DINOv2 (HF)        shortest side to `resize_size` (256), centre crop `size` (224) with the
                       crop offset floored (HF), ImageNet mean/std
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"  # "shortest" (then centre crop) | "squash"
    resize_size: int | None = None  # shortest side before the crop; None: `size`
    crop_rounding: str = "round"  # "round" (torchvision) | "floor" (Hugging Face processors)

    @classmethod
    def from_meta(cls, meta: dict) -> ImageSpec:
        return cls(
            int(meta["image_size"]),
            tuple(meta["mean"]),
            tuple(meta["std"]),
            meta.get("resize_mode", "shortest"),
            meta.get("resize_size"),
            meta.get("crop_rounding", "round"),
        )


# JPEG, PNG and WebP are what shops and image generators serve; GIF stays for the animated
# product shots some vendor feeds still carry (its first frame is used).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF")


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image and check its header: format and dimensions, no pixel decoding.

    Cheap enough for the gateway to run on every request, so that decompression bombs and
    non-images are refused before they cost Triton anything.
    """
    if not data:
        raise InvalidImage("image is empty (0 bytes)")
    try:
        # Only the formats product and look images come in: Pillow would otherwise try ~40
        # decoders on untrusted bytes (EPS hands them to Ghostscript where it is installed).
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        # Pillow's own guard (~179 MP) fired while reading the header.
        raise InvalidImage(f"image dimensions are over the limit of {max_pixels} pixels") from None
    except Exception:  # Pillow raises many types for garbage input
        head = data[:8].hex()
        raise InvalidImage(
            f"bytes are not a supported image format ({', '.join(ALLOWED_FORMATS)}; first bytes: {head})"
        ) from None
    width, height = img.size
    if width < 1 or height < 1:
        raise InvalidImage(f"image has invalid dimensions {width}x{height}")
    if width * height > max_pixels:
        raise InvalidImage(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )
    return img


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode an image to RGB, upright; truncated or corrupt data raises InvalidImage."""
    img = probe_image(data, max_pixels)
    try:
        img.seek(0)  # animated formats: the first frame is the product shot
        img.load()
    except Exception as exc:
        raise InvalidImage(f"image data is corrupt or truncated ({exc})") from None
    return to_rgb(upright(img))


# EXIF orientations that swap width and height (a phone held upright stores 6 or 8).
SWAPS_SIDES = (5, 6, 7, 8)


def orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored; 2-8 = how a viewer turns or mirrors it)."""
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block: show the pixels as stored, as browsers do
        return 1
    return value if 1 <= value <= 8 else 1


def upright(img: Image.Image) -> Image.Image:
    """The image as a viewer shows it: phones store pixels as the sensor read them plus an EXIF
    orientation, and an image search must see what the user saw (a shop photo on its side
    embeds far from itself). A copy only when there is something to turn."""
    if orientation(img) == 1:
        return img
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Product cut-outs are transparent around the garment: put them on white, as a shop
        # page shows them, rather than on the black that a plain convert() gives.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float32)
        arr = (arr / max(float(arr.max()), 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int, resize_to: int | None = None, rounding: str = "round"):
    """Shortest side to `resize_to` (default `size`; bicubic), then a centred square crop.

    Integer rounding follows torchvision's Resize/CenterCrop exactly, which is what open_clip
    uses at training time; Hugging Face processors floor the crop offset instead
    (`rounding="floor"`). Parity with both is tested.
    """
    resize_to = resize_to or size
    width, height = img.size
    if width <= height:
        new_w, new_h = resize_to, int(resize_to * height / width)
    else:
        new_w, new_h = int(resize_to * width / height), resize_to
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.BICUBIC)
    if rounding == "floor":
        top, left = (new_h - size) // 2, (new_w - size) // 2
    else:
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def pixels(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """RGB image -> normalised float32 CHW array, as the image tower expects."""
    width, height = img.size
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InvalidImage(
            f"image is {width}x{height}: one side is more than {MAX_ASPECT_RATIO} times the other"
        )
    img = to_rgb(img)
    if spec.resize_mode == "squash":
        if img.size != (spec.size, spec.size):
            img = img.resize((spec.size, spec.size), Image.BICUBIC)
    else:
        img = resize_center_crop(img, spec.size, spec.resize_size, spec.crop_rounding)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def image_bytes_to_pixels(data: bytes, spec: ImageSpec, max_pixels: int = DEFAULT_MAX_PIXELS):
    return pixels(decode_image(data, max_pixels), spec)
