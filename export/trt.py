"""Build TensorRT plans for an exported GPU-target version (GPU hosts only).

    python -m export trt --name clip --version 2 [--min-batch 1 --opt-batch 16 --max-batch 64]

For each encoder (`<name>_image_encoder`, `<name>_text_encoder`) of version N: parse the ONNX,
one optimisation profile over the batch range, fp16 with normalisation, softmax and reductions
kept in fp32 (where fp16 loses accuracy in transformer towers), check the engine against ONNX
Runtime on random inputs (cosine >= 0.999), write `model.plan` next to the ONNX and switch the
encoder's config to `platform: "tensorrt_plan"`. The python pre-processing models are unchanged:
they call the encoder of their own version whatever runs it.

TensorRT is imported lazily: `pip install tensorrt` cannot work on machines without NVIDIA's
index, and nothing else in the project needs it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.triton_config import Batching

# Layer kinds kept in fp32 under an fp16 build (names of tensorrt.LayerType members).
FP32_LAYERS = ("NORMALIZATION", "SOFTMAX", "REDUCE")
MIN_COSINE = 0.999


@dataclass
class TrtRequest:
    name: str
    version: int
    repository: Path = Path("model_repository")
    min_batch: int = 1
    opt_batch: int = 16
    max_batch: int = 64
    fp16: bool = True
    workspace_gb: float = 4.0


def keep_fp32(layer_type_name: str) -> bool:
    return layer_type_name in FP32_LAYERS


def plan_config(
    name: str, tower: str, image_size: int, batching: Batching = Batching(), instances: int = 1
) -> str:
    """config.pbtxt for an encoder served from a TensorRT plan (same names as every target)."""
    if tower == "image":
        inp = f'input [\n  {{ name: "pixel_values" data_type: TYPE_FP32 dims: [ 3, {image_size}, {image_size} ] }}\n]\n'
    else:
        inp = 'input [\n  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }\n]\n'
    return (
        f'name: "{name}_{tower}_encoder"\nplatform: "tensorrt_plan"\n'
        f"max_batch_size: {batching.max_batch_size}\n{inp}"
        'output [\n  { name: "embedding" data_type: TYPE_FP32 dims: [ -1 ] }\n]\n'
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {batching.encoder_queue_delay_us}\n}}\n"
        "version_policy: { latest: { num_versions: 2 } }\n"
        f"instance_group [ {{ kind: KIND_GPU count: {instances} }} ]\n"
    )


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise SystemExit(
            "TensorRT is not installed: build plans on a GPU host with NVIDIA's TensorRT Python package "
            "(the PyPI 'tensorrt' package only points at NVIDIA's index). The GPU-target configs work "
            "without plans: ONNX Runtime's TensorRT execution accelerator builds engines at load."
        ) from None
    return trt


def build_engine(
    trt, onnx_path: Path, input_name: str, shape_tail: tuple[int, ...], req: TrtRequest
) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SystemExit(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(req.workspace_gb * (1 << 30)))
    if req.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if keep_fp32(layer.type.name):
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    layer.set_output_type(j, trt.float32)
    profile = builder.create_optimization_profile()
    profile.set_shape(
        input_name, (req.min_batch, *shape_tail), (req.opt_batch, *shape_tail), (req.max_batch, *shape_tail)
    )
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SystemExit(f"TensorRT could not build an engine for {onnx_path}")
    return bytes(plan)


def engine_parity(trt, plan: bytes, onnx_path: Path, input_name: str, make_input) -> float:
    """Worst cosine between the engine's and ONNX Runtime's outputs at a few batch sizes."""
    import onnxruntime as ort
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 1.0
    for n in (1, 3, 16):
        x = make_input(n)
        (ref,) = session.run(["embedding"], {input_name: x})
        inp = torch.from_numpy(x).cuda()
        out = torch.empty(ref.shape, dtype=torch.float32, device="cuda")
        context.set_input_shape(input_name, tuple(x.shape))
        context.set_tensor_address(input_name, inp.data_ptr())
        context.set_tensor_address("embedding", out.data_ptr())
        stream = torch.cuda.current_stream()
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        got = out.cpu().numpy()
        cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
        worst = min(worst, float(cos.min()))
    return worst


def build_plans(req: TrtRequest) -> None:
    trt = _tensorrt()
    repo = Path(req.repository)
    meta = json.loads((repo / f"{req.name}_image" / str(req.version) / "preprocess.json").read_text())
    size = int(meta["image_size"])
    tmeta = json.loads((repo / f"{req.name}_text" / str(req.version) / "preprocess.json").read_text())
    ctx = int(tmeta["context_length"])
    rng = np.random.default_rng(0)
    towers = (
        (
            "image",
            "pixel_values",
            (3, size, size),
            lambda n: rng.standard_normal((n, 3, size, size), dtype=np.float32),
        ),
        (
            "text",
            "input_ids",
            (ctx,),
            lambda n: np.tile(
                np.r_[49406, rng.integers(1, 49000, 5), 49407, np.zeros(ctx - 7, int)], (n, 1)
            ).astype(np.int64),
        ),
    )
    for tower, input_name, tail, make_input in towers:
        folder = repo / f"{req.name}_{tower}_encoder" / str(req.version)
        plan = build_engine(trt, folder / "model.onnx", input_name, tail, req)
        cosine = engine_parity(trt, plan, folder / "model.onnx", input_name, make_input)
        print(
            f"[trt] {req.name}_{tower}_encoder v{req.version}: engine {len(plan) / 1e6:.0f} MB, "
            f"parity min cosine {cosine:.5f}",
            flush=True,
        )
        if cosine < MIN_COSINE:
            raise SystemExit(f"{tower}: TensorRT differs from ONNX Runtime (cosine {cosine} < {MIN_COSINE})")
        tmp = folder / "model.plan.tmp"
        tmp.write_bytes(plan)
        tmp.rename(folder / "model.plan")
        config = folder.parent / "config.pbtxt"
        shutil.copy(config, folder.parent / "config.onnx.pbtxt.bak")
        config.write_text(plan_config(req.name, tower, size))
