"""The real tritonserver on the CPU target: metadata, parity with ONNX Runtime, dynamic batching."""

import asyncio
import io
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image

from export.triton.preprocess import ImageSpec, image_bytes_to_pixels
from export.triton.text_tokenizer import TextTokenizer
from gateway.embedder import TritonEmbedder
from gateway.errors import InvalidArgument
from tests.conftest import wait_for


@pytest.fixture(scope="module")
def tc(triton):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{triton.grpc_port}")
    yield client
    client.close()


def _run(coro):
    return asyncio.run(coro)


async def _with_embedder(triton, fn):
    embedder = TritonEmbedder(f"127.0.0.1:{triton.grpc_port}")
    try:
        return await fn(embedder)
    finally:
        await embedder.close()


def test_model_metadata_lists_the_contract(tc):
    image = tc.get_model_metadata("clip_image", as_json=True)
    assert [(i["name"], i["datatype"]) for i in image["inputs"]] == [("image", "BYTES")]
    assert [(o["name"], o["datatype"]) for o in image["outputs"]] == [("embedding", "FP32")]
    text = tc.get_model_metadata("clip_text", as_json=True)
    assert [(i["name"], i["datatype"]) for i in text["inputs"]] == [("text", "BYTES")]
    assert sorted((o["name"], o["datatype"]) for o in text["outputs"]) == [
        ("embedding", "FP32"),
        ("truncated", "BOOL"),
    ]
    encoder = tc.get_model_metadata("clip_image_encoder", as_json=True)
    assert encoder["inputs"][0]["name"] == "pixel_values" and encoder["versions"] == ["1"]


def _images(n: int) -> list[bytes]:
    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        arr = rng.integers(0, 255, (40 + i * 7, 90 - i * 3, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG" if i % 2 else "JPEG")
        out.append(buf.getvalue())
    return out


def test_triton_embeddings_equal_onnxruntime_directly(triton, tiny_repo: Path):
    images = _images(5)
    texts = ["red midi dress", "blue denim jacket with brass buttons", "x"]
    got_img = _run(_with_embedder(triton, lambda e: e.embed_images("clip", 1, images, 30)))
    got_txt, truncated = _run(_with_embedder(triton, lambda e: e.embed_texts("clip", 1, texts, 30)))

    meta = json.loads((tiny_repo / "clip_image/1/preprocess.json").read_text())
    spec = ImageSpec.from_meta(meta)
    pixels = np.stack([image_bytes_to_pixels(b, spec) for b in images])
    session = ort.InferenceSession(str(tiny_repo / "clip_image_encoder/1/model.onnx"))
    (ref_img,) = session.run(None, {"pixel_values": pixels})
    np.testing.assert_allclose(got_img, ref_img, atol=1e-5)

    tmeta = json.loads((tiny_repo / "clip_text/1/preprocess.json").read_text())
    tokenizer = TextTokenizer(str(tiny_repo / "clip_text/1" / tmeta["tokenizer_file"]), 77, 0, "lower")
    ids, _ = tokenizer(texts)
    session = ort.InferenceSession(str(tiny_repo / "clip_text_encoder/1/model.onnx"))
    (ref_txt,) = session.run(None, {"input_ids": ids})
    np.testing.assert_allclose(got_txt, ref_txt, atol=1e-5)
    assert not truncated.any()


def _stats(tc, model):
    stats = tc.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def test_dynamic_batching_groups_concurrent_requests(triton, tc):
    images = _images(4)
    # The wrapper runs the encoder in its own process on the cpu target: its executions are the
    # encoder's batches (test_bls_runner_... covers the encoder as its own Triton model).
    before = {m: _stats(tc, m) for m in ("clip_image",)}

    async def burst(embedder):
        calls = [embedder.embed_images("clip", 1, [images[i % 4]], 30) for i in range(64)]
        return await asyncio.gather(*calls)

    results = _run(_with_embedder(triton, burst))
    assert len(results) == 64 and all(r.shape == (1, 64) for r in results)
    for model, (inf0, exe0) in before.items():
        # Triton counts a request when it is released, which can trail its response a little.
        deadline = time.monotonic() + 10
        while (inf1 := _stats(tc, model)[0]) - inf0 < 64 and time.monotonic() < deadline:
            time.sleep(0.05)
        inf1, exe1 = _stats(tc, model)
        # >=: the session's Triton is shared, a straggler from an earlier test may land here.
        assert inf1 - inf0 >= 64, (model, inf1 - inf0)
        # Batched: fewer executions than inferences.
        assert exe1 - exe0 < inf1 - inf0, f"{model}: {exe1 - exe0} executions for 64 inferences"


def test_a_bad_image_fails_alone_inside_a_batch(triton):
    good = _images(2)

    async def mixed(embedder):
        return await asyncio.gather(
            embedder.embed_images("clip", 1, [good[0]], 30),
            embedder.embed_images("clip", 1, [b"not an image at all"], 30),
            embedder.embed_images("clip", 1, [good[1]], 30),
            return_exceptions=True,
        )

    a, bad, b = _run(_with_embedder(triton, mixed))
    assert a.shape == (1, 64) and b.shape == (1, 64)
    assert isinstance(bad, InvalidArgument) and "not a supported image format" in str(bad)


def test_long_text_is_truncated_and_flagged(triton):
    emb, truncated = _run(
        _with_embedder(triton, lambda e: e.embed_texts("clip", 1, ["floral " * 300, "short"], 30))
    )
    assert truncated.tolist() == [True, False]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def _reload(tc, repo: Path, model: str, **params) -> None:
    """Load `model` again with its config's parameters changed (explicit model control)."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    for key, value in params.items():
        config.parameters[key].string_value = value
    tc.load_model(model, config=json_format.MessageToJson(config, preserving_proto_field_name=True))


def test_wrappers_run_the_encoder_in_process_or_through_bls_with_the_same_answers(triton, tc, tiny_repo):
    """One hop on the cpu target: the encoder models are never called (and never open their
    session). Switched to the BLS runner (the GPU target's), the same version gives the same
    embeddings through the encoder models."""
    images, texts = _images(3), ["red dress", "striped shirt with a collar"]

    async def both(embedder):
        img = await embedder.embed_images("clip", 1, images, 30)
        txt, _ = await embedder.embed_texts("clip", 1, texts, 30)
        return img, txt

    encoders = ("clip_image_encoder", "clip_text_encoder")
    before = {m: _stats(tc, m)[0] for m in encoders}
    img_inprocess, txt_inprocess = _run(_with_embedder(triton, both))
    assert {m: _stats(tc, m)[0] for m in encoders} == before, "in-process runner called an encoder model"
    try:
        for model in ("clip_image", "clip_text"):
            _reload(tc, tiny_repo, model, runner="bls")
        img_bls, txt_bls = _run(_with_embedder(triton, both))
        # Triton counts a request when it is released, which can trail its response.
        wait_for(
            lambda: all(_stats(tc, m)[0] >= before[m] + 1 for m in encoders),
            timeout_s=30,
            what="the encoder models to count the BLS requests",
        )
    finally:
        for model in ("clip_image", "clip_text"):
            _reload(tc, tiny_repo, model)
    np.testing.assert_allclose(img_bls, img_inprocess, atol=1e-5)
    np.testing.assert_allclose(txt_bls, txt_inprocess, atol=1e-5)
