"""The standard vocabularies: categories, the garment layer each belongs to, genders."""

from __future__ import annotations

import re

# Standard category -> garment layer. Vendors' own words are mapped onto these at ingestion.
CATEGORY_LAYER: dict[str, str] = {
    "t-shirt": "topwear",
    "shirt": "topwear",
    "blouse": "topwear",
    "sweater": "topwear",
    "hoodie": "topwear",
    "top": "topwear",
    "trousers": "bottomwear",
    "jeans": "bottomwear",
    "shorts": "bottomwear",
    "skirt": "bottomwear",
    "dress": "dress",
    "jacket": "outerwear",
    "coat": "outerwear",
    "sneakers": "footwear",
    "boots": "footwear",
    "heels": "footwear",
    "sandals": "footwear",
    "handbag": "bag",
    "backpack": "bag",
    "sunglasses": "eyewear",
    "necklace": "jewelry",
    "earrings": "jewelry",
    "hat": "headwear",
    "cap": "headwear",
    "scarf": "accessory",
    "belt": "accessory",
}
CATEGORIES = frozenset(CATEGORY_LAYER)
LAYERS = tuple(dict.fromkeys(CATEGORY_LAYER.values()))
GENDERS = ("women", "men", "unisex")
_MARKET = re.compile(r"^[A-Z]{2}$")


def is_market(code: str) -> bool:
    """ISO 3166-1 alpha-2 shape (upper case); the index stores markets upper-cased."""
    return bool(_MARKET.match(code))


def categories_of_layer(layer: str) -> list[str]:
    return [c for c, lay in CATEGORY_LAYER.items() if lay == layer]
