"""Catalog records: parsing, validation and image loading (JSON Lines and queue events share it)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gateway.taxonomy import CATEGORIES, GENDERS, is_market

# Vendor spellings that are plainly a standard category. The full vendor vocabulary mapping
# (synonyms, locales, CLIP zero-shot fallback) belongs to ingestion's enrichment step.
_PLURALS = {c + "s": c for c in CATEGORIES} | {"tshirt": "t-shirt", "tee": "t-shirt", "pants": "trousers"}


class RecordError(ValueError):
    """A catalog record that cannot be indexed; the message names the field."""


@dataclass
class Product:
    id: str
    title: str
    brand: str
    category: str
    gender: str
    market: str
    price: float
    currency: str
    sizes: list[str] = field(default_factory=list)
    in_stock: bool = True
    image_url: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def standard_category(value: str) -> str | None:
    v = value.strip().lower()
    if v in CATEGORIES:
        return v
    return _PLURALS.get(v)


def parse_record(raw: dict) -> Product:
    """Validate one catalog record (DESIGN.md "Catalog records") into a Product."""
    if not isinstance(raw, dict):
        raise RecordError("record is not a JSON object")

    def text(name: str, required: bool = True, limit: int = 500) -> str:
        value = raw.get(name, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise RecordError(f"{name}: expected a string, got {type(value).__name__}")
        value = value.strip()
        if required and not value:
            raise RecordError(f"{name}: missing")
        if len(value) > limit:
            raise RecordError(f"{name}: longer than {limit} characters")
        return value

    pid = text("id", limit=200)
    category = standard_category(text("category"))
    if category is None:
        raise RecordError(f"category: {raw.get('category')!r} is not a known category")
    gender = text("gender").lower()
    if gender not in GENDERS:
        raise RecordError(f"gender: {gender!r} is not one of {', '.join(GENDERS)}")
    market = text("market").upper()
    if not is_market(market):
        raise RecordError(f"market: {market!r} is not an ISO 3166 alpha-2 code")
    price = raw.get("price")
    if isinstance(price, bool) or not isinstance(price, int | float) or not math.isfinite(price) or price < 0:
        raise RecordError(f"price: {price!r} is not a non-negative number")
    sizes = raw.get("sizes", [])
    if not isinstance(sizes, list) or not all(isinstance(s, str) for s in sizes):
        raise RecordError("sizes: expected a list of strings")
    in_stock = raw.get("in_stock", True)
    if not isinstance(in_stock, bool):
        raise RecordError(f"in_stock: expected true or false, got {in_stock!r}")
    return Product(
        id=pid,
        title=text("title"),
        brand=text("brand"),
        category=category,
        gender=gender,
        market=market,
        price=float(price),
        currency=text("currency", limit=3).upper(),
        sizes=[s.strip() for s in sizes if s.strip()],
        in_stock=in_stock,
        image_url=text("image_url", limit=2000),
    )


def read_jsonl(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, record or None, error or None) for each non-empty line."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield number, None, f"line {number}: not JSON ({exc.msg})"


def load_local_image(url: str, base: Path) -> bytes:
    """Image bytes for a local path (relative paths are relative to the catalog file)."""
    path = Path(url[len("file://") :] if url.startswith("file://") else url)
    if not path.is_absolute():
        path = base / path
    return path.read_bytes()


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]
