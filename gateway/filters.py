"""Hard filters: validated once at the edge, then translated by each index backend."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gateway.errors import InvalidArgument
from gateway.taxonomy import CATEGORIES, GENDERS, is_market

MAX_VALUES = 50
MAX_VALUE_CHARS = 200


@dataclass(frozen=True)
class SearchFilters:
    categories: tuple[str, ...] = ()
    gender: str | None = None
    market: str | None = None
    brands: tuple[str, ...] = ()
    sizes: tuple[str, ...] = ()
    min_price: float | None = None
    max_price: float | None = None
    in_stock_only: bool = False

    def genders(self) -> tuple[str, ...]:
        """Genders a product may have to pass: a women's search also shows unisex items."""
        if self.gender is None:
            return ()
        return (self.gender,) if self.gender == "unisex" else (self.gender, "unisex")

    def matches(self, p) -> bool:
        """Reference semantics for one product; the backends must agree with it (tested)."""
        return (
            (not self.categories or p.category in self.categories)
            and (not self.genders() or p.gender in self.genders())
            and (self.market is None or p.market == self.market)
            and (not self.brands or p.brand in self.brands)
            and (not self.sizes or bool(set(self.sizes) & set(p.sizes)))
            and (self.min_price is None or p.price >= self.min_price)
            and (self.max_price is None or p.price <= self.max_price)
            and (not self.in_stock_only or p.in_stock)
        )


@dataclass(frozen=True)
class AllOf:
    """Several filter sets that must all hold (a precomputed look's own preferences and the
    reading request's filters)."""

    parts: tuple[SearchFilters, ...]

    def matches(self, p) -> bool:
        return all(f.matches(p) for f in self.parts)


def _strings(field: str, values, lower: bool = False) -> tuple[str, ...]:
    values = [v.strip() for v in values]
    if len(values) > MAX_VALUES:
        raise InvalidArgument(f"filters.{field}: {len(values)} values, at most {MAX_VALUES}")
    for v in values:
        if not v:
            raise InvalidArgument(f"filters.{field}: empty value")
        if len(v) > MAX_VALUE_CHARS:
            raise InvalidArgument(f"filters.{field}: value longer than {MAX_VALUE_CHARS} characters")
    return tuple(dict.fromkeys(v.lower() if lower else v for v in values))


def _price(field: str, value: float | None) -> float | None:
    if value is None:
        return None
    if math.isnan(value) or math.isinf(value):
        raise InvalidArgument(f"filters.{field}: {value} is not a finite number")
    if value < 0:
        raise InvalidArgument(f"filters.{field}: {value} is negative")
    return float(value)


def build_filters(
    categories=(),
    gender="",
    market="",
    brands=(),
    sizes=(),
    min_price=None,
    max_price=None,
    in_stock_only=False,
) -> SearchFilters:
    cats = _strings("categories", categories, lower=True)
    unknown = [c for c in cats if c not in CATEGORIES]
    if unknown:
        raise InvalidArgument(
            f"filters.categories: unknown category {unknown[0]!r}; known: {', '.join(sorted(CATEGORIES))}"
        )
    gender = (gender or "").strip().lower() or None
    if gender is not None and gender not in GENDERS:
        raise InvalidArgument(f"filters.gender: {gender!r} is not one of {', '.join(GENDERS)}")
    market = (market or "").strip().upper() or None
    if market is not None and not is_market(market):
        raise InvalidArgument(f"filters.market: {market!r} is not an ISO 3166 alpha-2 code")
    lo, hi = _price("min_price", min_price), _price("max_price", max_price)
    if lo is not None and hi is not None and lo > hi:
        raise InvalidArgument(f"filters: min_price {lo} is above max_price {hi}")
    return SearchFilters(
        categories=cats,
        gender=gender,
        market=market,
        brands=_strings("brands", brands),
        sizes=_strings("sizes", sizes),
        min_price=lo,
        max_price=hi,
        in_stock_only=bool(in_stock_only),
    )


def from_proto(msg) -> SearchFilters:
    return build_filters(
        categories=list(msg.categories),
        gender=msg.gender,
        market=msg.market,
        brands=list(msg.brands),
        sizes=list(msg.sizes),
        min_price=msg.min_price if msg.HasField("min_price") else None,
        max_price=msg.max_price if msg.HasField("max_price") else None,
        in_stock_only=msg.in_stock_only,
    )
