"""`florence2_ground`: image bytes + phrase in, boxes (pixels of that image) and labels out.

Inputs (one image per request; Triton's dynamic batcher groups requests):
    image   BYTES [1]   encoded image
    phrase  BYTES [1]   what to find, e.g. "t-shirt" (ignored for <OD>)
    task    BYTES [1]   optional: "<CAPTION_TO_PHRASE_GROUNDING>" (default) or "<OD>"
Outputs:
    boxes   FP32 [N, 4] x0, y0, x1, y1 in pixels of the input image (N may be 0)
    labels  BYTES [N]   the phrase of each box
    text    BYTES [1]   the raw generated text (location tokens included), for debugging

Where the decode loop lives. The greedy loop runs here, in this python model, with the four
ONNX parts loaded into this process by onnxruntime (`runner: inprocess`, the CPU target). The
alternative is each part as its own Triton model, called per decoding step through BLS
(`runner: bls`, what the GPU target uses so the parts run on Triton's GPU backends).
Measured with the tiny config on this project's 2-core CPU machine (shared with other work, so
+-20%), one request at a time, `python -m benchmarks.vision_latency`:

                                        run 1     run 2   (median of 30 requests each)
    in-process (florence2_ground)       22.4 ms   19.1 ms per grounding request
    BLS (florencebls_ground + 4 parts)  28.1 ms   28.4 ms per grounding request
    -> +5.8 / +9.3 ms for 15 BLS calls (vision, encoder, decoder-init, 12 decoder steps),
       i.e. ~0.4-0.6 ms per BLS call

The tiny decoder step itself costs 0.09 ms, so BLS multiplies the decoding cost several times.
For Florence-2-base on the CPU (a step ~12 ms) the fixed ~0.5 ms per call is small, but every
step must also ship the cache through Triton: the cross-attention K/V alone are 6 layers x 2 x
12 heads x ~590 positions x 64 x 4 B = 22 MB, ~1 ms per copy here, copied at least twice per
step, i.e. ~2-3 ms on a ~12 ms step, plus the growing self-attention cache. On the CPU both
placements run the same onnxruntime kernels on the same cores, so BLS buys nothing there: the
CPU target decodes in-process. On a GPU the trade changes (the parts get TensorRT / CUDA and
GPU instance groups, the python model only loops), hence `runner: bls` there; keeping the KV
cache on the GPU between steps (ORT IOBinding in-process, or TensorRT-LLM) is the next step if
the GPU decode loop turns out to be copy-bound.
"""

import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from bart_tokenizer import BartTokenizer  # noqa: E402
from florence2_runtime import GROUNDING, Florence2Grounder, Florence2Spec, InvalidRequest  # noqa: E402
from image_ops import InvalidImage, decode_image  # noqa: E402
from triton_common import invalid, load_meta, make_runner, parameters, string_items, version_dir  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        meta = load_meta(args, "florence2.json")
        spec = Florence2Spec.from_json(meta)
        if params.get("max_new_tokens"):
            spec = Florence2Spec(**{**spec.__dict__, "max_new_tokens": int(params["max_new_tokens"])})
        tokenizer = BartTokenizer(os.path.join(version_dir(args), meta["tokenizer"]))
        self.max_pixels = int(meta.get("max_pixels", 40_000_000))
        self.grounder = Florence2Grounder(spec, tokenizer, make_runner(pb_utils, args, meta, params))

    def execute(self, requests):
        responses = [None] * len(requests)
        items, owners = [], []
        decoded = {}  # one look grounded for several phrases is decoded and encoded once
        for i, request in enumerate(requests):
            try:
                blobs = pb_utils.get_input_tensor_by_name(request, "image").as_numpy().reshape(-1)
                phrases = string_items(pb_utils, request, "phrase", "")
                tasks = string_items(pb_utils, request, "task", GROUNDING)
                if len(blobs) != 1 or len(phrases) != 1 or len(tasks) != 1:
                    raise InvalidRequest(
                        "send one image, phrase and task per request (Triton batches requests)"
                    )
                task = tasks[0] or GROUNDING
                self.grounder.prompt_ids(task, phrases[0])  # validates task and phrase
                blob = bytes(blobs[0])
                key = hashlib.sha1(blob).digest()
                if key not in decoded:
                    decoded[key] = decode_image(blob, self.max_pixels)
                image = decoded[key]
            except InvalidImage as exc:
                responses[i] = pb_utils.InferenceResponse(error=invalid(pb_utils, f"invalid image: {exc}"))
                continue
            except InvalidRequest as exc:
                responses[i] = pb_utils.InferenceResponse(error=invalid(pb_utils, f"invalid request: {exc}"))
                continue
            items.append((image, task, phrases[0]))
            owners.append(i)
        if not items:
            return responses
        try:
            results = self.grounder.ground(
                [x[0] for x in items], [x[1] for x in items], [x[2] for x in items]
            )
        except Exception as exc:  # a failing part fails this batch, never the instance
            error = pb_utils.TritonError(f"florence2 grounding failed: {exc}")
            for i in owners:
                responses[i] = pb_utils.InferenceResponse(error=error)
            return responses
        for i, result in zip(owners, results):
            n = len(result.labels)
            outs = [
                pb_utils.Tensor("boxes", result.boxes.reshape(1, n, 4).astype(np.float32)),
                pb_utils.Tensor(
                    "labels",
                    np.array([s.encode("utf-8") for s in result.labels], dtype=np.object_).reshape(1, n),
                ),
                pb_utils.Tensor(
                    "text", np.array([result.text.encode("utf-8")], dtype=np.object_).reshape(1, 1)
                ),
            ]
            responses[i] = pb_utils.InferenceResponse(output_tensors=outs)
        return responses
