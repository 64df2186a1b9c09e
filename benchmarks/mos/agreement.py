"""Inter-annotator agreement for 1-5 scores.

Krippendorff's alpha with the interval metric: it takes any number of annotators, tolerates
items that not everyone scored, and corrects for chance (1 = perfect agreement, 0 = what
random scoring with the same score distribution gives, < 0 = systematic disagreement).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations


def krippendorff_alpha_interval(units: Mapping[str, Sequence[float]]) -> float | None:
    """units: item -> the scores it got (one per annotator). Items scored once carry no
    information about agreement and are left out. None when alpha is undefined (fewer than two
    pairable scores, or every score equal so that no disagreement is even expected)."""
    pairable = [list(map(float, v)) for v in units.values() if len(v) >= 2]
    values = [x for v in pairable for x in v]
    n = len(values)
    if n < 2:
        return None
    observed = sum(sum((a - b) ** 2 for a, b in combinations(v, 2)) * 2 / (len(v) - 1) for v in pairable) / n
    expected = sum((a - b) ** 2 for a, b in combinations(values, 2)) * 2 / (n * (n - 1))
    if expected == 0:
        return None
    return 1.0 - observed / expected


def within_one(units: Mapping[str, Sequence[float]]) -> float | None:
    """Share of annotator pairs on the same item whose scores differ by at most one point:
    cruder than alpha, but what a reader of the table can check by eye."""
    pairs = [(a, b) for v in units.values() for a, b in combinations(v, 2)]
    if not pairs:
        return None
    return sum(abs(a - b) <= 1 for a, b in pairs) / len(pairs)
