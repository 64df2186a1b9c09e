"""SAM2 + Florence-2 on the CPU target: per-part latency, and where the decode loop should live.

    python -m benchmarks.vision_latency [--requests 30] [--threads 1]

Exports the tiny configs (random weights; Florence-2 imprinted so it emits a box) into a
temporary repository twice: `florence2_ground` with the ONNX parts in-process, and
`florencebls_ground` whose parts are separate Triton models called through BLS. Then:

1. each ONNX part alone in onnxruntime (median of repeated runs);
2. through a real tritonserver, one request at a time: grounding (both placements), SAM2
   masks, and the gateway's localizer for a look with three phrases.

Needs the export extra (torch, transformers). Prints a table; nothing is written to the repo.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from export.vision_common import seconds


def _png(width: int, height: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _ms(fn, repeat: int) -> float:
    return seconds(fn, repeat) * 1000


def part_latencies(repo: Path, threads: int, repeat: int) -> dict[str, float]:
    from export.triton_vision.bart_tokenizer import BartTokenizer
    from export.triton_vision.florence2_runtime import Florence2Grounder, Florence2Spec
    from export.triton_vision.image_ops import square_pixels
    from export.triton_vision.onnx_parts import InProcessParts
    from export.triton_vision.sam2_runtime import Sam2Masker, Sam2Spec

    out = {}
    sam_dir = repo / "sam2_mask/1"
    meta = json.loads((sam_dir / "sam2.json").read_text())
    masker = Sam2Masker(Sam2Spec.from_json(meta), InProcessParts(str(sam_dir), meta["parts"], threads))
    image = Image.open(io.BytesIO(_png(400, 600)))
    pixels = square_pixels(image, masker.spec.image)[None]
    emb = masker.run(
        "image_encoder",
        {"pixel_values": pixels},
        ["image_embeddings_0", "image_embeddings_1", "image_embeddings_2"],
    )
    out["sam2 image_encoder (1 image)"] = _ms(
        lambda: masker.run("image_encoder", {"pixel_values": pixels}, list(emb)), repeat
    )
    box = np.array([[50, 80, 300, 500]], dtype=np.float32)
    out["sam2 mask_decoder (1 box)"] = _ms(lambda: masker.low_res(emb, 0, box, image.size), repeat)
    out["sam2 mask upsampling to 400x600 (numpy)"] = (
        _ms(lambda: masker.masks(emb, 0, box, image.size), repeat) - out["sam2 mask_decoder (1 box)"]
    )

    flo_dir = repo / "florence2_ground/1"
    meta = json.loads((flo_dir / "florence2.json").read_text())
    spec = Florence2Spec.from_json(meta)
    run = InProcessParts(str(flo_dir), meta["parts"], threads)
    grounder = Florence2Grounder(spec, BartTokenizer(str(flo_dir / meta["tokenizer"])), run)
    pv = square_pixels(image, spec.image)[None]
    feats = run("vision_encoder", {"pixel_values": pv}, ["image_features"])["image_features"]
    ids, mask = grounder._pad([grounder.prompt_ids("<CAPTION_TO_PHRASE_GROUNDING>", "a red t-shirt")])
    enc_feeds = {"input_ids": ids, "attention_mask": mask, "image_features": feats}
    enc = run("encoder", enc_feeds, ["encoder_hidden_states"])["encoder_hidden_states"]
    layers = spec.decoder_layers
    init_out = ["logits"] + [
        f"present.{i}.{a}.{kv}" for i in range(layers) for a in ("self", "cross") for kv in ("key", "value")
    ]
    start = np.full((1, 1), spec.decoder_start_token_id, dtype=np.int64)
    init_feeds = {"decoder_input_ids": start, "encoder_hidden_states": enc, "encoder_attention_mask": mask}
    init = run("decoder_init", init_feeds, init_out)
    step_feeds = {"input_ids": start, "encoder_attention_mask": mask, "encoder_hidden_states": enc}
    for name, value in init.items():
        if name != "logits":
            step_feeds[name.replace("present.", "past.")] = (
                np.concatenate([value] * 10, axis=2) if ".self." in name else value
            )
    step_out = ["logits"] + [f"present.{i}.self.{kv}" for i in range(layers) for kv in ("key", "value")]
    out["florence2 vision_encoder (1 image)"] = _ms(
        lambda: run("vision_encoder", {"pixel_values": pv}, ["image_features"]), repeat
    )
    out["florence2 encoder (1 prompt)"] = _ms(
        lambda: run("encoder", enc_feeds, ["encoder_hidden_states"]), repeat
    )
    out["florence2 decoder_init"] = _ms(lambda: run("decoder_init", init_feeds, init_out), repeat)
    out["florence2 decoder_step (past 10)"] = _ms(lambda: run("decoder_step", step_feeds, step_out), repeat)
    out["florence2 whole grounding in-process (no Triton)"] = _ms(
        lambda: grounder.ground([image], ["<CAPTION_TO_PHRASE_GROUNDING>"], ["a red t-shirt"]), repeat
    )
    return out


def triton_latencies(repo: Path, work: Path, requests: int) -> tuple[dict[str, float], dict[str, int]]:
    import tritonclient.grpc as grpcclient

    from gateway.look.segment_localizer import FlorenceSam2Localizer
    from tests.conftest import start_triton

    server = start_triton(repo, work)
    out, calls = {}, {}
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        look = _png(400, 600)

        def bytes_input(name, value):
            tensor = grpcclient.InferInput(name, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[value]], dtype=np.object_))
            return tensor

        def ground(model):
            return client.infer(model, [bytes_input("image", look), bytes_input("phrase", b"a red t-shirt")])

        for model in ("florence2_ground", "florencebls_ground"):
            out[f"{model} request"] = _ms(lambda m=model: ground(m), requests)
        boxes = ground("florence2_ground").as_numpy("boxes")
        box_input = grpcclient.InferInput("boxes", list(boxes.shape), "FP32")
        box_input.set_data_from_numpy(boxes.astype(np.float32))
        out["sam2_mask request (1 box, 400x600 look)"] = _ms(
            lambda: client.infer("sam2_mask", [bytes_input("image", look), box_input]), requests
        )
        stats = client.get_inference_statistics("florencebls_decoder_step", as_json=True)["model_stats"][0]
        ground_stats = client.get_inference_statistics("florencebls_ground", as_json=True)["model_stats"][0]
        calls["bls decoder_step calls per request"] = round(
            int(stats["inference_count"]) / int(ground_stats["inference_count"])
        )

        async def localize():
            localizer = FlorenceSam2Localizer(f"127.0.0.1:{server.grpc_port}")
            try:
                phrases = {"topwear": "t-shirt", "bottomwear": "jeans", "footwear": "sneakers"}
                return await localizer.regions_for(look, phrases, 30)
            finally:
                await localizer.close()

        out["localizer.regions_for (3 phrases)"] = _ms(lambda: asyncio.run(localize()), max(5, requests // 3))
        client.close()
    finally:
        server.stop()
    return out, calls


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per model")
    args = parser.parse_args(argv)

    from export.florence2 import Florence2Request, export_florence2
    from export.sam2 import Sam2Request, export_sam2

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "model_repository"
        export_sam2(Sam2Request(version=1, tiny=True, repository=repo, onnx_threads=args.threads))
        export_florence2(Florence2Request(version=1, tiny=True, repository=repo, onnx_threads=args.threads))
        export_florence2(
            Florence2Request(
                version=1,
                tiny=True,
                repository=repo,
                onnx_threads=args.threads,
                name="florencebls",
                runner="bls",
            )
        )
        parts = part_latencies(repo, args.threads, args.requests)
        served, calls = triton_latencies(repo, Path(tmp) / "triton", args.requests)
    print("\n| what (tiny configs, CPU target) | median ms |\n|---|---|")
    for name, ms in {**parts, **served}.items():
        print(f"| {name} | {ms:.2f} |")
    for name, n in calls.items():
        print(f"{name}: {n}")
    bls = served["florencebls_ground request"] - served["florence2_ground request"]
    per_call = bls / (calls["bls decoder_step calls per request"] + 3)
    print(f"BLS costs {bls:.2f} ms more per grounding, ~{per_call:.2f} ms per BLS call")


if __name__ == "__main__":
    main()
