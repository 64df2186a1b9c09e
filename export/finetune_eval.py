"""Base and fine-tuned versions side by side on a held-out world, from the files Triton serves.

The quality harness's queries and metrics (benchmarks/quality.py: text -> product, image ->
product, look -> garment; R@1/R@5/R@10, MRR, nDCG@10, per category and gender), with each
version's own ONNX encoders, pre-processing and tokenizer run in process (the same code as its
Triton models) and exact search over the held-out catalog. Looks are cut as SearchLook cuts
them: by the repository's garment detector when it has one, else by body zones. `recommend` prints the swap command,
or refuses when the fine-tuned version is worse than the base.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TASKS = ("text", "image", "look")


class ServedVersion:
    """One version's encoders and pre-processing, in process."""

    def __init__(self, repo: Path, name: str, version: int):
        from export.finetune import version_meta
        from export.triton.encoder_runner import InProcessEncoder
        from export.triton.preprocess import ImageSpec
        from export.triton.text_tokenizer import TextTokenizer

        image_meta, text_meta = version_meta(repo, name, version)
        self.spec = ImageSpec.from_meta(image_meta)
        self.image = InProcessEncoder(
            str(repo / f"{name}_image_encoder" / str(version) / "model.onnx"), "pixel_values"
        )
        self.text = InProcessEncoder(
            str(repo / f"{name}_text_encoder" / str(version) / "model.onnx"), "input_ids"
        )
        self.tokenizer = TextTokenizer.from_version(repo / f"{name}_text" / str(version), text_meta)
        self.repo = repo

    def embed_images(self, images: list[Image.Image], batch: int = 64) -> np.ndarray:
        from export.triton.preprocess import pixels

        out = [
            self.image(np.stack([pixels(img, self.spec) for img in images[i : i + batch]]))
            for i in range(0, len(images), batch)
        ]
        return np.concatenate(out)

    def embed_texts(self, texts: list[str], batch: int = 64) -> np.ndarray:
        return np.concatenate(
            [self.text(self.tokenizer(texts[i : i + batch])[0]) for i in range(0, len(texts), batch)]
        )


def served_ranks(version: ServedVersion, world: Path, sample: int = 400) -> dict[str, list]:
    """(category, gender, rank or None) per query and task, as the quality harness counts them."""
    from benchmarks.quality import Queries, exact_ranks
    from export.detector import InProcessDetector

    detector = InProcessDetector.in_repository(version.repo)
    return exact_ranks(
        Queries(world, sample), version.embed_images, version.embed_texts, detector and detector.regions
    )


def mean_r5(summary: dict) -> float:
    return float(np.mean([summary[t]["all"]["R@5"] for t in TASKS if t in summary]))


def compare_versions(
    repo: Path, name: str, base: int, tuned: int, world: Path, plot: Path | None = None
) -> dict:
    """Summaries of both versions on `world` (JSON-able), and a plot next to the checkpoint."""
    from benchmarks.quality import summarise

    figures = {}
    for label, version in (("base", base), ("finetuned", tuned)):
        figures[label] = {
            "version": version,
            **summarise(served_ranks(ServedVersion(repo, name, version), world)),
        }
        figures[label]["mean_R@5"] = mean_r5(figures[label])
    figures["world"] = str(world)
    print(table(figures), flush=True)
    if plot is not None:
        draw(figures, plot)
    return figures


def table(figures: dict) -> str:
    from benchmarks.common import markdown_table

    rows = []
    for task in TASKS:
        if task not in figures["base"]:
            continue
        for metric in ("R@1", "R@5", "MRR", "nDCG@10"):
            b, f = figures["base"][task]["all"][metric], figures["finetuned"][task]["all"][metric]
            rows.append([task, metric, f"{b:.3f}", f"{f:.3f}", f"{f - b:+.3f}"])
    base_v, tuned_v = figures["base"]["version"], figures["finetuned"]["version"]
    return markdown_table(["task", "metric", f"base v{base_v}", f"fine-tuned v{tuned_v}", "change"], rows)


def draw(figures: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[finetune] matplotlib is not installed (the bench extra): no plot", flush=True)
        return
    labels = [f"{t}\n{m}" for t in TASKS if t in figures["base"] for m in ("R@1", "R@5", "MRR", "nDCG@10")]
    values = {
        k: [
            figures[k][t]["all"][m]
            for t in TASKS
            if t in figures["base"]
            for m in ("R@1", "R@5", "MRR", "nDCG@10")
        ]
        for k in ("base", "finetuned")
    }
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(10, 3.8))
    ax.bar(x - 0.2, values["base"], 0.4, label=f"base v{figures['base']['version']}")
    ax.bar(x + 0.2, values["finetuned"], 0.4, label=f"fine-tuned v{figures['finetuned']['version']}")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_title(f"held-out world: {Path(figures['world']).name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recommend(figures: dict, name: str, version: int, force: bool) -> bool:
    """Print the swap command, unless the fine-tuned version is worse than the base on the
    held-out world (mean R@5 over the tasks) and not forced. Returns whether it recommends."""
    base, tuned = figures["base"]["mean_R@5"], figures["finetuned"]["mean_R@5"]
    command = f"looksync models activate --model {name} --version {version} --catalog CATALOG.jsonl"
    if tuned < base and not force:
        print(
            f"[finetune] NOT recommended: v{version} is worse than the base on the held-out world "
            f"(mean R@5 {tuned:.3f} < {base:.3f}). It stays exported but unused; --force prints the "
            f"swap command anyway.",
            flush=True,
        )
        return False
    verdict = "better than" if tuned > base else "as good as" if tuned == base else "WORSE than (forced)"
    print(
        f"[finetune] v{version} is {verdict} the base (mean R@5 {tuned:.3f} vs {base:.3f}). Swap it in:",
        flush=True,
    )
    print(f"    {command}", flush=True)
    return tuned >= base or force
