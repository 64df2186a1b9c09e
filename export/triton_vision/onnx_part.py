"""One ONNX part (e.g. `florence2_decoder_step`) as a python-backend model on the CPU target.

Used only with `runner: bls`, where the orchestrating model calls each part through Triton; on
the GPU target the same model names are served by Triton's onnxruntime backend instead. No
batching here (max_batch_size 0): the orchestrator already hands over whole batches.
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
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0") or 0)
        options.inter_op_num_threads = 1
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feeds = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
                values = self.session.run(self.outputs, feeds)
            except Exception as exc:  # a bad shape from one caller must not kill the instance
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(f"part failed: {exc}"))
                )
                continue
            tensors = [pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in zip(self.outputs, values)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
