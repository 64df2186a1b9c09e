"""A model over protobuf's 2 GB limit (ViT-H/14 is ~3.9 GB in fp32) goes through the same
export, parity gate and Triton load as the tiny one, as ONNX with external data."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import tritonclient.grpc as grpcclient

from tests.conftest import REPO, start_triton

TWO_GB = 2**31


def test_a_model_over_2gb_exports_as_external_data_that_triton_serves(tmp_path):
    # The tiny config with its token table widened (unused rows; the tokenizer is unchanged):
    # 4.3 M x 128 fp32 = 2.2 GB in one initializer, quick to export, cheap to run.
    config = json.loads((REPO / "export" / "configs" / "looksync-tiny.json").read_text())
    config["text_cfg"]["vocab_size"] = 4_300_000
    arch = tmp_path / "looksync-tiny-2gb.json"
    arch.write_text(json.dumps(config))
    repo = tmp_path / "repo"
    # In a process of its own, as a user runs it (and so its memory is returned).
    result = subprocess.run(
        [sys.executable, "-m", "export", "clip", "--arch", str(arch), "--version", "1",
         "--repository", str(repo)],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    folder = repo / "clip_text_encoder" / "1"
    assert (folder / "model.onnx.data").stat().st_size > TWO_GB
    assert (folder / "model.onnx").stat().st_size < 10_000_000  # the graph only
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data", "model.py"]
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    locations = {
        entry.value for t in graph.graph.initializer for entry in t.external_data if entry.key == "location"
    }
    assert locations == {"model.onnx.data"}  # one file, relative: the folder can move
    meta = json.loads((repo / "clip_text" / "1" / "preprocess.json").read_text())
    assert meta["parity_min_cosine"]["text_encoder"] >= 0.9999

    server = start_triton(repo, tmp_path / "triton")
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    try:
        texts = [b"a red striped shirt", b"black leather boots"]
        inp = grpcclient.InferInput("text", [2, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[t] for t in texts], dtype=object))
        served = client.infer("clip_text", [inp], model_version="1", client_timeout=120).as_numpy("embedding")
    finally:
        client.close()
        server.stop()
    # The same file (moved away from where it was written) in onnxruntime directly.
    moved = tmp_path / "moved"
    folder.rename(moved)
    session = ort.InferenceSession(str(moved / "model.onnx"), providers=["CPUExecutionProvider"])
    from export.triton.text_tokenizer import TextTokenizer

    tokenizer = TextTokenizer.from_version(repo / "clip_text" / "1", meta)
    ids, _ = tokenizer([t.decode() for t in texts])
    (direct,) = session.run(["embedding"], {"input_ids": ids})
    np.testing.assert_allclose(served, direct, atol=1e-5)
