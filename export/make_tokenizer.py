"""Build the small SentencePiece-style (Unigram) tokenizer of the SigLIP-style test and demo
configs, so that they need no download: a real SigLIP checkpoint brings its own tokenizer
(`python -m export siglip --tokenizer DIR`).

    python -m export.make_tokenizer [--out export/tokenizers/looksync-unigram] [--vocab 800]

Trained on the synthetic world's captions and the sample catalog's titles; the committed
output is what the tests use. Deterministic for the same inputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "tokenizers" / "looksync-unigram"
SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2, as in T5/SigLIP vocabularies


def corpus() -> list[str]:
    from clients.sample_catalog import CATEGORIES, COLOURS, PATTERNS
    from clients.world import make_catalog

    texts = [p.style.caption for p in make_catalog(600, seed=1)]
    texts += [f"{c} {p} {k}" for c in COLOURS for p in PATTERNS for k in CATEGORIES]
    # Everyday words beyond fashion, so that queries outside the world still split sensibly.
    texts += [
        "a photo of a person wearing an outfit in the street at night",
        "the quick brown fox jumps over the lazy dog while people walk by",
        "summer winter autumn spring casual formal sporty elegant vintage modern",
    ]
    return texts


def build(out: Path = DEFAULT_OUT, vocab_size: int = 800) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vocab", type=int, default=800)
    args = parser.parse_args()
    print(f"wrote {build(args.out, args.vocab)}")


if __name__ == "__main__":
    main()
