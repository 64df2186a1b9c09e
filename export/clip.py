"""Export an open_clip model to ONNX and write it as a new version into the Triton repository.

    python -m export clip --arch ViT-H-14 --random-init --version 1 --target cpu
    python -m export clip --arch ViT-H-14 --checkpoint /models/vit-h-14.bin --version 2

The version is assembled in a hidden folder and renamed into place only after the ONNX parity
check passes, so Triton never sees a half-written or wrong version.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.triton_config import ServingPlan, all_configs

HERE = Path(__file__).resolve().parent
TRITON_CODE = HERE / "triton"
MIN_COSINE = 0.9999


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


def _log(msg: str, t0: float) -> None:
    print(f"[export {time.monotonic() - t0:6.1f}s] {msg}", flush=True)


def build_model(req: ExportRequest):
    """The open_clip model in eval mode. Never downloads: weights come from disk or are random."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip
    import torch

    open_clip.add_model_config(HERE / "configs")
    torch.manual_seed(req.seed)
    pretrained = req.checkpoint or req.pretrained
    if pretrained is None:
        model = open_clip.create_model(req.arch, pretrained=None)
    else:
        model = open_clip.create_model(req.arch, pretrained=pretrained)
    return model.eval()


def _wrappers(model):
    import torch
    import torch.nn.functional as F

    class ImageTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = model.visual

        def forward(self, pixel_values):
            return F.normalize(self.visual(pixel_values), dim=-1)

    class TextTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = model

        def forward(self, input_ids):
            return self.clip.encode_text(input_ids, normalize=True)

    return ImageTower().eval(), TextTower().eval()


def _export_onnx(module, example, input_name: str, path: Path, opset: int) -> None:
    import torch

    from export.vision_common import export_onnx

    # The legacy exporter cannot trace the fused MHA fast path (EXPORT_NOTES.md).
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


def _parity(module, onnx_path: Path, make_input, batch_sizes=(1, 3, 5)) -> float:
    """Worst cosine between PyTorch and ONNX Runtime outputs over a few batch sizes."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst = 1.0
    for n in batch_sizes:
        x = make_input(n)
        with torch.no_grad():
            ref = module(torch.from_numpy(x)).numpy()
        (got,) = session.run(["embedding"], {name: x})
        cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
        worst = min(worst, float(cos.min()))
    return worst


def export_clip(req: ExportRequest) -> Path:
    t0 = time.monotonic()
    import open_clip

    model = build_model(req)
    _log(f"built {req.arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params)", t0)
    cfg = model.visual.preprocess_cfg
    image_size = int(cfg["size"][0] if isinstance(cfg["size"], tuple | list) else cfg["size"])
    tokenizer = open_clip.get_tokenizer(req.arch)
    context_length = int(tokenizer.context_length)
    image_tower, text_tower = _wrappers(model)
    rng = np.random.default_rng(req.seed)

    def pixels(n):
        return rng.standard_normal((n, 3, image_size, image_size), dtype=np.float32)

    def tokens(n):
        texts = [f"a {c} garment number {i}" for i, c in enumerate(["red", "blue", "green"] * n)][:n]
        return tokenizer(texts).numpy().astype(np.int64)

    repo = Path(req.repository)
    staging = {
        tower: repo / f"{req.name}_{tower}" / f".{req.version}.tmp"
        for tower in ("image_encoder", "text_encoder", "image", "text")
    }
    finals = {tower: path.parent / str(req.version) for tower, path in staging.items()}
    for final in finals.values():
        if final.exists():
            raise SystemExit(f"{final} already exists: pick a new --version (versions are immutable)")
    for path in staging.values():
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)

    parity = {}
    for tower, module, make_input, input_name in (
        ("image_encoder", image_tower, pixels, "pixel_values"),
        ("text_encoder", text_tower, tokens, "input_ids"),
    ):
        onnx_path = staging[tower] / "model.onnx"
        _export_onnx(module, torch_tensor(make_input(1)), input_name, onnx_path, req.opset)
        cosine = _parity(module, onnx_path, make_input)
        parity[tower] = cosine
        _log(f"{tower}: exported, parity min cosine {cosine:.7f}", t0)
        if cosine < MIN_COSINE:
            for path in staging.values():
                shutil.rmtree(path, ignore_errors=True)
            raise SystemExit(f"{tower}: ONNX Runtime differs from PyTorch (cosine {cosine} < {MIN_COSINE})")
        if req.target == "cpu":
            shutil.copy(TRITON_CODE / "onnx_encoder.py", staging[tower] / "model.py")

    dim = int(image_tower(torch_tensor(pixels(1))).shape[-1])
    identity = {
        "model": req.name,
        "version": req.version,
        "arch": req.arch,
        "dim": dim,
        "weights": req.checkpoint or req.pretrained or f"random-init(seed={req.seed})",
        "parity_min_cosine": parity,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    image_meta = {
        **identity,
        "image_size": image_size,
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "image_encoder": f"{req.name}_image_encoder",
    }
    shutil.copy(TRITON_CODE / "clip_image.py", staging["image"] / "model.py")
    shutil.copy(TRITON_CODE / "preprocess.py", staging["image"] / "preprocess.py")
    (staging["image"] / "preprocess.json").write_text(json.dumps(image_meta, indent=2))

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    text_meta = {
        **identity,
        "context_length": context_length,
        "bpe_file": bpe.name,
        "trim_padding": False,
        "text_encoder": f"{req.name}_text_encoder",
    }
    shutil.copy(TRITON_CODE / "clip_text.py", staging["text"] / "model.py")
    shutil.copy(TRITON_CODE / "clip_bpe.py", staging["text"] / "clip_bpe.py")
    shutil.copy(bpe, staging["text"] / bpe.name)
    (staging["text"] / "preprocess.json").write_text(json.dumps(text_meta, indent=2))

    plan = ServingPlan(
        model=req.name,
        target=req.target,
        image_size=image_size,
        context_length=context_length,
        onnx_threads=req.onnx_threads,
    )
    for model_name, text in all_configs(plan).items():
        (repo / model_name / "config.pbtxt").write_text(text)
    # Encoders first: a wrapper version must never be visible before the encoder it calls.
    for tower in ("image_encoder", "text_encoder", "image", "text"):
        staging[tower].rename(finals[tower])
    _log(f"wrote {req.name} version {req.version} ({req.target} target, {dim}-d) to {repo}", t0)
    return finals["image"]


def torch_tensor(x: np.ndarray):
    import torch

    return torch.from_numpy(x)
