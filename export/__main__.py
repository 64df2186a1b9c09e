"""python -m export clip --arch ViT-H-14 [--checkpoint PATH | --random-init] --version N --target cpu|gpu"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    clip = sub.add_parser("clip", help="export an open_clip model (image + text towers)")
    clip.add_argument("--arch", default="ViT-H-14", help="open_clip architecture name, or looksync-tiny")
    weights = clip.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", help="local checkpoint file (never downloaded)")
    weights.add_argument("--pretrained", help="open_clip pretrained tag, from the local HF cache only")
    weights.add_argument("--random-init", action="store_true", help="random weights (the default)")
    clip.add_argument("--version", type=int, required=True, help="Triton version number to write")
    clip.add_argument("--target", choices=["cpu", "gpu"], default="cpu")
    clip.add_argument("--name", default="clip", help="model name: Triton models are <name>_image etc.")
    clip.add_argument("--repository", type=Path, default=Path("model_repository"))
    clip.add_argument("--seed", type=int, default=0)
    clip.add_argument("--onnx-threads", type=int, default=0, help="cpu target: onnxruntime threads")

    args = parser.parse_args(argv)
    if args.command == "clip":
        from export.clip import ExportRequest, export_clip

        export_clip(
            ExportRequest(
                arch=args.arch,
                version=args.version,
                target=args.target,
                name=args.name,
                checkpoint=args.checkpoint,
                pretrained=args.pretrained,
                repository=args.repository,
                seed=args.seed,
                onnx_threads=args.onnx_threads,
            )
        )


if __name__ == "__main__":
    main()
