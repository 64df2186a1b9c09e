"""Florence-2's tokenizer (BART's byte-level BPE) in plain Python, read from `tokenizer.json`.

Triton's python models cannot depend on transformers or tokenizers, so this re-implements what
they do for this one tokenizer: split out added tokens (`<s>`, `<image>`, `<loc_123>`, ...),
GPT-2 pre-tokenisation, byte-to-character mapping, BPE merges by rank. The export step checks
it against transformers' tokenizer on the prompts it serves and refuses to write a version if
they differ.
"""

from __future__ import annotations

import json
from functools import lru_cache

try:  # the exact Unicode classes GPT-2's pattern uses; `re` is a close stand-in without it
    import regex as _re

    _PRETOKENIZE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
except ImportError:  # pragma: no cover - exercised only where `regex` is missing
    import re as _re

    _PRETOKENIZE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?[^\s\w]+|_+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (no whitespace or controls)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def char_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_char().items()}


class BartTokenizer:
    def __init__(self, tokenizer_json_path: str):
        with open(tokenizer_json_path, encoding="utf-8") as fh:
            spec = json.load(fh)
        model = spec["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"expected a BPE tokenizer, got {model.get('type')}")
        self.encoder: dict[str, int] = dict(model["vocab"])
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.added: dict[str, int] = {}
        self.special: set[str] = set()
        strip: dict[str, tuple[bool, bool]] = {}
        for tok in spec.get("added_tokens", []):
            self.added[tok["content"]] = int(tok["id"])
            strip[tok["content"]] = (bool(tok.get("lstrip")), bool(tok.get("rstrip")))
            if tok.get("special"):
                self.special.add(tok["content"])
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.decoder.update({i: t for t, i in self.added.items()})
        self.add_prefix_space = _prefix_space(spec.get("pre_tokenizer"))
        self.unk_id = self.encoder.get(model.get("unk_token") or "<unk>", self.added.get("<unk>"))
        self._strip = strip
        longest_first = sorted(self.added, key=len, reverse=True)
        self._added_re = (
            _re.compile("|".join(_re.escape(t) for t in longest_first)) if longest_first else None
        )
        self._words = _re.compile(_PRETOKENIZE)
        self._cache: dict[str, list[str]] = {}

    def token_id(self, token: str) -> int:
        if token in self.added:
            return self.added[token]
        if token in self.encoder:
            return self.encoder[token]
        raise KeyError(f"token {token!r} is not in the vocabulary")

    def __len__(self) -> int:
        return max(self.decoder) + 1

    def _bpe(self, word: str) -> list[str]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = list(word)
        while len(parts) > 1:
            best, best_rank = None, None
            for pair in zip(parts, parts[1:]):
                rank = self.ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best, best_rank = pair, rank
            if best is None:
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

    def _encode_plain(self, text: str, first: bool) -> list[int]:
        if not text:
            return []
        if self.add_prefix_space and first and not text[0].isspace():
            text = " " + text
        byte_char = byte_to_char()
        ids: list[int] = []
        for word in self._words.findall(text):
            mapped = "".join(byte_char[b] for b in word.encode("utf-8"))
            for piece in self._bpe(mapped):
                ids.append(self.encoder.get(piece, self.unk_id))
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added around it."""
        if self._added_re is None:
            return self._encode_plain(text, True)
        ids: list[int] = []
        pos = 0
        pending = ""
        for match in self._added_re.finditer(text):
            token = match.group(0)
            lstrip, rstrip = self._strip.get(token, (False, False))
            before = text[pos : match.start()]
            if lstrip:
                before = before.rstrip()
            pending += before
            ids.extend(self._encode_plain(pending, not ids))
            pending = ""
            ids.append(self.added[token])
            pos = match.end()
            if rstrip:
                while pos < len(text) and text[pos].isspace():
                    pos += 1
        ids.extend(self._encode_plain(pending + text[pos:], not ids))
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of `ids`; added tokens (`<loc_12>`, `</s>`) appear literally unless skipped."""
        char_byte = char_to_byte()
        out: list[str] = []
        buf: list[int] = []
        for i in ids:
            token = self.decoder.get(int(i))
            if token is None:
                continue
            if token in self.added:
                if buf:
                    out.append(bytes(buf).decode("utf-8", "replace"))
                    buf.clear()
                if not (skip_special and token in self.special):
                    out.append(token)
            else:
                buf.extend(char_byte.get(c, ord("?")) for c in token)
        if buf:
            out.append(bytes(buf).decode("utf-8", "replace"))
        return "".join(out)


def _prefix_space(pre_tokenizer) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "ByteLevel":
        return bool(pre_tokenizer.get("add_prefix_space", False))
    for sub in pre_tokenizer.get("pretokenizers", []) or []:
        if sub.get("type") == "ByteLevel":
            return bool(sub.get("add_prefix_space", False))
    return False
