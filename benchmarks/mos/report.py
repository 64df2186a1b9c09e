"""The aggregate tables of a MOS study (one table per study): mean scores by
system x gender x annotator, agreement between annotators, and blind pairwise preferences."""

from __future__ import annotations

from collections import defaultdict
from statistics import mean

from benchmarks.mos.agreement import krippendorff_alpha_interval, within_one
from benchmarks.mos.store import CRITERIA

ALL = "all"


def score_table(scores: list[dict]) -> list[dict]:
    """One row per (system, gender, annotator), plus the pooled rows where gender and/or
    annotator is "all": n items scored and the mean of every criterion."""
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for row in scores:
        for gender in (row["gender"], ALL):
            for annotator in (row["annotator"], ALL):
                groups[(row["system"], gender, annotator)].append(row)
    out = []
    for (system, gender, annotator), rows in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        out.append(
            {
                "system": system,
                "gender": gender,
                "annotator": annotator,
                "n": len(rows),
                **{c: round(mean(r[c] for r in rows), 3) for c in CRITERIA},
            }
        )
    return out


def _order(key: tuple[str, str, str]):
    # Per-annotator rows first, the pooled "all" row last within each group.
    return tuple((part == ALL, part) for part in key)


def agreement_table(scores: list[dict]) -> list[dict]:
    """Per criterion, over items that two or more annotators scored: Krippendorff's alpha
    (interval) and the share of annotator pairs within one point."""
    annotators = {r["annotator"] for r in scores}
    out = []
    for c in CRITERIA:
        units: dict[str, list[int]] = defaultdict(list)
        for r in scores:
            units[r["item"]].append(r[c])
        shared = {k: v for k, v in units.items() if len(v) >= 2}
        alpha = krippendorff_alpha_interval(shared)
        close = within_one(shared)
        out.append(
            {
                "criterion": c,
                "annotators": len(annotators),
                "items": len(shared),
                "alpha": None if alpha is None else round(alpha, 3),
                "within_1": None if close is None else round(close, 3),
            }
        )
    return out


def preference_table(preferences: list[dict]) -> list[dict]:
    """Blind A/B judgements per pair of systems (names sorted: a < b), per gender and pooled:
    wins of each, ties, and a's preference rate with ties counted half."""
    groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for p in preferences:
        winner = {"left": p["left_system"], "right": p["right_system"], "tie": None}[p["choice"]]
        a, b = sorted((p["left_system"], p["right_system"]))
        for gender in (p["gender"], ALL):
            groups[(a, b, gender)].append(winner)
    out = []
    for (a, b, gender), winners in sorted(groups.items(), key=lambda kv: _order(kv[0])):
        wins_a, wins_b = winners.count(a), winners.count(b)
        ties = len(winners) - wins_a - wins_b
        out.append(
            {
                "a": a,
                "b": b,
                "gender": gender,
                "n": len(winners),
                "wins_a": wins_a,
                "wins_b": wins_b,
                "ties": ties,
                "a_preferred": round((wins_a + ties / 2) / len(winners), 3),
            }
        )
    return out


def report(store) -> dict:
    scores, preferences = store.scores(), store.preferences()
    return {
        "scores": score_table(scores),
        "agreement": agreement_table(scores),
        "preferences": preference_table(preferences),
    }
