"""benchmarks/gpu_vith14.py runs on a GPU host with nothing but PyTorch: its own ViT-H/14
towers must have open_clip's shapes, and the script must run end to end (checked on the CPU
with a narrow model; its figures are not measured here)."""

import json
import subprocess
import sys

import pytest

from benchmarks.gpu_vith14 import VIT_H14, build_towers
from tests.conftest import REPO

torch = pytest.importorskip("torch")


def test_the_towers_are_open_clips_vit_h14():
    open_clip = pytest.importorskip("open_clip")
    ref = open_clip.get_model_config("ViT-H-14")
    vision, text = ref["vision_cfg"], ref["text_cfg"]
    assert (VIT_H14["vision_width"], VIT_H14["vision_layers"], VIT_H14["patch_size"]) == (
        vision["width"], vision["layers"], vision["patch_size"])  # fmt: skip
    assert VIT_H14["vision_width"] // VIT_H14["vision_heads"] == vision["head_width"]
    assert (VIT_H14["text_width"], VIT_H14["text_layers"], VIT_H14["text_heads"]) == (
        text["width"], text["layers"], text["heads"])  # fmt: skip
    assert VIT_H14["embed_dim"] == ref["embed_dim"] and VIT_H14["context_length"] == text["context_length"]
    with torch.device("meta"):  # shapes only: no 4 GB allocated
        towers = build_towers(torch, VIT_H14)
    params = [sum(p.numel() for p in t.parameters()) for t in towers]
    # open_clip counts 986.1 M (visual 632.1 M, text 354.0 M incl. its logit scale).
    assert round(params[0] / 1e6, 1) == 632.1 and round(params[1] / 1e6, 1) == 354.0


def test_the_script_runs_end_to_end_without_a_gpu(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_vith14", "--cpu-check", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "gpu_vith14_cpu_check.json").read_text())
    assert {(r["tower"], r["batch"]) for r in figures["rows"]} == {
        (t, b) for t in ("image", "text") for b in (1, 2)
    }
    assert all(r["per_s"] > 0 and r["of_h100_limit"] > 0 for r in figures["rows"])
    assert (tmp_path / "gpu_vith14_cpu_check.png").stat().st_size > 10_000
    assert "| image | bf16 | eager | 1 |" in result.stdout
