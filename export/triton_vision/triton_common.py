"""Helpers shared by the python-backend models (imports triton_python_backend_utils lazily)."""

from __future__ import annotations

import json
import os


def invalid(pb_utils, message: str):
    try:
        return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    except (AttributeError, TypeError):  # older python backends have no error codes
        return pb_utils.TritonError(message)


def parameters(args) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def version_dir(args) -> str:
    return os.path.join(args["model_repository"], args["model_version"])


def load_meta(args, name: str) -> dict:
    with open(os.path.join(version_dir(args), name)) as fh:
        return json.load(fh)


def make_runner(pb_utils, args, meta: dict, params: dict[str, str]):
    """In-process onnxruntime sessions, or BLS calls to the part models (parameter `runner`)."""
    if __package__:
        from .onnx_parts import BlsParts, InProcessParts
    else:
        from onnx_parts import BlsParts, InProcessParts
    mode = params.get("runner", meta.get("runner", "inprocess"))
    if mode == "bls":
        return BlsParts(pb_utils, meta["parts"], int(args["model_version"]))
    if mode != "inprocess":
        raise ValueError(f"runner must be 'inprocess' or 'bls', got {mode!r}")
    return InProcessParts(version_dir(args), meta["parts"], int(params.get("intra_op_threads", "0") or 0))


def string_items(pb_utils, request, name: str, default: str | None = None) -> list[str] | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None if default is None else [default]
    raw = tensor.as_numpy().reshape(-1)
    return [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in raw]
