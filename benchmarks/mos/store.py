"""Annotations in SQLite: one row per (annotator, item) for scores and per (annotator, pair)
for blind preferences. A second submission of the same item replaces the first (annotators
may revise), so the tables never hold two opinions of one person on one thing."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CRITERIA = ("colour", "fit", "sleeve", "fabric", "pattern", "overall")
CHOICES = ("left", "right", "tie")
_ANNOTATOR = re.compile(r"^[\w][\w .@-]{0,63}$")

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS scores (
    annotator TEXT NOT NULL,
    item TEXT NOT NULL,
    system TEXT NOT NULL,
    look TEXT NOT NULL,
    gender TEXT NOT NULL,
    {", ".join(f"{c} INTEGER NOT NULL CHECK ({c} BETWEEN 1 AND 5)" for c in CRITERIA)},
    at REAL NOT NULL,
    PRIMARY KEY (annotator, item)
);
CREATE TABLE IF NOT EXISTS preferences (
    annotator TEXT NOT NULL,
    pair TEXT NOT NULL,
    look TEXT NOT NULL,
    gender TEXT NOT NULL,
    left_system TEXT NOT NULL,
    right_system TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie')),
    at REAL NOT NULL,
    PRIMARY KEY (annotator, pair)
);
"""


class BadInput(ValueError):
    """An annotation the store refuses; the message names the field and what is wrong."""


def check_annotator(name: str) -> str:
    name = (name or "").strip()
    if not _ANNOTATOR.match(name):
        raise BadInput(
            f"annotator: {name!r} is not a name (1-64 letters, digits, spaces, '.', '@', '-' or '_')"
        )
    return name


def check_scores(form: dict[str, str]) -> dict[str, int]:
    scores = {}
    for c in CRITERIA:
        raw = (form.get(c) or "").strip()
        if raw not in {"1", "2", "3", "4", "5"}:
            raise BadInput(f"{c}: {raw!r} is not a score from 1 to 5" if raw else f"{c}: missing score")
        scores[c] = int(raw)
    return scores


class Store:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        # One connection per call: the web server answers on several threads. WAL lets the
        # results page read while an annotator writes. `with db` commits or rolls back.
        db = sqlite3.connect(self.path, timeout=10)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            with db:
                yield db
        finally:
            db.close()

    def save_scores(self, annotator: str, item: dict, scores: dict[str, int]) -> None:
        with self._db() as db:
            db.execute(
                f"INSERT OR REPLACE INTO scores (annotator, item, system, look, gender, "
                f"{', '.join(CRITERIA)}, at) VALUES ({', '.join('?' * (len(CRITERIA) + 6))})",
                (
                    annotator,
                    item["id"],
                    item["system"],
                    item["look"],
                    item["gender"],
                    *(scores[c] for c in CRITERIA),
                    time.time(),
                ),
            )

    def save_preference(self, annotator: str, pair: dict, left: str, right: str, choice: str) -> None:
        if choice not in CHOICES:
            raise BadInput(f"choice: {choice!r} is not one of {', '.join(CHOICES)}")
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO preferences VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (annotator, pair["id"], pair["look"], pair["gender"], left, right, choice, time.time()),
            )

    def scored_items(self, annotator: str) -> set[str]:
        with self._db() as db:
            return {r[0] for r in db.execute("SELECT item FROM scores WHERE annotator = ?", (annotator,))}

    def judged_pairs(self, annotator: str) -> set[str]:
        with self._db() as db:
            return {
                r[0] for r in db.execute("SELECT pair FROM preferences WHERE annotator = ?", (annotator,))
            }

    def scores(self) -> list[dict]:
        with self._db() as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM scores ORDER BY system, gender, annotator")]

    def preferences(self) -> list[dict]:
        with self._db() as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM preferences ORDER BY pair, annotator")]
