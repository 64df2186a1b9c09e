"""Exact kNN for the embedded index with the vectors held in memory.

LanceDB's exact search under a filter reads each matching vector from disk at ~13 us a row (1 M
x 1024-d, 2 cores: 5,000 rows of a 0.5 % filter cost ~70 ms; benchmarks/RESULTS.md). Scoring
5,000 vectors in numpy costs ~2 ms. So exact search here asks LanceDB only for the row ids the
filter leaves (its scalar indexes answer that without reading a column), scores the rows'
vectors from memory, and reads the columns of the k winners alone.

Why row ids can key a cache: without stable row ids (LanceDB's default, and how this project
creates its tables) a row id is the row's address, fragment id << 32 | offset, and a Lance
fragment's data files are never rewritten: an update or a compaction writes the rows anew in new
fragments with new ids, a delete only marks the old address deleted
(https://lancedb.github.io/lance/format.html#fragments, "Data files are immutable"). What sits at
an address therefore never changes while the table exists. A table dropped and made again under
the same name reuses addresses: the index manifest gives each table it creates an incarnation id
that the cache is tied to, and a table's versions starting over catches it before the manifest
is re-read.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from prometheus_client import Counter, Gauge

HELD = Gauge("looksync_exact_cache_rows", "Vectors held in memory for exact search", ["index"])
EXACT = Counter(
    "looksync_exact_searches_total",
    "Exact searches by where their vectors came from: memory (all held), filled (some read "
    "from disk first) or lancedb (LanceDB's own exact search: too many rows or a row gone)",
    ["index", "path"],
)


class RowVectorCache:
    """Unit vectors by row address, for one table, within a memory budget. Addresses are kept
    sorted (lookups are one `searchsorted` for a whole filter's rows). When a fill would pass
    the budget everything is dropped and filling starts again: rows of compacted-away fragments
    are never looked up again, and a budget smaller than the working set should degrade to
    LanceDB's speed, not fail."""

    def __init__(self, dim: int, budget_bytes: int, incarnation: str = "", name: str = ""):
        self.dim = dim
        self.name = name  # the table's, for the metrics
        self.incarnation = incarnation  # of the table whose rows it holds (the manifest's record)
        self.max_rows = max(0, budget_bytes // (4 * dim))
        self.version_seen = 0
        self.clear()

    def clear(self) -> None:
        self._addresses = np.empty(0, np.uint64)
        self._slots = np.empty(0, np.int64)
        self._vectors = np.empty((0, self.dim), np.float32)
        self._used = 0
        HELD.labels(index=self.name).set(0)

    def __len__(self) -> int:
        return self._used

    def lookup(self, rowids: np.ndarray) -> np.ndarray:
        """Slot of each row id, -1 where it is not held."""
        if not len(self._addresses):
            return np.full(len(rowids), -1, np.int64)
        at = np.searchsorted(self._addresses, rowids)
        at = np.minimum(at, len(self._addresses) - 1)
        found = self._addresses[at] == rowids
        return np.where(found, self._slots[at], -1)

    def fits(self, rows: int) -> bool:
        return rows <= self.max_rows

    def add(self, rowids: np.ndarray, vectors: np.ndarray) -> None:
        """Hold these rows (unique ids, at most max_rows). Rows already held are skipped (two
        searches may have read the same rows at once); when the rest would not fit beside what
        is held, everything held is dropped first."""
        new = self.lookup(rowids) < 0
        rowids, vectors = rowids[new], vectors[new]
        if self._used + len(rowids) > self.max_rows:
            self.clear()
        if self._used + len(rowids) > len(self._vectors):
            rows = min(self.max_rows, max(2 * len(self._vectors), self._used + len(rowids)))
            grown = np.empty((rows, self.dim), np.float32)
            grown[: self._used] = self._vectors[: self._used]
            self._vectors = grown
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        slots = np.arange(self._used, self._used + len(rowids))
        self._vectors[slots] = vectors / np.where(norms > 0, norms, 1.0)
        self._used += len(rowids)
        HELD.labels(index=self.name).set(self._used)
        addresses = np.concatenate([self._addresses, rowids.astype(np.uint64)])
        order = np.argsort(addresses, kind="stable")
        self._addresses = addresses[order]
        self._slots = np.concatenate([self._slots, slots])[order]

    def vectors(self, slots: np.ndarray) -> np.ndarray:
        return self._vectors[slots]

    def distances(self, slots: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """Cosine distances, rows (slots) x queries. When the rows are most of what is held
        (a table small enough to be searched whole), scoring everything held and picking the
        rows' scores beats copying their vectors out first."""
        q = np.atleast_2d(queries).astype(np.float32)
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        q = q / np.where(norms > 0, norms, 1.0)
        if 2 * len(slots) >= self._used:
            return 1.0 - (self._vectors[: self._used] @ q.T)[slots]
        return 1.0 - self._vectors[slots] @ q.T


def top_k(distances: np.ndarray, rowids: np.ndarray, k: int):
    """Per query (column of `distances`, rows x queries) the k nearest rows: (query index, row
    id, cosine distance) arrays, each query's rows nearest first, ties by row id (a fixed
    order, like a scan's)."""
    k = min(k, len(rowids))
    out_q, out_rows, out_d = [], [], []
    for j in range(distances.shape[1]):
        d = distances[:, j]
        near = np.argpartition(d, k - 1)[:k] if k < len(d) else np.arange(len(d))
        # Rows tied with the k-th must all compete for the last places.
        cut = d[near].max()
        near = np.flatnonzero(d <= cut)
        near = near[np.lexsort((rowids[near], d[near]))][:k]
        out_q.append(np.full(len(near), j, np.uint32))
        out_rows.append(rowids[near])
        out_d.append(d[near])
    return np.concatenate(out_q), np.concatenate(out_rows), np.concatenate(out_d).astype(np.float32)


def assemble(
    rows: pa.Table, query_index: np.ndarray, rowids: np.ndarray, distances: np.ndarray, multi: bool
) -> pa.Table | None:
    """The winners' columns (as read by row id, in any order) arranged like a LanceDB kNN
    answer: one row per (query, hit), `_distance`, and `query_index` for a multi-vector query.
    None when a winner is missing (deleted between the two reads): the caller searches again."""
    read = rows.column("_rowid").to_numpy()
    order = np.argsort(read)
    at = np.searchsorted(read[order], rowids)
    at = np.minimum(at, len(read) - 1)
    if len(read) == 0 or not np.array_equal(read[order][at], rowids):
        return None
    out = rows.drop_columns(["_rowid"]).take(pa.array(order[at]))
    out = out.append_column("_distance", pa.array(distances, pa.float32()))
    if multi:
        out = out.append_column("query_index", pa.array(query_index, pa.uint32()))
    return out


async def exact_search(table, cache: RowVectorCache, vectors, where: str | None, k: int, columns: list[str]):
    """Exact kNN of one query vector (an array) or several (a list) on a LanceDB table: the
    filter's row ids from LanceDB (its scalar indexes, no column read), their vectors from the
    cache (read once), the winners' columns by row id. None where LanceDB's own exact search
    should answer instead: no row matches, the rows do not fit the budget, or a row went
    between the reads."""
    query = table.query() if where is None else table.query().where(where)
    matched = await query.select([]).with_row_id().to_arrow()
    rowids = matched.column("_rowid").to_numpy()
    if not len(rowids) or not cache.fits(len(rowids)):
        EXACT.labels(index=cache.name, path="lancedb").inc()
        return None
    slots = cache.lookup(rowids)
    path = "memory"
    if (slots < 0).any():
        path = "filled"
        if not cache.fits(len(cache) + int((slots < 0).sum())):
            cache.clear()
            slots = cache.lookup(rowids)
        missing = rowids[slots < 0]
        read = await table.take_row_ids(missing.tolist()).select(["vector"]).with_row_id().to_arrow()
        if read.num_rows != len(missing):
            EXACT.labels(index=cache.name, path="lancedb").inc()
            return None
        flat = read.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        cache.add(
            read.column("_rowid").to_numpy(), np.asarray(flat, np.float32).reshape(len(missing), cache.dim)
        )
        slots = cache.lookup(rowids)
        if (slots < 0).any():  # another search's fill dropped some of them meanwhile
            EXACT.labels(index=cache.name, path="lancedb").inc()
            return None
    queries = np.stack(vectors) if isinstance(vectors, list) else vectors
    query_index, winners, distances = top_k(cache.distances(slots, queries), rowids, k)
    rows = await table.take_row_ids(np.unique(winners).tolist()).select(columns).with_row_id().to_arrow()
    found = assemble(rows, query_index, winners, distances, multi=isinstance(vectors, list))
    EXACT.labels(index=cache.name, path=path if found is not None else "lancedb").inc()
    return found
