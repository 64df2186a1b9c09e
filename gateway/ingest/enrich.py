"""Enrichment: the standard category and gender of a product.

Vendor words are looked up in data tables (gateway/data/vendor_*.json: synonyms in several
languages, matched case- and accent-insensitively). When the vendor value is missing or
unknown, CLIP zero-shot on the product image decides, and the record says which source did.
"""

from __future__ import annotations

import json
import re
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np

from gateway.taxonomy import CATEGORIES, GENDERS

DATA = Path(__file__).resolve().parent.parent / "data"
_PUNCT = re.compile(r"[^\w\s'-]+")


def normalise(word: str) -> str:
    decomposed = unicodedata.normalize("NFKD", word)
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()
    return " ".join(_PUNCT.sub(" ", plain).replace("_", " ").split())


@lru_cache(maxsize=4)
def vocabulary(name: str, allowed: frozenset[str]) -> dict[str, str]:
    table = json.loads((DATA / f"{name}.json").read_text(encoding="utf-8"))
    out = {}
    for standard, words in table.items():
        if standard.startswith("_"):
            continue
        if standard not in allowed:
            raise ValueError(f"{name}.json maps to unknown value {standard!r}")
        for word in [standard, *words]:
            out[normalise(word)] = standard
    return out


def vendor_category(value) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    return vocabulary("vendor_categories", frozenset(CATEGORIES)).get(normalise(value))


def vendor_gender(value) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    return vocabulary("vendor_genders", frozenset(GENDERS)).get(normalise(value))


def standardise(raw: dict) -> tuple[dict, dict[str, str]]:
    """The record with standard category/gender where the vendor's words allow it, and the
    source of each ("vendor", or "missing" when zero-shot must decide)."""
    record = dict(raw)
    sources = {}
    for field, lookup in (("category", vendor_category), ("gender", vendor_gender)):
        standard = lookup(raw.get(field))
        if standard is None:
            sources[field] = "missing"
        else:
            record[field] = standard
            sources[field] = "vendor"
    return record, sources


def zero_shot_fill(record: dict, sources: dict[str, str], vector: np.ndarray, prompts: dict) -> None:
    """Decide the missing fields from the image vector and the zero-shot prompt embeddings."""
    for field, group in (("category", "category"), ("gender", "gender")):
        if sources.get(field) != "missing":
            continue
        labels, vectors = prompts[group]
        record[field] = labels[int(np.argmax(vectors @ vector))]
        sources[field] = "zero_shot"
