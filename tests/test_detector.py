"""The garment detector's post-processing: grid cells -> garments -> boxes and cut-outs in look
pixels (gateway/look/detector.py), and its export (ONNX parity, Triton config)."""

import io

import numpy as np
import pytest
from PIL import Image

from export.detector import INPUT_SIZE, STRIDE, letterbox
from gateway.look.detector import CATALOG_BACKDROP, DetectorSpec, cut_out, detections, look_mask

CLASSES = (
    "background",
    "topwear",
    "outerwear",
    "bottomwear",
    "dress",
    "footwear",
    "bag",
    "headwear",
    "eyewear",
)
GRID = INPUT_SIZE // STRIDE
SPEC = DetectorSpec(CLASSES, INPUT_SIZE, STRIDE)


def _logits(blobs: dict[str, list[tuple[int, int, int, int]]]) -> np.ndarray:
    """Background everywhere, each blob (y0, y1, x0, x1) of its class."""
    logits = np.zeros((len(CLASSES), GRID, GRID), np.float32)
    logits[0] = 5.0
    for layer, boxes in blobs.items():
        for y0, y1, x0, x1 in boxes:
            logits[CLASSES.index(layer), y0:y1, x0:x1] = 10.0
    return logits


def test_cells_become_garments():
    found = detections(
        _logits(
            {
                "topwear": [(5, 15, 5, 15), (40, 50, 40, 50)],  # two tops, far apart: two garments
                "outerwear": [(20, 34, 20, 27), (20, 34, 29, 36)],  # an open jacket's halves: one
                "eyewear": [(60, 61, 60, 62)],  # two cells: noise
            }
        ),
        CLASSES,
    )
    layers = sorted(d.layer for d in found)
    assert layers == ["outerwear", "topwear", "topwear"]
    jacket = next(d for d in found if d.layer == "outerwear")
    assert jacket.box == (20, 20, 36, 34)
    assert all(0.9 < d.score <= 1.0 for d in found)


def test_boxes_and_cut_outs_are_in_look_pixels():
    # A tall look (letterboxed with padding left and right): a blue garment on a red background.
    look = Image.new("RGB", (300, 600), (220, 20, 20))
    garment = (60, 120, 180, 360)
    look.paste((20, 40, 200), garment)
    _, scale, (ox, oy) = letterbox(look)
    logits = np.zeros((len(CLASSES), GRID, GRID), np.float32)
    logits[0] = 5.0
    # The cells whose centres fall inside the garment, as a perfect detector would mark them.
    centres = (np.arange(GRID) + 0.5) * STRIDE
    xs = (centres - ox) / scale
    ys = (centres - oy) / scale
    inside = (ys[:, None] >= garment[1]) & (ys[:, None] < garment[3]) & (xs >= garment[0]) & (xs < garment[2])
    logits[CLASSES.index("topwear")][inside] = 10.0
    (det,) = detections(logits, CLASSES)
    region = cut_out(look, det, look_mask(det, SPEC, look.size, scale, (ox, oy)))
    cell = STRIDE / scale
    assert all(abs(a - b) <= cell for a, b in zip(region.box, garment)), (region.box, garment)
    assert region.source == "detector" and "t-shirt" in region.categories
    crop = np.asarray(Image.open(io.BytesIO(region.image)).convert("RGB")).reshape(-1, 3).astype(int)
    assert (
        crop.shape[0] > 0
        and Image.open(io.BytesIO(region.image)).size[0] == Image.open(io.BytesIO(region.image)).size[1]
    )
    red = np.sum((crop[:, 0] > 150) & (crop[:, 1] < 80))
    backdrop = np.sum(np.abs(crop - CATALOG_BACKDROP).sum(1) < 30)
    assert red / len(crop) < 0.03  # the background is cut away (JPEG and the mask edge aside)
    assert backdrop / len(crop) > 0.2  # onto the catalog's backdrop, square like a product photo


def test_an_empty_look_has_no_garments():
    assert detections(_logits({}), CLASSES) == []


@pytest.mark.parametrize("size", [(640, 480), (200, 900), (256, 256)])
def test_letterbox_keeps_proportions(size):
    pixels, scale, (ox, oy) = letterbox(Image.new("RGB", size, (255, 0, 0)))
    assert pixels.shape == (3, INPUT_SIZE, INPUT_SIZE)
    assert abs(scale * max(size) - INPUT_SIZE) < 1
    red = pixels[0] > 0.9
    ys, xs = np.nonzero(red)
    assert xs.min() == ox and ys.min() == oy
    assert abs((xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1) - size[0] / size[1]) < 0.05


def test_training_is_reproducible_and_the_export_passes_parity(tmp_path):
    import json

    import onnxruntime as ort
    import torch

    from export.detector import DetectorExport, TrainRequest, export_detector, train

    states = []
    for run in ("a", "b"):
        out = tmp_path / run / "det.pt"
        report = train(TrainRequest(looks=24, steps=3, batch=4, threads=1, out=out))
        states.append(torch.load(out, weights_only=True))
    assert report["classes"][0] == "background" and len(report["classes"]) == 9
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])  # same seed, same weights
    folder = export_detector(DetectorExport(version=3, repository=tmp_path / "repo", checkpoint=out))
    config = (tmp_path / "repo" / "garment_detector" / "config.pbtxt").read_text()
    assert (
        "dynamic_batching" in config and "background,topwear" in config and "dims: [ 3, 256, 256 ]" in config
    )
    record = json.loads((folder / "detector.json").read_text())
    assert record["parity"]["class_agreement"] >= 0.999
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(
        ["logits"], {"pixel_values": np.zeros((2, 3, INPUT_SIZE, INPUT_SIZE), np.float32)}
    )
    assert logits.shape == (2, 9, GRID, GRID)
