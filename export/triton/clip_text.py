"""`<model>_text`: strings in, L2-normalised embedding and a 'truncated' flag out.

Tokenises with the version's own `tokenizer.json` (written next to this file at export time;
run by Hugging Face `tokenizers` after open_clip's text cleaning, text_tokenizer.py). Then runs
the ONNX text encoder of the same version on the whole batch: in this process on the CPU target,
through BLS to `<model>_text_encoder` on the GPU target (encoder_runner.py). `trim_padding` in
preprocess.json would cut a batch to its longest real sequence; export sets it false for every
family today (open_clip's CLIP text tower applies a fixed 77 x 77 causal mask, so its ONNX graph
needs the full context).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from encoder_runner import EncoderError, make_encoder  # noqa: E402
from text_tokenizer import TextTokenizer  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(version_dir, "preprocess.json")) as fh:
            meta = json.load(fh)
        self.tokenizer = TextTokenizer.from_version(version_dir, meta)
        self.trim = bool(meta.get("trim_padding", False))
        self.encode = make_encoder(pb_utils, args, meta["text_encoder"], "input_ids", meta.get("runner"))

    def execute(self, requests):
        texts, sizes = [], []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
            decoded = [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in raw]
            texts.extend(decoded)
            sizes.append(len(decoded))
        ids, truncated = self.tokenizer(texts)
        if self.trim:
            longest = int((ids != 0).sum(axis=1).max())
            ids = np.ascontiguousarray(ids[:, :longest])
        try:
            embeddings = self.encode(ids)
        except EncoderError as exc:
            error = pb_utils.TritonError(f"text encoder failed: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for n in sizes:
            outs = [
                pb_utils.Tensor("embedding", np.ascontiguousarray(embeddings[start : start + n])),
                pb_utils.Tensor("truncated", truncated[start : start + n].reshape(n, 1)),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outs))
            start += n
        return responses
