"""open_clip's CLIP tokenizer as a Hugging Face `tokenizer.json`.

open_clip ships CLIP's byte-level BPE as a gzipped merge table (`bpe_simple_vocab_16e6.txt.gz`)
read by its own Python tokenizer. The serving side runs `tokenizers` instead, so export converts
the table: the vocabulary open_clip builds (256 byte characters, the same with `</w>`, one entry
per merge, then `<start_of_text>` and `<end_of_text>`), its pre-tokenisation pattern, and a
template that puts the two special tokens around the text. open_clip's text cleaning (ftfy,
HTML, whitespace, lowercase) runs before, in `export/triton/text_tokenizer.py`. Export checks
the result id for id against open_clip.
"""

from __future__ import annotations

import gzip
from pathlib import Path

SOT = "<start_of_text>"
EOT = "<end_of_text>"
# The merge file has a header line and more merges than CLIP used; CLIP keeps this many.
N_MERGES = 49152 - 256 - 2
# open_clip's pattern after its special tokens (it matches case-insensitively, on text it has
# already lowercased).
WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def build(bpe_path: Path):
    """A `tokenizers.Tokenizer` equal to open_clip's SimpleTokenizer after its cleaning."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    with gzip.open(bpe_path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")[1 : N_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    # open_clip lists GPT-2's 256 byte characters in code point order (printable bytes stand
    # for themselves, the others were moved to 256 and up in byte order).
    chars = sorted(ByteLevel.alphabet())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(vocab)},
            merges=merges,
            end_of_word_suffix="</w>",
            continuing_subword_prefix="",
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    # Typed into a query, open_clip's pattern reads the special tokens as themselves.
    tok.add_special_tokens([AddedToken(SOT, normalized=False), AddedToken(EOT, normalized=False)])
    sot, eot = tok.token_to_id(SOT), tok.token_to_id(EOT)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, sot), (EOT, eot)]
    )
    return tok


def write(bpe_path: Path, out: Path) -> Path:
    build(bpe_path).save(str(out))
    return out
