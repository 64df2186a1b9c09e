"""How `<model>_image` / `<model>_text` run their encoder: in their own process, or through Triton.

- `inprocess` (the CPU target's default): the wrapper opens the ONNX file of
  `<model>_<tower>_encoder` of the same version with onnxruntime and runs the batch itself. One
  python-backend hop per request instead of two: measured on the demo and tiny models, the
  second hop (BLS into another python stub: a request, two shared-memory copies, a second
  scheduler) cost more than the tiny text encoder itself (benchmarks/RESULTS.md).
- `bls`: a BLS request to `<model>_<tower>_encoder` (the GPU target, where that model runs on
  Triton's onnxruntime/TensorRT backend on the GPU; or a CPU deployment that wants the encoder
  as its own Triton model, e.g. to give it more instances than the wrapper).

Both are called as `run(batch) -> embeddings` and raise `EncoderError` on failure.

A version may name its own runner and encoder in preprocess.json (`runner`, `<tower>_encoder`):
a TensorRT version (`python -m export trt`) calls `<model>_<tower>_encoder_trt` through BLS
whatever the model-wide config says, so ONNX and TensorRT versions live side by side.
"""

from __future__ import annotations

import os

import numpy as np


class EncoderError(RuntimeError):
    pass


class InProcessEncoder:
    def __init__(self, onnx_path: str, input_name: str, intra_op_threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(intra_op_threads)
        options.inter_op_num_threads = 1
        # Triton's other models and the gateway share the cores: threads spinning while idle
        # would take them (see export/triton_vision/onnx_parts.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        self.input_name = input_name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        try:
            (out,) = self.session.run(["embedding"], {self.input_name: batch})
        except Exception as exc:  # one odd batch must not take the instance down
            raise EncoderError(str(exc)) from None
        return out


class BlsEncoder:
    def __init__(self, pb_utils, model: str, version: int, input_name: str):
        self.pb = pb_utils
        self.model = model
        self.version = int(version)
        self.input_name = input_name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        call = self.pb.InferenceRequest(
            model_name=self.model,
            model_version=self.version,
            requested_output_names=["embedding"],
            inputs=[self.pb.Tensor(self.input_name, batch)],
        )
        result = call.exec()
        if result.has_error():
            raise EncoderError(result.error().message())
        return self.pb.get_output_tensor_by_name(result, "embedding").as_numpy()


def make_encoder(pb_utils, args: dict, encoder: str, input_name: str, runner: str | None = None):
    """The runner this version names (`runner`, from its preprocess.json), else the one named by
    the wrapper's `runner` parameter (config.pbtxt, shared by every version)."""
    import json

    config = json.loads(args["model_config"])
    params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
    mode = runner or params.get("runner", "bls")
    version = args["model_version"]
    if mode == "bls":
        return BlsEncoder(pb_utils, encoder, int(version), input_name)
    if mode != "inprocess":
        raise ValueError(f"runner must be 'inprocess' or 'bls', got {mode!r}")
    # args["model_repository"] is this model's folder; the encoder is its sibling.
    path = os.path.join(os.path.dirname(args["model_repository"]), encoder, version, "model.onnx")
    if not os.path.isfile(path):
        raise ValueError(f"runner 'inprocess' needs {path} (the encoder's ONNX file of this version)")
    return InProcessEncoder(path, input_name, int(params.get("intra_op_threads", "0") or 0))
