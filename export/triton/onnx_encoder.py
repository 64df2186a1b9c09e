"""CPU target: an ONNX tower run by onnxruntime inside Triton's python backend.

On the GPU target the same model name is served by Triton's onnxruntime or TensorRT backend
instead; inputs, outputs and batching are identical, so nothing upstream knows the difference.
With `lazy_session` (set when the wrappers run the encoder in their own process, the CPU
target's default) the session opens on the first request: usually never, so the weights are
not held twice.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        if not os.path.isfile(self.path):
            raise ValueError(f"{self.path} is missing")
        self.threads = int(params.get("intra_op_threads", "0"))
        self.session = None
        if params.get("lazy_session", "0") != "1":
            self.session = self._open()

    def _open(self):
        options = ort.SessionOptions()
        # One instance per model by default: let it use the cores, but Triton's other models
        # and the gateway share them, so the count is a tunable, not "all".
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        return ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        if self.session is None:
            self.session = self._open()
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = [len(a) for a in arrays]
        try:
            batch = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
            (out,) = self.session.run([self.output_name], {self.input_name: batch})
        except Exception as exc:  # a bad shape from one caller must not kill the instance
            error = pb_utils.TritonError(f"encoder failed: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for n in sizes:
            tensor = pb_utils.Tensor(self.output_name, out[start : start + n].astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            start += n
        return responses
