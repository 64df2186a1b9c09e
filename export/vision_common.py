"""Shared steps of the SAM2 and Florence-2 exports: ONNX export, parity, atomic versions.

A version is assembled in hidden staging folders (`<model>/.<N>.tmp`) and renamed into place
only after every part passed its parity check, parts before the model that calls them, so
Triton never sees a half-written or wrong version; an existing version is never overwritten.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
VISION_CODE = HERE / "triton_vision"
IMAGE_CODE = HERE / "triton" / "preprocess.py"
MIN_COSINE = 0.9999
RUNTIME_FILES = ("image_ops.py", "onnx_parts.py", "triton_common.py")


def log(msg: str, t0: float) -> None:
    print(f"[export {time.monotonic() - t0:6.1f}s] {msg}", flush=True)


def offline() -> None:
    """Nothing in an export may reach a hub: weights and processors come from local folders."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def export_onnx(
    module, args: tuple, path: Path, input_names, output_names, dynamic_axes, opset: int = 17
) -> None:
    """Legacy (TorchScript) exporter, one file (or one `.data` file beside it when over 1 GiB)."""
    import onnx
    import torch

    module.eval()
    tmp = path.parent / f".raw-{path.stem}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(tmp / "model.onnx"),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                dynamo=False,
            )
        model = onnx.load(str(tmp / "model.onnx"), load_external_data=False)
        if _external(model):
            # Over protobuf's 2 GB the exporter wrote one file per tensor: copy them into one
            # file tensor by tensor rather than loading them (ViT-H/14: 3.9 GB held twice).
            _merge_external_data(model, tmp, path)
        else:
            big = sum(t.ByteSize() for t in model.graph.initializer) > (1 << 30)
            onnx.save_model(
                model,
                str(path),
                save_as_external_data=big,
                all_tensors_to_one_file=True,
                location=f"{path.name}.data" if big else None,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    onnx.checker.check_model(str(path))


def _external(model) -> bool:
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in _tensors(model.graph))


def _tensors(graph):
    """Every tensor of a graph: initializers and Constant nodes' values, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _merge_external_data(model, source_dir: Path, path: Path, align: int = 4096) -> None:
    """Write `model` (whose tensors live in files under source_dir) as `path` plus one
    `<path>.data`, offsets aligned so the data can be memory-mapped."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    location = f"{path.name}.data"
    with open(path.parent / location, "wb") as out:
        for tensor in _tensors(model.graph):
            if not uses_external_data(tensor):
                continue
            info = ExternalDataInfo(tensor)
            with open(source_dir / info.location, "rb") as src:
                src.seek(info.offset or 0)
                data = src.read(info.length) if info.length else src.read()
            pad = -out.tell() % align
            out.write(b"\0" * pad)
            offset = out.tell()
            out.write(data)
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", offset), ("length", len(data))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
    onnx.save_model(model, str(path))


def session(path: Path, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class Parity:
    part: str
    max_abs: float = 0.0
    min_cosine: float = 1.0
    scale: float = 0.0  # largest |reference| value seen, for judging max_abs

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        ref = np.asarray(ref, dtype=np.float64)
        got = np.asarray(got, dtype=np.float64)
        if ref.shape != got.shape:
            raise SystemExit(f"{self.part}: ONNX output shape {got.shape} != PyTorch {ref.shape}")
        if ref.size == 0:
            return
        self.max_abs = max(self.max_abs, float(np.abs(ref - got).max()))
        self.scale = max(self.scale, float(np.abs(ref).max()))
        a = ref.reshape(ref.shape[0], -1) if ref.ndim > 1 else ref.reshape(1, -1)
        b = got.reshape(a.shape)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        live = norms > 1e-12
        if live.any():
            cos = (a[live] * b[live]).sum(1) / norms[live]
            self.min_cosine = min(self.min_cosine, float(cos.min()))

    @property
    def tolerance(self) -> float:
        return 1e-3 * max(1.0, self.scale)

    @property
    def ok(self) -> bool:
        return self.min_cosine >= MIN_COSINE and self.max_abs <= self.tolerance

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"parity {self.part}: max abs diff {self.max_abs:.2e} (tolerance {self.tolerance:.1e}), "
            f"min cosine {self.min_cosine:.7f} -> {verdict}"
        )

    def as_json(self) -> dict:
        return {"max_abs_diff": self.max_abs, "min_cosine": self.min_cosine}


class VersionWriter:
    """Staging folders for one version of several Triton models, renamed into place together."""

    def __init__(self, repository: Path, version: int, models: list[str]):
        self.repo = Path(repository)
        self.version = int(version)
        self.models = list(models)
        self.staging = {m: self.repo / m / f".{self.version}.tmp" for m in self.models}
        self.final = {m: self.repo / m / str(self.version) for m in self.models}
        for final in self.final.values():
            if final.exists():
                raise SystemExit(f"{final} already exists: pick a new --version (versions are immutable)")
        for path in self.staging.values():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        self.configs: dict[str, str] = {}

    def __getitem__(self, model: str) -> Path:
        return self.staging[model]

    def copy_code(self, model: str, entry: str, files: tuple[str, ...]) -> None:
        """The python model (`entry` becomes model.py) and the modules it imports."""
        shutil.copy(VISION_CODE / entry, self.staging[model] / "model.py")
        for name in files:
            shutil.copy(VISION_CODE / name, self.staging[model] / name)
        shutil.copy(IMAGE_CODE, self.staging[model] / "preprocess.py")

    def abort(self) -> None:
        for path in self.staging.values():
            shutil.rmtree(path, ignore_errors=True)

    def commit(self) -> dict[str, Path]:
        """Configs, then versions in the order given (parts first, their caller last)."""
        for model, text in self.configs.items():
            (self.repo / model / "config.pbtxt").write_text(text)
        for model in self.models:
            self.staging[model].rename(self.final[model])
        return self.final


def check_parity(results: list[Parity], writer: VersionWriter, t0: float) -> None:
    for result in results:
        log(result.line(), t0)
    failed = [r.part for r in results if not r.ok]
    if failed:
        writer.abort()
        raise SystemExit(f"ONNX Runtime differs from PyTorch in {', '.join(failed)}: nothing written")


def seconds(fn, repeat: int = 5) -> float:
    """Median wall time of `fn()` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))
