"""The garment detector: which garment layer each part of a look shows, as a Triton model.

No pretrained detector can be downloaded here, so the demo trains a small one on the synthetic
world's hard looks (clients/world_hard.py), the way the demo CLIP is trained: reproducible for
a seed, weights committed (export/weights/garment-detector.pt), exported to ONNX with a parity
gate and served by Triton with dynamic batching as `garment_detector`.

It is a segmenter rather than a box regressor: a small convolutional encoder-decoder gives
each cell of a 1/4-resolution grid a class (background or one of DETECTOR_LAYERS). The gateway
(gateway/look/detector.py) turns the class map into boxes, one per connected garment, and cuts
each garment out of its background, which a box alone cannot do on a cluttered picture.

    python -m export train-detector [--looks 3000] [--steps 3000]     (writes the weights)
    python -m export detector --version 1 [--checkpoint PATH]          (ONNX + Triton model)
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
WEIGHTS = REPO / "export" / "weights" / "garment-detector.pt"
INPUT_SIZE = 256
STRIDE = 4
PAD_VALUE = 0.5  # letterbox padding (pixels in 0..1)


def letterbox(img: Image.Image, size: int = INPUT_SIZE) -> tuple[np.ndarray, float, tuple[int, int]]:
    """(3, size, size) float32 in 0..1, the scale applied and the (x, y) offset of the picture:
    the longest side fits, the rest is padded, so garments keep their proportions."""
    scale = size / max(img.size)
    w, h = max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))
    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    offset = ((size - w) // 2, (size - h) // 2)
    canvas.paste(img.convert("RGB").resize((w, h), Image.Resampling.BILINEAR), offset)
    return np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) / 255.0, scale, offset


def build(classes: int, width: int = 16):
    import torch
    from torch import nn

    def conv(cin, cout, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class GarmentDetector(nn.Module):
        """Encoder to 1/32 (the context that tells a skirt from a top), decoder back to 1/4."""

        def __init__(self):
            super().__init__()
            w = width
            self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1))
            self.stem = conv(3, w, 2)  # 1/2
            self.down = nn.ModuleList(
                [
                    nn.Sequential(conv(w, 2 * w, 2), conv(2 * w, 2 * w)),  # 1/4
                    nn.Sequential(conv(2 * w, 4 * w, 2), conv(4 * w, 4 * w)),  # 1/8
                    nn.Sequential(conv(4 * w, 6 * w, 2), conv(6 * w, 6 * w)),  # 1/16
                    nn.Sequential(conv(6 * w, 8 * w, 2), conv(8 * w, 8 * w)),  # 1/32
                ]
            )
            self.lateral = nn.ModuleList(nn.Conv2d(c, 2 * w, 1) for c in (2 * w, 4 * w, 6 * w, 8 * w))
            self.fuse = conv(2 * w, 2 * w)
            self.head = nn.Conv2d(2 * w, classes, 1)

        def forward(self, pixel_values):
            x = self.stem((pixel_values - self.mean) * 4.0)
            feats = []
            for stage in self.down:
                x = stage(x)
                feats.append(x)
            y = self.lateral[-1](feats[-1])
            for level in range(len(feats) - 2, -1, -1):
                y = nn.functional.interpolate(y, scale_factor=2.0, mode="nearest") + self.lateral[level](
                    feats[level]
                )
            return self.head(self.fuse(y))  # (batch, classes, size / 4, size / 4)

    return GarmentDetector()


@dataclass
class TrainRequest:
    looks: int = 3000
    steps: int = 3000
    batch: int = 24
    lr: float = 3e-3
    seed: int = 0
    threads: int = 0
    easy_share: float = 0.15  # easy (centred, full-length) looks mixed in
    out: Path = WEIGHTS


def training_set(n: int, seed: int, easy_share: float) -> tuple[np.ndarray, np.ndarray]:
    """n looks letterboxed to INPUT_SIZE (uint8) and their class maps at 1/STRIDE."""
    from clients.world import LOOK_SIZE, easy_boxes, make_catalog, make_looks, render_look
    from clients.world_hard import DETECTOR_LAYERS, make_hard_looks, render_hard_look
    from gateway.taxonomy import CATEGORY_LAYER

    catalog = make_catalog(400, seed, accessories=True, palette="base")
    novel = make_catalog(200, seed + 1, accessories=True, palette="novel")
    rng = random.Random(seed)
    grid = INPUT_SIZE // STRIDE
    images = np.zeros((n, 3, INPUT_SIZE, INPUT_SIZE), dtype=np.uint8)
    targets = np.zeros((n, grid, grid), dtype=np.int64)
    hard = make_hard_looks(catalog + novel, n, seed + 2)
    easy = make_looks([p for p in catalog if p.style.kind not in ("hat", "sunglasses")], n, seed + 3)
    started = time.monotonic()
    for i in range(n):
        if rng.random() < easy_share:
            look = easy[i]
            img = render_look(look, seed)
            classes = np.zeros((LOOK_SIZE[1], LOOK_SIZE[0]), dtype=np.uint8)
            for zone, (left, top, right, bottom) in easy_boxes(look).items():
                from clients.world import garment

                side = (right - left, bottom - top)
                _, mask = garment(look.styles[zone], max(side))
                mask = np.asarray(mask.resize(side)) > 0
                layer = CATEGORY_LAYER[look.styles[zone].kind]
                classes[top:bottom, left:right][mask] = DETECTOR_LAYERS.index(layer) + 1
        else:
            img, classes = render_hard_look(hard[i])
        pixels, scale, (ox, oy) = letterbox(img)
        images[i] = np.round(pixels * 255).astype(np.uint8)
        label = Image.new("L", (INPUT_SIZE, INPUT_SIZE), 0)
        w, h = max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))
        label.paste(Image.fromarray(classes).resize((w, h), Image.Resampling.NEAREST), (ox, oy))
        targets[i] = np.asarray(label.resize((grid, grid), Image.Resampling.NEAREST))
        if (i + 1) % 500 == 0:
            print(f"  rendered {i + 1}/{n} looks ({time.monotonic() - started:.0f}s)", flush=True)
    return images, targets


def train(req: TrainRequest) -> dict:
    import torch

    from clients.world_hard import DETECTOR_LAYERS

    torch.manual_seed(req.seed)
    if req.threads:
        torch.set_num_threads(req.threads)
    t0 = time.monotonic()
    images, targets = training_set(req.looks, req.seed, req.easy_share)
    held = max(1, req.looks // 20)  # the last 5 %: held out, for the report
    model = build(len(DETECTOR_LAYERS) + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=req.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=req.lr, total_steps=req.steps, pct_start=0.1)
    # Background is most of every look: weigh it down so small garments (sunglasses) count.
    weight = torch.ones(len(DETECTOR_LAYERS) + 1)
    weight[0] = 0.3
    gen = np.random.default_rng(req.seed)
    model.train()
    for step in range(1, req.steps + 1):
        idx = gen.integers(0, req.looks - held, req.batch)
        x = torch.from_numpy(images[idx].astype(np.float32) / 255.0)
        y = torch.from_numpy(targets[idx])
        if gen.random() < 0.5:  # mirrored looks are as likely as the others
            x, y = x.flip(-1), y.flip(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == req.steps:
            print(
                f"  step {step}/{req.steps} loss {loss.item():.4f} ({time.monotonic() - t0:.0f}s)", flush=True
            )
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(images[-held:].astype(np.float32) / 255.0)
        pred = model(x).argmax(1).numpy()
    truth = targets[-held:]
    ious = {}
    for c, layer in enumerate(DETECTOR_LAYERS, start=1):
        inter, union = np.sum((pred == c) & (truth == c)), np.sum((pred == c) | (truth == c))
        if union:
            ious[layer] = round(float(inter / union), 3)
    report = {
        "looks": req.looks,
        "steps": req.steps,
        "batch": req.batch,
        "seed": req.seed,
        "train_s": round(time.monotonic() - t0, 1),
        "held_out_iou": ious,
        "classes": ["background", *DETECTOR_LAYERS],
        "input_size": INPUT_SIZE,
        "stride": STRIDE,
    }
    req.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), req.out)
    req.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {req.out} ({report['train_s']}s); held-out IoU by layer: {ious}")
    return report


class InProcessDetector:
    """An exported detector version run in this process with the gateway's own post-processing
    (gateway/look/detector.py): what training and offline evaluation use to cut looks exactly
    as SearchLook does."""

    def __init__(self, version_dir: Path):
        import onnxruntime as ort

        from gateway.look.detector import DetectorSpec

        meta = json.loads((version_dir / "detector.json").read_text())
        self.spec = DetectorSpec(tuple(meta["classes"]), meta["input_size"], meta["stride"])
        self.session = ort.InferenceSession(
            str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"]
        )

    @classmethod
    def in_repository(cls, repo: Path, name: str = "garment_detector") -> InProcessDetector | None:
        """The newest version of the detector in a model repository, or None."""
        versions = sorted(int(p.name) for p in (repo / name).glob("*") if p.name.isdigit())
        return cls(repo / name / str(versions[-1])) if versions else None

    def regions(self, look: Image.Image):
        from gateway.look.detector import regions_from_logits

        pixels, scale, offset = letterbox(look, self.spec.input_size)
        (logits,) = self.session.run(["logits"], {"pixel_values": pixels[None]})
        return regions_from_logits(look, logits[0], self.spec, scale, offset)


@dataclass
class DetectorExport:
    version: int = 1
    repository: Path = REPO / "model_repository"
    checkpoint: Path = WEIGHTS
    name: str = "garment_detector"
    target: str = "cpu"
    max_batch_size: int = 16
    onnx_threads: int = 0


def load(checkpoint: Path):
    import torch

    meta = json.loads(checkpoint.with_suffix(".json").read_text())
    model = build(len(meta["classes"]))
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    return model.eval(), meta


def config(req: DetectorExport, meta: dict) -> str:
    """The Triton model: fixed input size, dynamic batching; the class names and geometry
    travel as parameters, so the gateway reads them from Triton (no file of its own)."""
    grid = meta["input_size"] // meta["stride"]
    size = meta["input_size"]
    params = {
        "classes": ",".join(meta["classes"]),
        "input_size": str(size),
        "stride": str(meta["stride"]),
        "pad_value": str(PAD_VALUE),
    }
    text = f'name: "{req.name}"\n'
    text += 'backend: "onnxruntime"\n' if req.target == "gpu" else 'backend: "python"\n'
    text += f"max_batch_size: {req.max_batch_size}\n"
    text += f'input [ {{ name: "pixel_values" data_type: TYPE_FP32 dims: [ 3, {size}, {size} ] }} ]\n'
    text += f'output [ {{ name: "logits" data_type: TYPE_FP32 dims: [ {len(meta["classes"])}, {grid}, {grid} ] }} ]\n'
    # A look's garments are all in one request; batching gathers concurrent looks.
    text += "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"
    text += "version_policy: { latest: { num_versions: 1 } }\n"
    if req.target == "gpu":
        text += "instance_group [ { kind: KIND_GPU count: 1 } ]\n"
    else:
        text += "instance_group [ { kind: KIND_CPU count: 1 } ]\n"
        params["intra_op_threads"] = str(req.onnx_threads)
    for key, value in params.items():
        text += f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
    return text


def parity_inputs(n: int = 4, seed: int = 7) -> np.ndarray:
    """Letterboxed hard looks (what the gateway sends), not noise: parity on real inputs."""
    from clients.world import make_catalog
    from clients.world_hard import make_hard_looks, render_hard_look

    looks = make_hard_looks(make_catalog(60, seed, accessories=True), n, seed)
    return np.stack([letterbox(render_hard_look(look)[0])[0] for look in looks])


def export_detector(req: DetectorExport) -> Path:
    import shutil

    import onnxruntime as ort
    import torch

    from export.vision_common import export_onnx

    model, meta = load(req.checkpoint)
    folder = req.repository / req.name / str(req.version)
    folder.mkdir(parents=True, exist_ok=True)
    example = torch.from_numpy(parity_inputs(2))
    export_onnx(
        model,
        (example,),
        folder / "model.onnx",
        ["pixel_values"],
        ["logits"],
        {"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        17,
    )
    inputs = parity_inputs(5)
    with torch.no_grad():
        ref = model(torch.from_numpy(inputs)).numpy()
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"pixel_values": inputs})
    agree = float(np.mean(ref.argmax(1) == got.argmax(1)))
    worst = float(np.abs(ref - got).max())
    if agree < 0.999:
        shutil.rmtree(folder)
        raise RuntimeError(f"parity: ONNX classes agree with PyTorch on {agree:.4f} of cells (< 0.999)")
    shutil.copy(REPO / "export" / "triton" / "onnx_encoder.py", folder / "model.py")
    (folder / "detector.json").write_text(
        json.dumps({**meta, "parity": {"class_agreement": agree, "max_abs_diff": worst}}, indent=1) + "\n"
    )
    (req.repository / req.name / "config.pbtxt").write_text(config(req, meta))
    print(
        f"exported {req.name} v{req.version} to {folder}: parity {agree:.4f} of cells agree, "
        f"max |logit diff| {worst:.2e}"
    )
    return folder
