"""Text to token ids for `<model>_text`: the version's own `tokenizer.json`, run by Hugging Face
`tokenizers`, after open_clip's text cleaning.

Every text version carries a `tokenizer.json` written at export (for CLIP, converted from
open_clip's BPE table by `export/clip_tokenizer.py`; for SigLIP-style models, the checkpoint's
own). The cleaning open_clip applies in Python before its tokenizer (ftfy, HTML unescaping,
whitespace, lowercase, punctuation) is not part of `tokenizer.json`, so it stays here, written
as open_clip writes it. Export checks the ids against open_clip's tokenizer on an awkward corpus
and refuses to write a version that differs.
"""

from __future__ import annotations

import html
import json
import os
import string

import ftfy  # required: a text left unrepaired tokenises differently from training
import numpy as np
from tokenizers import Tokenizer

CLEAN_MODES = ("lower", "canonicalize", "whitespace", "none")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def clean(text: str, mode: str) -> str:
    """open_clip's `clean=` modes (its CLIP tokenizer uses `lower`; SigLIP-style models say which
    in their config). Every mode but `none` first repairs the text (ftfy), unescapes HTML twice
    and collapses whitespace."""
    if mode == "none":
        return text
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    if mode == "canonicalize":
        text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    text = " ".join(text.split())
    return text.lower() if mode == "lower" else text


class TextTokenizer:
    """Ids (batch, context_length) int64, right-padded, and a per-text 'was truncated' flag.

    Over-long text keeps its first tokens and still ends with the template's closing special
    token (CLIP reads its embedding at end-of-text), so truncation degrades quality, never fails.
    """

    def __init__(self, tokenizer_json: str, context_length: int, pad_id: int, clean_mode: str):
        if clean_mode not in CLEAN_MODES:
            raise ValueError(f"clean mode {clean_mode!r} is not one of {CLEAN_MODES}")
        self.tokenizer = Tokenizer.from_file(tokenizer_json)
        # Truncation by tokenizers keeps room for the template's special tokens, as open_clip
        # does; padding is a numpy fill below (padded encodings cost twice as much to build).
        self.tokenizer.enable_truncation(int(context_length))
        self.tokenizer.no_padding()
        self.context_length = int(context_length)
        self.pad_id = int(pad_id)
        self.clean_mode = clean_mode

    @classmethod
    def from_version(cls, version_dir, meta: dict | None = None) -> TextTokenizer:
        """The tokenizer of one exported text version (its folder; `meta`: its preprocess.json,
        read from the folder when not given)."""
        version_dir = str(version_dir)
        if meta is None:
            with open(os.path.join(version_dir, "preprocess.json")) as fh:
                meta = json.load(fh)
        return cls(
            os.path.join(version_dir, meta["tokenizer_file"]),
            meta["context_length"],
            meta["pad_id"],
            meta["clean"],
        )

    def token_id(self, token: str) -> int:
        found = self.tokenizer.token_to_id(token)
        if found is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return found

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = self.tokenizer.encode_batch_fast([clean(t, self.clean_mode) for t in texts])
        ids = np.full((len(texts), self.context_length), self.pad_id, dtype=np.int64)
        truncated = np.zeros(len(texts), dtype=bool)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = enc.ids
            truncated[row] = bool(enc.overflowing)
        return ids, truncated
