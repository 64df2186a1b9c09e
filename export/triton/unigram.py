"""A SentencePiece-style Unigram tokenizer read from a Hugging Face `tokenizer.json`, in pure
Python (the Triton python models may need only numpy and Pillow).

It implements the parts SigLIP-style tokenizers use, and refuses others by name at load time
(export then fails instead of serving a tokenizer that differs from training):

    clean           open_clip's "canonicalize" (lowercase, no punctuation, single spaces),
                    "lower", "whitespace" (each after ftfy and HTML unescaping) or none
    normalizer      Precompiled (SentencePiece's charsmap, as T5/SigLIP tokenizers carry it),
                    NFC/NFD/NFKC/NFKD, Lowercase, Strip, Replace (string or regex), Sequence
    added tokens    special tokens typed into the text are cut out first (lstrip/rstrip honoured)
    pre_tokenizer   Metaspace (split on the replacement character; prepend always/first/never),
                    WhitespaceSplit, Sequence
    model           Unigram: best-scoring segmentation (Viterbi), unknown characters scored
                    min_score - 10 and consecutive unknowns fused, as tokenizers does
    post_processor  TemplateProcessing for single sequences
    then            truncation to context_length (special tokens kept) and right padding

Parity with the Hugging Face tokenizer is checked at export time on a test corpus.
"""

from __future__ import annotations

import base64
import html
import json
import string
import unicodedata

import ftfy
import numpy as np
import regex

UNK_PENALTY = 10.0
_PUNCTUATION = str.maketrans("", "", string.punctuation)


class Unsupported(ValueError):
    """tokenizer.json uses a component this tokenizer does not implement."""


def _clean(text: str, mode: str) -> str:
    """open_clip's text cleaning for Hugging Face tokenizers: every mode first repairs the
    text (ftfy: mojibake, NFC) and unescapes HTML entities twice, as its `basic_clean` does."""
    if mode not in ("canonicalize", "whitespace", "lower"):
        return text
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    if mode == "canonicalize":
        text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    elif mode == "lower":
        text = text.lower()
    return " ".join(text.split())


def _chain(steps):
    def run(value):
        for step in steps:
            value = step(value)
        return value

    return run


def _normalizer(spec: dict | None):
    if spec is None:
        return lambda s: s
    kind = spec["type"]
    if kind == "Sequence":
        return _chain([_normalizer(s) for s in spec["normalizers"]])
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda s: unicodedata.normalize(kind, s)
    if kind == "Lowercase":
        return str.lower
    if kind == "Strip":
        left, right = spec.get("strip_left", True), spec.get("strip_right", True)

        def strip(s):
            s = s.lstrip() if left else s
            return s.rstrip() if right else s

        return strip
    if kind == "Replace" and "String" in spec["pattern"]:
        old, new = spec["pattern"]["String"], spec["content"]
        return lambda s: s.replace(old, new)
    if kind == "Replace" and "Regex" in spec["pattern"]:
        pattern, new = regex.compile(spec["pattern"]["Regex"]), spec["content"]
        return lambda s: pattern.sub(new.replace("\\", "\\\\"), s)
    if kind == "Precompiled":
        return Precompiled(spec["precompiled_charsmap"])
    raise Unsupported(f"normalizer {kind} (or its pattern) is not implemented")


class Precompiled:
    """SentencePiece's precompiled normaliser (e.g. nmt_nfkc): a double-array trie over UTF-8
    bytes whose leaves point at replacement strings. Applied the way the tokenizers library
    does: per extended grapheme cluster, the whole cluster is looked up when it is under 6
    bytes, else (or when it has no rule) each character; the first (shortest) matching key
    wins, and text without a rule passes through."""

    def __init__(self, charsmap_b64: str):
        blob = base64.b64decode(charsmap_b64)
        size = int.from_bytes(blob[:4], "little")
        self.units = np.frombuffer(blob[4 : 4 + size], dtype="<u4").tolist()
        self.replacements = blob[4 + size :]

    @staticmethod
    def _offset(unit: int) -> int:
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    def transform(self, key: bytes) -> str | None:
        units = self.units
        pos = self._offset(units[0])
        for byte in key:
            if byte == 0:
                break
            pos ^= byte
            if pos >= len(units):
                return None
            unit = units[pos]
            if unit & ((1 << 31) | 0xFF) != byte:
                return None
            pos ^= self._offset(unit)
            if (unit >> 8) & 1:  # a key ends here: its value is an offset into the strings
                at = units[pos] & ((1 << 31) - 1)
                end = self.replacements.find(b"\0", at)
                return self.replacements[at : end if end >= 0 else None].decode("utf-8")
        return None

    def __call__(self, text: str) -> str:
        out = []
        for grapheme in regex.findall(r"\X", text):
            if len(grapheme.encode("utf-8")) < 6:
                whole = self.transform(grapheme.encode("utf-8"))
                if whole is not None:
                    out.append(whole)
                    continue
            for ch in grapheme:
                part = self.transform(ch.encode("utf-8"))
                out.append(ch if part is None else part)
        return "".join(out)


def _pre_tokenizer(spec: dict | None):
    """A function from [(piece, offset)] to [(piece, offset)]; the offset (where the piece
    starts in the text) matters only to Metaspace's prepend_scheme "first"."""
    if spec is None:
        return lambda pieces: [(p, o) for p, o in pieces if p]
    kind = spec["type"]
    if kind == "Sequence":
        return _chain([_pre_tokenizer(s) for s in spec["pretokenizers"]])
    if kind == "Metaspace":
        rep = spec.get("replacement", "\u2581")
        # tokenizers < 0.19 wrote add_prefix_space instead of prepend_scheme.
        scheme = spec.get("prepend_scheme") or ("always" if spec.get("add_prefix_space", True) else "never")
        split = spec.get("split", True)

        def metaspace(pieces):
            out = []
            for s, offset in pieces:
                if not s:
                    continue
                s = s.replace(" ", rep)
                if not s.startswith(rep) and (scheme == "always" or (scheme == "first" and offset == 0)):
                    s = rep + s
                if not split:
                    out.append((s, offset))
                    continue
                start = 0
                for i in range(1, len(s)):
                    if s[i] == rep:
                        out.append((s[start:i], offset + start))
                        start = i
                out.append((s[start:], offset + start))
            return out

        return metaspace
    if kind == "WhitespaceSplit":
        return lambda pieces: [
            (m.group(), offset + m.start()) for s, offset in pieces for m in regex.finditer(r"\S+", s)
        ]
    raise Unsupported(f"pre_tokenizer {kind} is not implemented")


class _AddedTokens:
    """Tokens that the tokenizers library cuts out of the raw text before normalising it
    (special tokens such as "</s>" or "<unk>" typed into a query), leftmost-longest."""

    def __init__(self, specs: list[dict]):
        self.tokens = {}
        for t in specs:
            if t.get("single_word") or t.get("normalized"):
                raise Unsupported(f"added token {t['content']!r}: single_word/normalized are not implemented")
            self.tokens[t["content"]] = (int(t["id"]), bool(t.get("lstrip")), bool(t.get("rstrip")))
        alternatives = sorted(self.tokens, key=len, reverse=True)
        self.pattern = (
            regex.compile("|".join(regex.escape(a) for a in alternatives)) if alternatives else None
        )

    def split(self, text: str) -> list[tuple[str, int] | int]:
        """Text segments (with their offsets) and added-token ids, in order."""
        if self.pattern is None:
            return [(text, 0)]
        out, pos = [], 0
        for m in self.pattern.finditer(text):
            token_id, lstrip, rstrip = self.tokens[m.group()]
            start, end = m.start(), m.end()
            if lstrip:
                while start > pos and text[start - 1].isspace():
                    start -= 1
            if start > pos:
                out.append((text[pos:start], pos))
            out.append(token_id)
            pos = end
            if rstrip:
                while pos < len(text) and text[pos].isspace():
                    pos += 1
        if pos < len(text):
            out.append((text[pos:], pos))
        return out


class UnigramTokenizer:
    def __init__(self, tokenizer_json: str, context_length: int, pad_id: int, clean: str = "canonicalize"):
        with open(tokenizer_json, encoding="utf-8") as fh:
            spec = json.load(fh)
        model = spec["model"]
        if model.get("type") != "Unigram":
            raise Unsupported(f"model {model.get('type')} is not Unigram")
        if model.get("byte_fallback"):
            raise Unsupported("Unigram byte_fallback is not implemented")
        self.vocab = {piece: (i, score) for i, (piece, score) in enumerate(model["vocab"])}
        self.unk_id = int(model["unk_id"])
        self.unk_score = min(score for _, score in model["vocab"]) - UNK_PENALTY
        self.max_piece = max(len(p) for p in self.vocab)
        self.normalize = _normalizer(spec.get("normalizer"))
        self.added = _AddedTokens(spec.get("added_tokens") or [])
        self.pre_tokenize = _pre_tokenizer(spec.get("pre_tokenizer"))
        self.prefix, self.suffix = self._template(spec.get("post_processor"))
        self.context_length = context_length
        self.pad_id = pad_id
        self.clean = clean

    @staticmethod
    def _template(spec: dict | None) -> tuple[list[int], list[int]]:
        if spec is None:
            return [], []
        if spec["type"] != "TemplateProcessing":
            raise Unsupported(f"post_processor {spec['type']} is not implemented")
        before, after, seen = [], [], False
        for part in spec["single"]:
            if "Sequence" in part:
                seen = True
            else:
                ids = spec["special_tokens"][part["SpecialToken"]["id"]]["ids"]
                (after if seen else before).extend(ids)
        return before, after

    def _viterbi(self, piece: str) -> list[int]:
        n = len(piece)
        best: list[tuple[float, int, int] | None] = [None] * (n + 1)  # (score, start, id)
        best[0] = (0.0, -1, -1)
        for start in range(n):
            if best[start] is None:
                continue
            base = best[start][0]
            single = False
            for end in range(start + 1, min(n, start + self.max_piece) + 1):
                hit = self.vocab.get(piece[start:end])
                if hit is None:
                    continue
                single |= end == start + 1
                score = base + hit[1]
                if best[end] is None or score > best[end][0]:
                    best[end] = (score, start, hit[0])
            if not single:
                score = base + self.unk_score
                if best[start + 1] is None or score > best[start + 1][0]:
                    best[start + 1] = (score, start, self.unk_id)
        ids, end = [], n
        while end > 0:
            _, start, token = best[end]
            if not (token == self.unk_id and ids and ids[-1] == self.unk_id):  # fuse unknowns
                ids.append(token)
            end = start
        return ids[::-1]

    def encode(self, text: str) -> tuple[list[int], bool]:
        """Ids of one text padded to context_length, and whether it was truncated."""
        ids = []
        for part in self.added.split(_clean(text, self.clean)):
            if isinstance(part, int):
                ids.append(part)
                continue
            segment, offset = part
            for piece, _ in self.pre_tokenize([(self.normalize(segment), offset)]):
                ids.extend(self._viterbi(piece))
        room = self.context_length - len(self.prefix) - len(self.suffix)
        truncated = len(ids) > room
        ids = self.prefix + ids[:room] + self.suffix
        return ids + [self.pad_id] * (self.context_length - len(ids)), truncated

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        rows = [self.encode(t) for t in texts]
        ids = np.asarray([r[0] for r in rows], dtype=np.int64).reshape(len(texts), self.context_length)
        return ids, np.asarray([r[1] for r in rows], dtype=bool)
