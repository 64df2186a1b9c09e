"""`sam2_mask`: image bytes + boxes in, one mask of the image's size per box out.

Inputs (one image per request; Triton's dynamic batcher groups requests, and the image
encoder runs once over all images of a batch):
    image       BYTES [1]     encoded image
    boxes       FP32  [N, 4]  x0, y0, x1, y1 in pixels of that image (clipped to it)
Outputs:
    masks       UINT8 [N, H, W]  1 inside the garment, 0 outside; H, W = the image's size
    iou_scores  FP32  [N]        the model's own estimate of each mask's quality

The ONNX parts run in this process on the CPU target (see florence2_ground.py for why), or as
their own Triton models through BLS (`runner: bls`).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from image_ops import InvalidImage, decode_image  # noqa: E402
from sam2_runtime import Sam2Masker, Sam2Spec  # noqa: E402
from triton_common import invalid, load_meta, make_runner, parameters  # noqa: E402

MAX_BOXES = 64


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        meta = load_meta(args, "sam2.json")
        self.max_pixels = int(meta.get("max_pixels", 40_000_000))
        self.masker = Sam2Masker(Sam2Spec.from_json(meta), make_runner(pb_utils, args, meta, params))

    def execute(self, requests):
        responses = [None] * len(requests)
        images, boxes, owners = [], [], []
        for i, request in enumerate(requests):
            try:
                blobs = pb_utils.get_input_tensor_by_name(request, "image").as_numpy().reshape(-1)
                box = pb_utils.get_input_tensor_by_name(request, "boxes").as_numpy()
                if len(blobs) != 1 or box.shape[0] != 1:
                    raise ValueError("send one image and its boxes per request (Triton batches requests)")
                box = box.reshape(-1, 4).astype(np.float32)
                if len(box) > MAX_BOXES:
                    raise ValueError(f"at most {MAX_BOXES} boxes per image, got {len(box)}")
                if not np.isfinite(box).all():
                    raise ValueError("boxes must be finite numbers")
                image = decode_image(bytes(blobs[0]), self.max_pixels)
            except InvalidImage as exc:
                responses[i] = pb_utils.InferenceResponse(error=invalid(pb_utils, f"invalid image: {exc}"))
                continue
            except ValueError as exc:
                responses[i] = pb_utils.InferenceResponse(error=invalid(pb_utils, f"invalid request: {exc}"))
                continue
            images.append(image)
            boxes.append(box)
            owners.append(i)
        if not owners:
            return responses
        try:
            embeddings = self.masker.embed(images)
            results = [
                self.masker.masks(embeddings, j, b, img.size) for j, (img, b) in enumerate(zip(images, boxes))
            ]
        except Exception as exc:  # a failing part fails this batch, never the instance
            error = pb_utils.TritonError(f"sam2 masking failed: {exc}")
            for i in owners:
                responses[i] = pb_utils.InferenceResponse(error=error)
            return responses
        for i, (masks, iou) in zip(owners, results):
            outs = [
                pb_utils.Tensor("masks", masks[None]),
                pb_utils.Tensor("iou_scores", iou.reshape(1, -1).astype(np.float32)),
            ]
            responses[i] = pb_utils.InferenceResponse(output_tensors=outs)
        return responses
