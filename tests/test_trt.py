"""The TensorRT plan path, as far as a machine without TensorRT can check it."""

import asyncio
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.triton_config import ServingPlan, all_configs
from export.trt import keep_fp32, next_version, plan_config, towers_of, write_trt_version
from gateway.errors import Unavailable
from gateway.index.base import EmbeddingSpace
from gateway.index.embedded import EmbeddedIndex
from gateway.models import TritonModels, rollback
from tests.conftest import REPO, start_triton, wait_for


@pytest.mark.parametrize("tower", ["image", "text"])
def test_plan_configs_parse_and_keep_the_contract(tower):
    cfg = text_format.Parse(plan_config("clip", tower, 224), model_config_pb2.ModelConfig())
    onnx = text_format.Parse(
        all_configs(ServingPlan("clip", "gpu", 224, 77))[f"clip_{tower}_encoder"],
        model_config_pb2.ModelConfig(),
    )
    assert cfg.platform == "tensorrt_plan" and cfg.name == onnx.name + "_trt"
    assert [i.name for i in cfg.input] == [i.name for i in onnx.input]
    assert [o.name for o in cfg.output] == [o.name for o in onnx.output]
    assert cfg.max_batch_size == onnx.max_batch_size
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


def test_precision_sensitive_layers_stay_fp32():
    assert keep_fp32("NORMALIZATION") and keep_fp32("SOFTMAX") and keep_fp32("REDUCE")
    assert not keep_fp32("MATRIX_MULTIPLY") and not keep_fp32("CONVOLUTION")


def test_without_tensorrt_the_command_says_what_to_do(tiny_repo):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here: the GPU path applies")
    except ImportError:
        pass
    result = subprocess.run(
        [sys.executable, "-m", "export", "trt", "--version", "1", "--repository", str(tiny_repo)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "TensorRT is not installed" in result.stderr and "GPU host" in result.stderr


# --- A TensorRT version beside the ONNX ones (config only: no TensorRT or GPU needed) ---------


@pytest.fixture
def trt_repo(tiny_repo, tmp_path):
    """Version 1 (ONNX, cpu target) and version 2 added by `export trt` from it, with stand-in
    plan bytes: everything the exporter writes except a real engine."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    record = {"fp16": True, "batch_profile": [1, 16, 64]}
    write_trt_version(repo, "clip", 1, 2, {"image": b"engine-i", "text": b"engine-t"}, record, max_batch=64)
    return repo, before


def test_a_trt_version_leaves_every_onnx_file_alone_and_names_its_own_encoders(trt_repo):
    repo, before = trt_repo
    assert {p: p.read_bytes() for p in before} == before, "export trt changed an existing file"
    for tower in ("image", "text"):
        cfg = text_format.Parse(
            (repo / f"clip_{tower}_encoder_trt" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        assert cfg.name == f"clip_{tower}_encoder_trt" and cfg.platform == "tensorrt_plan"
        assert (
            repo / f"clip_{tower}_encoder_trt" / "2" / "model.plan"
        ).read_bytes() == f"engine-{tower[0]}".encode()
        meta = json.loads((repo / f"clip_{tower}" / "2" / "preprocess.json").read_text())
        assert meta[f"{tower}_encoder"] == f"clip_{tower}_encoder_trt" and meta["runner"] == "bls"
        assert meta["derived_from"] == 1 and meta["encoder_backend"] == "tensorrt" and meta["version"] == 2
        assert not (repo / f"clip_{tower}_encoder" / "2").exists()

    async def layout():  # the gRPC aio client needs a running loop, even unused
        models = TritonModels("127.0.0.1:1", repo, "clip")
        try:
            return models.on_disk(), models.models_for(1), models.models_for(2)
        finally:
            await models.close()

    on_disk, v1, v2 = asyncio.run(layout())
    assert on_disk == [1, 2]
    assert v1 == ["clip_image_encoder", "clip_text_encoder", "clip_image", "clip_text"]
    assert v2[:2] == ["clip_image_encoder_trt", "clip_text_encoder_trt"]
    # Versions are immutable; a TensorRT version is not built from another one.
    with pytest.raises(SystemExit, match="already exists"):
        write_trt_version(repo, "clip", 1, 2, {"image": b"x"}, {})
    with pytest.raises(SystemExit, match="already a TensorRT version"):
        towers_of(repo, "clip", 2)
    assert next_version(repo, "clip") == 3


def test_the_trt_exporter_refuses_what_it_cannot_build(tmp_path, tiny_repo):
    (tmp_path / "sam2_mask" / "1").mkdir(parents=True)
    with pytest.raises(SystemExit, match="embedding models .*SAM2 and Florence-2"):
        towers_of(tmp_path, "sam2", 1)
    with pytest.raises(SystemExit, match="not exported"):
        towers_of(tmp_path, "clip", 1)
    # Any embedding family's text tower is exercised with ids from its own tokenizer.
    towers = towers_of(tiny_repo, "clip", 1)
    assert [t.tower for t in towers] == ["image", "text"]
    ids = towers[1].sample(5)
    assert ids.shape == (5, 77) and ids.dtype == np.int64 and (ids[:, 0] == ids[0, 0]).all()


def test_older_onnx_versions_still_load_and_roll_back_after_a_trt_version(trt_repo, tmp_path, capfd):
    repo, _ = trt_repo
    # The CPU server has no TensorRT backend: it starts and leaves the TensorRT models out.
    server = start_triton(repo, tmp_path / "triton")
    url = f"127.0.0.1:{server.grpc_port}"
    client = grpcclient.InferenceServerClient(url)
    try:
        assert "not loading clip_image_encoder_trt: backend 'tensorrt'" in capfd.readouterr().err
        assert _embed(client, 1).shape == (1, 64)

        async def scenario():
            models = TritonModels(url, repo, "clip")
            index = EmbeddedIndex(tmp_path / "index", refresh_s=0)
            try:
                with pytest.raises(Unavailable, match="clip_image_encoder_trt"):
                    await models.serve_versions([1, 2])  # no TensorRT here
                await models.serve_versions([1])
                # Serving v2 (it would on a GPU host), roll back to v1: v1 loads and serves.
                await index.set_current(EmbeddingSpace("clip", 1, 64))
                await index.set_current(EmbeddingSpace("clip", 2, 64))
                space = await rollback(index, models)
                return space, await index.alias_target(), await models.loaded()
            finally:
                await index.close()
                await models.close()

        space, target, loaded = asyncio.run(scenario())
        assert space.version == 1 and target == space.index_name
        assert loaded["clip_image"] == [1] and loaded["clip_image_encoder"] == [1]
        assert loaded["clip_image_encoder_trt"] == []
        assert _embed(client, 1).shape == (1, 64)
    finally:
        client.close()
        server.stop()


def test_a_version_calls_the_encoder_it_names(trt_repo, tmp_path):
    """Version 2 runs on `clip_*_encoder_trt` through BLS although the wrappers' shared config
    says in-process. Here the TensorRT models are replaced by python-backend stand-ins on the
    same ONNX file, so the routing is checked on a CPU: same embeddings as v1, counted by the
    `_trt` models, which are unloaded again when no served version needs them."""
    repo, _ = trt_repo
    for tower, size in (("image", 64), ("text", 0)):
        trt_model = repo / f"clip_{tower}_encoder_trt"
        (trt_model / "2" / "model.plan").unlink()
        shutil.copy(repo / f"clip_{tower}_encoder" / "1" / "model.onnx", trt_model / "2" / "model.onnx")
        shutil.copy(REPO / "export" / "triton" / "onnx_encoder.py", trt_model / "2" / "model.py")
        config = all_configs(ServingPlan("clip", "cpu", size, 77))[f"clip_{tower}_encoder"]
        (trt_model / "config.pbtxt").write_text(config.replace(f"clip_{tower}_encoder", trt_model.name))
    server = start_triton(repo, tmp_path / "triton")
    url = f"127.0.0.1:{server.grpc_port}"
    client = grpcclient.InferenceServerClient(url)
    try:
        asyncio.run(_serve(url, repo, [1, 2]))
        v1, v2 = _embed(client, 1), _embed(client, 2)
        np.testing.assert_allclose(v2, v1, atol=1e-5)
        wait_for(
            lambda: _count(client, "clip_text_encoder_trt") >= 1,
            timeout_s=30,
            what="the TensorRT-named encoder to count version 2's request",
        )
        assert _count(client, "clip_text_encoder") == 0  # v1 ran in process
        loaded = asyncio.run(_serve(url, repo, [1]))
        assert loaded["clip_text_encoder_trt"] == [] and loaded["clip_text"] == [1]
    finally:
        client.close()
        server.stop()


def _embed(client, version: int) -> np.ndarray:
    data = np.array([[b"a red striped shirt"]], dtype=object)
    inp = grpcclient.InferInput("text", [1, 1], "BYTES")
    inp.set_data_from_numpy(data)
    result = client.infer("clip_text", [inp], model_version=str(version), client_timeout=60)
    return result.as_numpy("embedding")


def _count(client, model: str) -> int:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"]
    return sum(int(s.get("inference_count", 0)) for s in stats)


async def _serve(url, repo, versions) -> dict[str, list[int]]:
    models = TritonModels(url, repo, "clip")
    try:
        await models.serve_versions(versions)
        return await models.loaded()
    finally:
        await models.close()
