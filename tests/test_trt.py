"""The TensorRT plan path, as far as a machine without TensorRT can check it."""

import subprocess
import sys

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.triton_config import ServingPlan, all_configs
from export.trt import keep_fp32, plan_config
from tests.conftest import REPO


@pytest.mark.parametrize("tower", ["image", "text"])
def test_plan_configs_parse_and_keep_the_contract(tower):
    cfg = text_format.Parse(plan_config("clip", tower, 224), model_config_pb2.ModelConfig())
    onnx = text_format.Parse(
        all_configs(ServingPlan("clip", "gpu", 224, 77))[f"clip_{tower}_encoder"],
        model_config_pb2.ModelConfig(),
    )
    assert cfg.platform == "tensorrt_plan" and cfg.name == onnx.name
    assert [i.name for i in cfg.input] == [i.name for i in onnx.input]
    assert [o.name for o in cfg.output] == [o.name for o in onnx.output]
    assert cfg.max_batch_size == onnx.max_batch_size
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU


def test_precision_sensitive_layers_stay_fp32():
    assert keep_fp32("NORMALIZATION") and keep_fp32("SOFTMAX") and keep_fp32("REDUCE")
    assert not keep_fp32("MATRIX_MULTIPLY") and not keep_fp32("CONVOLUTION")


def test_without_tensorrt_the_command_says_what_to_do(tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here: the GPU path applies")
    except ImportError:
        pass
    result = subprocess.run(
        [sys.executable, "-m", "export", "trt", "--version", "1", "--repository", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "TensorRT is not installed" in result.stderr and "GPU host" in result.stderr
