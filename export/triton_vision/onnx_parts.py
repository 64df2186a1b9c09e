"""How an orchestrating python model runs its ONNX parts: in-process, or through Triton (BLS).

Both runners are called the same way, `run(part, feeds, outputs) -> {name: array}`, so the decode
loop and the mask code do not know where the parts live:

- `InProcessParts`: onnxruntime sessions inside the python model's own process (the CPU target's
  default: no tensor copies between processes, see florence2_ground.py for the measurement);
- `BlsParts`: each part is its own Triton model, called with a BLS request (the GPU target, where
  the parts run on Triton's onnxruntime/TensorRT backends on the GPU).
"""

from __future__ import annotations

import os


class PartError(RuntimeError):
    pass


class InProcessParts:
    def __init__(self, version_dir: str, parts: dict[str, dict], intra_op_threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(intra_op_threads)
        options.inter_op_num_threads = 1
        # Several models share the CPU in Triton: threads that spin while idle steal it from
        # the others (measured: a 2-core box with a busy neighbour slows ~10x with spinning).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {}
        self.inputs = {}
        for part, meta in parts.items():
            path = os.path.join(version_dir, meta["file"])
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            self.sessions[part] = session
            self.inputs[part] = [i.name for i in session.get_inputs()]

    def __call__(self, part: str, feeds: dict, outputs: list[str]) -> dict:
        session = self.sessions[part]
        # A graph may drop an input it ends up not using (the legacy exporter prunes them).
        used = {name: feeds[name] for name in self.inputs[part]}
        try:
            values = session.run(outputs, used)
        except Exception as exc:
            raise PartError(f"{part}: {exc}") from None
        return dict(zip(outputs, values))


class BlsParts:
    def __init__(self, pb_utils, parts: dict[str, dict], version: int):
        self.pb = pb_utils
        self.parts = parts
        self.version = int(version)

    def __call__(self, part: str, feeds: dict, outputs: list[str]) -> dict:
        meta = self.parts[part]
        request = self.pb.InferenceRequest(
            model_name=meta["triton_model"],
            model_version=self.version,
            requested_output_names=outputs,
            inputs=[self.pb.Tensor(name, feeds[name]) for name in meta["inputs"]],
        )
        result = request.exec()
        if result.has_error():
            raise PartError(f"{meta['triton_model']}: {result.error().message()}")
        return {name: self.pb.get_output_tensor_by_name(result, name).as_numpy() for name in outputs}
