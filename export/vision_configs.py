"""`config.pbtxt` for the SAM2 and Florence-2 Triton models.

    florence2_ground   image bytes + phrase -> boxes, labels   (python: decode loop, see below)
    sam2_mask          image bytes + boxes  -> masks, IoU      (python: pre/post-processing)

and, where the orchestrators call their ONNX parts through Triton (`runner: bls`, the GPU
target's default), one model per part: `florence2_vision_encoder`, `florence2_encoder`,
`florence2_decoder_init`, `florence2_decoder_step`, `sam2_image_encoder`, `sam2_mask_decoder`
(onnxruntime backend on the GPU; python + onnxruntime on the CPU). On the CPU target the parts
run inside the orchestrator's process (`runner: inprocess`) and get no Triton model of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from export.triton_config import Batching, _dynamic_batching

_ONNX_TO_TRITON = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
}


@dataclass(frozen=True)
class VisionPlan:
    target: str  # "cpu" | "gpu"
    runner: str = ""  # "inprocess" | "bls"; "" = the target's default
    # Grounding and masking are heavy per item: small batches, a longer wait to fill them.
    batching: Batching = field(default_factory=lambda: Batching(8, (4, 8), 5000))
    versions_kept: int = 2
    cpu_instances: int = 1
    gpu_instances: int = 1
    onnx_threads: int = 0
    max_new_tokens: int = 0  # florence2_ground: 0 = what the export recorded

    @property
    def effective_runner(self) -> str:
        return self.runner or ("bls" if self.target == "gpu" else "inprocess")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False
    ragged: bool = False

    def text(self) -> str:
        dims = ", ".join(str(d) for d in self.dims)
        extra = (" optional: true" if self.optional else "") + (
            " allow_ragged_batch: true" if self.ragged else ""
        )
        return f'  {{ name: "{self.name}" data_type: {self.data_type} dims: [ {dims} ]{extra} }}'


def _block(kind: str, tensors: list[TensorSpec]) -> str:
    return f"{kind} [\n" + ",\n".join(t.text() for t in tensors) + "\n]\n"


def _params(values: dict[str, str]) -> str:
    return "".join(
        f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in values.items()
    )


def _version_policy(plan: VisionPlan) -> str:
    return f"version_policy: {{ latest: {{ num_versions: {plan.versions_kept} }} }}\n"


def _orchestrator(plan: VisionPlan, name: str, inputs, outputs, params: dict[str, str]) -> str:
    text = f'name: "{name}"\nbackend: "python"\nmax_batch_size: {plan.batching.max_batch_size}\n'
    text += _block("input", inputs) + _block("output", outputs)
    text += _dynamic_batching(plan.batching) + _version_policy(plan)
    # Pre/post-processing is CPU work on both targets (the parts may run on the GPU via BLS).
    count = plan.cpu_instances if plan.target == "cpu" else max(2, plan.gpu_instances * 2)
    text += f"instance_group [ {{ kind: KIND_CPU count: {count} }} ]\n"
    params = {"runner": plan.effective_runner, "intra_op_threads": str(plan.onnx_threads), **params}
    return text + _params(params)


def florence2_ground_config(plan: VisionPlan, name: str = "florence2_ground") -> str:
    inputs = [
        TensorSpec("image", "TYPE_STRING", (1,)),
        TensorSpec("phrase", "TYPE_STRING", (1,)),
        TensorSpec("task", "TYPE_STRING", (1,), optional=True),
    ]
    outputs = [
        TensorSpec("boxes", "TYPE_FP32", (-1, 4)),
        TensorSpec("labels", "TYPE_STRING", (-1,)),
        TensorSpec("text", "TYPE_STRING", (1,)),
    ]
    params = {"max_new_tokens": str(plan.max_new_tokens)} if plan.max_new_tokens else {}
    return _orchestrator(plan, name, inputs, outputs, params)


def sam2_mask_config(plan: VisionPlan, name: str = "sam2_mask") -> str:
    inputs = [
        TensorSpec("image", "TYPE_STRING", (1,)),
        # Each request has its own number of boxes; the python model takes them as they come.
        TensorSpec("boxes", "TYPE_FP32", (-1, 4), ragged=True),
    ]
    outputs = [
        TensorSpec("masks", "TYPE_UINT8", (-1, -1, -1)),
        TensorSpec("iou_scores", "TYPE_FP32", (-1,)),
    ]
    return _orchestrator(plan, name, inputs, outputs, {})


def onnx_io(path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX file as Triton tensors (symbolic dims become -1)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(value) -> TensorSpec:
        t = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return TensorSpec(value.name, _ONNX_TO_TRITON[t.elem_type], dims)

    initializers = {i.name for i in model.graph.initializer}
    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in model.graph.output]


def part_config(plan: VisionPlan, name: str, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> str:
    """One ONNX part as its own Triton model, for `runner: bls`. The orchestrator batches."""
    text = f'name: "{name}"\n'
    text += 'backend: "onnxruntime"\n' if plan.target == "gpu" else 'backend: "python"\n'
    text += "max_batch_size: 0\n" + _block("input", inputs) + _block("output", outputs)
    text += _version_policy(plan)
    if plan.target == "gpu":
        text += f"instance_group [ {{ kind: KIND_GPU count: {plan.gpu_instances} }} ]\n"
    else:
        text += f"instance_group [ {{ kind: KIND_CPU count: {plan.cpu_instances} }} ]\n"
        text += _params({"intra_op_threads": str(plan.onnx_threads)})
    return text
