"""Embedding model families behind one interface: what `export` needs to know of a model is
its towers (PyTorch modules that return L2-normalised embeddings), how its images are
pre-processed and how its text is tokenised. Everything family-specific lives here.

    family   towers         pre-processing                         tokenizer
    clip     image + text   shortest side, centre crop, CLIP mean  CLIP BPE (converted to a
                                                                   tokenizer.json), 77
    siglip   image + text   squash to a square, mean/std 0.5       the checkpoint's tokenizer.json
                                                                   (Unigram), 64,
                                                                   padding kept (bidirectional,
                                                                   last-token pooling)
    dinov2   image only     shortest side 256, crop 224 (floor),   none: image-only space
                            ImageNet mean/std

open_clip records SigLIP's pre-processing with the pretrained *tag*, not the architecture, so a
SigLIP model built from a local checkpoint file or random weights would silently get CLIP's
mean/std and crop; the family supplies it instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TOKENIZERS = HERE / "tokenizers"
FAMILIES = ("clip", "siglip", "dinov2")
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# DINOv2 shapes by name (random weights or to check a checkpoint against); the tiny one keeps
# the real code path, position-embedding interpolation included (trained 70 px, served 56).
DINOV2 = {
    "dinov2-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, image_size=518),
    "dinov2-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=518),
    "dinov2-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518),
    "looksync-dinov2-tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=70
    ),
}
DINOV2_CROP = {"looksync-dinov2-tiny": (64, 56)}  # (shortest side, crop); others 256, 224


@dataclass
class Towers:
    family: str
    image: object  # torch.nn.Module: pixels -> normalised embedding
    text: object | None  # torch.nn.Module: token ids -> normalised embedding; None: image-only
    image_meta: dict  # preprocess.json fields of <model>_image (ImageSpec.from_meta)
    text_meta: dict | None  # preprocess.json fields of <model>_text (tokenizer)
    # Files written next to the text model: name -> a file to copy, or a function(destination).
    text_files: dict[str, Path | Callable[[Path], object]]
    tokenize: Callable[[list[str]], np.ndarray] | None  # the reference tokenizer (parity)
    params: int

    @property
    def modalities(self) -> list[str]:
        return ["image", "text"] if self.text is not None else ["image"]


def build(family: str, arch: str, checkpoint: str | None, pretrained: str | None, seed: int,
          tokenizer: str | None = None) -> Towers:  # fmt: skip
    if family not in FAMILIES:
        raise SystemExit(f"family {family!r} is not one of {', '.join(FAMILIES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time
    import torch

    torch.manual_seed(seed)
    if family == "dinov2":
        return _dinov2(arch, checkpoint)
    return _open_clip(family, arch, checkpoint, pretrained, tokenizer)


def register_arch(arch: str) -> str:
    """The open_clip model name for `arch`: a registered name, or a JSON model config of one's
    own (open_clip's format; e.g. real-size shapes with other widths), registered under its
    file stem. The project's configs (export/configs) are registered too."""
    import open_clip

    open_clip.add_model_config(HERE / "configs")
    if not arch.endswith(".json"):
        return arch
    if not Path(arch).is_file():
        raise SystemExit(f"--arch {arch}: no such config file")
    open_clip.add_model_config(Path(arch))
    return Path(arch).stem


def open_clip_model(family: str, arch: str, checkpoint: str | None, pretrained: str | None, seed=None):
    """An open_clip model (CLIP or SigLIP-style) in eval mode, with its family's
    pre-processing where the pretrained tag does not bring it. Never downloads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    arch = register_arch(arch)
    force = None
    if family == "siglip" and not pretrained:
        force = {
            "mean": INCEPTION[0],
            "std": INCEPTION[1],
            "interpolation": "bicubic",
            "resize_mode": "squash",
        }
    return open_clip.create_model(
        arch, pretrained=checkpoint or pretrained, force_preprocess_cfg=force
    ).eval()


def _open_clip(family, arch, checkpoint, pretrained, tokenizer_dir) -> Towers:
    import open_clip
    import torch
    import torch.nn.functional as F

    arch = register_arch(arch)

    model = open_clip_model(family, arch, checkpoint, pretrained)  # build() seeded torch

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

    cfg = model.visual.preprocess_cfg
    size = int(cfg["size"][0] if isinstance(cfg["size"], tuple | list) else cfg["size"])
    if cfg.get("interpolation", "bicubic") != "bicubic":
        raise SystemExit(f"{arch}: interpolation {cfg['interpolation']} is not supported (bicubic only)")
    image_meta = {
        "image_size": size,
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "resize_mode": "squash" if cfg.get("resize_mode") == "squash" else "shortest",
    }
    if cfg.get("resize_mode", "shortest") not in ("shortest", "squash"):
        raise SystemExit(f"{arch}: resize_mode {cfg['resize_mode']} is not supported")
    params = sum(p.numel() for p in model.parameters())

    if family == "clip":
        from functools import partial

        from export.clip_tokenizer import write as write_clip_tokenizer

        tok = open_clip.get_tokenizer(arch)
        bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
        text_meta = {
            "tokenizer": "tokenizers",
            "tokenizer_file": "tokenizer.json",
            "context_length": int(tok.context_length),
            "pad_id": 0,
            "clean": "lower",
            "trim_padding": False,
        }
        return Towers(
            family, ImageTower().eval(), TextTower().eval(), image_meta, text_meta,
            {"tokenizer.json": partial(write_clip_tokenizer, bpe)},
            lambda texts: tok(texts).numpy().astype(np.int64), params,
        )  # fmt: skip

    # siglip: a Hugging Face tokenizer directory; its tokenizer.json is served as it is
    from open_clip.tokenizer import HFTokenizer

    text_cfg = open_clip.get_model_config(arch)["text_cfg"]
    name = tokenizer_dir or text_cfg.get("hf_tokenizer_name")
    local = Path(name) if Path(name).is_dir() else TOKENIZERS / name
    if not (local / "tokenizer.json").is_file():
        raise SystemExit(
            f"{arch}: no tokenizer.json in {local}; pass --tokenizer DIR (a local Hugging Face "
            "tokenizer directory; nothing is downloaded)"
        )
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    unsupported = sorted(set(kwargs) - {"clean"}) + (
        ["tokenizer_mode"] if text_cfg.get("tokenizer_mode") else []
    )
    if unsupported:
        raise SystemExit(
            f"{arch}: tokenizer options {unsupported} are not implemented by the serving tokenizer"
        )
    clean = kwargs.get("clean", "whitespace")
    context = int(text_cfg["context_length"])
    tok = HFTokenizer(str(local), context_length=context, clean=clean)
    pad_id = tok.tokenizer.pad_token_id
    text_meta = {
        "tokenizer": "tokenizers",
        "tokenizer_file": "tokenizer.json",
        "context_length": context,
        "pad_id": int(pad_id if pad_id is not None else 0),
        "clean": clean,
        "trim_padding": False,
    }
    return Towers(
        family, ImageTower().eval(), TextTower().eval(), image_meta, text_meta,
        {"tokenizer.json": local / "tokenizer.json"},
        lambda texts: tok(texts).numpy().astype(np.int64), params,
    )  # fmt: skip


def _dinov2(arch: str, checkpoint: str | None) -> Towers:
    import torch
    import torch.nn.functional as F
    from transformers import Dinov2Config, Dinov2Model

    if checkpoint:
        model = Dinov2Model.from_pretrained(checkpoint, local_files_only=True)
        processor = Path(checkpoint) / "preprocessor_config.json"
        spec = json.loads(processor.read_text()) if processor.is_file() else {}
        resize = int(spec.get("size", {}).get("shortest_edge", 256))
        crop = spec.get("crop_size", {"height": 224})
        crop = int(crop["height"] if isinstance(crop, dict) else crop)
        mean, std = tuple(spec.get("image_mean", IMAGENET[0])), tuple(spec.get("image_std", IMAGENET[1]))
    else:
        if arch not in DINOV2:
            raise SystemExit(
                f"dinov2 arch {arch!r} is not one of {', '.join(DINOV2)} (or pass --checkpoint DIR)"
            )
        model = Dinov2Model(Dinov2Config(**DINOV2[arch]))
        resize, crop = DINOV2_CROP.get(arch, (256, 224))
        mean, std = IMAGENET
    model.eval()

    class ImageTower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dino = model

        def forward(self, pixel_values):
            # pooler_output: the final-layernormed CLS token, DINOv2's global descriptor.
            return F.normalize(self.dino(pixel_values=pixel_values).pooler_output, dim=-1)

    image_meta = {
        "image_size": crop,
        "resize_size": resize,
        "mean": list(mean),
        "std": list(std),
        "resize_mode": "shortest",
        "crop_rounding": "floor",
    }
    params = sum(p.numel() for p in model.parameters())
    return Towers("dinov2", ImageTower().eval(), None, image_meta, None, {}, None, params)
