"""Florence-2 grounding and SAM2 masks through the real tritonserver (CPU target, tiny exports),
and the Florence-2 + SAM2 localizer of the gateway on top of them."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from gateway.errors import DeadlineExceeded, InvalidArgument
from gateway.look.segment_localizer import FlorenceSam2Localizer, box_mask, cut_out
from tests.conftest import start_triton, wait_for
from tests.vision_fixtures import tiny_vision_repo


@pytest.fixture(scope="module")
def vision_triton(tmp_path_factory):
    pytest.importorskip("transformers")
    server = start_triton(tiny_vision_repo(), tmp_path_factory.mktemp("vision-triton"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tc(vision_triton):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{vision_triton.grpc_port}")
    yield client
    client.close()


def _png(width: int, height: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _bytes(name: str, *values: bytes) -> grpcclient.InferInput:
    data = np.array(values, dtype=np.object_).reshape(1, -1)
    tensor = grpcclient.InferInput(name, list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def _ground(tc, image: bytes, phrase: str, task: str | None = None):
    inputs = [_bytes("image", image), _bytes("phrase", phrase.encode())]
    if task is not None:
        inputs.append(_bytes("task", task.encode()))
    result = tc.infer("florence2_ground", inputs, model_version="1")
    return result.as_numpy("boxes"), result.as_numpy("labels"), result.as_numpy("text")


def _mask(tc, image: bytes, boxes: np.ndarray):
    data = np.asarray(boxes, dtype=np.float32).reshape(1, -1, 4)
    box_input = grpcclient.InferInput("boxes", list(data.shape), "FP32")
    box_input.set_data_from_numpy(data)
    result = tc.infer("sam2_mask", [_bytes("image", image), box_input], model_version="1")
    return result.as_numpy("masks"), result.as_numpy("iou_scores")


def test_metadata_lists_the_contract(tc):
    ground = tc.get_model_metadata("florence2_ground", as_json=True)
    assert [(i["name"], i["datatype"]) for i in ground["inputs"]] == [
        ("image", "BYTES"),
        ("phrase", "BYTES"),
        ("task", "BYTES"),
    ]
    assert [(o["name"], o["datatype"]) for o in ground["outputs"]] == [
        ("boxes", "FP32"),
        ("labels", "BYTES"),
        ("text", "BYTES"),
    ]
    mask = tc.get_model_metadata("sam2_mask", as_json=True)
    assert [(o["name"], o["datatype"]) for o in mask["outputs"]] == [
        ("masks", "UINT8"),
        ("iou_scores", "FP32"),
    ]


@pytest.mark.parametrize("task", [None, "<OD>"])
def test_grounding_returns_well_formed_boxes_inside_the_image(tc, task):
    width, height = 180, 240
    boxes, labels, text = _ground(tc, _png(width, height), "red t-shirt", task)
    n = boxes.shape[1]
    assert boxes.shape == (1, n, 4) and boxes.dtype == np.float32 and labels.shape == (1, n)
    # Random weights: where the boxes are is arbitrary. The tiny export is imprinted to answer
    # with one box, so there is at least one to check.
    assert n >= 1, text
    x0, y0, x1, y1 = boxes[0].T
    assert (x0 >= 0).all() and (x1 <= width).all() and (y0 >= 0).all() and (y1 <= height).all()
    assert (x0 < x1).all() and (y0 < y1).all()
    assert b"<loc_" in text[0, 0]


def test_concurrent_requests_are_batched_and_each_gets_its_own_image_scale(vision_triton, tc):
    sizes = [(100 + 20 * i, 90 + 10 * i) for i in range(8)]
    phrases = ["hat", "a long phrase about blue denim jeans with a belt", "boots", "x"] * 2
    before = tc.get_inference_statistics("florence2_ground", as_json=True)["model_stats"][0]

    async def burst():
        import tritonclient.grpc.aio as aio

        client = aio.InferenceServerClient(f"127.0.0.1:{vision_triton.grpc_port}")
        try:
            calls = []
            for (w, h), phrase in zip(sizes, phrases):
                inputs = [
                    aio.InferInput("image", [1, 1], "BYTES"),
                    aio.InferInput("phrase", [1, 1], "BYTES"),
                ]
                inputs[0].set_data_from_numpy(np.array([[_png(w, h)]], dtype=np.object_))
                inputs[1].set_data_from_numpy(np.array([[phrase.encode()]], dtype=np.object_))
                calls.append(client.infer("florence2_ground", inputs))
            return await asyncio.gather(*calls)
        finally:
            await client.close()

    results = asyncio.run(burst())

    def counts():
        after = tc.get_inference_statistics("florence2_ground", as_json=True)["model_stats"][0]
        return (
            int(after.get("inference_count", 0)) - int(before.get("inference_count", 0)),
            int(after.get("execution_count", 0)) - int(before.get("execution_count", 0)),
        )

    # Triton counts a request when it is released, which can trail its response.
    inferences, executions = wait_for(lambda: (c := counts())[0] >= 8 and c, what="Triton's statistics")
    # >=: statistics of an earlier test's last request may land after `before` was read.
    assert inferences >= 8 and executions < inferences, (inferences, executions)
    for (w, h), phrase, result in zip(sizes, phrases, results):
        # Batched decoding (padded prompts of different lengths) gives what a lone request gets.
        alone, _, _ = _ground(tc, _png(w, h), phrase)
        np.testing.assert_allclose(result.as_numpy("boxes"), alone, atol=1e-4)


def test_bad_requests_are_invalid_argument(tc):
    image = _png(64, 64)
    cases = [
        ([_bytes("image", b"not an image"), _bytes("phrase", b"hat")], "invalid image"),
        ([_bytes("image", image), _bytes("phrase", b"   ")], "phrase is empty"),
        ([_bytes("image", image), _bytes("phrase", b"hat"), _bytes("task", b"<OCR>")], "task must be one of"),
        ([_bytes("image", image), _bytes("phrase", b"hat " * 400)], "phrase is too long"),
    ]
    for inputs, message in cases:
        with pytest.raises(Exception) as info:
            tc.infer("florence2_ground", inputs)
        assert "INVALID_ARGUMENT" in str(info.value) and message in str(info.value)


def test_sam2_returns_a_mask_of_the_image_size_per_box(tc):
    width, height = 150, 110
    boxes = np.array([[10, 10, 80, 100], [60, 5, 149, 60], [-20, -20, 500, 500]], dtype=np.float32)
    masks, iou = _mask(tc, _png(width, height, 3), boxes)
    assert masks.shape == (1, 3, height, width) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}
    assert iou.shape == (1, 3) and np.isfinite(iou).all()
    empty, no_iou = _mask(tc, _png(width, height, 3), np.zeros((0, 4), dtype=np.float32))
    assert empty.shape == (1, 0, height, width) and no_iou.shape == (1, 0)
    with pytest.raises(Exception, match="INVALID_ARGUMENT"):
        _mask(tc, _png(width, height), np.array([[0, 0, np.nan, 5]], dtype=np.float32))


# ------------------------------------------------------------------------- the localizer --


def _look(width: int = 160, height: int = 320) -> bytes:
    """A figure-ish picture: coloured blocks on a light background."""
    img = Image.new("RGB", (width, height), (235, 235, 230))
    px = img.load()
    for y in range(height):
        for x in range(width):
            if 50 <= x < 110 and 60 <= y < 150:
                px[x, y] = (200, 30, 40)
            elif 55 <= x < 105 and 150 <= y < 270:
                px[x, y] = (30, 50, 160)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_localizer_cuts_each_grounded_layer_out_as_a_png(vision_triton):
    look = _look()

    async def run():
        localizer = FlorenceSam2Localizer(
            f"127.0.0.1:{vision_triton.grpc_port}", ground_version=1, mask_version=1
        )
        try:
            return await localizer.regions_for(
                look, {"topwear": "t-shirt", "bottomwear": "jeans", "bag": ""}, 30
            )
        finally:
            await localizer.close()

    regions = asyncio.run(run())
    assert set(regions) == {"topwear", "bottomwear"}  # an empty phrase asks for nothing
    assert "jeans" in regions["bottomwear"].categories and "t-shirt" in regions["topwear"].categories
    for layer, region in regions.items():
        assert region.zone == layer
        left, top, right, bottom = region.box
        assert 0 <= left < right <= 160 and 0 <= top < bottom <= 320
        crop = Image.open(io.BytesIO(region.image))
        assert crop.format == "PNG" and crop.size == (right - left, bottom - top)
        assert np.asarray(crop).size > 0


def test_localizer_sync_protocol_and_deadline(vision_triton):
    url = f"127.0.0.1:{vision_triton.grpc_port}"
    localizer = FlorenceSam2Localizer(url)
    regions = localizer.regions(Image.open(io.BytesIO(_look())))
    assert regions and all(Image.open(io.BytesIO(r.image)).size[0] > 0 for r in regions)

    async def too_fast():
        other = FlorenceSam2Localizer(url)
        try:
            return await other.regions_for(_look(), {"topwear": "t-shirt"}, 1e-4)
        finally:
            await other.close()

    with pytest.raises(DeadlineExceeded):
        asyncio.run(too_fast())


class _FakeResult:
    def __init__(self, values):
        self.values = values

    def as_numpy(self, name):
        return self.values[name]


class _FakeTriton:
    """Stands in for tritonclient's aio client: boxes only for 'hat', masks that are empty."""

    def __init__(self, size):
        self.size = size
        self.calls = []

    async def infer(self, model, inputs, model_version="", outputs=None, client_timeout=None):
        self.calls.append((model, client_timeout))
        if model == "florence2_ground":
            found = b"hat" in inputs[1]._raw_content  # the serialized phrase
            boxes = (
                np.array([[[10, 5, 40, 30]]], dtype=np.float32) if found else np.zeros((1, 0, 4), np.float32)
            )
            return _FakeResult({"boxes": boxes})
        n = 1
        return _FakeResult({"masks": np.zeros((1, n, self.size[1], self.size[0]), dtype=np.uint8)})


def test_localizer_without_boxes_or_masks_falls_back_sensibly():
    fake = _FakeTriton((64, 48))
    localizer = FlorenceSam2Localizer(fake, default_timeout_s=5)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 10)).save(buf, "PNG")
    regions = asyncio.run(
        localizer.regions_for(buf.getvalue(), {"headwear": "hat", "eyewear": "sunglasses"}, 5)
    )
    # No box for the sunglasses: that layer is absent. SAM2 found nothing inside the hat's box:
    # the box itself is cut out.
    assert set(regions) == {"headwear"}
    assert regions["headwear"].box == (10, 5, 40, 30)
    assert all(0 < timeout <= 5 for _, timeout in fake.calls)
    with pytest.raises(InvalidArgument):
        asyncio.run(localizer.regions_for(b"junk", {"headwear": "hat"}, 5))


def test_cut_out_puts_the_garment_on_white_and_crops_to_the_mask():
    look = Image.new("RGB", (20, 10), (0, 0, 0))
    mask = np.zeros((10, 20), dtype=np.uint8)
    mask[2:6, 3:9] = 1
    mask[5, 3] = 0
    box, png = cut_out(look, mask)
    assert box == (3, 2, 9, 6)
    crop = np.asarray(Image.open(io.BytesIO(png)))
    assert crop.shape == (4, 6, 3) and (crop[0, 0] == 0).all() and (crop[3, 0] == 255).all()
    assert cut_out(look, np.zeros((10, 20), dtype=np.uint8)) is None
    assert box_mask(np.array([[-5, 8, 4.2, 50]]), 20, 10).sum() == 5 * 2
