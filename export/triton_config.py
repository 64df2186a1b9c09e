"""`config.pbtxt` for the Triton models that serve one embedding model (four; two for an
image-only family).

For a model named `clip`:

    clip_image_encoder   pixels -> embedding      (ONNX; python+onnxruntime on cpu, ORT/TRT on gpu)
    clip_text_encoder    token ids -> embedding   (same)
    clip_image           image bytes -> embedding (python: decode + resize + normalise, then the encoder)
    clip_text            strings -> embedding     (python: tokenise, then the encoder)

Names, inputs and outputs are the same on both targets; only backends and placement differ. The
wrappers run the encoder's ONNX file in their own process on the CPU target (`runner`
"inprocess": one python-backend hop per request, export/triton/encoder_runner.py) and call the
encoder model through BLS on the GPU target ("bls"). On the CPU target with the in-process
runner the encoder models stay loadable (a BLS deployment, tools) but open their session only
when first called, so the weights are in memory once.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Batching:
    max_batch_size: int = 64
    preferred: tuple[int, ...] = (8, 16, 32)
    # Measured (benchmarks/RESULTS.md, serving efficiency): with 2000 us at both the wrapper
    # and the encoder, a lone request waited twice and batching made concurrency 1 slower
    # than no batching (0.41x for text). The wrapper is where requests meet; 500 us there when
    # it calls the encoder through BLS (the GPU target, where a fuller batch is worth the wait).
    max_queue_delay_us: int = 500
    # A wrapper that runs the encoder itself (the CPU target) batches whatever queued while it
    # was busy and never waits: on 2 cores waiting only idled them (tiny model, c=16: images
    # 0.73 -> 0.84 of in-process, texts 0.59 -> 0.68; c=1: 0.51 -> 0.63 and 0.31 -> 0.42).
    inprocess_queue_delay_us: int = 0
    # The encoder receives batches already formed by the wrapper: waiting there only adds
    # latency, so it batches whatever is queued and never waits.
    encoder_queue_delay_us: int = 0


@dataclass(frozen=True)
class ServingPlan:
    model: str
    target: str  # "cpu" | "gpu"
    image_size: int
    context_length: int
    batching: Batching = field(default_factory=Batching)
    # Versions kept loaded: the serving one and the incoming one during a swap (gateway/models.py).
    versions_kept: int = 2
    cpu_instances: int = 1
    gpu_instances: int = 1
    onnx_threads: int = 0
    fp16: bool = True
    family: str = "clip"  # recorded on <model>_image, read by the gateway (capabilities)
    text: bool = True  # False: an image-only family (DINOv2) has no text models
    runner: str = ""  # "inprocess" | "bls"; "" = the target's default (cpu: inprocess, gpu: bls)

    @property
    def effective_runner(self) -> str:
        return self.runner or ("bls" if self.target == "gpu" else "inprocess")


def _dynamic_batching(b: Batching, encoder: bool = False, inprocess: bool = False) -> str:
    if encoder:
        return f"dynamic_batching {{\n  max_queue_delay_microseconds: {b.encoder_queue_delay_us}\n}}\n"
    preferred = ", ".join(str(n) for n in b.preferred if n <= b.max_batch_size)
    delay = b.inprocess_queue_delay_us if inprocess else b.max_queue_delay_us
    return (
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {preferred} ]\n"
        f"  max_queue_delay_microseconds: {delay}\n"
        "}\n"
    )


def _io(kind: str, name: str, dtype: str, dims: list[int]) -> str:
    dims_s = ", ".join(str(d) for d in dims)
    return f'{kind} [\n  {{ name: "{name}" data_type: {dtype} dims: [ {dims_s} ] }}\n]\n'


def _version_policy(plan: ServingPlan) -> str:
    return f"version_policy: {{ latest: {{ num_versions: {plan.versions_kept} }} }}\n"


def _trt_accelerator(plan: ServingPlan) -> str:
    precision = "FP16" if plan.fp16 else "FP32"
    params = {
        "precision_mode": precision,
        "max_workspace_size_bytes": str(4 << 30),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": f"/tmp/looksync-trt-cache/{plan.model}",
    }
    body = " ".join(f'parameters {{ key: "{k}" value: "{v}" }}' for k, v in params.items())
    return (
        "optimization { execution_accelerators { gpu_execution_accelerator: [\n"
        f'  {{ name: "tensorrt" {body} }}\n'
        "] } }\n"
    )


def encoder_config(plan: ServingPlan, tower: str) -> str:
    """Config for `<model>_<tower>_encoder`, tower in {"image", "text"}."""
    if tower == "image":
        # CPU: any size (the python model checks); GPU: fixed, so TensorRT builds one profile.
        side = plan.image_size if plan.target == "gpu" else -1
        inp = _io("input", "pixel_values", "TYPE_FP32", [3, side, side])
    else:
        inp = _io("input", "input_ids", "TYPE_INT64", [-1])
    text = f'name: "{plan.model}_{tower}_encoder"\n'
    if plan.target == "gpu":
        text += 'backend: "onnxruntime"\n'
    else:
        text += 'backend: "python"\n'
    text += f"max_batch_size: {plan.batching.max_batch_size}\n"
    text += inp + _io("output", "embedding", "TYPE_FP32", [-1])
    text += _dynamic_batching(plan.batching, encoder=True) + _version_policy(plan)
    if plan.target == "gpu":
        text += f"instance_group [ {{ kind: KIND_GPU count: {plan.gpu_instances} }} ]\n"
        text += _trt_accelerator(plan)
    else:
        text += f"instance_group [ {{ kind: KIND_CPU count: {plan.cpu_instances} }} ]\n"
        text += f'parameters {{ key: "intra_op_threads" value: {{ string_value: "{plan.onnx_threads}" }} }}\n'
        lazy = "1" if plan.effective_runner == "inprocess" else "0"
        text += f'parameters {{ key: "lazy_session" value: {{ string_value: "{lazy}" }} }}\n'
    return text


def wrapper_config(plan: ServingPlan, tower: str) -> str:
    """Config for the python model `<model>_<tower>` that pre-processes and runs the encoder."""
    text = f'name: "{plan.model}_{tower}"\nbackend: "python"\n'
    text += f"max_batch_size: {plan.batching.max_batch_size}\n"
    if tower == "image":
        text += _io("input", "image", "TYPE_STRING", [1])
        text += _io("output", "embedding", "TYPE_FP32", [-1])
    else:
        text += _io("input", "text", "TYPE_STRING", [1])
        text += (
            "output [\n"
            '  { name: "embedding" data_type: TYPE_FP32 dims: [ -1 ] },\n'
            '  { name: "truncated" data_type: TYPE_BOOL dims: [ 1 ] }\n'
            "]\n"
        )
    text += _dynamic_batching(plan.batching, inprocess=plan.effective_runner == "inprocess")
    text += _version_policy(plan)
    # Pre-processing is CPU work on both targets; more instances overlap decode with the GPU.
    count = plan.cpu_instances if plan.target == "cpu" else max(2, plan.gpu_instances * 2)
    text += f"instance_group [ {{ kind: KIND_CPU count: {count} }} ]\n"
    text += f'parameters {{ key: "runner" value: {{ string_value: "{plan.effective_runner}" }} }}\n'
    if plan.effective_runner == "inprocess":
        text += f'parameters {{ key: "intra_op_threads" value: {{ string_value: "{plan.onnx_threads}" }} }}\n'
    if tower == "image":
        # The family and what the space can embed, for the gateway (one value per model name:
        # export refuses to put another family under an existing name).
        modalities = "image,text" if plan.text else "image"
        text += f'parameters {{ key: "family" value: {{ string_value: "{plan.family}" }} }}\n'
        text += f'parameters {{ key: "modalities" value: {{ string_value: "{modalities}" }} }}\n'
    return text


def all_configs(plan: ServingPlan) -> dict[str, str]:
    """Model name -> config text, for every model of the plan."""
    configs = {
        f"{plan.model}_image_encoder": encoder_config(plan, "image"),
        f"{plan.model}_image": wrapper_config(plan, "image"),
    }
    if plan.text:
        configs[f"{plan.model}_text_encoder"] = encoder_config(plan, "text")
        configs[f"{plan.model}_text"] = wrapper_config(plan, "text")
    return configs
