"""Export SAM2 (transformers `Sam2Model`) to ONNX and serve box prompts from Triton as `sam2_mask`.

    python -m export sam2 --checkpoint /models/sam2.1-hiera-large --version 1
    python -m export sam2 --random-init --tiny --version 1     # CI: 1.4 M params, 256 px
    python -m export sam2 --random-init --size base-plus --version 1   # sam2.1-hiera-base-plus shapes

Two graphs, split where SAM2 itself splits its work:

    image_encoder  pixel_values (B,3,S,S) -> image_embeddings_0|1|2   (once per image)
    mask_decoder   the three feature maps + input_boxes (B,N,4)       (once per set of boxes)
                   -> pred_masks (B,N,S/4,S/4) logits, iou_scores (B,N)

The prompt encoder + mask decoder is exported with the legacy exporter: the dynamo export fails
in onnxruntime when batch > 1 and boxes > 1 (`repeat_interleave` in the mask decoder).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.vision_common import (
    RUNTIME_FILES,
    Parity,
    VersionWriter,
    check_parity,
    export_onnx,
    log,
    offline,
    session,
)
from export.vision_configs import VisionPlan, onnx_io, part_config, sam2_mask_config

# The smallest config on the same code path (1.4 M params, 256 px). `model_type` in
# backbone_config is required: without it transformers fails with `KeyError: None`.
TINY_CONFIG = dict(
    vision_config=dict(
        backbone_config=dict(
            model_type="sam2_hiera_det_model",
            image_size=[256, 256],
            hidden_size=32,
            embed_dim_per_stage=[32, 64, 128, 256],
            num_attention_heads_per_stage=[1, 1, 2, 4],
            blocks_per_stage=[1, 1, 2, 1],
            window_size_per_stage=[8, 4, 4, 2],
            global_attention_blocks=[3],
        ),
        backbone_channel_list=[256, 128, 64, 32],
        backbone_feature_sizes=[[64, 64], [32, 32], [16, 16]],
        fpn_hidden_size=64,
    ),
    prompt_encoder_config=dict(hidden_size=64, image_size=256, patch_size=16),
    mask_decoder_config=dict(hidden_size=64, mlp_dim=256, num_attention_heads=4, iou_head_hidden_dim=64),
)


# Real sizes with random weights (SAM 2.1's Hiera configs; 1024 px). "hiera-tiny" is
# transformers' default Sam2Config.
def _hiera(hidden, blocks, windows, global_blocks, background) -> dict:
    dims = [hidden, hidden * 2, hidden * 4, hidden * 8]
    return dict(
        vision_config=dict(
            backbone_config=dict(
                model_type="sam2_hiera_det_model",
                hidden_size=hidden,
                num_attention_heads=2,
                embed_dim_per_stage=dims,
                num_attention_heads_per_stage=[2, 4, 8, 16],
                blocks_per_stage=blocks,
                window_size_per_stage=windows,
                global_attention_blocks=global_blocks,
                window_positional_embedding_background_size=background,
            ),
            backbone_channel_list=dims[::-1],
        )
    )


SIZES = {
    "tiny": TINY_CONFIG,
    "hiera-tiny": {},
    "base-plus": _hiera(112, [2, 3, 16, 3], [8, 4, 14, 7], [12, 16, 20], [14, 14]),
    "large": _hiera(144, [2, 6, 36, 4], [8, 4, 16, 8], [23, 33, 43], [7, 7]),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic"}
EMBEDDINGS = ("image_embeddings_0", "image_embeddings_1", "image_embeddings_2")
CODE_FILES = (*RUNTIME_FILES, "sam2_runtime.py")


@dataclass
class Sam2Request:
    version: int
    target: str = "cpu"
    checkpoint: str | None = None
    tiny: bool = False  # the same as size "tiny"
    size: str = "hiera-tiny"  # random-init shapes: a key of SIZES
    repository: Path = Path("model_repository")
    name: str = "sam2"
    seed: int = 0
    opset: int = 17
    onnx_threads: int = 0
    runner: str = ""  # "" = the target's default (cpu: inprocess, gpu: bls)


def build_model(req: Sam2Request):
    """(Sam2Model in eval mode, image spec dict). Never downloads."""
    offline()
    import torch

    size = "tiny" if req.tiny else req.size
    if size not in SIZES:
        raise SystemExit(f"sam2 size {size!r} is not one of {', '.join(SIZES)}")
    if size == "tiny":
        # Tiny models are all overhead: on a small shared machine more threads only spin.
        torch.set_num_threads(1)
    from transformers import Sam2Config, Sam2Model

    if req.checkpoint:
        model = Sam2Model.from_pretrained(req.checkpoint, local_files_only=True)
    else:
        torch.manual_seed(req.seed)
        model = Sam2Model(Sam2Config(**SIZES[size]))
    model.eval()
    return model, image_spec(model, req.checkpoint)


def image_spec(model, checkpoint: str | None) -> dict:
    side = int(model.config.prompt_encoder_config.image_size)
    spec = {"height": side, "width": side, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "resample": "bilinear"}
    if checkpoint and (Path(checkpoint) / "preprocessor_config.json").exists():
        cfg = json.loads((Path(checkpoint) / "preprocessor_config.json").read_text())
        size = cfg.get("size") or {}
        spec.update(
            height=int(size.get("height", side)),
            width=int(size.get("width", side)),
            mean=tuple(cfg.get("image_mean", IMAGENET_MEAN)),
            std=tuple(cfg.get("image_std", IMAGENET_STD)),
            resample=_RESAMPLE_NAMES.get(cfg.get("resample", 2), "bilinear"),
            rescale=float(cfg.get("rescale_factor", 1 / 255)),
        )
    spec["mean"], spec["std"] = list(spec["mean"]), list(spec["std"])
    return spec


def wrappers(model):
    import torch

    class ImageEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sam = model

        def forward(self, pixel_values):
            return tuple(self.sam.get_image_embeddings(pixel_values))

    class MaskDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sam = model

        def forward(self, emb0, emb1, emb2, input_boxes):
            out = self.sam(
                image_embeddings=[emb0, emb1, emb2], input_boxes=input_boxes, multimask_output=False
            )
            return out.pred_masks[:, :, 0], out.iou_scores[:, :, 0]

    return ImageEncoder().eval(), MaskDecoder().eval()


def _random_boxes(rng, batch: int, n: int, side: int) -> np.ndarray:
    xy0 = rng.uniform(0, side * 0.6, (batch, n, 2))
    wh = rng.uniform(side * 0.1, side * 0.4, (batch, n, 2))
    return np.concatenate([xy0, xy0 + wh], axis=-1).astype(np.float32)


def export_parts(req: Sam2Request, model, out_dir: Path, t0: float) -> tuple[dict[str, Path], list[Parity]]:
    """Write image_encoder.onnx and mask_decoder.onnx into out_dir, checked against PyTorch."""
    import torch

    side = int(model.config.prompt_encoder_config.image_size)
    encoder, decoder = wrappers(model)
    rng = np.random.default_rng(req.seed)
    paths = {"image_encoder": out_dir / "image_encoder.onnx", "mask_decoder": out_dir / "mask_decoder.onnx"}

    pixels = rng.standard_normal((2, 3, side, side), dtype=np.float32)
    export_onnx(
        encoder,
        (torch.from_numpy(pixels),),
        paths["image_encoder"],
        ["pixel_values"],
        list(EMBEDDINGS),
        {"pixel_values": {0: "batch"}, **{e: {0: "batch"} for e in EMBEDDINGS}},
        req.opset,
    )
    log("image_encoder exported", t0)
    with torch.no_grad():
        feats = [f.numpy() for f in encoder(torch.from_numpy(pixels))]
    boxes = _random_boxes(rng, 2, 3, side)
    export_onnx(
        decoder,
        (*[torch.from_numpy(f) for f in feats], torch.from_numpy(boxes)),
        paths["mask_decoder"],
        [*EMBEDDINGS, "input_boxes"],
        ["pred_masks", "iou_scores"],
        {
            **{e: {0: "batch"} for e in EMBEDDINGS},
            "input_boxes": {0: "batch", 1: "boxes"},
            "pred_masks": {0: "batch", 1: "boxes"},
            "iou_scores": {0: "batch", 1: "boxes"},
        },
        req.opset,
    )
    log("mask_decoder exported", t0)

    enc_parity, dec_parity = Parity("sam2 image_encoder"), Parity("sam2 mask_decoder")
    enc_sess, dec_sess = session(paths["image_encoder"]), session(paths["mask_decoder"])
    for batch in (1, 3):  # neither is the example's batch of 2
        x = rng.standard_normal((batch, 3, side, side), dtype=np.float32)
        with torch.no_grad():
            ref = [f.numpy() for f in encoder(torch.from_numpy(x))]
        got = enc_sess.run(list(EMBEDDINGS), {"pixel_values": x})
        for r, g in zip(ref, got):
            enc_parity.add(r, g)
        for n in (1, 4):
            b = _random_boxes(rng, batch, n, side)
            with torch.no_grad():
                ref_m, ref_i = decoder(*[torch.from_numpy(f) for f in ref], torch.from_numpy(b))
            got_m, got_i = dec_sess.run(
                ["pred_masks", "iou_scores"], {**dict(zip(EMBEDDINGS, ref)), "input_boxes": b}
            )
            dec_parity.add(ref_m.numpy(), got_m)
            dec_parity.add(ref_i.numpy(), got_i)
    return paths, [enc_parity, dec_parity]


def export_sam2(req: Sam2Request) -> Path:
    t0 = time.monotonic()
    plan = VisionPlan(target=req.target, runner=req.runner, onnx_threads=req.onnx_threads)
    model, spec = build_model(req)
    log(
        f"built SAM2 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, {spec['height']} px)",
        t0,
    )
    orchestrator = f"{req.name}_mask"
    part_models = {"image_encoder": f"{req.name}_image_encoder", "mask_decoder": f"{req.name}_mask_decoder"}
    bls = plan.effective_runner == "bls"
    writer = VersionWriter(req.repository, req.version, [*part_models.values()] * bls + [orchestrator])
    try:
        paths, parity = export_parts(req, model, writer[orchestrator], t0)
        check_parity(parity, writer, t0)
        parts = {}
        for part, path in paths.items():
            inputs, outputs = onnx_io(path)
            parts[part] = {
                "file": path.name,
                "triton_model": part_models[part],
                "inputs": [t.name for t in inputs],
                "outputs": [t.name for t in outputs],
            }
            if bls:
                target = writer[part_models[part]]
                path.rename(target / "model.onnx")
                if Path(f"{path}.data").exists():  # the graph refers to its data file by this name
                    Path(f"{path}.data").rename(target / f"{path.name}.data")
                if req.target == "cpu":
                    writer.copy_code(part_models[part], "onnx_part.py", ())
                writer.configs[part_models[part]] = part_config(plan, part_models[part], inputs, outputs)
        meta = {
            "model": req.name,
            "version": req.version,
            "weights": req.checkpoint or f"random-init(seed={req.seed}, {'tiny' if req.tiny else req.size})",
            "image": spec,
            "mask_threshold": 0.0,
            "runner": plan.effective_runner,
            "parts": parts,
            "parity": {p.part: p.as_json() for p in parity},
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (writer[orchestrator] / "sam2.json").write_text(json.dumps(meta, indent=2))
        writer.copy_code(orchestrator, "sam2_mask.py", CODE_FILES)
        writer.configs[orchestrator] = sam2_mask_config(plan, orchestrator)
        final = writer.commit()
    except BaseException:
        writer.abort()
        raise
    log(
        f"wrote {orchestrator} version {req.version} ({req.target} target, runner {plan.effective_runner})",
        t0,
    )
    return final[orchestrator]
