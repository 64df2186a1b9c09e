"""python -m export clip|siglip|dinov2 --arch ARCH [--checkpoint PATH | --random-init] --version N --target cpu|gpu
python -m export sam2|florence2 [--checkpoint DIR | --random-init] [--tiny | --size S] --version N --target cpu|gpu
python -m export trt --name clip --version N            (GPU hosts: TensorRT plans as a new version)
python -m export finetune --from-version N --world DIR --eval-world DIR   (fine-tune, export, compare)
python -m export train-detector [--looks N --steps N]   (the demo garment detector, on the hard world)
python -m export detector --version N [--checkpoint PATH]   (the garment detector as a Triton model)"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    for family, what, arch, arches in (
        ("clip", "an open_clip CLIP model (image + text towers)", "ViT-H-14", "open_clip name, or looksync-tiny"),
        ("siglip", "a SigLIP-style open_clip model (image + text)", "ViT-B-16-SigLIP",
         "open_clip name, or looksync-siglip-tiny"),
        ("dinov2", "a DINOv2 model from transformers (image only)", "dinov2-base",
         "dinov2-small|base|large or looksync-dinov2-tiny (with --checkpoint: ignored)"),
    ):  # fmt: skip
        clip = sub.add_parser(family, help=f"export {what}")
        clip.add_argument("--arch", default=arch, help=arches)
        weights = clip.add_mutually_exclusive_group()
        weights.add_argument(
            "--checkpoint",
            help="local checkpoint file (dinov2: a local HF model directory); never downloaded",
        )
        if family != "dinov2":
            weights.add_argument(
                "--pretrained", help="open_clip pretrained tag, from the local HF cache only"
            )
        weights.add_argument("--random-init", action="store_true", help="random weights (the default)")
        if family == "siglip":
            clip.add_argument("--tokenizer", help="local Hugging Face tokenizer directory (tokenizer.json)")
        clip.add_argument("--version", type=int, required=True, help="Triton version number to write")
        clip.add_argument("--target", choices=["cpu", "gpu"], default="cpu")
        clip.add_argument("--name", default=family, help="model name: Triton models are <name>_image etc.")
        clip.add_argument("--repository", type=Path, default=Path("model_repository"))
        clip.add_argument("--seed", type=int, default=0)
        clip.add_argument("--onnx-threads", type=int, default=0, help="cpu target: onnxruntime threads")
        clip.add_argument(
            "--precision",
            choices=["fp32", "fp16"],
            default="fp32",
            help="gpu target: fp16 weights and activations (fp32 inputs/outputs, LayerNorm in fp32)",
        )
        clip.add_argument(
            "--runner",
            choices=["inprocess", "bls"],
            default=None,
            help="where the wrappers run the encoder: in their own process (cpu default) or via BLS (gpu default)",
        )

    for name, what in (
        ("sam2", "SAM2 box prompts -> masks (sam2_mask)"),
        ("florence2", "Florence-2 grounding (florence2_ground)"),
    ):
        vision = sub.add_parser(name, help=f"export {what}")
        weights = vision.add_mutually_exclusive_group()
        weights.add_argument("--checkpoint", help="local Hugging Face model directory (never downloaded)")
        weights.add_argument("--random-init", action="store_true", help="random weights (the default)")
        vision.add_argument(
            "--tiny", action="store_true", help="the smallest config on the same code path (random-init only)"
        )
        sizes = "tiny|hiera-tiny|base-plus|large" if name == "sam2" else "tiny|base|large"
        vision.add_argument(
            "--size",
            default="hiera-tiny" if name == "sam2" else "base",
            help=f"random-init shapes: {sizes} (a checkpoint brings its own)",
        )
        vision.add_argument("--version", type=int, required=True, help="Triton version number to write")
        vision.add_argument("--target", choices=["cpu", "gpu"], default="cpu")
        vision.add_argument("--repository", type=Path, default=Path("model_repository"))
        vision.add_argument("--name", default=name, help=f"model name prefix: Triton models are {name}_* ")
        vision.add_argument("--seed", type=int, default=0)
        vision.add_argument("--onnx-threads", type=int, default=0, help="cpu target: onnxruntime threads")
        vision.add_argument(
            "--runner",
            choices=["inprocess", "bls"],
            default=None,
            help="where the ONNX parts run: in the python model (cpu default) or as Triton models via BLS (gpu default)",
        )
        if name == "florence2":
            vision.add_argument("--max-new-tokens", type=int, default=128, help="decoding limit per request")
            vision.add_argument(
                "--no-imprint", action="store_true", help="--tiny: keep the weights purely random"
            )

    trt = sub.add_parser("trt", help="TensorRT plans for an exported gpu-target version (GPU hosts only)")
    trt.add_argument("--name", default="clip")
    trt.add_argument("--version", type=int, required=True, help="the exported ONNX version to build from")
    trt.add_argument(
        "--as-version", type=int, default=None, help="the new version's number (default: next free)"
    )
    trt.add_argument("--repository", type=Path, default=Path("model_repository"))
    trt.add_argument("--min-batch", type=int, default=1)
    trt.add_argument("--opt-batch", type=int, default=16)
    trt.add_argument("--max-batch", type=int, default=64)
    trt.add_argument("--fp32", action="store_true", help="no fp16 (default: fp16, norms/softmax in fp32)")

    ft = sub.add_parser("finetune", help="fine-tune a served version on a world's catalog, export, compare")
    ft.add_argument("--name", default="clip")
    ft.add_argument("--from-version", type=int, required=True, help="the served version to start from")
    ft.add_argument(
        "--world", type=Path, required=True, help="training world (catalog.jsonl, images, looks.json)"
    )
    ft.add_argument("--eval-world", type=Path, help="held-out world for the comparison (recommended)")
    ft.add_argument("--version", type=int, help="the new version's number (default: next free)")
    ft.add_argument("--repository", type=Path, default=Path("model_repository"))
    ft.add_argument("--checkpoint", help="start from these weights instead of the version's recorded ones")
    ft.add_argument("--out", type=Path, help="fine-tuned checkpoint path (default finetune/<name>-v<M>.pt)")
    ft.add_argument("--steps", type=int, default=300)
    ft.add_argument("--batch", type=int, default=64)
    ft.add_argument("--lr", type=float, default=1e-4)
    ft.add_argument("--freeze-layers", type=int, default=0, help="leading residual blocks kept frozen")
    ft.add_argument(
        "--distill", type=float, default=0.0, help="weight of the distillation to the base towers"
    )
    ft.add_argument(
        "--wise", type=float, default=1.0, help="WiSE-FT: (1-a) base + a fine-tuned; 1 = no mixing"
    )
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--threads", type=int, default=2)
    ft.add_argument("--force", action="store_true", help="print the swap command even for a worse model")

    td = sub.add_parser("train-detector", help="train the demo garment detector on the synthetic hard world")
    td.add_argument("--looks", type=int, default=3000)
    td.add_argument("--steps", type=int, default=2500)
    td.add_argument("--batch", type=int, default=24)
    td.add_argument("--lr", type=float, default=3e-3)
    td.add_argument("--seed", type=int, default=0)
    td.add_argument("--threads", type=int, default=0)
    td.add_argument("--out", type=Path, help="weights path (default export/weights/garment-detector.pt)")
    det = sub.add_parser("detector", help="export the garment detector (ONNX, parity, Triton model)")
    det.add_argument("--version", type=int, default=1)
    det.add_argument("--checkpoint", type=Path, help="weights (default: the committed demo detector)")
    det.add_argument("--repository", type=Path, default=Path("model_repository"))
    det.add_argument("--name", default="garment_detector")
    det.add_argument("--target", choices=["cpu", "gpu"], default="cpu")
    det.add_argument("--onnx-threads", type=int, default=0)

    args = parser.parse_args(argv)
    if args.command == "train-detector":
        from export.detector import WEIGHTS, TrainRequest, train

        train(
            TrainRequest(
                looks=args.looks, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                threads=args.threads, out=args.out or WEIGHTS,
            )
        )  # fmt: skip
        return
    if args.command == "detector":
        from export.detector import WEIGHTS, DetectorExport, export_detector

        export_detector(
            DetectorExport(
                version=args.version, repository=args.repository, checkpoint=args.checkpoint or WEIGHTS,
                name=args.name, target=args.target, onnx_threads=args.onnx_threads,
            )
        )  # fmt: skip
        return
    if args.command == "finetune":
        import sys

        from export.finetune import FinetuneRequest, finetune

        record = finetune(
            FinetuneRequest(
                from_version=args.from_version, world=args.world, name=args.name, repository=args.repository,
                eval_world=args.eval_world, version=args.version, checkpoint=args.checkpoint, out=args.out,
                steps=args.steps, batch=args.batch, lr=args.lr, freeze_layers=args.freeze_layers,
                distill=args.distill, wise=args.wise, seed=args.seed, threads=args.threads, force=args.force,
            )
        )  # fmt: skip
        if record.get("recommended") is False:
            sys.exit(3)  # exported, but worse than the base: scripts must not swap it in
        return
    if args.command == "trt":
        from export.trt import TrtRequest, build_plans

        build_plans(
            TrtRequest(
                name=args.name,
                version=args.version,
                as_version=args.as_version,
                repository=args.repository,
                min_batch=args.min_batch,
                opt_batch=args.opt_batch,
                max_batch=args.max_batch,
                fp16=not args.fp32,
            )
        )
        return
    if args.command in ("sam2", "florence2") and args.tiny and args.checkpoint:
        parser.error("--tiny builds a random-init model; it cannot be combined with --checkpoint")
    if args.command == "sam2":
        from export.sam2 import Sam2Request, export_sam2

        export_sam2(
            Sam2Request(
                version=args.version,
                target=args.target,
                checkpoint=args.checkpoint,
                tiny=args.tiny,
                size=args.size,
                repository=args.repository,
                name=args.name,
                seed=args.seed,
                onnx_threads=args.onnx_threads,
                runner=args.runner or "",
            )
        )
    if args.command == "florence2":
        from export.florence2 import Florence2Request, export_florence2

        export_florence2(
            Florence2Request(
                version=args.version,
                target=args.target,
                checkpoint=args.checkpoint,
                tiny=args.tiny,
                size=args.size,
                imprint=not args.no_imprint,
                repository=args.repository,
                name=args.name,
                seed=args.seed,
                onnx_threads=args.onnx_threads,
                runner=args.runner or "",
                max_new_tokens=args.max_new_tokens,
            )
        )
    if args.command in ("clip", "siglip", "dinov2"):
        from export.clip import ExportRequest, export_clip

        export_clip(
            ExportRequest(
                family=args.command,
                tokenizer=getattr(args, "tokenizer", None),
                arch=args.arch,
                version=args.version,
                target=args.target,
                name=args.name,
                checkpoint=args.checkpoint,
                pretrained=getattr(args, "pretrained", None),
                repository=args.repository,
                seed=args.seed,
                onnx_threads=args.onnx_threads,
                runner=args.runner or "",
                precision=args.precision,
            )
        )


if __name__ == "__main__":
    main()
