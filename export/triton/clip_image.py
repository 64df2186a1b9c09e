"""`<model>_image`: image bytes in, L2-normalised embedding out.

Decodes and pre-processes each image here (per version: the spec is in preprocess.json next
to this file), then runs the ONNX image encoder of the *same version* on the whole batch: in
this process on the CPU target, through BLS to `<model>_image_encoder` on the GPU target
(encoder_runner.py), so dynamic batching carries through to the encoder. A bad image fails only its
own request, with a message that starts with "invalid image:".
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from encoder_runner import EncoderError, make_encoder  # noqa: E402
from preprocess import ImageSpec, InvalidImage, image_bytes_to_pixels  # noqa: E402


def _invalid(message):
    try:
        return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    except (AttributeError, TypeError):  # older python backends have no error codes
        return pb_utils.TritonError(message)


class TritonPythonModel:
    def initialize(self, args):
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(version_dir, "preprocess.json")) as fh:
            meta = json.load(fh)
        self.spec = ImageSpec.from_meta(meta)
        self.max_pixels = int(meta.get("max_pixels", 40_000_000))
        self.encode = make_encoder(pb_utils, args, meta["image_encoder"], "pixel_values", meta.get("runner"))

    def execute(self, requests):
        responses = [None] * len(requests)
        pixel_batches, owners = [], []
        for i, request in enumerate(requests):
            blobs = pb_utils.get_input_tensor_by_name(request, "image").as_numpy().reshape(-1)
            try:
                arrays = []
                for j, blob in enumerate(blobs):
                    try:
                        arrays.append(image_bytes_to_pixels(bytes(blob), self.spec, self.max_pixels))
                    except InvalidImage as exc:
                        raise InvalidImage(f"item {j}: {exc}") from None
            except InvalidImage as exc:
                responses[i] = pb_utils.InferenceResponse(error=_invalid(f"invalid image: {exc}"))
                continue
            pixel_batches.append(np.stack(arrays))
            owners.append(i)
        if not owners:
            return responses
        batch = np.concatenate(pixel_batches)
        try:
            embeddings = self.encode(batch)
        except EncoderError as exc:
            error = pb_utils.TritonError(f"image encoder failed: {exc}")
            for i in owners:
                responses[i] = pb_utils.InferenceResponse(error=error)
            return responses
        start = 0
        for i, arrays in zip(owners, pixel_batches):
            part = embeddings[start : start + len(arrays)]
            start += len(arrays)
            out = pb_utils.Tensor("embedding", np.ascontiguousarray(part, dtype=np.float32))
            responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
        return responses
