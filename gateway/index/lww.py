"""Per-field last-writer-wins for catalog events, so that the order events arrive in never
matters: each stored field remembers the position (event_seq) of the event that set it.

- upsert(seq):  sets every field whose stored seq is older; a tombstone newer than the upsert
                wins; an upsert newer than the tombstone brings the product back (fields set
                by even newer events keep their values).
- update(seq):  sets the given fields where their stored seq is older; older than a delete it
                is "stale"; a product that is not there (or deleted before it) is "missing"
                (its upsert may still be on its way).
- delete(seq):  applies when no upsert newer than it has been seen; leaves a tombstone.

Replaying any event gives the same state (idempotent); any interleaving of the same events
gives the same final state (commutative) — which is what at-least-once delivery and several
workers need. Pure functions on plain dicts; the index backends store the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE = "image"  # the image hash and vector travel together, under one seq


@dataclass
class Op:
    kind: str  # "upsert" | "update" | "delete" | "item"
    product_id: str
    seq: int
    fields: dict = field(default_factory=dict)  # upsert: every field, + image_hash, vector


def apply(row: dict | None, op: Op) -> tuple[dict | None, str]:
    """The new row (None: unchanged) and the outcome: applied | stale | missing."""
    if op.kind == "item":
        # The dedup job's grouping (gateway/dedup.py): not a catalog event, so outside the
        # per-field ordering; it applies to a live product, as of the image it was computed on.
        if row is None or row["deleted"]:
            return None, "missing"
        if op.fields.get("image_hash") not in (None, row.get("image_hash")):
            return None, "stale"  # the image changed since: the next dedup run decides again
        if row.get("item_id", "") == op.fields["item_id"]:
            return None, "stale"
        return {**row, "item_id": op.fields["item_id"]}, "applied"
    seqs = dict(row["field_seqs"]) if row else {}
    if op.kind == "upsert":
        if row is not None and row["deleted"] and row["deleted_seq"] >= op.seq:
            return None, "stale"
        # A re-listing after a delete starts from the tombstone: fields written by events newer
        # than this upsert (updates that arrived before it) must survive it.
        new = dict(row) if row else {"id": op.product_id, "deleted_seq": 0}
        new["deleted"] = False
        changed = False
        for name, value in op.fields.items():
            key = IMAGE if name in ("image_hash", "vector") else name
            if seqs.get(key, -1) < op.seq:
                if name == "image_hash" and row is not None and row.get("image_hash") != value:
                    new["item_id"] = ""  # another picture: its item is decided again
                new[name] = value
                changed = True
        for name in op.fields:
            key = IMAGE if name in ("image_hash", "vector") else name
            seqs[key] = max(seqs.get(key, -1), op.seq)
        if not changed and row is not None and not row["deleted"]:
            return None, "stale"
        new["field_seqs"] = seqs
        new["event_seq"] = max(seqs.values())
        return new, "applied"
    if row is not None and row["deleted"] and op.kind == "update" and row["deleted_seq"] >= op.seq:
        return None, "stale"  # the product was deleted after this update: nothing to do
    if row is None or row["deleted"]:
        if op.kind == "delete":
            if row is not None and row["deleted_seq"] >= op.seq:
                return None, "stale"
            # A newer delete over a tombstone keeps what the tombstone remembers (the positions
            # of fields set before it), so the outcome does not depend on arrival order.
            tomb = {**(row or {}), "id": op.product_id, "deleted": True, "deleted_seq": op.seq}
            tomb["field_seqs"] = dict(row["field_seqs"]) if row else {}
            tomb["event_seq"] = max(op.seq, row["event_seq"] if row else 0)
            return tomb, "applied"
        return None, "missing"
    if op.kind == "delete":
        if seqs.get(IMAGE, -1) > op.seq:
            return None, "stale"  # re-listed by an upsert after this delete
        return {
            **row,
            "deleted": True,
            "deleted_seq": op.seq,
            "event_seq": max(row["event_seq"], op.seq),
        }, "applied"
    new, changed = dict(row), False
    for name, value in op.fields.items():
        if seqs.get(name, -1) < op.seq:
            new[name] = value
            seqs[name] = op.seq
            changed = True
    if not changed:
        return None, "stale"
    new["field_seqs"] = seqs
    new["event_seq"] = max(seqs.values())
    return new, "applied"
