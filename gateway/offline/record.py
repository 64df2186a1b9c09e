"""What offline look matching stores per look, in the index backend that serves the catalog."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from gateway.index.base import EmbeddingSpace


@dataclass
class LookRequest:
    """One look to match: a manifest line (or a queue message)."""

    look_id: str
    image: str  # a local path or an http(s) URL
    filters: dict = field(default_factory=dict)  # build_filters(**filters): market, user preferences
    keep: int = 30  # candidates kept per garment, more than any k: read-time filters drop some

    def digest(self) -> str:
        """What the look's answer depends on besides the space and the catalog: a change here
        makes a stored answer stale for resuming."""
        body = json.dumps([self.image, self.filters, self.keep], sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:32]

    def to_dict(self) -> dict:
        return {"look_id": self.look_id, "image": self.image, "filters": self.filters, "keep": self.keep}


@dataclass
class LookMatches:
    """A look's per-garment candidate lists, as the pipeline produced them (ids and scores;
    product state is read from the catalog when served, never stored here)."""

    look_id: str
    space: EmbeddingSpace
    computed_at: float  # unix seconds
    # The catalog's position when matching started: an event_seq (gateway/ingest/events.py), so
    # it orders against the stream's events and `looksync match-looks --stale --before`.
    catalog_position: int
    request: LookRequest
    layers: list[dict]  # gateway/look/stored.py: query, box, rerank source, candidates

    def to_row(self) -> dict:
        """Flat fields both stores index (look id, space, time) and the rest as JSON."""
        return {
            "look_id": self.look_id,
            "model": self.space.model,
            "version": self.space.version,
            "dim": self.space.dim,
            "computed_at": self.computed_at,
            "catalog_position": self.catalog_position,
            "digest": self.request.digest(),
            "request": json.dumps(self.request.to_dict(), sort_keys=True),
            "layers": json.dumps(self.layers),
        }

    @classmethod
    def from_row(cls, row: dict) -> LookMatches:
        request = json.loads(row["request"])
        return cls(
            look_id=row["look_id"],
            space=EmbeddingSpace(row["model"], int(row["version"]), int(row["dim"])),
            computed_at=float(row["computed_at"]),
            catalog_position=int(row["catalog_position"]),
            request=LookRequest(**request),
            layers=json.loads(row["layers"]),
        )

    def in_space(self, space: EmbeddingSpace) -> bool:
        return (self.space.model, self.space.version) == (space.model, space.version)

    def candidate_count(self) -> int:
        return sum(len(layer["candidates"]) for layer in self.layers)
