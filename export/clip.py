"""Export an embedding model to ONNX and write it as a new version into the Triton repository.

    python -m export clip --arch ViT-H-14 --random-init --version 1 --target cpu
    python -m export clip --arch ViT-H-14 --checkpoint /models/vit-h-14.bin --version 2
    python -m export siglip --arch ViT-B-16-SigLIP --checkpoint ... --tokenizer DIR --name siglip
    python -m export dinov2 --arch dinov2-base --name dinov2 --version 1      (image only)

One routine for every family; what differs between families is in export/families.py.

The version is assembled in a hidden folder and renamed into place only after the ONNX parity
check passes, so Triton never sees a half-written or wrong version.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.triton_config import ServingPlan, all_configs

HERE = Path(__file__).resolve().parent
TRITON_CODE = HERE / "triton"
MIN_COSINE = 0.9999
# fp16 weights and activations against the fp32 model (LayerNorms in fp32): measured 0.99999+
# on the tiny and demo configs; 0.999 leaves room for deeper towers without hiding a broken graph.
MIN_COSINE_FP16 = 0.999


@dataclass
class ExportRequest:
    arch: str
    version: int
    target: str = "cpu"
    name: str = "clip"
    checkpoint: str | None = None
    pretrained: str | None = None
    repository: Path = Path("model_repository")
    seed: int = 0
    opset: int = 17
    onnx_threads: int = 0
    family: str = "clip"  # clip | siglip | dinov2 (export/families.py)
    tokenizer: str | None = None  # siglip: a local Hugging Face tokenizer directory
    runner: str = ""  # wrappers run the encoder "inprocess" or via "bls"; "" = the target's default
    precision: str = "fp32"  # "fp16": fp16 weights and activations, fp32 inputs/outputs (gpu target)


def _log(msg: str, t0: float) -> None:
    print(f"[export {time.monotonic() - t0:6.1f}s] {msg}", flush=True)


def build_model(req: ExportRequest):
    """The open_clip model in eval mode. Never downloads: weights come from disk or are random."""
    from export.families import open_clip_model

    return open_clip_model(req.family, req.arch, req.checkpoint, req.pretrained, req.seed)


def _export_onnx(module, example, input_name: str, path: Path, opset: int) -> None:
    import torch

    from export.vision_common import export_onnx

    # The legacy exporter fails on the fused MHA fast path (aten::_native_multi_head_attention).
    torch.backends.mha.set_fastpath_enabled(False)
    export_onnx(
        module,
        (example,),
        path,
        [input_name],
        ["embedding"],
        {input_name: {0: "batch"}, "embedding": {0: "batch"}},
        opset,
    )


def _references(module, make_input, batch_sizes=(1, 3, 5)) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Inputs at a few batch sizes and the fp32 PyTorch outputs the ONNX file must match."""
    import torch

    inputs = [make_input(n) for n in batch_sizes]
    with torch.no_grad():
        refs = [module(torch.from_numpy(x)).float().numpy() for x in inputs]
    return inputs, refs


def _parity(onnx_path: Path, inputs: list[np.ndarray], refs: list[np.ndarray], fp16: bool = False) -> float:
    """Worst cosine between the references and ONNX Runtime's outputs (fp32: with the session
    options the CPU target serves with)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if fp16:
        # ORT 1.31's CPU provider crashes (SIGSEGV) building an fp16 CLIP graph at
        # ORT_ENABLE_ALL; EXTENDED runs it (fp16 is served on the GPU, not here).
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst = 1.0
    for x, ref in zip(inputs, refs):
        (got,) = session.run(["embedding"], {name: x})
        cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
        worst = min(worst, float(cos.min()))
    return worst


def half_tower(module):
    """The tower with fp16 weights and activations, fp32 inputs and outputs (the Triton contract
    stays TYPE_FP32, so configs and clients do not change) and LayerNorms computed in fp32, where
    fp16 loses most. Converts `module` in place."""
    import torch

    inner = module.half()
    for m in inner.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.float()
            m.register_forward_pre_hook(lambda _m, args: tuple(a.float() for a in args))
            m.register_forward_hook(lambda _m, _args, out: out.half())

    class Half(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.half() if x.is_floating_point() else x).float()

    return Half().eval()


def export_clip(req: ExportRequest) -> Path:
    """Export one version of an embedding model of any family (export/families.py): the image
    tower always, the text tower when the family has one."""
    t0 = time.monotonic()
    if req.runner not in ("", "inprocess", "bls"):
        raise SystemExit(f"runner must be 'inprocess' or 'bls', not {req.runner!r}")
    if req.precision not in ("fp32", "fp16"):
        raise SystemExit(f"precision must be 'fp32' or 'fp16', not {req.precision!r}")
    if req.precision == "fp16" and req.target != "gpu":
        raise SystemExit(
            "precision fp16 is for the gpu target (Triton's onnxruntime/TensorRT backends); the cpu "
            "target serves fp32. An fp16 gpu-target export is still checked here, on the CPU"
        )
    if req.target == "gpu" and req.runner == "inprocess":
        raise SystemExit("the gpu target runs the encoders on Triton's GPU backends: runner 'bls' only")
    from export.families import build

    towers = build(req.family, req.arch, req.checkpoint, req.pretrained, req.seed, req.tokenizer)
    _log(f"built {req.family} {req.arch} ({towers.params / 1e6:.1f} M params)", t0)
    image_size = int(towers.image_meta["image_size"])
    rng = np.random.default_rng(req.seed)

    def pixels(n):
        return rng.standard_normal((n, 3, image_size, image_size), dtype=np.float32)

    def tokens(n):
        texts = [f"a {c} garment number {i}" for i, c in enumerate(["red", "blue", "green"] * n)][:n]
        return towers.tokenize(texts)

    repo = Path(req.repository)
    parts = ["image_encoder", "image"] + (["text_encoder", "text"] if towers.text is not None else [])
    staging = {tower: repo / f"{req.name}_{tower}" / f".{req.version}.tmp" for tower in parts}
    finals = {tower: path.parent / str(req.version) for tower, path in staging.items()}
    for final in finals.values():
        if final.exists():
            raise SystemExit(f"{final} already exists: pick a new --version (versions are immutable)")
    _check_family(repo, req, towers.modalities)
    for path in staging.values():
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)

    parity = {}
    encoders = [("image_encoder", towers.image, pixels, "pixel_values")]
    if towers.text is not None:
        encoders.append(("text_encoder", towers.text, tokens, "input_ids"))
    min_cosine = MIN_COSINE_FP16 if req.precision == "fp16" else MIN_COSINE
    dim = 0
    for tower, module, make_input, input_name in encoders:
        onnx_path = staging[tower] / "model.onnx"
        # References from the fp32 model whatever the precision exported.
        inputs, refs = _references(module, make_input)
        dim = dim or int(refs[0].shape[-1])
        if req.precision == "fp16":
            module = half_tower(module)
        _export_onnx(module, torch_tensor(make_input(1)), input_name, onnx_path, req.opset)
        cosine = _parity(onnx_path, inputs, refs, fp16=req.precision == "fp16")
        parity[tower] = cosine
        _log(f"{tower}: exported ({req.precision}), parity min cosine vs fp32 PyTorch {cosine:.7f}", t0)
        if cosine < min_cosine:
            for path in staging.values():
                shutil.rmtree(path, ignore_errors=True)
            raise SystemExit(f"{tower}: ONNX Runtime differs from PyTorch (cosine {cosine} < {min_cosine})")
        if req.target == "cpu":
            shutil.copy(TRITON_CODE / "onnx_encoder.py", staging[tower] / "model.py")

    identity = {
        "model": req.name,
        "version": req.version,
        "family": towers.family,
        "modalities": towers.modalities,
        "arch": req.arch,
        "dim": dim,
        "weights": req.checkpoint or req.pretrained or f"random-init(seed={req.seed})",
        "parity_min_cosine": parity,
        "precision": req.precision,
        "parity_tolerance": min_cosine,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    image_meta = {**identity, **towers.image_meta, "image_encoder": f"{req.name}_image_encoder"}
    shutil.copy(TRITON_CODE / "clip_image.py", staging["image"] / "model.py")
    shutil.copy(TRITON_CODE / "preprocess.py", staging["image"] / "preprocess.py")
    shutil.copy(TRITON_CODE / "encoder_runner.py", staging["image"] / "encoder_runner.py")
    (staging["image"] / "preprocess.json").write_text(json.dumps(image_meta, indent=2))

    context_length = 0
    if towers.text is not None:
        text_meta = {**identity, **towers.text_meta, "text_encoder": f"{req.name}_text_encoder"}
        context_length = int(text_meta["context_length"])
        _check_tokenizer(towers, text_meta, staging["text"])
        shutil.copy(TRITON_CODE / "clip_text.py", staging["text"] / "model.py")
        shutil.copy(TRITON_CODE / "text_tokenizer.py", staging["text"] / "text_tokenizer.py")
        shutil.copy(TRITON_CODE / "encoder_runner.py", staging["text"] / "encoder_runner.py")
        (staging["text"] / "preprocess.json").write_text(json.dumps(text_meta, indent=2))
        _log(f"text: tokenizer.json (clean {text_meta['clean']}), context {context_length}, parity exact", t0)

    plan = ServingPlan(
        model=req.name,
        target=req.target,
        image_size=image_size,
        context_length=context_length,
        onnx_threads=req.onnx_threads,
        family=towers.family,
        text=towers.text is not None,
        runner=req.runner,
    )
    for model_name, text in all_configs(plan).items():
        (repo / model_name / "config.pbtxt").write_text(text)
    # Encoders first: a wrapper version must never be visible before the encoder it calls.
    for tower in ("image_encoder", "text_encoder", "image", "text"):
        if tower in staging:
            staging[tower].rename(finals[tower])
    _log(
        f"wrote {req.name} version {req.version} ({towers.family}, {req.target} target, {dim}-d) to {repo}",
        t0,
    )
    return finals["image"]


def _check_family(repo: Path, req: ExportRequest, modalities: list[str]) -> None:
    """A model name keeps one family: Triton's config.pbtxt (one per model, not per version)
    records it, and a space's capabilities must not change between versions."""
    config = repo / f"{req.name}_image" / "config.pbtxt"
    if config.is_file():
        text = config.read_text()
        recorded = "clip"
        marker = 'key: "family" value: { string_value: "'
        if marker in text:
            recorded = text.split(marker, 1)[1].split('"', 1)[0]
        if recorded != req.family:
            raise SystemExit(
                f"{req.name} is a {recorded} model in {repo}; export {req.family} under another --name"
            )


def _check_tokenizer(towers, text_meta: dict, folder: Path) -> None:
    """The serving tokenizer (export/triton/text_tokenizer.py on the files written here) must
    give exactly the reference tokenizer's ids on a corpus with the awkward cases; otherwise
    the export stops."""
    for name, source in towers.text_files.items():
        if callable(source):
            source(folder / name)
        else:
            shutil.copy(source, folder / name)
    corpus = [
        "red striped shirt", "A RED, Striped shirt!!", "", "   ", "t-shirt_with under_scores",
        "café crème résumé", "cafe\u0301 combining", "ﬁne ligatures ① ²", "日本語 👗 dress", "Ω omega ÅNGSTRÖM",
        "Ｆｕｌｌｗｉｄｔｈ", "👩\u200d👩\u200d👧 👍🏽", "&amp;quot;quoted&amp;quot;", "cafÃ© mojibake", "tab\there\u00a0nbsp",
        "don't it's WE'RE", "<start_of_text> typed specials </s> <pad>",
        "a very long query about a long floral summer dress with a belt " * 8,
    ]  # fmt: skip
    # The same module that is copied next to the Triton model, imported as a package.
    from export.triton.text_tokenizer import TextTokenizer

    ours = TextTokenizer.from_version(folder, text_meta)
    got, _ = ours(corpus)
    want = towers.tokenize(corpus)
    bad = [t for t, a, b in zip(corpus, got, want) if a.shape != b.shape or (a != b).any()]
    if bad:
        raise SystemExit(f"the serving tokenizer differs from the reference on {bad[:3]!r}")


def torch_tensor(x: np.ndarray):
    import torch

    return torch.from_numpy(x)
