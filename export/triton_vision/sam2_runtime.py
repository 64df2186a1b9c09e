"""SAM2 box prompts -> masks over the exported ONNX parts.

Parts (see onnx_parts.py for how they are run):

    image_encoder  pixel_values (B,3,S,S) -> image_embeddings_0|1|2 (three feature levels)
    mask_decoder   image_embeddings_0|1|2 (B,..), input_boxes (B,N,4) in model pixels
                   -> pred_masks (B,N,h,w) low-resolution logits, iou_scores (B,N)

Boxes come in pixels of the caller's image and are scaled to the model's square input; masks
are upsampled bilinearly from the low-resolution logits straight to the image's size and
thresholded at 0, as transformers' Sam2ImageProcessor.post_process_masks does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

if __package__:
    from .image_ops import SquareSpec, clip_boxes, resize_bilinear, square_pixels
else:
    from image_ops import SquareSpec, clip_boxes, resize_bilinear, square_pixels

EMBEDDINGS = ("image_embeddings_0", "image_embeddings_1", "image_embeddings_2")


@dataclass(frozen=True)
class Sam2Spec:
    image: SquareSpec
    mask_threshold: float = 0.0

    @classmethod
    def from_json(cls, meta: dict) -> Sam2Spec:
        return cls(SquareSpec.from_json(meta["image"]), float(meta.get("mask_threshold", 0.0)))


class Sam2Masker:
    def __init__(self, spec: Sam2Spec, run):
        self.spec = spec
        self.run = run

    def embed(self, images) -> dict[str, np.ndarray]:
        """Feature maps for a batch of PIL images (one encoder run)."""
        pixels = np.stack([square_pixels(img, self.spec.image) for img in images])
        return self.run("image_encoder", {"pixel_values": pixels}, list(EMBEDDINGS))

    def scale_boxes(self, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        boxes = clip_boxes(boxes, width, height)
        scale = np.array(
            [self.spec.image.width / width, self.spec.image.height / height] * 2, dtype=np.float32
        )
        return (boxes * scale).astype(np.float32)

    def low_res(self, embeddings: dict[str, np.ndarray], index: int, boxes: np.ndarray, size):
        """Low-resolution mask logits (N,h,w) and IoU scores (N,) for one image of a batch."""
        width, height = size
        feeds = {name: embeddings[name][index : index + 1] for name in EMBEDDINGS}
        feeds["input_boxes"] = self.scale_boxes(boxes, width, height)[None]
        out = self.run("mask_decoder", feeds, ["pred_masks", "iou_scores"])
        return out["pred_masks"][0], out["iou_scores"][0]

    def masks(self, embeddings: dict[str, np.ndarray], index: int, boxes: np.ndarray, size):
        """uint8 masks (N, H, W) of value 0/1 at the image's size, and IoU scores (N,)."""
        width, height = size
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return np.zeros((0, height, width), dtype=np.uint8), np.zeros((0,), dtype=np.float32)
        logits, iou = self.low_res(embeddings, index, boxes, size)
        masks = np.empty((len(boxes), height, width), dtype=np.uint8)
        for i in range(len(boxes)):  # one at a time keeps the float buffer to one image
            masks[i] = resize_bilinear(logits[i], height, width) > self.spec.mask_threshold
        return masks, iou.astype(np.float32)
