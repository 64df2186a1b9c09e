"""Embeddings from Triton: `<model>_text` and `<model>_image` at an explicit model version.

The version always comes from the index being searched (docs/ARCHITECTURE.md, "Embedding
identity"), so this client never picks "latest" on its own. Every call has a deadline; Triton's
failures are translated into the gateway's errors here and nowhere else.
"""

from __future__ import annotations

import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

from gateway.errors import DeadlineExceeded, InvalidArgument, ModelNotLoaded, Unavailable

# Reconnect quickly after Triton restarts: gRPC's default backoff grows to two minutes, which
# would keep answering UNAVAILABLE long after the server is back.
_CHANNEL_ARGS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


def _translate(exc: InferenceServerException, url: str, what: str) -> Exception:
    status = str(exc.status() or "")
    message = exc.message() or str(exc)
    if "INVALID_ARGUMENT" in status and "invalid image:" in message:
        return InvalidArgument("image: " + message.split("invalid image:", 1)[1].strip())
    if "DEADLINE_EXCEEDED" in status or "Deadline Exceeded" in message:
        return DeadlineExceeded(f"{what}: Triton did not answer within the deadline")
    if "NOT_FOUND" in status or "unknown model" in message or "is not found" in message:
        return ModelNotLoaded(f"{what}: not loaded in Triton ({message})")
    return Unavailable(f"{what}: Triton at {url} failed: {status} {message}".strip())


class TritonEmbedder:
    def __init__(self, url: str):
        self.url = url
        self.client = triton.InferenceServerClient(url, channel_args=_CHANNEL_ARGS)

    async def _infer(self, model: str, version: int | None, inputs, outputs: list[str], timeout_s: float):
        """`version` None: the latest Triton serves (models outside the embedding space only,
        such as the garment detector; embeddings always name theirs)."""
        if timeout_s <= 0:
            raise DeadlineExceeded(f"{model}: no time left in the request's deadline")
        what = model if version is None else f"{model} v{version}"
        version = "" if version is None else version
        try:
            result = await self.client.infer(
                model,
                inputs,
                model_version=str(version),
                outputs=[triton.InferRequestedOutput(o) for o in outputs],
                client_timeout=timeout_s,
            )
        except InferenceServerException as exc:
            raise _translate(exc, self.url, what) from None
        return [result.as_numpy(o) for o in outputs]

    async def embed_texts(
        self, model: str, version: int, texts: list[str], timeout_s: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """(n, dim) float32 embeddings and an (n,) bool 'truncated to the context' flag."""
        data = np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(-1, 1)
        tensor = triton.InferInput("text", list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        emb, truncated = await self._infer(
            f"{model}_text", version, [tensor], ["embedding", "truncated"], timeout_s
        )
        return emb.astype(np.float32), truncated.reshape(-1).astype(bool)

    async def embed_images(
        self, model: str, version: int, images: list[bytes], timeout_s: float
    ) -> np.ndarray:
        data = np.array(images, dtype=object).reshape(-1, 1)
        tensor = triton.InferInput("image", list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        (emb,) = await self._infer(f"{model}_image", version, [tensor], ["embedding"], timeout_s)
        return emb.astype(np.float32)

    async def ready_versions(self, model: str, timeout_s: float = 5.0) -> list[int]:
        """Versions of `<model>_image` that Triton reports READY (highest last)."""
        try:
            index = await self.client.get_model_repository_index(as_json=True, client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise _translate(exc, self.url, "model repository index") from None
        versions = {
            int(m["version"])
            for m in index.get("models", [])
            if m.get("name") == f"{model}_image" and m.get("state") == "READY" and m.get("version")
        }
        return sorted(versions)

    async def family(self, model: str, timeout_s: float = 5.0) -> tuple[str, tuple[str, ...]]:
        """(family, modalities) that export recorded on `<model>_image`'s config; models
        exported before families existed are CLIP with both towers."""
        try:
            config = await self.client.get_model_config(
                f"{model}_image", as_json=True, client_timeout=timeout_s
            )
        except InferenceServerException as exc:
            raise _translate(exc, self.url, f"{model}_image config") from None
        params = config.get("config", {}).get("parameters", {})
        family = params.get("family", {}).get("string_value", "clip")
        modalities = params.get("modalities", {}).get("string_value", "image,text")
        return family, tuple(m for m in modalities.split(",") if m)

    async def model_parameters(self, model: str, timeout_s: float = 5.0) -> dict[str, str]:
        """The string parameters of a model's config (what export recorded on it)."""
        try:
            config = await self.client.get_model_config(model, as_json=True, client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise _translate(exc, self.url, f"{model} config") from None
        params = config.get("config", {}).get("parameters", {})
        return {k: v.get("string_value", "") for k, v in params.items()}

    async def max_batch_size(self, model: str, timeout_s: float = 5.0) -> int:
        """The most items one request to `model` may carry (its config's max_batch_size)."""
        try:
            config = await self.client.get_model_config(model, as_json=True, client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise _translate(exc, self.url, f"{model} config") from None
        return int(config.get("config", {}).get("max_batch_size", 0) or 0)

    async def infer_array(self, model: str, name: str, array: np.ndarray, output: str, timeout_s: float):
        """One float32 tensor in, one out, on the latest version of `model`."""
        tensor = triton.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array.astype(np.float32))
        (out,) = await self._infer(model, None, [tensor], [output], timeout_s)
        return out

    async def live(self, timeout_s: float = 1.0) -> bool:
        try:
            return bool(await self.client.is_server_ready(client_timeout=timeout_s))
        except InferenceServerException:
            return False

    async def close(self) -> None:
        await self.client.close()
