"""TensorRT plans for an exported embedding version, added as a new version (GPU hosts only).

    python -m export trt --name clip --version 2 [--as-version 3] [--min-batch 1 --opt-batch 16 --max-batch 64]

For each encoder of version N (`<name>_image_encoder`, and `<name>_text_encoder` when the family
has text): parse the ONNX, one optimisation profile over the batch range, fp16 with
normalisation, softmax and reductions kept in fp32 (where fp16 loses accuracy in transformer
towers), check the engine against ONNX Runtime (cosine >= 0.999; text on ids from the version's
own tokenizer, so any family's vocabulary works).

Where the plans go: Triton's config.pbtxt belongs to a model, not a version, so a plan never
goes into the ONNX encoder's folder (rewriting its config to `tensorrt_plan` would stop every
older ONNX version loading and break rollback). One model name per backend instead:

    <name>_image_encoder/N/model.onnx          onnxruntime (unchanged)
    <name>_image_encoder_trt/M/model.plan      tensorrt_plan, M = --as-version (default: next free)
    <name>_image/M/                            version N's wrapper files; its preprocess.json names
                                               `<name>_image_encoder_trt`, runner "bls",
                                               "derived_from": N, "encoder_backend": "tensorrt"

Version M is a version like any other: `looksync models activate --model <name> --version M --catalog CATALOG.jsonl` swaps to it (and
re-embeds the catalog with the engine's fp16 numerics: the same weights, but not bit-identical
vectors), `rollback` returns to N, whose models were never touched.

SAM2 and Florence-2 are not built here: their parts run on ONNX Runtime, whose TensorRT
execution accelerator (gpu-target config) builds and caches engines at load.

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
FAMILIES = ("clip", "siglip", "dinov2")  # the embedding families (export/families.py)
TRT_SUFFIX = "_trt"
PARITY_TEXTS = ["red striped shirt", "a long floral summer dress with a belt", "Sneakers", "日本語 👗"]


@dataclass
class TrtRequest:
    name: str
    version: int
    repository: Path = Path("model_repository")
    as_version: int | None = None  # None: one past the newest version of the model
    min_batch: int = 1
    opt_batch: int = 16
    max_batch: int = 64
    fp16: bool = True
    workspace_gb: float = 4.0


@dataclass(frozen=True)
class Tower:
    tower: str  # "image" | "text"
    input_name: str
    shape_tail: tuple[int, ...]
    sample: object  # n -> an input batch for the parity check


def keep_fp32(layer_type_name: str) -> bool:
    return layer_type_name in FP32_LAYERS


def encoder_name(name: str, tower: str) -> str:
    return f"{name}_{tower}_encoder{TRT_SUFFIX}"


def plan_config(
    name: str, tower: str, image_size: int, batching: Batching = Batching(), instances: int = 1
) -> str:
    """config.pbtxt of `<name>_<tower>_encoder_trt` (same inputs and outputs as the ONNX encoder;
    max_batch_size is the profile's largest batch: Triton must never form a larger one)."""
    if tower == "image":
        inp = f'input [\n  {{ name: "pixel_values" data_type: TYPE_FP32 dims: [ 3, {image_size}, {image_size} ] }}\n]\n'
    else:
        inp = 'input [\n  { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }\n]\n'
    return (
        f'name: "{encoder_name(name, tower)}"\nplatform: "tensorrt_plan"\n'
        f"max_batch_size: {batching.max_batch_size}\n{inp}"
        'output [\n  { name: "embedding" data_type: TYPE_FP32 dims: [ -1 ] }\n]\n'
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {batching.encoder_queue_delay_us}\n}}\n"
        "version_policy: { latest: { num_versions: 2 } }\n"
        f"instance_group [ {{ kind: KIND_GPU count: {instances} }} ]\n"
    )


def _meta(repo: Path, name: str, tower: str, version: int) -> dict | None:
    path = repo / f"{name}_{tower}" / str(version) / "preprocess.json"
    return json.loads(path.read_text()) if path.is_file() else None


def towers_of(repo: Path, name: str, version: int) -> list[Tower]:
    """What to build for version N of `name`, or SystemExit saying why nothing can be."""
    image = _meta(repo, name, "image", version)
    if image is None:
        others = sorted(p.name for p in repo.glob(f"{name}_*") if p.is_dir())
        if others:
            raise SystemExit(
                f"export trt builds plans for embedding models ({', '.join(FAMILIES)}); {name} in {repo} "
                f"has {', '.join(others)} but no {name}_image version {version}. SAM2 and Florence-2 "
                "parts run on ONNX Runtime's TensorRT execution accelerator (gpu target) instead."
            )
        raise SystemExit(f"{name} version {version} is not exported in {repo}")
    family = image.get("family", "clip")
    if family not in FAMILIES:
        raise SystemExit(f"export trt supports the families {FAMILIES}, not {family!r}")
    if image.get("encoder_backend") == "tensorrt":
        raise SystemExit(
            f"{name} version {version} is already a TensorRT version (from {image.get('derived_from')})"
        )
    rng = np.random.default_rng(0)
    size = int(image["image_size"])
    towers = [
        Tower("image", "pixel_values", (3, size, size),
              lambda n: rng.standard_normal((n, 3, size, size), dtype=np.float32)),
    ]  # fmt: skip
    text = _meta(repo, name, "text", version)
    if text is not None:
        from export.triton.text_tokenizer import TextTokenizer

        tokenizer = TextTokenizer.from_version(repo / f"{name}_text" / str(version), text)
        towers.append(
            Tower("text", "input_ids", (int(text["context_length"]),),
                  lambda n: tokenizer((PARITY_TEXTS * n)[:n])[0]),
        )  # fmt: skip
    return towers


def next_version(repo: Path, name: str) -> int:
    versions = [
        int(p.name)
        for folder in repo.glob(f"{name}_*")
        if folder.is_dir()
        for p in folder.iterdir()
        if p.is_dir() and p.name.isdigit()
    ]
    return max(versions, default=0) + 1


def write_trt_version(
    repo: Path,
    name: str,
    source: int,
    target: int,
    plans: dict[str, bytes],
    record: dict,
    max_batch: int = 64,
) -> None:
    """Add version `target` of `name`: the plans as `<name>_<tower>_encoder_trt/<target>` and a
    copy of version `source`'s wrappers that calls them. Staged, encoders renamed into place
    before the wrappers that call them; no existing file is changed except the `_trt` configs."""
    repo = Path(repo)
    towers = list(plans)
    finals = [repo / encoder_name(name, t) / str(target) for t in towers]
    finals += [repo / f"{name}_{t}" / str(target) for t in towers]
    for final in finals:
        if final.exists():
            raise SystemExit(f"{final} already exists: pick a new --as-version (versions are immutable)")
    size = int((_meta(repo, name, "image", source) or {}).get("image_size", 0))
    staged = []
    try:
        for tower, plan in plans.items():
            folder = repo / encoder_name(name, tower)
            stage = folder / f".{target}.tmp"
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir(parents=True)
            (stage / "model.plan").write_bytes(plan)
            (folder / "config.pbtxt").write_text(
                plan_config(name, tower, size, Batching(max_batch_size=max_batch))
            )
            staged.append((stage, folder / str(target)))
        for tower in towers:
            wrapper = repo / f"{name}_{tower}"
            stage = wrapper / f".{target}.tmp"
            shutil.rmtree(stage, ignore_errors=True)
            shutil.copytree(wrapper / str(source), stage)
            meta = json.loads((stage / "preprocess.json").read_text())
            meta.update(
                version=target,
                runner="bls",
                derived_from=source,
                encoder_backend="tensorrt",
                tensorrt=record,
                **{f"{tower}_encoder": encoder_name(name, tower)},
            )
            (stage / "preprocess.json").write_text(json.dumps(meta, indent=2))
            staged.append((stage, wrapper / str(target)))
    except BaseException:
        for stage, _ in staged:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    for stage, final in staged:  # encoders first
        stage.rename(final)


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


def build_engine(trt, onnx_path: Path, tower: Tower, req: TrtRequest) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    # From a file, so the parser finds external data (models over 2 GB) next to it.
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
    tail = tower.shape_tail
    profile.set_shape(
        tower.input_name, (req.min_batch, *tail), (req.opt_batch, *tail), (req.max_batch, *tail)
    )
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SystemExit(f"TensorRT could not build an engine for {onnx_path}")
    return bytes(plan)


def engine_parity(trt, plan: bytes, onnx_path: Path, tower: Tower, batches=(1, 3, 16)) -> float:
    """Worst cosine between the engine's and ONNX Runtime's outputs at a few batch sizes."""
    import onnxruntime as ort
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 1.0
    for n in batches:
        x = tower.sample(n)
        (ref,) = session.run(["embedding"], {tower.input_name: x})
        inp = torch.from_numpy(x).cuda()
        out = torch.empty(ref.shape, dtype=torch.float32, device="cuda")
        context.set_input_shape(tower.input_name, tuple(x.shape))
        context.set_tensor_address(tower.input_name, inp.data_ptr())
        context.set_tensor_address("embedding", out.data_ptr())
        stream = torch.cuda.current_stream()
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        got = out.cpu().numpy()
        cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
        worst = min(worst, float(cos.min()))
    return worst


def build_plans(req: TrtRequest) -> int:
    """Build, check and add the TensorRT version; returns its number."""
    repo = Path(req.repository)
    towers = towers_of(repo, req.name, req.version)  # refuse early, before needing TensorRT
    trt = _tensorrt()
    target = req.as_version or next_version(repo, req.name)
    plans, parity = {}, {}
    for tower in towers:
        onnx_path = repo / f"{req.name}_{tower.tower}_encoder" / str(req.version) / "model.onnx"
        plan = build_engine(trt, onnx_path, tower, req)
        cosine = engine_parity(trt, plan, onnx_path, tower)
        print(
            f"[trt] {req.name}_{tower.tower}_encoder v{req.version}: engine {len(plan) / 1e6:.0f} MB, "
            f"parity min cosine {cosine:.5f}",
            flush=True,
        )
        if cosine < MIN_COSINE:
            raise SystemExit(
                f"{tower.tower}: TensorRT differs from ONNX Runtime (cosine {cosine} < {MIN_COSINE})"
            )
        plans[tower.tower] = plan
        parity[tower.tower] = cosine
    record = {
        "fp16": req.fp16,
        "batch_profile": [req.min_batch, req.opt_batch, req.max_batch],
        "parity_min_cosine_vs_onnx": parity,
        "tensorrt": getattr(trt, "__version__", "?"),
    }
    write_trt_version(repo, req.name, req.version, target, plans, record, max_batch=req.max_batch)
    print(f"[trt] wrote {req.name} version {target} (TensorRT, from version {req.version})", flush=True)
    print(
        f"      swap it in: looksync models activate --model {req.name} --version {target} --catalog CATALOG",
        flush=True,
    )
    return target
