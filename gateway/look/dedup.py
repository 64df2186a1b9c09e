"""Stage 3b: near-duplicate removal.

Multi-retailer catalogs list the same product many times (one per shop, market or colour-code).
Candidates whose image vectors are nearly identical, or that share brand and normalised title,
collapse into the best-scoring one, which reports how many it absorbed.
"""

from __future__ import annotations

import re

import numpy as np

from gateway.look.types import Candidate

_WORD = re.compile(r"[a-z0-9]+")


def normalised_title(title: str) -> str:
    return " ".join(_WORD.findall(title.lower()))


def dedup(candidates: list[Candidate], threshold: float = 0.97, by_title: bool = True) -> list[Candidate]:
    """Greedy in score order: each candidate joins the first kept one it duplicates."""
    ordered = sorted(candidates, key=lambda c: -c.hit.score)
    kept: list[Candidate] = []
    with_vectors: list[Candidate] = []
    kept_vectors: list[np.ndarray] = []
    kept_keys: dict[tuple[str, str], Candidate] = {}
    for cand in ordered:
        product = cand.hit.product
        key = (product.brand.lower(), normalised_title(product.title))
        owner = kept_keys.get(key) if by_title else None
        if owner is None and kept_vectors and cand.hit.vector is not None:
            sims = np.stack(kept_vectors) @ cand.hit.vector
            best = int(np.argmax(sims))
            if sims[best] >= threshold:
                owner = with_vectors[best]
        if owner is not None:
            owner.duplicates += 1 + cand.duplicates
            continue
        kept.append(cand)
        if cand.hit.vector is not None:
            with_vectors.append(cand)
            kept_vectors.append(cand.hit.vector)
        kept_keys.setdefault(key, cand)
    return kept
