"""CLIP's byte-level BPE tokenizer in plain Python.

Triton's python models and the gateway cannot depend on open_clip (and through it torch), so
this re-implements the tokenizer from the published algorithm and reads the merge table that
the export step copies next to the model. Parity with open_clip's tokenizer is tested.
"""

from __future__ import annotations

import gzip
import html
import re
from functools import lru_cache

import numpy as np

try:  # the exact Unicode classes CLIP was trained with; `re` is a close stand-in without it
    import regex as _re

    _WORD = r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
except ImportError:  # pragma: no cover - exercised only where `regex` is missing
    _re = re
    _WORD = r"[^\W\d_]+|\d|[^\s\w]+|_+"

try:
    import ftfy
except ImportError:  # pragma: no cover
    ftfy = None

SOT = "<start_of_text>"
EOT = "<end_of_text>"
_PATTERN = _re.compile(rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|{_WORD}", _re.IGNORECASE)
# The merge file has a header line and more merges than CLIP used; CLIP keeps this many.
_N_MERGES = 49152 - 256 - 2


@lru_cache(maxsize=1)
def _byte_to_char() -> dict[int, str]:
    """Map each byte to a printable character so that BPE never sees whitespace/control."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def clean(text: str) -> str:
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    def __init__(self, merges_path: str, context_length: int = 77):
        with gzip.open(merges_path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")[1 : _N_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        chars = list(_byte_to_char().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.sot_id = self.encoder[SOT]
        self.eot_id = self.encoder[EOT]
        self.context_length = context_length
        self._cache: dict[str, list[str]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, word: str) -> list[str]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        if len(self._cache) < 100_000:
            self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        byte_char = _byte_to_char()
        ids: list[int] = []
        for token in _PATTERN.findall(clean(text)):
            mapped = "".join(byte_char[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self._bpe(mapped))
        return ids

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (batch, context_length) int64 and a per-text 'was truncated' flag.

        Over-long text keeps its first tokens and still ends in the end-of-text id, which is
        where CLIP reads the embedding; so truncation degrades quality, never fails.
        """
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        truncated = np.zeros(len(texts), dtype=bool)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot_id
                truncated[row] = True
            out[row, : len(ids)] = ids
        return out, truncated
