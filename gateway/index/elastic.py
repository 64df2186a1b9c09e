"""The Elasticsearch catalog index: one physical index per embedding space, read through an alias.

Layout on the cluster (the server-side twin of the embedded backend's manifest):

    products-clip-v1          one index per embedding space (EmbeddingSpace.index_name)
                              mapping _meta {"looksync": {"model": "clip", "version": 1, "dim": 1024}}
    products  -> products-clip-v2
                              the read alias; moving it (one `_aliases` call) switches serving
    products.previous  -> products-clip-v1
                              where a rollback goes; moved in the same `_aliases` call
    products.write-also -> products-clip-v2 (during a swap's rebuild), products-clip-v1 (after)
                              indexes live ingestion writes besides the alias target

All swap state lives in aliases, so every process (gateway, ingest workers, the CLI) reads the
same state from the cluster, and each change of it is one atomic `_aliases` call (a model swap
is several such changes; gateway/models.py orders them so that no write is lost in between).

The gateway re-resolves the alias every `refresh_s` seconds, so an alias move or a new index is
followed without a restart. Every request body is built by a small pure function below
(`index_body`, `knn_body`, `filter_clauses`, `bulk_actions`, `alias_actions`, ...), so the tests
pin the exact JSON without a server.

Requires Elasticsearch 8.12+ (int8_hnsw). On 9.2+ new indices leave vectors out of `_source` by
default; `index_body` turns that off (`index.mapping.exclude_source_vectors: false`) so `get()`
and `search(with_vectors=True)` read vectors the same way on every version (the indexer reuses
stored vectors of unchanged images). Dropping that setting saves the `_source` copy (see below)
but then every read of vectors has to ask for them with `_source.exclude_vectors: false`.

Sizing, 12 M products x 1024-d float32 (per copy of the data; replicas multiply it):

    raw vectors            12e6 x 1024 x 4 B   ~ 49 GB   always kept on disk (merges, rescoring)
    int8_hnsw quantised    12e6 x 1024 x 1 B   ~ 12.3 GB (+ 4 B/vector correction)
    bbq_hnsw (1 bit/dim)   12e6 x 1024 / 8 B   ~ 1.5 GB  (+ ~14 B/vector corrections)
    HNSW graph             12e6 x m x 2 x 4 B  ~ 1.5 GB at m = 16 (layer 0 keeps 2m neighbours)
    vectors in _source     JSON floats, compressed: tens of GB more; see the setting above

kNN search only stays fast when what it touches is in the off-heap page cache of the data
nodes (not the JVM heap): float HNSW needs ~51 GB of it, int8_hnsw ~14 GB, bbq_hnsw ~3 GB
(plus the raw floats actually read when rescoring). Leave the heap at <= 31 GB and give the
rest of the node's RAM to the page cache.

Shards: keep each shard <= 30-50 GB on disk. With int8 the index is roughly 49 + 12 + 1.5 GB
of vector data plus `_source` and keyword fields (~100-120 GB), so ~4-6 primary shards,
each with >= 1 replica on other nodes. Every shard runs its own HNSW search over
`num_candidates`, so more shards cost more work per query: do not over-shard, and force-merge
to few segments after a full (re)index, since each segment holds its own graph.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from elastic_transport import ConnectionError as TransportConnectionError
from elastic_transport import ConnectionTimeout, TransportError
from elasticsearch import ApiError, AsyncElasticsearch, BadRequestError, NotFoundError
from elasticsearch.helpers import async_streaming_bulk

from gateway.catalog import Product
from gateway.errors import FailedPrecondition, InvalidArgument, Unavailable
from gateway.filters import SearchFilters
from gateway.index.base import (
    CatalogIndex,
    EmbeddingSpace,
    ScoredProduct,
    StoredProduct,
    check_query,
    within,
)
from gateway.index.lww import IMAGE, Op
from gateway.index.lww import apply as lww_apply
from gateway.ingest.events import seq_at_ms

_FIELDS = [f for f in Product.__dataclass_fields__]
META_KEY = "looksync"
MAX_CATEGORIES = 1000  # terms buckets read by `categories`
MAX_NUM_CANDIDATES = 10_000  # Elasticsearch's upper bound for knn.num_candidates
MIN_NUM_CANDIDATES = 100
# The oldest server version each vector index type works on.
INDEX_TYPES = {"hnsw": (8, 0), "int8_hnsw": (8, 12), "bbq_hnsw": (8, 16)}
MIN_SERVER = (8, 12)
# Binary quantisation is refused below this many dimensions (Elasticsearch's BBQ_MIN_DIMS,
# https://www.elastic.co/guide/en/elasticsearch/reference/8.17/dense-vector.html#dense-vector-quantization).
BBQ_MIN_DIMS = 64
# Elasticsearch refuses dot_product vectors whose squared length is off 1 by more than 1e-4
# (1e-3 from 8.15 on);
# vectors within this of unit length are sent as they are, others are normalised first.
_UNIT_TOLERANCE = 1e-5


# ---------------------------------------------------------------------------------------------
# Request bodies (pure functions, pinned by tests/test_index_elasticsearch.py)
# ---------------------------------------------------------------------------------------------


def default_index_type(server: tuple[int, int]) -> str:
    """int8_hnsw on 8.x and 9.x: 4x less page cache than float and near-float recall.
    bbq_hnsw (32x less) needs oversampling + rescoring to keep recall; opt in explicitly."""
    return "int8_hnsw"


def vector_mapping(dim: int, m: int, ef_construction: int, index_type: str) -> dict:
    return {
        "type": "dense_vector",
        "element_type": "float",
        "dims": dim,
        "index": True,
        # The embedder L2-normalises every vector, so dot product == cosine and is the
        # cheapest similarity; Elasticsearch rejects non-unit vectors for it (see `unit`).
        "similarity": "dot_product",
        "index_options": {"type": index_type, "m": m, "ef_construction": ef_construction},
    }


def index_body(
    space: EmbeddingSpace,
    m: int = 16,
    ef_construction: int = 100,
    server: tuple[int, int] = (8, 15),
    shards: int = 1,
    replicas: int | None = None,
    index_type: str | None = None,
) -> dict:
    """Settings and mappings for the physical index of one embedding space."""
    index_type = index_type or default_index_type(server)
    if server < INDEX_TYPES[index_type]:
        oldest = ".".join(map(str, INDEX_TYPES[index_type]))
        raise FailedPrecondition(f"index_options {index_type} needs Elasticsearch {oldest} or newer")
    if index_type.startswith("bbq") and space.dim < BBQ_MIN_DIMS:
        raise FailedPrecondition(
            f"index_options {index_type} needs at least {BBQ_MIN_DIMS} dimensions (Elasticsearch refuses "
            f"fewer); {space} has {space.dim}: set LOOKSYNC_ES_INDEX_TYPE=int8_hnsw"
        )
    settings: dict[str, Any] = {"index.number_of_shards": shards}
    if replicas is not None:
        settings["index.number_of_replicas"] = replicas
    if server >= (9, 2):
        # Keep vectors in _source as 8.x does: get()/with_vectors read them the same way.
        settings["index.mapping.exclude_source_vectors"] = False
    keyword = {"type": "keyword"}
    return {
        "settings": settings,
        "mappings": {
            "dynamic": "strict",
            "_meta": {META_KEY: space.record()},
            "properties": {
                "id": keyword,
                "title": {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 512}}},
                "brand": keyword,
                "category": keyword,
                "gender": keyword,
                "market": keyword,
                "price": {"type": "scaled_float", "scaling_factor": 100},
                "currency": keyword,
                "sizes": keyword,
                "in_stock": {"type": "boolean"},
                "image_url": keyword,
                "image_hash": keyword,
                "vector": vector_mapping(space.dim, m, ef_construction, index_type),
                **ADDED_FIELDS,
                **BOOKKEEPING,
            },
        },
    }


# Per-field last-writer-wins state (gateway/index/lww.py) stored with each product: the stream
# position that set each field, and tombstones (deleted products stay as documents, excluded
# from every search, so Elasticsearch's own delete tombstones, forgotten after index.gc_deletes,
# never decide whether an old event may resurrect a product).
BOOKKEEPING = {
    "field_seqs": {"type": "object", "enabled": False},
    "deleted": {"type": "boolean"},
    "deleted_seq": {"type": "long"},
    "event_seq": {"type": "long"},
}
NOT_DELETED = {"bool": {"must_not": [{"term": {"deleted": True}}]}}
# Product fields added after the first release; an older index gets them in its mapping
# (adding fields is allowed under "dynamic": "strict"). Documents without them read as "".
ADDED_FIELDS = {
    "retailer": {"type": "keyword"},
    "product_url": {"type": "keyword"},
    "item_id": {"type": "keyword"},
}


def space_from_meta(name: str, meta: dict | None) -> EmbeddingSpace:
    """The embedding identity recorded in an index's mapping `_meta`."""
    identity = (meta or {}).get(META_KEY)
    try:
        return EmbeddingSpace.from_record(identity)
    except (TypeError, KeyError, ValueError):
        raise FailedPrecondition(
            f"index {name!r} has no recorded embedding space (mapping _meta.{META_KEY})"
        ) from None


def filter_clauses(filters: SearchFilters) -> list[dict]:
    """The filters as bool-filter clauses; the same semantics as `SearchFilters.matches`.
    `terms` on a multi-valued keyword field (sizes) matches when any value is listed."""
    clauses: list[dict] = []
    if filters.categories:
        clauses.append({"terms": {"category": list(filters.categories)}})
    if filters.genders():
        clauses.append({"terms": {"gender": list(filters.genders())}})
    if filters.market:
        clauses.append({"term": {"market": filters.market}})
    if filters.brands:
        clauses.append({"terms": {"brand": list(filters.brands)}})
    if filters.sizes:
        clauses.append({"terms": {"sizes": list(filters.sizes)}})
    price: dict[str, float] = {}
    if filters.min_price is not None:
        price["gte"] = filters.min_price
    if filters.max_price is not None:
        price["lte"] = filters.max_price
    if price:
        clauses.append({"range": {"price": price}})
    if filters.in_stock_only:
        clauses.append({"term": {"in_stock": True}})
    return clauses


def num_candidates(k: int, factor: int) -> int:
    return min(max(k * factor, MIN_NUM_CANDIDATES, k), MAX_NUM_CANDIDATES)


def knn_body(
    vector: list[float],
    k: int,
    filters: SearchFilters,
    num_candidates_factor: int = 10,
    with_vectors: bool = False,
    rescore_oversample: float | None = None,
) -> dict:
    """A top-level kNN search: filters apply during the graph search, before ranking."""
    if not 1 <= k <= MAX_NUM_CANDIDATES:
        raise InvalidArgument(f"k: {k} is not between 1 and {MAX_NUM_CANDIDATES}")
    knn: dict[str, Any] = {
        "field": "vector",
        "query_vector": vector,
        "k": k,
        "num_candidates": num_candidates(k, num_candidates_factor),
    }
    # must_not rather than term deleted=false: documents written before tombstones existed
    # have no `deleted` field and must still match.
    knn["filter"] = {"bool": {"filter": filter_clauses(filters), "must_not": [{"term": {"deleted": True}}]}}
    if rescore_oversample is not None:
        # 8.18+/9.0+: re-rank oversampled quantised hits with the raw float vectors.
        knn["rescore_vector"] = {"oversample": rescore_oversample}
    return {
        "knn": knn,
        "size": k,  # a search returns 10 hits unless told otherwise
        "track_total_hits": False,
        "_source": True if with_vectors else {"excludes": ["vector"]},
    }


def score_to_cosine(score: float) -> float:
    """Elasticsearch scores dot_product as (1 + dot) / 2; the embedded backend reports cosine."""
    return 2.0 * float(score) - 1.0


def product_source(product: Product, image_hash: str, vector: np.ndarray) -> dict:
    return {
        **product.to_dict(),
        "image_hash": image_hash,
        "vector": np.asarray(vector, dtype=np.float32).tolist(),
    }


UPDATABLE = frozenset(_FIELDS) - {"id"} | {"image_hash"}


def check_update(fields: dict) -> None:
    """Metadata updates change product fields, never the vector (a new image is an upsert)."""
    unknown = sorted(set(fields) - UPDATABLE)
    if unknown:
        raise InvalidArgument(f"cannot update {', '.join(unknown)}: updatable fields are {sorted(UPDATABLE)}")


def row_from_doc(doc: dict) -> dict:
    """A stored document as an lww row. Documents written before per-field positions existed
    count every field as set at their `_version` (then their external version = event_seq)."""
    source = dict(doc["_source"])
    row = {**source, "id": doc["_id"]}
    seqs = source.get("field_seqs")
    if seqs is None:
        version = int(doc.get("_version", 0))
        seqs = {
            f: version for f in source if f not in BOOKKEEPING and f not in ("vector", "image_hash", "id")
        }
        seqs[IMAGE] = version
    row["field_seqs"] = dict(seqs)
    row.setdefault("deleted", False)
    row.setdefault("deleted_seq", 0)
    row.setdefault("event_seq", max(seqs.values(), default=0))
    return row


def doc_of_row(row: dict) -> dict:
    """The _source for an lww row (the id is stored too: it is a keyword field of the mapping)."""
    return dict(row)


def row_changes(old: dict, new: dict) -> dict:
    """The partial document that turns `old` into `new`: what `_update` sends (the vector only
    when the image changed)."""
    return {k: v for k, v in doc_of_row(new).items() if k not in old or old[k] != v}


def write_actions(index: str, writes: list[tuple[str, dict | None, dict, dict | None]]) -> list[dict]:
    """Bulk actions for merged rows: (id, stored row or None, new row, stored _seq_no/_primary_term).
    A new product is a `create` (refused if another writer created it first); a stored one is a
    partial `update` under `if_seq_no`/`if_primary_term` (refused if it changed since it was read).
    Either refusal is a 409, after which the writer re-reads and merges again."""
    actions = []
    for pid, old, new, cas in writes:
        if old is None:
            actions.append({"_op_type": "create", "_index": index, "_id": pid, "_source": doc_of_row(new)})
        else:
            actions.append(
                {
                    "_op_type": "update",
                    "_index": index,
                    "_id": pid,
                    "if_seq_no": cas["_seq_no"],
                    "if_primary_term": cas["_primary_term"],
                    "doc": row_changes(old, new),
                }
            )
    return actions


def alias_actions(
    alias: str,
    index: str,
    current: Iterable[str] = (),
    previous_alias: str | None = None,
    previous_now: Iterable[str] = (),
) -> list[dict]:
    """Point `alias` at `index` only, atomically (one `_aliases` call). With `previous_alias`
    the same call moves that alias (now on `previous_now`) to the index `alias` leaves, so the
    rollback target can never disagree with the move."""
    leaving = [old for old in current if old != index]
    actions: list[dict] = [_remove(old, alias) for old in leaving]
    actions.append({"add": {"index": index, "alias": alias}})
    if previous_alias and leaving:
        actions += [_remove(old, previous_alias) for old in previous_now]
        actions.append({"add": {"index": leaving[0], "alias": previous_alias}})
    return actions


def _remove(index: str, alias: str) -> dict:
    """A remove that fails the whole `_aliases` call when the alias is no longer there, i.e.
    when another process changed the aliases since we read them. Without must_exist, a stale
    remove is skipped (8.14+: reported in action_results) and the other actions still apply,
    leaving a half-moved alias. https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-aliases.html"""
    return {"remove": {"index": index, "alias": alias, "must_exist": True}}


def set_alias_actions(alias: str, wanted: Iterable[str], current: Iterable[str]) -> list[dict]:
    """Make `alias` name exactly the `wanted` indexes (the write-also list), in one call."""
    wanted, current = list(wanted), list(current)
    return [_remove(n, alias) for n in current if n not in wanted] + [
        {"add": {"index": n, "alias": alias}} for n in wanted if n not in current
    ]


def product_from_source(source: dict) -> Product:
    return Product(**{f: source[f] if f not in ADDED_FIELDS else source.get(f) or "" for f in _FIELDS})


def unit(vector: np.ndarray) -> np.ndarray:
    """The vector as unit-length float32 (as is when it already is one)."""
    v = np.asarray(vector, dtype=np.float32)
    squared = float(np.dot(v.astype(np.float64), v.astype(np.float64)))
    if abs(squared - 1.0) <= _UNIT_TOLERANCE:
        return v
    if not np.isfinite(squared) or squared == 0.0:
        raise FailedPrecondition("a zero or non-finite vector cannot be indexed or searched")
    return (v / np.sqrt(squared)).astype(np.float32)


def _now_seq() -> int:
    return seq_at_ms(int(time.time() * 1000))


def parse_version(number: str) -> tuple[int, int]:
    major, minor = number.split("-")[0].split(".")[:2]
    return int(major), int(minor)


def safe_url(url: str) -> str:
    """The URL without credentials, for messages."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit(parts._replace(netloc=netloc))
    return url


# ---------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------


class ElasticIndex(CatalogIndex):
    def __init__(
        self,
        url: str,
        alias: str = "products",
        refresh_s: float = 0.5,
        timeout_s: float = 5.0,
        num_candidates_factor: int = 10,
        m: int = 16,
        ef_construction: int = 100,
        index_type: str | None = None,
        rescore_oversample: float | None = None,
        shards: int = 1,
        replicas: int | None = None,
        bulk_timeout_s: float = 60.0,
        bulk_max_retries: int = 5,
        bulk_initial_backoff_s: float = 0.5,
        max_chunk_bytes: int = 10 << 20,
        chunk_size: int = 500,
        max_retries: int = 1,
        **client_options: Any,
    ):
        if index_type is not None and index_type not in INDEX_TYPES:
            raise ValueError(f"index_type {index_type!r} is not one of {', '.join(INDEX_TYPES)}")
        self.url = url
        self.alias = alias
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.num_candidates_factor = num_candidates_factor
        self.m = m
        self.ef_construction = ef_construction
        self.index_type = index_type
        self.rescore_oversample = rescore_oversample
        self.shards = shards
        self.replicas = replicas
        self.bulk_timeout_s = bulk_timeout_s
        self.bulk_max_retries = bulk_max_retries
        self.bulk_initial_backoff_s = bulk_initial_backoff_s
        self.max_chunk_bytes = max_chunk_bytes
        self.chunk_size = chunk_size
        self._es = AsyncElasticsearch(
            url,
            request_timeout=timeout_s,
            max_retries=max_retries,
            retry_on_timeout=False,
            **client_options,
        )
        self._server: tuple[int, int] | None = None
        self._resolved: tuple[str | None, EmbeddingSpace | None] | None = None
        self._resolved_at = 0.0
        self._resolve_lock = asyncio.Lock()
        self._ensure_lock = asyncio.Lock()
        self._ensured: dict[str, EmbeddingSpace] = {}
        self._alias_seen = False
        self._writes: tuple[list[EmbeddingSpace], float] | None = None

    # -- plumbing ------------------------------------------------------------------------------

    def _client(self, timeout_s: float | None = None) -> AsyncElasticsearch:
        return self._es.options(request_timeout=timeout_s or self.timeout_s)

    async def _call(self, what: str, request: Awaitable):
        """Await one request; an unreachable, overloaded or failing cluster is Unavailable.
        Other API errors (404, 400, ...) are left to the caller."""
        where = safe_url(self.url)
        try:
            return await request
        except ConnectionTimeout as exc:
            raise Unavailable(f"Elasticsearch at {where} timed out ({what}): {exc}") from None
        except TransportConnectionError as exc:
            raise Unavailable(f"Elasticsearch at {where} cannot be reached ({what}): {exc}") from None
        except ApiError as exc:
            if exc.meta.status >= 500 or exc.meta.status == 429:
                raise Unavailable(f"Elasticsearch at {where} failed ({what}): {exc}") from None
            if exc.meta.status in (401, 403):
                raise Unavailable(
                    f"Elasticsearch at {where} refused the credentials ({what}): {exc}"
                ) from None
            raise
        except TransportError as exc:
            raise Unavailable(f"Elasticsearch at {where} failed ({what}): {exc}") from None

    async def _read(self, what: str, request: Awaitable):
        """A search or count, refused when it came back partial: by default Elasticsearch
        answers 200 with the hits of the shards that answered when every copy of some shard
        failed (`allow_partial_search_results`,
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/search-search.html), and a
        kNN answer, a dedup scan or a swap's count from part of the catalog must not pass for
        the whole."""
        return self._whole(await self._call(what, request), what)

    def _whole(self, resp, what: str):
        shards = resp.get("_shards") or {}
        failed = int(shards.get("failed", 0) or 0)
        if failed or resp.get("timed_out"):
            failures = shards.get("failures") or [{}]
            reason = (failures[0].get("reason") or {}).get("reason", "timed out") if failed else "timed out"
            raise Unavailable(
                f"Elasticsearch at {safe_url(self.url)} answered {what} from "
                f"{shards.get('successful', '?')} of {shards.get('total', '?')} shards ({reason}); "
                "a partial answer is refused"
            )
        return resp

    async def server_version(self) -> tuple[int, int]:
        if self._server is None:
            info = await self._call("server info", self._client().info())
            server = parse_version(info["version"]["number"])
            if server < MIN_SERVER:
                raise FailedPrecondition(
                    f"Elasticsearch at {safe_url(self.url)} is {info['version']['number']}; "
                    f"LookSync needs {MIN_SERVER[0]}.{MIN_SERVER[1]} or newer"
                )
            self._server = server
        return self._server

    async def _mapping(self, name: str) -> dict | None:
        """{concrete index: mapping} for an index or alias name; None when there is none."""
        try:
            resp = await self._call(f"read mapping of {name}", self._client().indices.get_mapping(index=name))
        except NotFoundError:
            return None
        return {index: body.get("mappings", {}) for index, body in resp.body.items()}

    async def _resolve(self, force: bool = False) -> tuple[str | None, EmbeddingSpace | None]:
        """(index behind the alias, its space), re-read at most every refresh_s seconds."""
        if not force and self._resolved is not None and time.monotonic() - self._resolved_at < self.refresh_s:
            return self._resolved
        async with self._resolve_lock:
            if (
                not force
                and self._resolved is not None
                and time.monotonic() - self._resolved_at < self.refresh_s
            ):
                return self._resolved
            mappings = await self._mapping(self.alias)
            if mappings is None:
                resolved: tuple[str | None, EmbeddingSpace | None] = (None, None)
            elif len(mappings) != 1:
                raise FailedPrecondition(
                    f"alias {self.alias!r} points at {len(mappings)} indexes ({', '.join(sorted(mappings))}); "
                    "it must name exactly one"
                )
            else:
                ((target, mapping),) = mappings.items()
                if target == self.alias:
                    raise FailedPrecondition(f"{self.alias!r} is a concrete index, not an alias")
                resolved = (target, space_from_meta(target, mapping.get("_meta")))
            self._resolved, self._resolved_at = resolved, time.monotonic()
            return resolved

    def _forget(self, name: str | None = None) -> None:
        self._resolved = None
        if name is not None:
            self._ensured.pop(name, None)

    # -- CatalogIndex --------------------------------------------------------------------------

    async def space(self) -> EmbeddingSpace | None:
        return (await self._resolve())[1]

    async def _space_of_index(self, name: str) -> EmbeddingSpace:
        known = self._ensured.get(name)
        if known is not None:
            return known
        mappings = await self._mapping(name)
        if not mappings or list(mappings) != [name]:
            raise FailedPrecondition(f"no index {name!r} on the cluster")
        space = space_from_meta(name, mappings[name].get("_meta"))
        self._ensured[name] = space
        return space

    async def space_of(self, name: str) -> EmbeddingSpace | None:
        try:
            return await self._space_of_index(name)
        except FailedPrecondition:
            return None

    async def search(self, vector, space, filters, k, with_vectors=False, index=None, timeout_s=None):
        async with within(timeout_s, f"search of {index or space.index_name}"):
            return await self._search(vector, space, filters, k, with_vectors, index, timeout_s)

    async def _search(self, vector, space, filters, k, with_vectors, index, timeout_s):
        # The index of the query's own space (or the one named), never "whatever the alias
        # names now": a request that resolved its space before an alias move stays consistent.
        target = index or space.index_name
        for _ in range(2):
            index_space = await self._space_of_index(target)
            check_query(vector, space, index_space)
            query = unit(vector).tolist()
            body = knn_body(
                query, k, filters, self.num_candidates_factor, with_vectors, self.rescore_oversample
            )
            try:
                # The deadline (asyncio) ends the request first; the HTTP timeout, just behind it,
                # is the backstop for a request that outlives its caller.
                client = self._client(min(timeout_s + 1.0, self.timeout_s) if timeout_s else None)
                resp = await self._read(f"search {target}", client.search(index=target, body=body))
            except NotFoundError:
                self._forget(target)  # deleted meanwhile: look it up once more
                continue
            hits = []
            for hit in resp["hits"]["hits"]:
                source = hit["_source"]
                vec = np.asarray(source["vector"], dtype=np.float32) if with_vectors else None
                hits.append(ScoredProduct(product_from_source(source), score_to_cosine(hit["_score"]), vec))
            return index_space, hits
        raise FailedPrecondition(f"index {target!r} disappeared during the search")

    async def neighbours(self, vectors, space, filters, k):
        """The batch job's kNN: one `_msearch` for all the vectors (a request per vector would be
        12 M round trips for a 12 M catalog), ids and scores only (`_source: false`).
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/search-multi-search.html"""
        if len(vectors) == 0:
            return []
        target = space.index_name
        index_space = await self._space_of_index(target)
        searches: list[dict] = []
        for v in vectors:
            check_query(v, space, index_space)
            body = knn_body(
                unit(v).tolist(), k, filters, self.num_candidates_factor, False, self.rescore_oversample
            )
            searches += [{}, {**body, "_source": False}]
        resp = await self._call(f"msearch {target}", self._client().msearch(index=target, searches=searches))
        out = []
        for answer in resp["responses"]:
            if "error" in answer:
                error = answer["error"]
                reason = error.get("reason", error) if isinstance(error, dict) else error
                raise Unavailable(f"kNN of {target} failed ({answer.get('status')}): {reason}")
            self._whole(answer, f"kNN of {target}")
            out.append([(h["_id"], score_to_cosine(h["_score"])) for h in answer["hits"]["hits"]])
        return out

    async def ensure(self, space: EmbeddingSpace, make_current_if_none: bool = True) -> str:
        name = space.index_name
        async with self._ensure_lock:
            known = self._ensured.get(name)
            if known is None:
                await self._ensure_index(space)
                self._ensured[name] = space
            elif known != space:
                raise FailedPrecondition(f"index {name} holds {known}, not {space}")
            if make_current_if_none and not self._alias_seen:
                exists = await self._call(
                    f"look up alias {self.alias}", self._client().indices.exists_alias(name=self.alias)
                )
                if not exists:
                    await self._update_aliases(
                        f"point alias {self.alias} at {name}", alias_actions(self.alias, name)
                    )
                    self._forget()
                self._alias_seen = True
        return name

    async def _ensure_index(self, space: EmbeddingSpace) -> None:
        name = space.index_name
        mappings = await self._mapping(name)
        if mappings is None:
            body = index_body(
                space,
                self.m,
                self.ef_construction,
                await self.server_version(),
                self.shards,
                self.replicas,
                self.index_type,
            )
            try:
                await self._call(
                    f"create index {name}",
                    self._client().indices.create(
                        index=name, settings=body["settings"], mappings=body["mappings"]
                    ),
                )
                return
            except BadRequestError as exc:
                if "resource_already_exists_exception" not in str(exc):
                    raise FailedPrecondition(f"cannot create index {name}: {exc}") from None
            mappings = await self._mapping(name)  # another process created it a moment ago
            if mappings is None:
                raise Unavailable(f"index {name} was created and is gone again")
        if list(mappings) != [name]:
            raise FailedPrecondition(f"{name!r} is an alias of {', '.join(sorted(mappings))}, not an index")
        recorded = space_from_meta(name, mappings[name].get("_meta"))
        if recorded != space:
            raise FailedPrecondition(f"index {name} holds {recorded}, not {space}")
        known = mappings[name].get("properties", {})
        missing = {k: v for k, v in {**BOOKKEEPING, **ADDED_FIELDS}.items() if k not in known}
        if missing:  # an index made before these fields: adding fields is allowed when strict
            await self._call(
                f"add ordering fields to {name}",
                self._client().indices.put_mapping(index=name, properties=missing),
            )

    async def set_dedup_threshold(self, space: EmbeddingSpace, threshold: float | None) -> None:
        """The threshold lives in the index's mapping `_meta` with the rest of its identity;
        `_meta` is updatable on a live index and replaced whole by the update
        (https://www.elastic.co/guide/en/elasticsearch/reference/8.17/mapping-meta-field.html)."""
        from dataclasses import replace

        name = space.index_name
        recorded = await self._space_of_index(name)
        updated = replace(recorded, dedup_threshold=None if threshold is None else float(threshold))
        await self._call(
            f"record the dedup threshold of {name}",
            self._client().indices.put_mapping(index=name, meta={META_KEY: updated.record()}),
        )
        self._ensured.pop(name, None)
        self._forget()

    async def set_current(self, space: EmbeddingSpace) -> str:
        """Move the alias to the index of `space` (atomically, away from whatever it named;
        `<alias>.previous` moves to the index it left in the same call)."""
        name = await self.ensure(space, make_current_if_none=False)
        current = await self._mapping(self.alias) or {}
        previous = self._aux("previous")
        actions = alias_actions(self.alias, name, current, previous, await self._alias_names(previous))
        await self._update_aliases(f"point alias {self.alias} at {name}", actions)
        self._forget()
        self._alias_seen = True
        return name

    # -- swap state (see the module docstring: all of it lives in aliases) -------------------

    async def _update_aliases(self, what: str, actions: list[dict]) -> None:
        """One atomic `_aliases` call. Its remove actions come from a read just before; if
        another process changed the aliases in between, Elasticsearch refuses the whole call
        (404) and nothing changes: say so instead of failing obscurely."""
        try:
            resp = await self._call(what, self._client().indices.update_aliases(actions=actions))
        except NotFoundError as exc:
            self._forget()
            self._writes = None
            raise FailedPrecondition(
                f"{what}: the aliases changed meanwhile (another swap or rollback?); run it again ({exc})"
            ) from None
        if resp.body.get("errors"):  # 8.14+: some action did not apply (cannot happen with must_exist)
            self._forget()
            self._writes = None
            raise FailedPrecondition(
                f"{what}: Elasticsearch applied it only in part: {resp.body.get('action_results')}"
            )

    def _aux(self, role: str) -> str:
        return f"{self.alias}.{role}"

    async def _alias_names(self, alias: str) -> list[str]:
        """The indexes an alias names; [] when it does not exist."""
        try:
            resp = await self._call(f"read alias {alias}", self._client().indices.get_alias(name=alias))
        except NotFoundError:
            return []
        return sorted(resp.body)

    async def indexes(self) -> dict[str, EmbeddingSpace]:
        resp = await self._call(
            "list indexes",
            self._client().indices.get_mapping(
                index="products-*", allow_no_indices=True, expand_wildcards="open"
            ),
        )
        out = {}
        for name, body in sorted(resp.body.items()):
            meta = body.get("mappings", {}).get("_meta") or {}
            if META_KEY in meta:  # skip foreign indexes that happen to match the pattern
                out[name] = space_from_meta(name, meta)
        return out

    async def alias_target(self) -> str | None:
        return (await self._resolve(force=True))[0]

    async def previous_target(self) -> str | None:
        names = await self._alias_names(self._aux("previous"))
        return names[0] if names else None

    async def write_targets(self) -> list[EmbeddingSpace]:
        # Read per ingestion batch, so cached like the alias target.
        cached = self._writes
        if cached is not None and time.monotonic() - cached[1] < self.refresh_s:
            return cached[0]
        spaces = [await self._space_of_index(n) for n in await self._alias_names(self._aux("write-also"))]
        self._writes = (spaces, time.monotonic())
        return spaces

    async def set_write_targets(self, spaces: list[EmbeddingSpace]) -> None:
        alias = self._aux("write-also")
        wanted = [await self.ensure(s, make_current_if_none=False) for s in spaces]
        actions = set_alias_actions(alias, wanted, await self._alias_names(alias))
        if actions:
            await self._update_aliases(f"point {alias} at {wanted}", actions)
        self._writes = None

    async def drop(self, space: EmbeddingSpace) -> None:
        name = space.index_name
        if name == await self.alias_target():
            raise FailedPrecondition(f"{name} is still behind the alias {self.alias}")
        # Deleting an index removes it from every alias (write-also, previous) with it.
        await self._call(
            f"delete index {name}",
            self._client().options(ignore_status=404).indices.delete(index=name),
        )
        self._forget(name)
        self._writes = None

    async def optimize(self, space: EmbeddingSpace) -> bool:
        """After a bulk (re)build: refresh (so counts and searches see everything) and start a
        merge to one segment in the background; each segment carries its own HNSW graph, and a
        query searches every one of them."""
        name = space.index_name
        await self._call(f"refresh {name}", self._client(self.bulk_timeout_s).indices.refresh(index=name))
        await self._call(
            f"force-merge {name}",
            self._client().indices.forcemerge(index=name, max_num_segments=1, wait_for_completion=False),
        )
        return True

    async def _bulk(self, what: str, actions: list[dict]) -> dict[str, dict]:
        """Send actions through the bulk helper (chunked, retried on 429); {id: item result}
        of the items that failed."""
        failed: dict[str, dict] = {}
        stream = async_streaming_bulk(
            self._client(self.bulk_timeout_s),
            actions,
            chunk_size=self.chunk_size,
            max_chunk_bytes=self.max_chunk_bytes,
            max_retries=self.bulk_max_retries,
            initial_backoff=self.bulk_initial_backoff_s,
            max_backoff=30,
            raise_on_error=False,
            raise_on_exception=True,
            yield_ok=False,
        )

        async def drain():
            async for ok, item in stream:
                (result,) = item.values()
                if not ok:
                    failed[result.get("_id")] = result

        await self._call(what, drain())
        return failed

    async def _read_rows(self, name: str, ids: list[str]) -> dict[str, tuple[dict, dict]]:
        """{id: (lww row, {_seq_no, _primary_term})} of stored documents, tombstones included.
        Real-time reads (mget), without vectors: merges never need the stored one."""
        return {
            doc["_id"]: (row_from_doc(doc), {k: doc[k] for k in ("_seq_no", "_primary_term")})
            for doc in await self._mget(name, ids, source_excludes=["vector"])
            if doc.get("found")
        }

    async def _mget(self, name: str, ids: list[str], **options) -> list[dict]:
        """Real-time reads of documents by id, 500 per request; a document that cannot be
        read makes the whole read Unavailable (never a silently shorter answer)."""
        docs = []
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            resp = await self._call(
                f"read products from {name}", self._client().mget(index=name, ids=chunk, **options)
            )
            for doc in resp["docs"]:
                if "error" in doc:
                    raise Unavailable(f"reading {doc.get('_id')!r} from {name} failed: {doc['error']}")
                docs.append(doc)
        return docs

    async def apply_ops(self, space: EmbeddingSpace, ops: list[Op], attempts: int = 10) -> list[str]:
        """Apply catalog operations with per-field last-writer-wins (gateway/index/lww.py, the
        same merge as the embedded backend): read the stored rows, merge, and write back only
        if nobody wrote them in between (create / if_seq_no); the ids another writer got to
        first are read and merged again. Any number of writers, any arrival order: the same
        final document, field by field."""
        if not ops:
            return []
        name = await self.ensure(space)
        outcomes: list[str | None] = [None] * len(ops)
        todo = list(range(len(ops)))
        for _ in range(attempts):
            ids = list(dict.fromkeys(ops[i].product_id for i in todo))
            stored = await self._read_rows(name, ids)
            rows = {pid: stored[pid][0] for pid in stored}
            for i in todo:
                new, outcome = lww_apply(rows.get(ops[i].product_id), ops[i])
                outcomes[i] = outcome
                if new is not None:
                    rows[ops[i].product_id] = new
            writes = [
                (
                    pid,
                    stored[pid][0] if pid in stored else None,
                    rows[pid],
                    stored[pid][1] if pid in stored else None,
                )
                for pid in ids
                if pid in rows and (pid not in stored or row_changes(stored[pid][0], rows[pid]))
            ]
            if not writes:
                return outcomes
            failed = await self._bulk(f"write to {name}", write_actions(name, writes))
            conflicts = {pid for pid, item in failed.items() if item.get("status") == 409}
            broken = {pid: item for pid, item in failed.items() if pid not in conflicts}
            if broken:
                self._forget(name)
                pid, item = next(iter(broken.items()))
                reason = item.get("error", {})
                if isinstance(reason, dict):
                    reason = f"{reason.get('type')}: {reason.get('reason')}"
                message = (
                    f"write to {name}: {len(broken)} of {len(writes)} documents failed at "
                    f"{safe_url(self.url)}; first: id {pid!r} status {item.get('status')} ({reason})"
                )
                statuses = {int(item.get("status") or 500) for item in broken.values()}
                if all(400 <= st < 500 and st != 429 for st in statuses):
                    # The documents are refused (mapping, validation): retrying will not help;
                    # the ingest worker isolates and dead-letters the event that carries them.
                    raise InvalidArgument(message)
                raise Unavailable(message)
            if not conflicts:
                return outcomes
            todo = [i for i in todo if ops[i].product_id in conflicts]
        raise Unavailable(f"index {name}: too many concurrent writers for the same products")

    async def upsert(self, space, items):
        """items: (product, image_hash, vector[, event_seq]); without an event_seq the write is
        ordered by this host's clock (use one for anything that races with catalog events)."""
        ops = []
        for item in items:
            product, image_hash, vector = item[:3]
            if vector.shape != (space.dim,):
                raise FailedPrecondition(f"vector for {product.id} is not {space.dim}-d")
            seq = item[3] if len(item) > 3 and item[3] is not None else _now_seq()
            fields = product_source(product, image_hash, unit(vector))
            fields.pop("id")
            fields.pop("item_id")  # only the dedup job sets it (an "item" op)
            ops.append(Op("upsert", product.id, seq, fields))
        await self.apply_ops(space, ops)

    async def update_fields(
        self, space: EmbeddingSpace, product_id: str, fields: dict, event_seq: int | None = None
    ) -> str:
        """Change some fields of one stored product: "applied", "missing" or "stale"."""
        check_update(fields)
        seq = _now_seq() if event_seq is None else event_seq
        return (await self.apply_ops(space, [Op("update", product_id, seq, dict(fields))]))[0]

    async def delete(self, space: EmbeddingSpace, ids: list[str], event_seq: int | None = None) -> None:
        seq = _now_seq() if event_seq is None else event_seq
        await self.apply_ops(space, [Op("delete", pid, seq) for pid in ids])

    async def apply_events(self, space, events):
        for kind, _, _, fields in events:
            if kind == "update":
                check_update(fields or {})
        return await self.apply_ops(
            space, [Op(kind, pid, seq, dict(fields or {})) for kind, pid, seq, fields in events]
        )

    async def get(self, space, ids):
        if not ids:
            return {}
        name = await self.ensure(space, make_current_if_none=False)
        return {
            doc["_id"]: StoredProduct(
                product_from_source(doc["_source"]),
                doc["_source"]["image_hash"],
                np.asarray(doc["_source"]["vector"], dtype=np.float32),
            )
            for doc in await self._mget(name, ids)
            if doc.get("found") and not doc["_source"].get("deleted")
        }

    async def products(self, space, ids):
        if not ids:
            return {}
        name = await self.ensure(space, make_current_if_none=False)
        return {
            doc["_id"]: product_from_source(doc["_source"])
            for doc in await self._mget(name, ids, source_excludes=["vector"])
            if doc.get("found") and not doc["_source"].get("deleted")
        }

    async def listings(self, space, item_ids):
        out: dict[str, list[Product]] = {}
        if not item_ids:
            return out
        name = await self.ensure(space, make_current_if_none=False)
        for start in range(0, len(item_ids), 500):
            chunk = item_ids[start : start + 500]
            body = {
                "query": {"bool": {"filter": [{"terms": {"item_id": chunk}}], **NOT_DELETED["bool"]}},
                "size": min(10_000, 64 * len(chunk)),
                "_source": {"excludes": ["vector"]},
            }
            resp = await self._read(
                f"read item listings from {name}", self._client().search(index=name, body=body)
            )
            for hit in resp["hits"]["hits"]:
                product = product_from_source(hit["_source"])
                out.setdefault(product.item_id, []).append(product)
        return out

    async def scan(self, space, batch_size=1000, category=None):
        """Every live product in id order, paged with search_after (no scroll context to keep)."""
        name = await self.ensure(space, make_current_if_none=False)
        query = NOT_DELETED
        if category is not None:
            query = {
                "bool": {
                    "must_not": NOT_DELETED["bool"]["must_not"],
                    "filter": [{"term": {"category": category}}],
                }
            }
        after = None
        while True:
            body = {"query": query, "sort": [{"id": "asc"}], "size": batch_size}
            if after is not None:
                body["search_after"] = after
            resp = await self._read(f"scan {name}", self._client().search(index=name, body=body))
            hits = resp["hits"]["hits"]
            if not hits:
                return
            yield [
                StoredProduct(
                    product_from_source(h["_source"]),
                    h["_source"]["image_hash"],
                    np.asarray(h["_source"]["vector"], np.float32),
                )
                for h in hits
            ]
            after = hits[-1]["sort"]

    async def categories(self, space):
        """A terms aggregation on `category` (a keyword field), every bucket: categories are a
        taxonomy of tens, so a remainder past MAX_CATEGORIES means a catalog this cannot group.
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/search-aggregations-bucket-terms-aggregation.html"""
        name = await self.ensure(space, make_current_if_none=False)
        body = {
            "query": NOT_DELETED,
            "size": 0,
            "aggs": {"categories": {"terms": {"field": "category", "size": MAX_CATEGORIES}}},
        }
        resp = await self._read(f"categories of {name}", self._client().search(index=name, body=body))
        agg = resp["aggregations"]["categories"]
        if agg.get("sum_other_doc_count"):
            raise FailedPrecondition(
                f"{name} has more than {MAX_CATEGORIES} categories; the dedup job groups one category at a time"
            )
        return {b["key"]: b["doc_count"] for b in agg["buckets"]}

    async def count(self, space):
        """Documents visible to search (written ones appear after the index refresh interval)."""
        name = await self.ensure(space, make_current_if_none=False)
        resp = await self._read(f"count {name}", self._client().count(index=name, query=NOT_DELETED))
        return int(resp["count"])

    async def refresh(self, space: EmbeddingSpace) -> None:
        """Make every write so far visible to search and count now (tests, end of a bulk load)."""
        name = space.index_name
        await self._call(f"refresh {name}", self._client().indices.refresh(index=name))

    @property
    def look_matches(self):
        if getattr(self, "_look_matches", None) is None:
            from gateway.index.look_matches import ElasticLookMatches

            self._look_matches = ElasticLookMatches(self)
        return self._look_matches

    async def close(self):
        await self._es.close()
