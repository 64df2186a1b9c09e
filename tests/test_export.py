"""Export: ONNX parity with PyTorch, the written version folders, and config.pbtxt validity."""

import json

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.clip import ExportRequest, build_model, export_clip
from export.triton_config import ServingPlan, all_configs

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_onnx_matches_pytorch_at_batch_sizes_other_than_the_example(tiny_repo):
    model = build_model(ExportRequest(arch="looksync-tiny", version=1))
    image = ort.InferenceSession(str(tiny_repo / "clip_image_encoder/1/model.onnx"))
    text = ort.InferenceSession(str(tiny_repo / "clip_text_encoder/1/model.onnx"))
    rng = np.random.default_rng(3)
    for n in (2, 7):
        pixels = rng.standard_normal((n, 3, 64, 64), dtype=np.float32)
        ids = rng.integers(1, 49406, size=(n, 77))
        ids[:, 0], ids[:, 12] = 49406, 49407  # start, end of text (argmax pooling reads the end)
        ids[:, 13:] = 0
        with torch.no_grad():
            ref_img = torch.nn.functional.normalize(model.visual(torch.from_numpy(pixels)), dim=-1).numpy()
            ref_txt = model.encode_text(torch.from_numpy(ids), normalize=True).numpy()
        (got_img,) = image.run(None, {"pixel_values": pixels})
        (got_txt,) = text.run(None, {"input_ids": ids})
        assert got_img.shape == (n, 64)
        np.testing.assert_allclose(got_img, ref_img, atol=1e-5)
        np.testing.assert_allclose(got_txt, ref_txt, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got_img, axis=1), 1.0, atol=1e-5)


def test_version_folders_are_complete_and_record_their_identity(tiny_repo):
    meta = json.loads((tiny_repo / "clip_image/1/preprocess.json").read_text())
    assert (meta["model"], meta["version"], meta["dim"], meta["image_size"]) == ("clip", 1, 64, 64)
    assert min(meta["parity_min_cosine"].values()) >= 0.9999
    text_meta = json.loads((tiny_repo / "clip_text/1/preprocess.json").read_text())
    assert text_meta["context_length"] == 77
    for path in (
        "clip_image/1/model.py",
        "clip_image/1/preprocess.py",
        "clip_text/1/text_tokenizer.py",
        f"clip_text/1/{text_meta['tokenizer_file']}",
        "clip_image_encoder/1/model.py",
    ):
        assert (tiny_repo / path).is_file(), path
    assert not list(tiny_repo.glob("*/.*.tmp")), "staging folders left behind"


def test_existing_version_is_never_overwritten(tiny_repo):
    before = (tiny_repo / "clip_image_encoder/1/model.onnx").stat().st_mtime_ns
    with pytest.raises(SystemExit, match="already exists"):
        export_clip(ExportRequest(arch="looksync-tiny", version=1, repository=tiny_repo))
    assert (tiny_repo / "clip_image_encoder/1/model.onnx").stat().st_mtime_ns == before


def test_written_configs_parse_with_tritons_protobuf(tiny_repo):
    for name in ("clip_image", "clip_text", "clip_image_encoder", "clip_text_encoder"):
        cfg = parse_config((tiny_repo / name / "config.pbtxt").read_text())
        assert cfg.name == name
        assert cfg.max_batch_size == 64
        assert cfg.HasField("dynamic_batching")
        if name.endswith("_encoder"):  # batches arrive formed by the wrapper: no waiting there
            assert cfg.dynamic_batching.max_queue_delay_microseconds == 0
        else:  # the wrappers run the encoder themselves on the cpu target: they never wait
            assert cfg.dynamic_batching.max_queue_delay_microseconds == 0
            assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16, 32]
        assert cfg.version_policy.latest.num_versions == 2


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_targets_share_model_names_inputs_and_outputs(target):
    plan = ServingPlan(model="clip", target=target, image_size=224, context_length=77)
    cpu = {n: parse_config(t) for n, t in all_configs(ServingPlan("clip", "cpu", 224, 77)).items()}
    for name, text in all_configs(plan).items():
        cfg = parse_config(text)
        assert [i.name for i in cfg.input] == [i.name for i in cpu[name].input]
        assert [o.name for o in cfg.output] == [o.name for o in cpu[name].output]
        if target == "gpu" and name.endswith("_encoder"):
            assert cfg.backend == "onnxruntime"
            assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
            accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
            assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP16"
        else:
            assert cfg.backend == "python"
        if not name.endswith("_encoder"):  # the wrappers: one hop on cpu, BLS to the GPU encoder
            assert cfg.parameters["runner"].string_value == ("bls" if target == "gpu" else "inprocess")
            # Waiting for a fuller batch pays only when a GPU encoder is behind a BLS call.
            assert cfg.dynamic_batching.max_queue_delay_microseconds == (500 if target == "gpu" else 0)


def test_gpu_target_refuses_the_in_process_runner(tmp_path):
    with pytest.raises(SystemExit, match="runner 'bls' only"):
        export_clip(
            ExportRequest(
                arch="looksync-tiny", version=1, repository=tmp_path, target="gpu", runner="inprocess"
            )
        )
    assert not list(tmp_path.iterdir()), "nothing written"


def test_the_fp16_variant_keeps_the_contract_and_its_tolerance(tmp_path, tiny_repo):
    """`--precision fp16` (gpu target): fp16 weights, fp32 inputs and outputs, within the
    documented tolerance of the fp32 model on inputs the export did not check."""
    import onnx

    export_clip(
        ExportRequest(arch="looksync-tiny", version=1, repository=tmp_path, target="gpu", precision="fp16")
    )
    model = build_model(ExportRequest(arch="looksync-tiny", version=1))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    rng = np.random.default_rng(11)
    for tower in ("image", "text"):
        path = tmp_path / f"clip_{tower}_encoder/1/model.onnx"
        weights = onnx.load(str(path)).graph.initializer
        half = sum(t.ByteSize() for t in weights if t.data_type == onnx.TensorProto.FLOAT16)
        assert half > 0.9 * sum(t.ByteSize() for t in weights), "weights are not fp16"
        assert path.stat().st_size < 0.6 * (tiny_repo / f"clip_{tower}_encoder/1/model.onnx").stat().st_size
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        assert [i.type for i in session.get_outputs()] == ["tensor(float)"]
        if tower == "image":
            assert session.get_inputs()[0].type == "tensor(float)"
            x = rng.standard_normal((4, 3, 64, 64), dtype=np.float32)
            with torch.no_grad():
                ref = torch.nn.functional.normalize(model.visual(torch.from_numpy(x)), dim=-1).numpy()
        else:
            x = rng.integers(1, 49406, size=(4, 77))
            x[:, 0], x[:, 9], x[:, 10:] = 49406, 49407, 0
            with torch.no_grad():
                ref = model.encode_text(torch.from_numpy(x), normalize=True).numpy()
        (got,) = session.run(None, {session.get_inputs()[0].name: x})
        assert got.dtype == np.float32
        assert ((got * ref).sum(-1) / np.linalg.norm(got, axis=-1)).min() >= 0.999
        assert not np.allclose(got, ref, atol=1e-6)  # it is really fp16, not the fp32 graph
    meta = json.loads((tmp_path / "clip_image/1/preprocess.json").read_text())
    assert meta["precision"] == "fp16" and meta["parity_tolerance"] == 0.999
    assert min(meta["parity_min_cosine"].values()) >= 0.999
    # The Triton contract is the fp32 one: same configs as an fp32 gpu export.
    for name, text in all_configs(ServingPlan("clip", "gpu", 64, 77)).items():
        assert parse_config((tmp_path / name / "config.pbtxt").read_text()) == parse_config(text)


def test_fp16_is_refused_on_the_cpu_target(tmp_path):
    with pytest.raises(SystemExit, match="gpu target"):
        export_clip(ExportRequest(arch="looksync-tiny", version=1, repository=tmp_path, precision="fp16"))
    assert not list(tmp_path.iterdir())
