"""Catalog events (docs/ARCHITECTURE.md, "Catalog records and events"): parsing, validation, ordering.

Each Redis stream id ("<ms>-<seq>") becomes an integer `event_seq` that orders writes of one
product in the index, so a replayed or late event never overwrites a newer state.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from gateway.catalog import TEXT_LIMITS, RecordError, check_field
from gateway.ingest.enrich import vendor_category, vendor_gender

STREAM = "catalog-updates"
DEAD_LETTERS = "catalog-updates:dead"
GROUP = "looksync-ingest"
# Stream ids that trimming must keep (field: who holds it, e.g. a swap's catch-up point).
HOLDS = "catalog-updates:holds"
SCHEMA = 1
TYPES = ("product.upsert", "product.update", "product.delete")
# Fields a metadata-only update may change. A new image is a product.upsert.
UPDATABLE = (
    "title",
    "brand",
    "category",
    "gender",
    "market",
    "price",
    "currency",
    "sizes",
    "in_stock",
    "retailer",
    "product_url",
)


class PoisonEvent(ValueError):
    """An event that can never be applied; it goes to the dead-letter stream with this reason."""


@dataclass
class Event:
    stream_id: str
    seq: int
    type: str
    product_id: str
    record: dict | None = None  # product.upsert
    fields: dict | None = None  # product.update


def stream_seq(stream_id: str) -> int:
    ms, _, seq = stream_id.partition("-")
    return seq_at_ms(int(ms), int(seq or 0))


def seq_at_ms(ms: int, n: int = 0) -> int:
    """The event_seq of a moment: writes that do not come from the stream (a bulk index, a
    catalog snapshot) are ordered against stream events by their time."""
    return ms * 1_000_000 + n


def snapshot_seq(path, as_of: str | None = None) -> int:
    """The event_seq of a catalog file's writes (`looksync index`, a swap rebuild): the moment
    the snapshot was taken, so that an update, delete or re-listing that reached the stream
    after it is never undone by re-indexing the file. `as_of`: a stream id ("<ms>-<n>") or an
    ISO-8601 time with a zone; default: the file's modification time."""
    if as_of is None:
        return seq_at_ms(Path(path).stat().st_mtime_ns // 1_000_000)
    if re.fullmatch(r"\d+-\d+|\d{10,}", as_of):  # a stream id, or milliseconds since 1970
        seq = stream_seq(as_of)
        if not 0 <= seq < 2**63:
            raise ValueError(f"as of {as_of!r}: outside 1970..2262")
        return seq
    try:
        moment = datetime.fromisoformat(as_of.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"as of {as_of!r}: expected a stream id (<ms>-<n>) or an ISO-8601 time") from None
    if moment.tzinfo is None:
        raise ValueError(f"as of {as_of!r}: give a time zone (e.g. Z or +01:00)")
    seq = seq_at_ms(int(moment.timestamp() * 1000))
    if not 0 <= seq < 2**63:  # stored as int64
        raise ValueError(f"as of {as_of!r}: outside 1970..2262")
    return seq


async def redis_time_ms(redis) -> int:
    """Now, on the stream's clock (Redis TIME): writers outside the stream order themselves
    against stream ids with it, never with their own host's clock."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _check_field(name: str, value):
    """An update's field: vendor words standardised as for upserts, then the record's rules."""
    standard = {"category": vendor_category, "gender": vendor_gender}.get(name)
    if standard is not None:
        value = standard(value) or value  # unknown words fall through to a clear error
    try:
        return check_field(name, value)
    except RecordError as exc:
        raise PoisonEvent(f"fields.{exc}") from None


def _product_id(value: str, where: str) -> str:
    """An event's product id, by the record's rules for ids: a delete or an update of an id no
    upsert could have written is poison at once, not a tombstone or a wait for a product."""
    value = value.strip()
    if len(value) > TEXT_LIMITS["id"]:
        raise PoisonEvent(f"{where}: longer than {TEXT_LIMITS['id']} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PoisonEvent(f"{where}: not valid Unicode (a lone surrogate at character {exc.start})") from None
    return value


def parse_event(stream_id: str, entry: dict) -> Event:
    """Validate one stream entry ({"event": "<json>"}); raises PoisonEvent with the reason."""
    raw = entry.get("event") if isinstance(entry, dict) else None
    if raw is None:
        raise PoisonEvent("entry has no 'event' field")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # incl. over-long integers
        raise PoisonEvent(f"event is not JSON we accept ({str(exc)[:200]})") from None
    if not isinstance(doc, dict):
        raise PoisonEvent("event is not a JSON object")
    if doc.get("schema") != SCHEMA:
        raise PoisonEvent(f"schema: {doc.get('schema')!r} is not supported (expected {SCHEMA})")
    kind = doc.get("type")
    if kind not in TYPES:
        raise PoisonEvent(f"type: {kind!r} is not one of {', '.join(TYPES)}")
    seq = stream_seq(stream_id)
    if kind == "product.upsert":
        record = doc.get("product")
        if not isinstance(record, dict) or not isinstance(record.get("id"), str) or not record["id"].strip():
            raise PoisonEvent("product: missing, or without an id")
        if not isinstance(record.get("image_url"), str) or not record["image_url"].strip():
            raise PoisonEvent("product.image_url: missing")
        return Event(stream_id, seq, kind, _product_id(record["id"], "product.id"), record=record)
    pid = doc.get("id")
    if not isinstance(pid, str) or not pid.strip():
        raise PoisonEvent("id: missing")
    pid = _product_id(pid, "id")
    if kind == "product.delete":
        return Event(stream_id, seq, kind, pid)
    fields = doc.get("fields")
    if not isinstance(fields, dict) or not fields:
        raise PoisonEvent("fields: missing or empty")
    unknown = sorted(set(fields) - set(UPDATABLE))
    if unknown:
        raise PoisonEvent(f"fields: {', '.join(unknown)} cannot be updated (a new image is a product.upsert)")
    return Event(stream_id, seq, kind, pid, fields={k: _check_field(k, v) for k, v in fields.items()})


def upsert_event(record: dict) -> dict:
    return {"schema": SCHEMA, "type": "product.upsert", "product": record}


def update_event(product_id: str, fields: dict) -> dict:
    return {"schema": SCHEMA, "type": "product.update", "id": product_id, "fields": fields}


def delete_event(product_id: str) -> dict:
    return {"schema": SCHEMA, "type": "product.delete", "id": product_id}


async def publish(redis, event: dict, stream: str = STREAM) -> str:
    """The producer library: append one event; returns its stream id."""
    stream_id = await redis.xadd(stream, {"event": json.dumps(event)})
    return stream_id.decode() if isinstance(stream_id, bytes) else stream_id
