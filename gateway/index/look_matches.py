"""Where offline look matches live: beside the catalog, in the backend that serves it.

    embedded        a LanceDB table `look-matches-<alias>` in the index directory
    Elasticsearch   an index `looksync-look-matches-<alias>`

One record per look id, whatever the number of workers or redeliveries: a write replaces the
stored record unless that one was computed later (a slow worker's older answer never
overwrites a newer one). Records hold ids and scores; product state is read from the catalog
when a look is served (gateway/offline/serve.py).
"""

from __future__ import annotations

import json

import pyarrow as pa

from gateway.errors import Unavailable
from gateway.offline.record import LookMatches

_SCHEMA = pa.schema(
    [
        ("look_id", pa.string()),
        ("model", pa.string()),
        ("version", pa.int32()),
        ("dim", pa.int32()),
        ("computed_at", pa.float64()),
        ("catalog_position", pa.int64()),
        ("digest", pa.string()),
        ("request", pa.string()),
        ("layers", pa.string()),
    ]
)
_SUMMARY = ["look_id", "model", "version", "dim", "computed_at", "catalog_position", "digest", "request"]


def _newest(records: list[LookMatches]) -> list[LookMatches]:
    """One record per look id (the latest computed), as a single write needs."""
    best: dict[str, LookMatches] = {}
    for r in records:
        if r.look_id not in best or r.computed_at >= best[r.look_id].computed_at:
            best[r.look_id] = r
    return list(best.values())


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class EmbeddedLookMatches:
    def __init__(self, index):
        self.index = index  # EmbeddedIndex: its connection and its cross-process writer lock
        self.name = f"look-matches-{index.alias}"
        self._tables: dict[bool, object] = {}

    async def _table(self, strong: bool = False):
        table = self._tables.get(strong)
        if table is None:
            db = await self.index._connect(strong)
            table = await db.create_table(self.name, schema=_SCHEMA, exist_ok=True)
            self._tables[strong] = table
        return table

    async def put(self, records: list[LookMatches]) -> None:
        if not records:
            return
        rows = [r.to_row() for r in _newest(records)]
        table = await self._table(strong=True)
        # Under the table's writer lock: two workers inserting one new look id at once would
        # otherwise both insert it (Lance's merge_insert does not see the other's new row).
        async with self.index._writer(self.name):
            try:
                await (
                    table.merge_insert("look_id")
                    .when_matched_update_all(where="target.computed_at <= source.computed_at")
                    .when_not_matched_insert_all()
                    .execute(pa.Table.from_pylist(rows, schema=_SCHEMA))
                )
            except (RuntimeError, OSError) as exc:  # the disk or the table: the caller waits
                self._tables.clear()
                raise Unavailable(f"writing {self.name} failed: {str(exc)[:200]}") from None

    async def get(self, look_ids: list[str], strong: bool = False) -> dict[str, LookMatches]:
        out: dict[str, LookMatches] = {}
        if not look_ids:
            return out
        table = await self._table(strong)
        for start in range(0, len(look_ids), 500):
            chunk = look_ids[start : start + 500]
            where = f"look_id IN ({', '.join(map(_quote, chunk))})"
            for row in (await table.query().where(where).to_arrow()).to_pylist():
                out[row["look_id"]] = LookMatches.from_row(row)
        return out

    async def scan(self, batch_size: int = 1000):
        """Every record without its layers (what --stale and status need), in batches."""
        table = await self._table(strong=True)
        batch = []
        async for records in await table.query().select(_SUMMARY).to_batches():
            for row in records.to_pylist():
                batch.append(LookMatches.from_row({**row, "layers": "[]"}))
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    async def count(self) -> int:
        return await (await self._table(strong=True)).count_rows()

    async def optimize(self) -> None:
        """Fragments merged (one per batch written) and a B-tree on look_id: GetLookMatches
        reads one look by id from a table of millions. Under the writer lock: workers write."""
        from lancedb.index import BTree

        table = await self._table(strong=True)
        async with self.index._writer(self.name):
            await table.optimize()
            await table.create_index("look_id", config=BTree(), replace=True)


def _source(r: LookMatches) -> dict:
    row = r.to_row()
    stored = {"request": r.request.to_dict(), "layers": r.layers}
    return {**{k: v for k, v in row.items() if k not in ("request", "layers")}, "stored": stored}


def _record(source: dict) -> LookMatches:
    stored = source["stored"]
    return LookMatches.from_row(
        {
            **source,
            "request": json.dumps(stored["request"]),
            "layers": json.dumps(stored.get("layers", [])),
        }
    )


class ElasticLookMatches:
    def __init__(self, index):
        self.index = index  # ElasticIndex: its client and error handling
        self.name = f"looksync-look-matches-{index.alias}"
        self._ready = False

    async def _ensure(self) -> None:
        if self._ready:
            return
        from elasticsearch import BadRequestError

        try:
            await self.index._call(
                f"create {self.name}",
                self.index._client().indices.create(
                    index=self.name,
                    mappings={
                        "dynamic": "strict",
                        "properties": {
                            "look_id": {"type": "keyword"},
                            "model": {"type": "keyword"},
                            "version": {"type": "integer"},
                            "dim": {"type": "integer"},
                            "computed_at": {"type": "double"},
                            "catalog_position": {"type": "long"},
                            "digest": {"type": "keyword"},
                            # The request and the candidate lists: read back whole from
                            # _source, never searched, so not parsed or indexed at all.
                            # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/enabled.html
                            "stored": {"type": "object", "enabled": False},
                        },
                    },
                ),
            )
        except BadRequestError as exc:  # it exists (made by another worker, or before)
            if "resource_already_exists_exception" not in str(exc):
                raise
        self._ready = True

    async def put(self, records: list[LookMatches]) -> None:
        if not records:
            return
        await self._ensure()
        # External versioning by computation time: an older answer arriving late is refused
        # by Elasticsearch (409), which is what we want, not an error.
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-index_.html#index-versioning
        actions = [
            {
                "_op_type": "index",
                "_index": self.name,
                "_id": r.look_id,
                "version": int(r.computed_at * 1_000_000),
                "version_type": "external_gte",
                "_source": _source(r),
            }
            for r in _newest(records)
        ]
        failed = await self.index._bulk(f"write look matches to {self.name}", actions)
        errors = {k: v for k, v in failed.items() if v.get("status") != 409}
        if errors:
            look_id, item = next(iter(errors.items()))
            raise Unavailable(f"writing look {look_id!r} to {self.name} failed: {item.get('error')}")

    async def get(self, look_ids: list[str], strong: bool = False) -> dict[str, LookMatches]:
        if not look_ids:
            return {}
        await self._ensure()
        out = {}
        for start in range(0, len(look_ids), 500):
            chunk = look_ids[start : start + 500]
            resp = await self.index._call(
                f"read look matches from {self.name}",
                self.index._client().mget(index=self.name, ids=chunk),
            )
            for doc in resp["docs"]:
                if "error" in doc:  # never read as "not matched"
                    raise Unavailable(
                        f"reading look {doc.get('_id')!r} from {self.name} failed: {doc['error']}"
                    )
                if doc.get("found"):
                    out[doc["_id"]] = _record(doc["_source"])
        return out

    async def scan(self, batch_size: int = 1000):
        await self._ensure()
        after = None
        while True:
            body = {
                "size": batch_size,
                "sort": [{"look_id": "asc"}],
                "_source": {"excludes": ["stored.layers"]},
            }
            if after is not None:
                body["search_after"] = [after]
            resp = await self.index._read(
                f"scan {self.name}", self.index._client().search(index=self.name, **body)
            )
            hits = resp["hits"]["hits"]
            if not hits:
                return
            yield [_record(h["_source"]) for h in hits]
            after = hits[-1]["_source"]["look_id"]

    async def count(self) -> int:
        await self._ensure()
        resp = await self.index._read(f"count {self.name}", self.index._client().count(index=self.name))
        return int(resp["count"])

    async def optimize(self) -> None:
        """Make what was written visible to scans and counts at once."""
        await self._ensure()
        await self.index._call(f"refresh {self.name}", self.index._client().indices.refresh(index=self.name))
