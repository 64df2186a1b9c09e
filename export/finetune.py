"""Fine-tune a served embedding version on a catalog, export it as the next version, compare.

    python -m export finetune --name clip --from-version 1 --world data/world \\
        --eval-world data/world-heldout [--steps 300 --batch 64 --lr 1e-4 --freeze-layers 0 \\
        --distill 0.5 --wise 0.5 --seed 0] [--version 2] [--force]

1. **Start** from what version N serves: the weights its export recorded (a checkpoint path, or
   random-init with its seed) or `--checkpoint`; the rebuilt image tower must reproduce N's ONNX
   (cosine >= 0.9999), so the comparison is against the model users get today.
2. **Train** contrastively on the world's (image, title) pairs and, where the world records
   which garments a look wears, on the look's body-zone crops paired with those garments' titles
   (the query distribution of look search). Images and titles go through version N's own
   pre-processing and tokenizer. Options: steps, batch, learning rate, frozen leading blocks,
   distillation towards the base towers (cosine to the frozen base embeddings, weight
   `--distill`), WiSE-FT (`--wise` a: weights = (1 - a) base + a fine-tuned). Deterministic for a
   seed and thread count; progress with the loss.
3. **Export** the result as version M (default N + 1's next free number) with the parity gate,
   then **evaluate** base and fine-tuned side by side on the held-out world from the served files
   (export/finetune_eval.py) and print the `looksync models activate` command, or refuse to when
   the fine-tuned model is worse than the base (mean R@5 over the tasks) unless `--force`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class FinetuneRequest:
    from_version: int
    world: Path
    name: str = "clip"
    repository: Path = Path("model_repository")
    eval_world: Path | None = None
    version: int | None = None  # None: the next free version
    checkpoint: str | None = None  # start here instead of the version's recorded weights
    out: Path | None = None  # the fine-tuned checkpoint (default: finetune/<name>-v<M>.pt)
    steps: int = 300
    batch: int = 64
    lr: float = 1e-4
    freeze_layers: int = 0
    distill: float = 0.0
    wise: float = 1.0
    seed: int = 0
    threads: int = 2
    max_looks: int = 1000
    force: bool = False
    log_every: int = 25
    losses: list[float] = field(default_factory=list)


def _log(msg: str) -> None:
    print(f"[finetune] {msg}", flush=True)


# --- the base: what version N serves --------------------------------------------------------


def version_meta(repo: Path, name: str, version: int) -> tuple[dict, dict]:
    image = repo / f"{name}_image" / str(version) / "preprocess.json"
    text = repo / f"{name}_text" / str(version) / "preprocess.json"
    if not image.is_file():
        raise SystemExit(f"{name} version {version} is not exported in {repo}")
    if not text.is_file():
        raise SystemExit(f"{name} version {version} has no text tower: contrastive fine-tuning needs one")
    return json.loads(image.read_text()), json.loads(text.read_text())


def base_model(req: FinetuneRequest, meta: dict):
    """The open_clip model version N was exported from, in eval mode."""
    from export.families import open_clip_model

    weights = req.checkpoint or meta["weights"]
    seed = None
    if weights.startswith("random-init(seed="):
        seed = int(weights.split("seed=", 1)[1].split(",")[0].rstrip(")"))
        weights = None
    model = open_clip_model(meta["family"], meta["arch"], weights, None, seed)
    _check_base(model, req, meta)
    return model


def _check_base(model, req: FinetuneRequest, meta: dict) -> None:
    import onnxruntime as ort
    import torch
    import torch.nn.functional as F

    size = int(meta["image_size"])
    x = np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32)
    onnx = Path(req.repository) / f"{req.name}_image_encoder" / str(req.from_version) / "model.onnx"
    (served,) = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": x}
    )
    with torch.no_grad():
        ours = F.normalize(model.visual(torch.from_numpy(x)), dim=-1).numpy()
    cosine = float(((served * ours).sum(-1) / np.linalg.norm(served, axis=-1)).min())
    if cosine < 0.9999:
        raise SystemExit(
            f"the weights recorded for {req.name} v{req.from_version} ({meta['weights']}) do not give its "
            f"ONNX (cosine {cosine:.5f}): pass --checkpoint with the weights it was exported from"
        )


# --- training data: the version's own pre-processing and tokenizer -------------------------


def training_pairs(world: Path, repo: Path, name: str, version: int, max_looks: int):
    """(pixels (N,3,S,S) float32, token ids (N,ctx) int64, caption per pair) from the world's
    catalog and its looks' garment crops."""
    import io

    from PIL import Image

    from benchmarks.quality import look_regions
    from clients.world_hard import garment_regions
    from export.detector import InProcessDetector
    from export.triton.preprocess import ImageSpec, image_bytes_to_pixels, pixels
    from export.triton.text_tokenizer import TextTokenizer

    image_meta, text_meta = version_meta(repo, name, version)
    spec = ImageSpec.from_meta(image_meta)
    tokenizer = TextTokenizer.from_version(repo / f"{name}_text" / str(version), text_meta)
    records = [
        json.loads(line) for line in (world / "catalog.jsonl").read_text().splitlines() if line.strip()
    ]
    titles = {r["id"]: r["title"] for r in records}
    images, captions = [], []
    for r in records:
        images.append(image_bytes_to_pixels((world / r["image_url"]).read_bytes(), spec))
        captions.append(r["title"])
    manifest = world / "looks.json"
    looks = json.loads(manifest.read_text()).get("looks", []) if manifest.is_file() else []
    # Looks are cut as SearchLook cuts them: by the repository's garment detector when it has
    # one, else by body zones; each worn garment pairs with the region that overlaps it best.
    detector = InProcessDetector.in_repository(repo)
    for look in looks[:max_looks]:
        regions = look_regions(
            Image.open(world / look["image"]).convert("RGB"), detector and detector.regions
        )
        for zone, pid in look["garments"].items():
            fits = garment_regions(zone, look.get("boxes", {}).get(zone), regions)
            if fits and pid in titles:
                images.append(pixels(Image.open(io.BytesIO(fits[0].image)).convert("RGB"), spec))
                captions.append(titles[pid])
    ids, _ = tokenizer(captions)
    return np.stack(images).astype(np.float32), ids, captions


# --- training -------------------------------------------------------------------------------


def freeze_leading_blocks(model, n: int) -> int:
    """Freeze the embeddings and the first n residual blocks of both towers; returns how many
    parameters stay trainable."""
    if n <= 0:
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    visual_blocks = getattr(getattr(model.visual, "transformer", None), "resblocks", None)
    text_blocks = getattr(getattr(model, "transformer", None), "resblocks", None)
    if visual_blocks is None or text_blocks is None:
        raise SystemExit("--freeze-layers needs open_clip's own transformer towers (not timm/HF towers)")
    frozen = [visual_blocks[:n], text_blocks[:n]]
    for name in ("conv1", "class_embedding", "positional_embedding", "ln_pre"):
        if hasattr(model.visual, name):
            frozen.append(getattr(model.visual, name))
    for name in ("token_embedding", "positional_embedding"):
        if hasattr(model, name):
            frozen.append(getattr(model, name))
    import torch

    for part in frozen:
        for p in [part] if isinstance(part, torch.nn.Parameter) else part.parameters():
            p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def contrastive_loss(model, x, ids, bf16: bool = False):
    """Symmetric InfoNCE with soft targets: pairs with the same title are all positives.
    `bf16`: the towers under CPU bf16 autocast (faster; the loss itself stays fp32)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(ids), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
    same = (ids[:, None, :] == ids[None, :, :]).all(-1).float()
    target = same / same.sum(1, keepdim=True)
    loss = (
        torch.sum(-target * F.log_softmax(logits.float(), 1), 1).mean()
        + torch.sum(-target * F.log_softmax(logits.float().T, 1), 1).mean()
    ) / 2
    return loss, img, txt


def train(model, images: np.ndarray, ids: np.ndarray, req: FinetuneRequest):
    """Fine-tune `model` in place; returns it (WiSE-FT mixed with the base when wise < 1)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(req.seed)
    torch.set_num_threads(req.threads)
    base = copy.deepcopy(model).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    trainable = freeze_leading_blocks(model, req.freeze_layers)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=req.lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(req.seed)
    n = len(images)
    batch = min(req.batch, n)
    _log(f"{n} pairs, {trainable / 1e6:.2f} M trainable parameters, {req.steps} steps of {batch}")
    model.train()
    start = time.monotonic()
    for step in range(req.steps):
        idx = torch.randperm(n, generator=gen)[:batch].numpy()
        x = torch.from_numpy(images[idx])
        if step % 2:
            x = torch.flip(x, dims=[3])
        t = torch.from_numpy(ids[idx])
        for g in opt.param_groups:  # warm-up, then cosine decay
            g["lr"] = req.lr * min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / req.steps))
        loss, img, txt = contrastive_loss(model, x, t)
        total = loss
        if req.distill > 0:
            with torch.no_grad():
                bi = F.normalize(base.encode_image(x), dim=-1)
                bt = F.normalize(base.encode_text(t), dim=-1)
            total = loss + req.distill * ((1 - (img * bi).sum(-1)).mean() + (1 - (txt * bt).sum(-1)).mean())
        opt.zero_grad()
        total.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        req.losses.append(float(loss.item()))
        if (step + 1) % req.log_every == 0 or step + 1 == req.steps:
            recent = np.mean(req.losses[-req.log_every :])
            _log(
                f"step {step + 1}/{req.steps} contrastive loss {recent:.4f} ({time.monotonic() - start:.0f}s)"
            )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    if req.wise < 1.0:
        mixed = wise_ft(base.state_dict(), model.state_dict(), req.wise)
        model.load_state_dict(mixed)
        _log(f"WiSE-FT: weights = {1 - req.wise:.2f} base + {req.wise:.2f} fine-tuned")
    return model


def wise_ft(base: dict, tuned: dict, alpha: float) -> dict:
    """Weight-space ensemble (Wortsman et al., WiSE-FT): (1 - alpha) base + alpha fine-tuned."""
    return {k: (1 - alpha) * base[k] + alpha * v if v.is_floating_point() else v for k, v in tuned.items()}


def dataset_loss(model, images: np.ndarray, ids: np.ndarray, batch: int = 128) -> float:
    """Contrastive loss over fixed consecutive batches of the pairs (a before/after yardstick)."""
    import torch

    losses = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            loss, _, _ = contrastive_loss(
                model, torch.from_numpy(images[i : i + batch]), torch.from_numpy(ids[i : i + batch])
            )
            losses.append(float(loss))
    return float(np.mean(losses))


# --- the procedure --------------------------------------------------------------------------


def finetune(req: FinetuneRequest) -> dict:
    import torch

    from export.clip import ExportRequest, export_clip
    from export.trt import next_version

    repo = Path(req.repository)
    image_meta, _ = version_meta(repo, req.name, req.from_version)
    if image_meta.get("family") not in ("clip", "siglip"):
        raise SystemExit(f"fine-tuning needs an image + text family, not {image_meta.get('family')!r}")
    target = req.version or next_version(repo, req.name)
    t0 = time.monotonic()
    model = base_model(req, image_meta)
    images, ids, captions = training_pairs(Path(req.world), repo, req.name, req.from_version, req.max_looks)
    before = dataset_loss(model, images, ids)
    _log(f"base {req.name} v{req.from_version} ({image_meta['arch']}): training-set loss {before:.4f}")
    model = train(model, images, ids, req)
    after = dataset_loss(model, images, ids)
    _log(f"training-set loss {before:.4f} -> {after:.4f} in {time.monotonic() - t0:.0f}s")

    out = Path(req.out or Path("finetune") / f"{req.name}-v{target}.pt").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out)
    record = {
        "from": {"model": req.name, "version": req.from_version, "weights": req.checkpoint or image_meta["weights"]},
        "world": str(req.world),
        "pairs": len(images),
        "steps": req.steps, "batch": req.batch, "lr": req.lr, "freeze_layers": req.freeze_layers,
        "distill": req.distill, "wise": req.wise, "seed": req.seed, "threads": req.threads,
        "loss_before": before, "loss_after": after,
        "loss_every": [round(float(np.mean(req.losses[i : i + req.log_every])), 4)
                       for i in range(0, len(req.losses), req.log_every)],
    }  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    target_kind, runner = _served_as(repo, req.name)
    tokenizer_dir = (
        repo / f"{req.name}_text" / str(req.from_version) if image_meta["family"] == "siglip" else None
    )
    export_clip(
        ExportRequest(
            family=image_meta["family"], arch=image_meta["arch"], version=target, target=target_kind,
            name=req.name, checkpoint=str(out), repository=repo, runner=runner,
            tokenizer=str(tokenizer_dir) if tokenizer_dir else None,
        )
    )  # fmt: skip
    record["version"] = target
    if req.eval_world is not None:
        from export.finetune_eval import compare_versions, recommend

        plot = out.with_name(f"{out.stem}-comparison.png")
        record["comparison"] = compare_versions(
            repo, req.name, req.from_version, target, Path(req.eval_world), plot
        )
        record["recommended"] = recommend(record["comparison"], req.name, target, req.force)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    return record


def _served_as(repo: Path, name: str) -> tuple[str, str]:
    """(target, runner) of the existing versions, so the new one is served the same way."""
    encoder = (repo / f"{name}_image_encoder" / "config.pbtxt").read_text()
    target = "cpu" if 'backend: "python"' in encoder else "gpu"
    wrapper = (repo / f"{name}_image" / "config.pbtxt").read_text()
    marker = 'key: "runner" value: { string_value: "'
    runner = wrapper.split(marker, 1)[1].split('"', 1)[0] if marker in wrapper else ""
    return target, runner
