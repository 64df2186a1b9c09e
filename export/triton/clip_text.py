"""`<model>_text`: strings in, L2-normalised embedding and a 'truncated' flag out.

Tokenises with the model's own tokenizer (files copied next to this file at export time): the
CLIP BPE table, or a SentencePiece-style Unigram `tokenizer.json` (SigLIP-style models). Then
calls `<model>_text_encoder` of the same version through BLS. For CLIP the batch is trimmed to
its longest real sequence: CLIP reads the end-of-text position under causal attention, so
padding after it never changes an embedding. SigLIP-style towers attend in both directions and
pool the last position, so their padding is part of the input and is never trimmed
(`trim_padding` in preprocess.json, set by export per family).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from clip_bpe import ClipTokenizer  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(version_dir, "preprocess.json")) as fh:
            meta = json.load(fh)
        if meta.get("tokenizer", "clip_bpe") == "unigram":
            from unigram import UnigramTokenizer  # only SigLIP-style models need regex/ftfy here

            self.tokenizer = UnigramTokenizer(
                os.path.join(version_dir, meta["tokenizer_file"]),
                meta["context_length"],
                meta["pad_id"],
                meta.get("clean", "whitespace"),
            )
        else:
            self.tokenizer = ClipTokenizer(
                os.path.join(version_dir, meta["bpe_file"]), meta["context_length"]
            )
        self.trim = bool(meta.get("trim_padding", False))
        self.encoder = meta["text_encoder"]
        self.version = int(args["model_version"])

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
        call = pb_utils.InferenceRequest(
            model_name=self.encoder,
            model_version=self.version,
            requested_output_names=["embedding"],
            inputs=[pb_utils.Tensor("input_ids", ids)],
        )
        result = call.exec()
        if result.has_error():
            error = pb_utils.TritonError(f"text encoder failed: {result.error().message()}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        embeddings = pb_utils.get_output_tensor_by_name(result, "embedding").as_numpy()
        responses, start = [], 0
        for n in sizes:
            outs = [
                pb_utils.Tensor("embedding", np.ascontiguousarray(embeddings[start : start + n])),
                pb_utils.Tensor("truncated", truncated[start : start + n].reshape(n, 1)),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outs))
            start += n
        return responses
