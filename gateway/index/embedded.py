"""The embedded catalog index: LanceDB tables on local disk, no server.

Layout under `<data_dir>/index/`:

    products-clip-v1.lance/   one LanceDB table per embedding space
    manifest.json             {"aliases": {"products": "products-clip-v1"},
                               "indexes": {"products-clip-v1": {"model": "clip", "version": 1, "dim": 64}}}

The manifest is the embedded stand-in for Elasticsearch's aliases and mapping `_meta`: it is
replaced atomically (write, fsync, rename) under a file lock, and every process re-reads it
when it changes, so the gateway follows an alias move or a new index without a restart.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from datetime import timedelta
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gateway.catalog import Product
from gateway.errors import FailedPrecondition, Unavailable
from gateway.filters import SearchFilters
from gateway.index.ann_plan import SearchPlan, index_config, partitions_for, plan_search, scalar_indexes
from gateway.index.base import (
    CatalogIndex,
    EmbeddingSpace,
    ScoredProduct,
    StoredProduct,
    check_query,
    within,
)
from gateway.index.exact_cache import RowVectorCache, exact_search
from gateway.index.lww import Op
from gateway.index.lww import apply as lww_apply
from gateway.ingest.events import seq_at_ms

MANIFEST = "manifest.json"


def wall_clock_seq() -> int:
    """An event_seq for writes that do not come from the queue, comparable with stream ids."""
    return seq_at_ms(int(time.time() * 1000))


_FIELDS = [f for f in Product.__dataclass_fields__]


def _schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("title", pa.string()),
            ("brand", pa.string()),
            ("category", pa.string()),
            ("gender", pa.string()),
            ("market", pa.string()),
            ("price", pa.float64()),
            ("currency", pa.string()),
            ("sizes", pa.list_(pa.string())),
            ("in_stock", pa.bool_()),
            ("image_url", pa.string()),
            ("retailer", pa.string()),
            ("product_url", pa.string()),
            ("item_id", pa.string()),
            ("image_hash", pa.string()),
            # Event ordering (gateway/index/lww.py): the seq of the event that set each field,
            # so replays and out-of-order deliveries cannot regress a product.
            ("field_seqs", pa.string()),
            ("event_seq", pa.int64()),
            # Deletes leave a tombstone so a late, older upsert cannot bring a product back;
            # searches never see tombstones.
            ("deleted", pa.bool_()),
            ("deleted_seq", pa.int64()),
            # Optimistic concurrency between writer processes: a write applies only on top of
            # the row version it was computed from, else it is recomputed.
            ("row_version", pa.int64()),
            ("vector", pa.list_(pa.float32(), dim)),
        ]
    )


# Columns added after the first release, in the order they came (see EmbeddedIndex._migrate).
ADDED_COLUMNS = ("retailer", "product_url", "item_id")


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def where_clause(f: SearchFilters) -> str:
    """The filters as a LanceDB (DataFusion SQL) predicate, every value quoted."""
    parts = ["deleted = false"]
    if f.categories:
        parts.append(f"category IN ({', '.join(map(_quote, f.categories))})")
    if f.genders():
        parts.append(f"gender IN ({', '.join(map(_quote, f.genders()))})")
    if f.market:
        parts.append(f"market = {_quote(f.market)}")
    if f.brands:
        parts.append(f"brand IN ({', '.join(map(_quote, f.brands))})")
    if f.sizes:
        parts.append(f"array_has_any(sizes, [{', '.join(map(_quote, f.sizes))}])")
    if f.min_price is not None:
        parts.append(f"price >= {f.min_price!r}")
    if f.max_price is not None:
        parts.append(f"price <= {f.max_price!r}")
    if f.in_stock_only:
        parts.append("in_stock = true")
    return " AND ".join(parts)


def _hits(found: pa.Table, with_vectors: bool, dim: int) -> list[tuple[int, ScoredProduct]]:
    """(query index, hit) per row of a kNN answer. Column by column: converting whole rows to
    dicts cost ~4 ms per 80 hits, more than the search itself once queries are batched."""
    n = found.num_rows
    if n == 0:
        return []
    products = _products(found)
    queries, scores = _queries_and_scores(found)
    vectors = None
    if with_vectors:
        flat = found.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors = np.asarray(flat, dtype=np.float32).reshape(n, dim)
    return [
        (queries[i], ScoredProduct(product, float(scores[i]), None if vectors is None else vectors[i]))
        for i, product in enumerate(products)
    ]


def _queries_and_scores(found: pa.Table) -> tuple[list[int], np.ndarray]:
    """Per row of a kNN answer: the query it answers (0 for a one-vector query) and its cosine."""
    scores = 1.0 - found.column("_distance").to_numpy(zero_copy_only=False).astype(np.float64)
    if "query_index" in found.column_names:
        return found.column("query_index").to_pylist(), scores
    return [0] * found.num_rows, scores


def _products(found: pa.Table) -> list[Product]:
    names = [f for f in _FIELDS if f in found.column_names]
    columns = [found.column(f).to_pylist() for f in names]
    return [
        Product(**{k: ("" if v is None else v) for k, v in zip(names, values)}) for values in zip(*columns)
    ]


def _row_product(row: dict) -> Product:
    return Product(**{k: row[k] if row.get(k) is not None else "" for k in _FIELDS})


class Manifest:
    """Aliases and per-index embedding identity, shared by the processes of one machine."""

    def __init__(self, root: Path):
        self.path = root / MANIFEST
        self._lock_path = root / ".manifest.lock"
        self._stamp: tuple[int, int] | None = None
        self._data: dict = {"aliases": {}, "indexes": {}}

    def read(self) -> dict:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return self._data
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp:
            self._data = json.loads(self.path.read_text())
            self._stamp = stamp
        return self._data

    @contextmanager
    def edit(self):
        """Read-modify-write under an exclusive lock; readers never see a partial file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._stamp = None
            data = json.loads(json.dumps(self.read()))
            yield data
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            with open(tmp, "w") as fh:
                json.dump(data, fh, indent=2, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)


class EmbeddedIndex(CatalogIndex):
    def __init__(
        self,
        root: Path,
        alias: str = "products",
        refresh_s: float = 0.5,
        ann_min_rows: int = 50_000,
        exact_max_rows: int = 20_000,
        exact_cache_mb: float = 1024,
        exact_cache_min_floats: int = 1_000_000,
    ):
        # Measured (benchmarks/RESULTS.md, embedded index at scale): a flat scan costs ~4 ms per
        # 1,000 1024-d rows on 2 cores; IVF-HNSW-SQ answers in ~4 ms but loses recall when a
        # filter leaves few rows. So: an ANN index from ann_min_rows on, and exact search
        # whenever the filter leaves at most exact_max_rows.
        self.ann_min_rows = ann_min_rows
        self.exact_max_rows = exact_max_rows
        # Exact searches score vectors held in memory (gateway/index/exact_cache.py), per table
        # within this budget; 0 leaves exact search to LanceDB.
        self.exact_cache_bytes = int(exact_cache_mb * 2**20)
        self._exact_caches: dict[str, RowVectorCache] = {}
        self.exact_cache_min_floats = exact_cache_min_floats
        # table -> (IVF partitions or 0, rows, when checked)
        self._ann: dict[str, tuple[int, int, float]] = {}
        self.root = Path(root)
        self.alias = alias
        self.refresh_s = refresh_s
        self.manifest = Manifest(self.root)
        self._db = self._strong_db = None
        self._tables: dict[tuple[str, bool], object] = {}
        self._manifest_checked = 0.0
        self._lock = asyncio.Lock()
        self._write_locks: dict[str, asyncio.Lock] = {}

    async def _connect(self, strong: bool = False):
        """Searches may lag other processes' commits by refresh_s (cheap); read-modify-write
        goes through a second, strongly consistent connection: computing a write from a stale
        snapshot would let an old event overwrite a newer one."""
        if self._db is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._db = await lancedb.connect_async(
                str(self.root), read_consistency_interval=timedelta(seconds=self.refresh_s)
            )
            self._strong_db = await lancedb.connect_async(
                str(self.root), read_consistency_interval=timedelta(0)
            )
        return self._strong_db if strong else self._db

    def _manifest(self) -> dict:
        now = time.monotonic()
        if now - self._manifest_checked >= self.refresh_s:
            self._manifest_checked = now
            return self.manifest.read()  # a stat(); re-parsed only when the file changed
        return self.manifest._data

    async def _table(self, name: str, strong: bool = False):
        table = self._tables.get((name, strong))
        if table is None:
            db = await self._connect(strong)
            try:
                table = await db.open_table(name)
            except (ValueError, FileNotFoundError) as exc:
                raise Unavailable(f"index {name!r} cannot be opened: {exc}") from None
            await self._migrate(name, table)
            self._tables[(name, strong)] = table
        return table

    async def _migrate(self, name: str, table) -> None:
        """Tables made before a column existed get it, empty (Product fields added since:
        retailer, product_url, item_id). Under the writer lock: one process adds them."""
        missing = [f for f in ADDED_COLUMNS if f not in (await table.schema()).names]
        if not missing:
            return
        async with self._writer(name):
            await table.checkout_latest()
            missing = [f for f in ADDED_COLUMNS if f not in (await table.schema()).names]
            if missing:
                await table.add_columns({f: "CAST('' AS STRING)" for f in missing})
                await table.alter_columns(*({"path": f, "nullable": True} for f in missing))

    def _space_of(self, name: str) -> EmbeddingSpace:
        meta = self._manifest()["indexes"].get(name)
        if meta is None:
            raise FailedPrecondition(f"index {name!r} has no recorded embedding space")
        return EmbeddingSpace.from_record(meta)

    async def space_of(self, name: str) -> EmbeddingSpace | None:
        return self._space_of(name) if name in self._manifest()["indexes"] else None

    async def space(self) -> EmbeddingSpace | None:
        target = self._manifest()["aliases"].get(self.alias)
        return None if target is None else self._space_of(target)

    async def search(self, vector, space, filters, k, with_vectors=False, index=None, timeout_s=None):
        # The index of the query's own space (or the one named), never "whatever the alias
        # names now": a request that resolved its space before an alias move stays consistent.
        target = index or space.index_name
        if target not in self._manifest()["indexes"]:
            self._manifest_checked = 0.0
            if target not in self._manifest()["indexes"]:
                raise FailedPrecondition(f"no index {target!r} for query space {space}")
        index_space = self._space_of(target)
        check_query(vector, space, index_space)
        found = await self._knn(
            target, np.asarray(vector, dtype=np.float32), filters, k, timeout_s, with_vectors
        )
        return index_space, [hit for _, hit in _hits(found, with_vectors, index_space.dim)]

    async def search_many(self, vectors, space, filters, k, with_vectors=False):
        """One LanceDB multi-vector query for several query vectors of one space."""
        if len(vectors) == 0:
            return []
        found = await self._knn_many(vectors, space, filters, k, with_vectors=with_vectors)
        out: list[list[ScoredProduct]] = [[] for _ in vectors]
        for query, hit in _hits(found, with_vectors, space.dim):
            out[query].append(hit)
        return out

    async def neighbours(self, vectors, space, filters, k):
        """Ids and scores only, with the batch-job plan (more partitions probed): the dedup
        self-join holds its listings already, and converting product columns cost as much as
        the search (1 M listings: 668 vs 359 queries/s)."""
        if len(vectors) == 0:
            return []
        found = await self._knn_many(vectors, space, filters, k, with_vectors=False, columns=["id"], job=True)
        ids = found.column("id").to_pylist()
        queries, scores = _queries_and_scores(found)
        out: list[list[tuple[str, float]]] = [[] for _ in vectors]
        for query, pid, score in zip(queries, ids, scores):
            out[query].append((pid, float(score)))
        return out

    async def _knn_many(self, vectors, space, filters, k, **options) -> pa.Table:
        target = space.index_name
        if target not in self._manifest()["indexes"]:
            raise FailedPrecondition(f"no index {target!r} for query space {space}")
        for v in vectors:
            check_query(v, space, self._space_of(target))
        batch = [np.asarray(v, dtype=np.float32) for v in vectors]
        return await self._knn(target, batch if len(batch) > 1 else batch[0], filters, k, None, **options)

    async def _knn(
        self,
        target: str,
        vectors,
        filters,
        k: int,
        timeout_s: float | None,
        with_vectors: bool = True,
        columns: list[str] | None = None,
        job: bool = False,
    ) -> pa.Table:
        table = await self._table(target)
        where = where_clause(filters)
        # Only what a hit carries: the bookkeeping columns (field_seqs, ...) cost conversion.
        columns = [*(columns or _FIELDS), *(["vector"] if with_vectors else [])]
        try:
            async with within(timeout_s, f"search of {target}"):
                plan = await self._plan(table, target, where, job)
                if plan.exact and self._exact_from_memory(target):
                    found = await self._exact(table, target, vectors, where, k, columns)
                    if found is not None:
                        return found
                query = table.query().nearest_to(vectors).distance_type("cosine").where(where)
                return await plan.apply(query.select([*columns, "_distance"]).limit(k)).to_arrow()
        except (RuntimeError, OSError) as exc:
            # Lance reports missing or unreadable files as RuntimeError: the index is not
            # there to answer. Forget the handle so a restored index is picked up again.
            self._tables.pop((target, False), None)
            self._ann.pop(target, None)
            self._forget_vectors(target)
            raise Unavailable(
                f"embedded index {target} cannot be read: {str(exc).splitlines()[0][:200]}"
            ) from None

    async def _plan(self, table, name: str, where: str, job: bool = False) -> SearchPlan:
        """Exact search when the table has no ANN index or the filter leaves few rows; the ANN
        index otherwise, with the measured settings (gateway/index/ann_plan.py)."""
        known = self._ann.get(name)
        if known is None or time.monotonic() - known[2] > 60:  # another process may build one
            indices = await table.list_indices()
            has_ann = any("vector" in i.columns for i in indices)
            rows = await table.count_rows()
            self._ann[name] = (partitions_for(rows) if has_ann else 0, rows, time.monotonic())
        partitions = self._ann[name][0]
        if not partitions:
            return SearchPlan(exact=True)
        matching = await table.count_rows(where)
        return plan_search(partitions, matching, self.exact_max_rows, job)

    def _forget_vectors(self, name: str) -> None:
        cache = self._exact_caches.pop(name, None)
        if cache is not None:
            cache.clear()  # frees the memory now and zeroes its gauge

    def _exact_from_memory(self, name: str) -> bool:
        """Whether exact search goes through the vector cache. Always on a table with an ANN
        index (large: a filter's rows lie scattered, each a random read). Without one, only
        from rows x dim = exact_cache_min_floats on: a small table's scan reads its vectors in
        sequence, and the cache path's three calls (row ids, lookup, winners) cost more.
        Measured (benchmarks/RESULTS.md, "Exact search from memory"): 1024-d, scan against
        cache 3.6 / 3.9 ms at 300 rows, 4.6 / 3.9 at 1,000, 40.6 / 9.2 at 10,000; at 64-d the
        scan stays ahead up to 10,000 rows (5.2 / 7.7 ms)."""
        partitions, rows, _ = self._ann[name]
        if not self.exact_cache_bytes:
            return False
        return partitions > 0 or rows * self._space_of(name).dim >= self.exact_cache_min_floats

    async def _exact(self, table, name: str, vectors, where: str, k: int, columns: list[str]):
        """Exact kNN from vectors held in memory (exact_cache.exact_search), with this table's
        cache; None where LanceDB's own exact search should answer."""
        record = self._manifest()["indexes"][name]
        incarnation = record.get("incarnation") or record.get("created_at", "")
        cache = self._exact_caches.get(name)
        if cache is None or cache.incarnation != incarnation:
            cache = RowVectorCache(self._space_of(name).dim, self.exact_cache_bytes, incarnation, name)
            self._exact_caches[name] = cache
        # The manifest is re-read every refresh_s; a table made again sooner shows itself by
        # its version numbers starting over.
        version = await table.version()
        if version < cache.version_seen:
            cache.clear()
        cache.version_seen = version
        return await exact_search(table, cache, vectors, where, k, columns)

    async def optimize(self, space: EmbeddingSpace) -> bool:
        """Scalar indexes (reads by id and item: writes, offers, dedup; and every filter column,
        so a kNN pre-filter reads an index instead of scanning the column), and the ANN index
        once the table is big enough; returns whether that exists."""
        table = await self._table(await self.ensure(space, make_current_if_none=False), strong=True)
        await self.compact(space)
        for column, config in scalar_indexes():
            await table.create_index(column, config=config, replace=True)
        rows = await table.count_rows()
        if rows < self.ann_min_rows:
            return False
        await table.create_index("vector", config=index_config(rows), replace=True)
        self._ann.pop(space.index_name, None)
        return True

    async def compact(self, space: EmbeddingSpace) -> None:
        """LanceDB's optimize: small fragments merged, indexes brought up to date with the rows
        written since they were built (rows outside the ANN index are searched by brute force).
        A bulk write leaves one fragment per batch and a dedup run one per write of item ids; measured
        at 100 k listings after a full dedup run: 203 fragments, a kNN 86 ms -> 13 ms and a read
        of 64 ids 190 -> 23 ms once compacted (32 s)."""
        table = await self._table(await self.ensure(space, make_current_if_none=False), strong=True)
        async with self._writer(space.index_name):
            await table.optimize()

    async def upkeep(self, space, max_unindexed_rows, max_fragments):
        table = await self._table(await self.ensure(space, make_current_if_none=False), strong=True)
        unindexed = 0
        for config in await table.list_indices():
            stats = await table.index_stats(config.name)
            if stats is not None:
                unindexed = max(unindexed, stats.num_unindexed_rows)
        fragments = (await table.stats())["fragment_stats"]["num_fragments"]
        due = unindexed >= max_unindexed_rows or fragments >= max_fragments
        if due:
            await self.compact(space)
        return {"unindexed_rows": unindexed, "fragments": fragments, "compacted": due}

    async def ensure(self, space: EmbeddingSpace, make_current_if_none: bool = True) -> str:
        name = space.index_name
        async with self._lock:
            data = self.manifest.read()
            known = data["indexes"].get(name)
            if known is not None:
                recorded = EmbeddingSpace.from_record(known)
                if recorded != space:
                    raise FailedPrecondition(f"index {name} holds {recorded}, not {space}")
                # Recorded, opened by this process, and nothing to set: no manifest write
                # (every read and write path calls this; a rewrite with fsync each time cost
                # milliseconds and made every other process re-read the manifest).
                opened = (name, False) in self._tables or (name, True) in self._tables
                if opened and (not make_current_if_none or data["aliases"].get(self.alias)):
                    return name
            db = await self._connect()
            try:
                await db.open_table(name)  # an older table may lack columns: _table migrates it
            except (ValueError, FileNotFoundError):
                # exist_ok: another process may have created it a moment ago.
                await db.create_table(name, schema=_schema(space.dim), exist_ok=True)
            with self.manifest.edit() as data:
                data["indexes"].setdefault(
                    name,
                    {
                        **space.record(),
                        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        # Tells a table made again under the same name from the one it replaced.
                        "incarnation": uuid.uuid4().hex,
                    },
                )
                if make_current_if_none:
                    data["aliases"].setdefault(self.alias, name)
            self._manifest_checked = 0.0
        return name

    async def set_dedup_threshold(self, space: EmbeddingSpace, threshold: float | None) -> None:
        async with self._lock:
            with self.manifest.edit() as data:
                entry = data["indexes"].get(space.index_name)
                if entry is None:
                    raise FailedPrecondition(f"no index {space.index_name!r}: index the catalog first")
                entry.pop("dedup_threshold", None)
                if threshold is not None:
                    entry["dedup_threshold"] = float(threshold)
            self._manifest_checked = 0.0

    async def indexes(self) -> dict[str, EmbeddingSpace]:
        self._manifest_checked = 0.0
        return {name: self._space_of(name) for name in self._manifest()["indexes"]}

    async def alias_target(self) -> str | None:
        self._manifest_checked = 0.0
        return self._manifest()["aliases"].get(self.alias)

    async def set_current(self, space: EmbeddingSpace) -> str:
        """Point the alias at the index of `space`, atomically (one manifest rename); the
        previous target is remembered for rollback."""
        name = await self.ensure(space, make_current_if_none=False)
        with self.manifest.edit() as data:
            previous = data["aliases"].get(self.alias)
            data["aliases"][self.alias] = name
            if previous and previous != name:
                data.setdefault("previous", {})[self.alias] = previous
        self._manifest_checked = 0.0
        return name

    async def previous_target(self) -> str | None:
        self._manifest_checked = 0.0
        return self._manifest().get("previous", {}).get(self.alias)

    async def write_targets(self) -> list[EmbeddingSpace]:
        """Indexes that live ingestion writes besides the alias target (a reindex in progress)."""
        data = self._manifest()
        return [self._space_of(n) for n in data.get("write_also", []) if n in data["indexes"]]

    async def set_write_targets(self, spaces: list[EmbeddingSpace]) -> None:
        with self.manifest.edit() as data:
            data["write_also"] = [s.index_name for s in spaces]
        self._manifest_checked = 0.0

    async def drop(self, space: EmbeddingSpace) -> None:
        """Delete a physical index that no alias names (after a swap's grace period)."""
        name = space.index_name
        with self.manifest.edit() as data:
            if name in data["aliases"].values():
                raise FailedPrecondition(f"{name} is still behind an alias")
            data["indexes"].pop(name, None)
            data["write_also"] = [n for n in data.get("write_also", []) if n != name]
            data["previous"] = {a: n for a, n in data.get("previous", {}).items() if n != name}
        db = await self._connect()
        await db.drop_table(name, ignore_missing=True)
        self._tables.pop((name, False), None)
        self._tables.pop((name, True), None)
        self._forget_vectors(name)

    async def upsert(self, space, items):
        """items: (product, image_hash, vector[, event_seq]); without an event_seq the write
        is ordered by wall-clock time (bulk indexing)."""
        ops = []
        for item in items:
            product, image_hash, vector = item[:3]
            if vector.shape != (space.dim,):
                raise FailedPrecondition(f"vector for {product.id} is not {space.dim}-d")
            seq = item[3] if len(item) > 3 and item[3] is not None else wall_clock_seq()
            fields = {**product.to_dict(), "image_hash": image_hash, "vector": np.asarray(vector, np.float32)}
            fields.pop("id")
            fields.pop("item_id")  # only the dedup job sets it (an "item" op)
            ops.append(Op("upsert", product.id, seq, fields))
        await self.apply_ops(space, ops)

    async def delete(self, space: EmbeddingSpace, ids: list[str], event_seq: int | None = None) -> None:
        seq = wall_clock_seq() if event_seq is None else event_seq
        await self.apply_ops(space, [Op("delete", pid, seq) for pid in ids])

    async def update_fields(
        self, space: EmbeddingSpace, product_id: str, fields: dict, event_seq: int | None = None
    ) -> str:
        """Metadata-only change, never touching the vector: "applied", "missing" or "stale"."""
        seq = wall_clock_seq() if event_seq is None else event_seq
        return (await self.apply_ops(space, [Op("update", product_id, seq, dict(fields))]))[0]

    async def apply_events(self, space, events):
        return await self.apply_ops(
            space, [Op(kind, pid, seq, dict(fields or {})) for kind, pid, seq, fields in events]
        )

    async def apply_ops(self, space: EmbeddingSpace, ops: list[Op], attempts: int = 8) -> list[str]:
        """Apply operations (several per product allowed) in one write; returns the outcome of
        each op. Concurrent writers: a row changed underneath is re-read and the ops
        re-applied, which is safe because they are idempotent and order-free."""
        if not ops:
            return []
        table = await self._table(await self.ensure(space), strong=True)
        async with self._writer(space.index_name):
            return await self._apply_locked(space, table, ops, attempts)

    @asynccontextmanager
    async def _writer(self, name: str):
        """One writer per table at a time, across processes (workers, `looksync index`, a swap
        rebuild). Lance's merge_insert does not see a row that another writer is inserting at
        the same moment, so two writers of one new id would both insert it; under this lock each
        read-merge-write sees every earlier commit. flock: released by the kernel when a writer
        dies, SIGKILL included."""
        local = self._write_locks.setdefault(name, asyncio.Lock())
        async with local:  # one thread at most per table waits on the file lock
            fd = os.open(self.root / f".{name}.write.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing the descriptor releases the lock

    async def _apply_locked(self, space: EmbeddingSpace, table, ops: list[Op], attempts: int) -> list[str]:
        ids = list(dict.fromkeys(op.product_id for op in ops))
        for _ in range(attempts):
            stored = await self._rows(space, ids)
            rows: dict[str, dict] = {}
            outcomes: list[str] = []
            for op in ops:
                current = rows.get(op.product_id, stored.get(op.product_id))
                new, outcome = lww_apply(current, op)
                outcomes.append(outcome)
                if new is not None:
                    rows[op.product_id] = new
            if not rows:
                return outcomes
            batch = self._batch(
                space,
                await table.schema(),
                [
                    {**r, "row_version": (stored[r["id"]]["row_version"] + 1) if r["id"] in stored else 1}
                    for r in rows.values()
                ],
            )
            result = await (
                table.merge_insert("id")
                .when_matched_update_all(where="target.row_version = source.row_version - 1")
                .when_not_matched_insert_all()
                .execute(batch)
            )
            if result.num_updated_rows + result.num_inserted_rows == len(rows):
                return outcomes
        raise Unavailable(f"index {space.index_name}: too many concurrent writers for the same products")

    def _batch(self, space: EmbeddingSpace, table_schema: pa.Schema, rows: list[dict]) -> pa.Table:
        blank = {f: "" for f in _FIELDS} | {"price": 0.0, "sizes": [], "in_stock": False, "image_hash": ""}
        full = []
        for r in rows:
            row = {**blank, **r}
            row["field_seqs"] = json.dumps(r.get("field_seqs", {}), sort_keys=True)
            if row.get("vector") is None or isinstance(row.get("vector"), str):
                row["vector"] = np.zeros(space.dim, np.float32)
            full.append(row)
        schema = _schema(space.dim)
        columns = {name: [r[name] for r in full] for name in schema.names if name != "vector"}
        flat = pa.array(
            np.concatenate([np.asarray(r["vector"], np.float32) for r in full]), type=pa.float32()
        )
        columns["vector"] = pa.FixedSizeListArray.from_arrays(flat, space.dim)
        # In the table's own column order: a migrated table has its added columns last.
        return pa.table(columns, schema=schema).select(table_schema.names).cast(table_schema)

    async def _rows(self, space: EmbeddingSpace, ids: list[str]) -> dict[str, dict]:
        table = await self._table(await self.ensure(space, make_current_if_none=False), strong=True)
        found = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            rows = await table.query().where(f"id IN ({', '.join(map(_quote, chunk))})").to_arrow()
            for row in rows.to_pylist():
                row["vector"] = np.asarray(row["vector"], dtype=np.float32)
                row["field_seqs"] = json.loads(row["field_seqs"] or "{}")
                found[row["id"]] = row
        return found

    async def listings(self, space, item_ids):
        out: dict[str, list[Product]] = {}
        if not item_ids:
            return out
        table = await self._table(await self.ensure(space, make_current_if_none=False))
        for start in range(0, len(item_ids), 500):
            chunk = item_ids[start : start + 500]
            where = f"deleted = false AND item_id IN ({', '.join(map(_quote, chunk))})"
            rows = await table.query().where(where).select(list(_FIELDS)).to_arrow()
            for row in rows.to_pylist():
                out.setdefault(row["item_id"], []).append(_row_product(row))
        return out

    async def scan(self, space, batch_size=2048, category=None):
        table = await self._table(await self.ensure(space, make_current_if_none=False), strong=True)
        where = (
            "deleted = false" if category is None else f"deleted = false AND category = {_quote(category)}"
        )
        query = table.query().where(where).select([*_FIELDS, "image_hash", "vector"])
        batch: list[StoredProduct] = []
        async for records in await query.to_batches():
            for row in records.to_pylist():
                batch.append(
                    StoredProduct(_row_product(row), row["image_hash"], np.asarray(row["vector"], np.float32))
                )
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    async def categories(self, space):
        table = await self._table(await self.ensure(space, make_current_if_none=False), strong=True)
        column = (await table.query().where("deleted = false").select(["category"]).to_arrow()).column(
            "category"
        )
        counts = pc.value_counts(column).to_pylist()
        return {("" if c["values"] is None else c["values"]): c["counts"] for c in counts}

    async def get(self, space, ids):
        rows = await self._rows(space, ids) if ids else {}
        return {
            pid: StoredProduct(_row_product(row), row["image_hash"], row["vector"])
            for pid, row in rows.items()
            if not row["deleted"]
        }

    async def products(self, space, ids):
        """Read like a search (the refreshing connection, the table already open, product
        columns only): what serving a stored answer needs, several times cheaper than `get`."""
        if not ids:
            return {}
        target = space.index_name
        if target not in self._manifest()["indexes"]:
            raise FailedPrecondition(f"no index {target!r} for space {space}")
        out = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            where = f"deleted = false AND id IN ({', '.join(map(_quote, chunk))})"
            out.update((p.id, p) for p in await self._select(target, where))
        return out

    async def _select(self, target: str, where: str) -> list[Product]:
        """Products matching a predicate, read like a search; an unreadable table is
        Unavailable and its handle is forgotten (a rebuilt table is opened afresh)."""
        table = await self._table(target)
        try:
            return _products(await table.query().where(where).select(list(_FIELDS)).to_arrow())
        except (RuntimeError, OSError) as exc:
            self._tables.pop((target, False), None)
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise Unavailable(f"embedded index {target} cannot be read: {first}") from None

    async def serving_read(self, space, ids, item_ids):
        """Products by id and the listings of these items, in one query."""
        if not ids and not item_ids:
            return {}, {}
        target = space.index_name
        if target not in self._manifest()["indexes"]:
            raise FailedPrecondition(f"no index {target!r} for space {space}")
        products: dict[str, Product] = {}
        listings: dict[str, list[Product]] = {i: [] for i in item_ids}
        terms = []
        if ids:
            terms.append(f"id IN ({', '.join(map(_quote, ids))})")
        if item_ids:
            terms.append(f"item_id IN ({', '.join(map(_quote, item_ids))})")
        found = await self._select(target, f"deleted = false AND ({' OR '.join(terms)})")
        wanted = set(ids)
        for p in found:
            if p.id in wanted:
                products[p.id] = p
            if p.item_id in listings:
                listings[p.item_id].append(p)
        return products, listings

    async def count(self, space):
        table = await self._table(await self.ensure(space, make_current_if_none=False))
        return await table.count_rows("deleted = false")

    @property
    def look_matches(self):
        if getattr(self, "_look_matches", None) is None:
            from gateway.index.look_matches import EmbeddedLookMatches

            self._look_matches = EmbeddedLookMatches(self)
        return self._look_matches

    async def close(self):
        self._tables.clear()
        self._db = None
        self._look_matches = None
