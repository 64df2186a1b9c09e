"""Catalog records: parsing, validation and image loading (JSON Lines and queue events share it)."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
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
    retailer: str = ""  # who sells this listing ("" = unknown)
    product_url: str = ""  # where to buy it (http/https)
    # The item this listing is one offer of (`looksync dedup`, gateway/dedup.py): set by the
    # dedup job only, never by a catalog record; "" until assigned.
    item_id: str = ""

    def to_dict(self) -> dict:
        # Not dataclasses.asdict: its recursive deep copy cost ~0.4 ms per 10-hit answer
        # (profiled SearchText); the fields are flat, only the list needs a copy.
        out = {f: getattr(self, f) for f in _PRODUCT_FIELDS}
        out["sizes"] = list(self.sizes)
        return out


_PRODUCT_FIELDS = tuple(f.name for f in fields(Product))


def standard_category(value: str) -> str | None:
    v = value.strip().lower()
    if v in CATEGORIES:
        return v
    return _PLURALS.get(v)


# Longest accepted value of each text field: vendor feeds send anything, and every stored
# byte is served, cached and sent to the LLM.
TEXT_LIMITS = {
    "id": 200,
    "title": 500,
    "brand": 200,
    "image_url": 2000,
    "category": 100,
    "gender": 20,
    "retailer": 200,
    "product_url": 2000,
}
MAX_SIZES, MAX_SIZE_CHARS = 100, 40


def _text(name: str, value, required: bool = True) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise RecordError(f"{name}: expected a string, got {type(value).__name__}")
    value = value.strip()
    if required and not value:
        raise RecordError(f"{name}: missing")
    if len(value) > TEXT_LIMITS.get(name, 500):
        raise RecordError(f"{name}: longer than {TEXT_LIMITS.get(name, 500)} characters")
    return _unicode(name, value)


def _unicode(name: str, value: str) -> str:
    """JSON may carry lone surrogates (\\ud800) that no UTF-8 store can hold: refuse them by
    name here rather than fail a whole batch's write later."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RecordError(f"{name}: not valid Unicode (a lone surrogate at character {exc.start})") from None
    return value


def check_field(name: str, value):
    """One field of a catalog record, validated and normalised: the same rules for a full
    record (parse_record) and for a metadata update event."""
    if name == "category":
        category = standard_category(_text(name, value))
        if category is None:
            raise RecordError(f"category: {value!r} is not a known category")
        return category
    if name == "gender":
        gender = _text(name, value).lower()
        if gender not in GENDERS:
            raise RecordError(f"gender: {gender!r} is not one of {', '.join(GENDERS)}")
        return gender
    if name == "market":
        market = _text(name, value).upper()
        if not is_market(market):
            raise RecordError(f"market: {market!r} is not an ISO 3166 alpha-2 code")
        return market
    if name == "currency":
        currency = _text(name, value).upper()
        if not (len(currency) == 3 and currency.isascii() and currency.isalpha()):
            raise RecordError(f"currency: {value!r} is not an ISO 4217 code (three letters)")
        return currency
    if name == "price":
        try:
            ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            ok = False
        if not ok or value < 0:
            raise RecordError(f"price: {str(value)[:40]!r} is not a non-negative number")
        return float(value)
    if name == "sizes":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RecordError("sizes: expected a list of strings")
        sizes = [v.strip() for v in value if v.strip()]
        if len(sizes) > MAX_SIZES or any(len(v) > MAX_SIZE_CHARS for v in sizes):
            raise RecordError(f"sizes: at most {MAX_SIZES} sizes of at most {MAX_SIZE_CHARS} characters")
        return [_unicode("sizes", v) for v in sizes]
    if name == "in_stock":
        if not isinstance(value, bool):
            raise RecordError(f"in_stock: expected true or false, got {value!r}")
        return value
    if name == "retailer":
        return _text(name, value, required=False)
    if name == "product_url":
        url = _text(name, value, required=False)
        if url and not (url.lower().startswith(("http://", "https://")) and len(url) > 8):
            raise RecordError(f"product_url: {url[:60]!r} is not an http(s) URL")
        return url
    return _text(name, value)


def parse_record(raw: dict) -> Product:
    """Validate one catalog record (docs/ARCHITECTURE.md, "Catalog records and events") into a Product."""
    if not isinstance(raw, dict):
        raise RecordError("record is not a JSON object")
    return Product(
        id=check_field("id", raw.get("id")),
        title=check_field("title", raw.get("title")),
        brand=check_field("brand", raw.get("brand")),
        category=check_field("category", raw.get("category")),
        gender=check_field("gender", raw.get("gender")),
        market=check_field("market", raw.get("market")),
        price=check_field("price", raw.get("price")),
        currency=check_field("currency", raw.get("currency")),
        sizes=check_field("sizes", raw.get("sizes", [])),
        in_stock=check_field("in_stock", raw.get("in_stock", True)),
        image_url=check_field("image_url", raw.get("image_url")),
        retailer=check_field("retailer", raw.get("retailer")),
        product_url=check_field("product_url", raw.get("product_url")),
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


def load_local_image(url: str, base: Path, confine_to: Path | None = None) -> bytes:
    """Image bytes for a local path (relative paths are relative to the catalog file); with
    `confine_to`, only files that resolve (symlinks followed) inside that directory."""
    path = Path(url[len("file://") :] if url.startswith("file://") else url)
    if not path.is_absolute():
        path = base / path
    if confine_to is not None and not path.resolve().is_relative_to(Path(confine_to).resolve()):
        raise RecordError(f"image_url: {url!r} is outside the catalog directory")
    return path.read_bytes()


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]
