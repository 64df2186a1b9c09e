"""The Elasticsearch index: exact request bodies, filter semantics, and the index contract.

The contract scenarios (the same ones tests/test_index_embedded.py runs on LanceDB) run twice:
against `FakeElasticsearch`, a small in-process HTTP server that speaks the handful of REST
calls ElasticIndex makes and answers kNN by brute force with the clause evaluator below, and
against a real cluster when LOOKSYNC_ES_URL is set (each run uses its own alias and index
names and deletes them afterwards).
"""

import asyncio
import fnmatch
import itertools
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from elastic_transport import TransportError
from elasticsearch import ApiError

from gateway.catalog import Product
from gateway.errors import FailedPrecondition, InvalidArgument, Unavailable
from gateway.filters import build_filters
from gateway.index.base import EmbeddingSpace
from gateway.index.elastic import (
    ElasticIndex,
    alias_actions,
    bulk_actions,
    filter_clauses,
    index_body,
    knn_body,
    num_candidates,
    score_to_cosine,
    set_alias_actions,
    space_from_meta,
    unit,
    update_body,
)
from tests.test_index_embedded import FILTER_CASES  # the same cases on both backends

SPACE64 = EmbeddingSpace("clip", 1, 64)


# ---------------------------------------------------------------------------------------------
# A tiny evaluator of the clauses filter_clauses emits (term / terms / range on one field).
# A multi-valued field (sizes) matches when any of its values does, as in Elasticsearch.
# ---------------------------------------------------------------------------------------------


def clause_matches(clause: dict, doc: dict) -> bool:
    ((kind, body),) = clause.items()
    ((field, cond),) = body.items()
    value = doc.get(field)
    values = value if isinstance(value, list) else [] if value is None else [value]
    if kind == "term":
        return any(v == cond and type(v) is type(cond) for v in values)
    if kind == "terms":
        return any(v in cond for v in values)
    if kind == "range":
        assert set(cond) <= {"gte", "lte"}, cond
        return any(
            ("gte" not in cond or v >= cond["gte"]) and ("lte" not in cond or v <= cond["lte"])
            for v in values
        )
    raise AssertionError(f"unexpected clause {clause}")


def clauses_match(clauses: list[dict], doc: dict) -> bool:
    return all(clause_matches(c, doc) for c in clauses)


# ---------------------------------------------------------------------------------------------
# Request bodies
# ---------------------------------------------------------------------------------------------


def test_index_body_for_a_64d_space():
    assert index_body(SPACE64, m=16, ef_construction=100, server=(8, 15)) == {
        "settings": {"index.number_of_shards": 1},
        "mappings": {
            "dynamic": "strict",
            "_meta": {
                "looksync": {
                    "model": "clip",
                    "version": 1,
                    "dim": 64,
                    "family": "clip",
                    "modalities": ["image", "text"],
                }
            },
            "properties": {
                "id": {"type": "keyword"},
                "title": {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 512}}},
                "brand": {"type": "keyword"},
                "category": {"type": "keyword"},
                "gender": {"type": "keyword"},
                "market": {"type": "keyword"},
                "price": {"type": "scaled_float", "scaling_factor": 100},
                "currency": {"type": "keyword"},
                "sizes": {"type": "keyword"},
                "in_stock": {"type": "boolean"},
                "image_url": {"type": "keyword"},
                "image_hash": {"type": "keyword"},
                "vector": {
                    "type": "dense_vector",
                    "element_type": "float",
                    "dims": 64,
                    "index": True,
                    "similarity": "dot_product",
                    "index_options": {"type": "int8_hnsw", "m": 16, "ef_construction": 100},
                },
            },
        },
    }


def test_index_body_per_server_version():
    v9 = index_body(SPACE64, m=32, ef_construction=200, server=(9, 2), shards=4, replicas=1)
    assert v9["settings"] == {
        "index.number_of_shards": 4,
        "index.number_of_replicas": 1,
        "index.mapping.exclude_source_vectors": False,
    }
    assert v9["mappings"]["properties"]["vector"]["index_options"] == {
        "type": "int8_hnsw",
        "m": 32,
        "ef_construction": 200,
    }
    assert "index.mapping.exclude_source_vectors" not in index_body(SPACE64, server=(9, 1))["settings"]
    bbq = index_body(SPACE64, server=(9, 0), index_type="bbq_hnsw")
    assert bbq["mappings"]["properties"]["vector"]["index_options"]["type"] == "bbq_hnsw"
    with pytest.raises(FailedPrecondition):
        index_body(SPACE64, server=(8, 11))  # int8_hnsw arrived in 8.12
    with pytest.raises(FailedPrecondition):
        index_body(SPACE64, server=(8, 15), index_type="bbq_hnsw")


def test_identity_is_read_from_meta():
    meta = index_body(SPACE64)["mappings"]["_meta"]
    assert space_from_meta("products-clip-v1", meta) == SPACE64
    # An index written before families existed is a CLIP space with both towers.
    old = space_from_meta("products-clip-v1", {"looksync": {"model": "clip", "version": 1, "dim": 64}})
    assert (old.family, old.modalities) == ("clip", ("image", "text"))
    dino = EmbeddingSpace("dinov2", 1, 64, "dinov2", ("image",))
    back = space_from_meta("products-dinov2-v1", index_body(dino)["mappings"]["_meta"])
    assert (back.family, back.modalities, back.has_text) == ("dinov2", ("image",), False)
    for bad in (None, {}, {"looksync": {"model": "clip"}}, {"other": 1}):
        with pytest.raises(FailedPrecondition):
            space_from_meta("foreign", bad)


def test_knn_body_with_every_filter_kind():
    filters = build_filters(
        categories=["dress", "jeans"],
        gender="women",
        market="us",
        brands=["Kumo", "O'Neil"],
        sizes=["M", "38"],
        min_price=10,
        max_price=99.5,
        in_stock_only=True,
    )
    assert knn_body([0.6, 0.8], 5, filters, num_candidates_factor=10) == {
        "knn": {
            "field": "vector",
            "query_vector": [0.6, 0.8],
            "k": 5,
            "num_candidates": 100,
            "filter": [
                {"terms": {"category": ["dress", "jeans"]}},
                {"terms": {"gender": ["women", "unisex"]}},
                {"term": {"market": "US"}},
                {"terms": {"brand": ["Kumo", "O'Neil"]}},
                {"terms": {"sizes": ["M", "38"]}},
                {"range": {"price": {"gte": 10.0, "lte": 99.5}}},
                {"term": {"in_stock": True}},
            ],
        },
        "size": 5,
        "track_total_hits": False,
        "_source": {"excludes": ["vector"]},
    }


def test_knn_body_without_filters():
    assert knn_body([1.0, 0.0], 50, build_filters(), num_candidates_factor=10, with_vectors=True) == {
        "knn": {"field": "vector", "query_vector": [1.0, 0.0], "k": 50, "num_candidates": 500},
        "size": 50,
        "track_total_hits": False,
        "_source": True,
    }
    rescored = knn_body([1.0, 0.0], 10, build_filters(), rescore_oversample=3.0)
    assert rescored["knn"]["rescore_vector"] == {"oversample": 3.0}
    with pytest.raises(InvalidArgument):
        knn_body([1.0, 0.0], 0, build_filters())


def test_num_candidates_bounds():
    assert num_candidates(1, 10) == 100
    assert num_candidates(20, 10) == 200
    assert num_candidates(5000, 10) == 10_000
    assert num_candidates(200, 1) == 200  # never fewer than k


def test_score_is_converted_back_to_cosine():
    assert score_to_cosine(1.0) == 1.0
    assert score_to_cosine(0.75) == 0.5
    assert score_to_cosine(0.0) == -1.0


def test_bulk_actions_for_two_products():
    a = Product("a1", "Red dress", "Kumo", "dress", "women", "US", 49.99, "USD", ["S", "M"], True, "a.jpg")
    b = Product("b2", "Jeans", "Brisa", "jeans", "men", "DE", 80.0, "EUR", [], False, "")
    vectors = [np.array([0.6, 0.8], dtype=np.float32), np.array([1.0, 0.0], dtype=np.float32)]
    actions = bulk_actions("products-clip-v1", [(a, "ha", vectors[0]), (b, "hb", vectors[1])])
    assert actions == [
        {
            "_op_type": "index",
            "_index": "products-clip-v1",
            "_id": "a1",
            "_source": {
                "id": "a1",
                "title": "Red dress",
                "brand": "Kumo",
                "category": "dress",
                "gender": "women",
                "market": "US",
                "price": 49.99,
                "currency": "USD",
                "sizes": ["S", "M"],
                "in_stock": True,
                "image_url": "a.jpg",
                "image_hash": "ha",
                "vector": [float(np.float32(0.6)), float(np.float32(0.8))],
            },
        },
        {
            "_op_type": "index",
            "_index": "products-clip-v1",
            "_id": "b2",
            "_source": {
                "id": "b2",
                "title": "Jeans",
                "brand": "Brisa",
                "category": "jeans",
                "gender": "men",
                "market": "DE",
                "price": 80.0,
                "currency": "EUR",
                "sizes": [],
                "in_stock": False,
                "image_url": "",
                "image_hash": "hb",
                "vector": [1.0, 0.0],
            },
        },
    ]
    assert all(type(x) is float for x in actions[0]["_source"]["vector"])  # plain JSON numbers


def test_alias_actions():
    assert alias_actions("products", "products-clip-v1") == [
        {"add": {"index": "products-clip-v1", "alias": "products"}}
    ]
    assert alias_actions("products", "products-clip-v2", ["products-clip-v1"]) == [
        {"remove": {"index": "products-clip-v1", "alias": "products"}},
        {"add": {"index": "products-clip-v2", "alias": "products"}},
    ]
    assert alias_actions("products", "products-clip-v2", ["products-clip-v2"]) == [
        {"add": {"index": "products-clip-v2", "alias": "products"}}
    ]
    # A swap moves the rollback record in the same atomic call.
    assert alias_actions(
        "products", "products-clip-v2", ["products-clip-v1"], "products.previous", ["products-clip-v0"]
    ) == [
        {"remove": {"index": "products-clip-v1", "alias": "products"}},
        {"add": {"index": "products-clip-v2", "alias": "products"}},
        {"remove": {"index": "products-clip-v0", "alias": "products.previous"}},
        {"add": {"index": "products-clip-v1", "alias": "products.previous"}},
    ]
    assert set_alias_actions("products.write-also", ["b", "c"], ["a", "b"]) == [
        {"remove": {"index": "a", "alias": "products.write-also"}},
        {"add": {"index": "c", "alias": "products.write-also"}},
    ]


def test_update_body_never_carries_the_vector():
    assert update_body({"price": 10.0, "in_stock": False}) == {"doc": {"price": 10.0, "in_stock": False}}
    for bad in ({"vector": [1.0]}, {"id": "other"}, {"colour": "red"}):
        with pytest.raises(InvalidArgument):
            update_body(bad)


def test_unit_keeps_unit_vectors_and_normalises_others():
    v = np.random.default_rng(3).standard_normal(64).astype(np.float32)
    v /= np.linalg.norm(v)
    assert unit(v) is v or np.array_equal(unit(v), v)
    np.testing.assert_allclose(np.linalg.norm(unit(3 * v)), 1.0, atol=1e-6)
    with pytest.raises(FailedPrecondition):
        unit(np.zeros(4, dtype=np.float32))


def test_filter_clauses_women_includes_unisex():
    assert filter_clauses(build_filters(gender="women")) == [{"terms": {"gender": ["women", "unisex"]}}]
    assert filter_clauses(build_filters(gender="unisex")) == [{"terms": {"gender": ["unisex"]}}]
    assert filter_clauses(build_filters()) == []


# ---------------------------------------------------------------------------------------------
# Catalog used by the semantic and contract tests
# ---------------------------------------------------------------------------------------------


def _products(n=120, seed=0):
    rng = np.random.default_rng(seed)
    cats = ["dress", "jeans", "sneakers", "shirt"]
    return [
        Product(
            id=f"x{i}",
            title=f"item {i} it's",
            brand=["O'Neil", "Kumo", "Brisa"][i % 3],
            category=cats[i % 4],
            gender=["women", "men", "unisex"][i % 3 if i % 5 else 2],
            market=["US", "DE"][i % 2],
            # Whole cents: Elasticsearch filters the scaled_float (cents) value of the price.
            price=round(float(rng.uniform(5, 300)), 2),
            currency="USD",
            sizes=[["S", "M"], ["L"], [], ["38", "39"]][i % 4],
            in_stock=bool(i % 4),
            image_url="",
        )
        for i in range(n)
    ]


def _vectors(n, dim=16, seed=1):
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_filter_clauses_agree_with_matches():
    products = _products(200, seed=5)
    values = {
        "categories": [["dress"], ["jeans", "shirt"]],
        "gender": ["women", "men", "unisex"],
        "market": ["US", "de"],
        "brands": [["Kumo"], ["O'Neil", "Brisa"]],
        "sizes": [["M"], ["38", "L"]],
        "min_price": [50.0],
        "max_price": [120.0],
        "in_stock_only": [True, False],
    }
    cases = list(FILTER_CASES)
    for combo in itertools.combinations(values, 3):
        for picked in itertools.product(*(values[k] for k in combo)):
            cases.append(dict(zip(combo, picked)))
    # prices exactly on the bounds are inside (gte / lte)
    cases.append({"min_price": products[0].price, "max_price": products[0].price})
    checked = 0
    for case in cases:
        filters = build_filters(**case)
        clauses = filter_clauses(filters)
        for p in products:
            assert clauses_match(clauses, p.to_dict()) == filters.matches(p), (case, p)
            checked += 1
    assert checked > 10_000
    assert (
        sum(
            clauses_match(
                filter_clauses(build_filters(min_price=products[0].price, max_price=products[0].price)),
                p.to_dict(),
            )
            for p in products
        )
        >= 1
    )


# ---------------------------------------------------------------------------------------------
# A fake Elasticsearch: just the REST calls ElasticIndex makes, kNN by brute force
# ---------------------------------------------------------------------------------------------


def _error(status: int, kind: str, reason: str) -> tuple[int, dict]:
    return status, {
        "error": {"root_cause": [{"type": kind, "reason": reason}], "type": kind, "reason": reason},
        "status": status,
    }


class FakeElasticsearch:
    VERSION = "9.2.0"

    def __init__(self):
        self.indices: dict[str, dict] = {}
        self.aliases: dict[str, set[str]] = {}
        self.requests: list[tuple[str, str, object]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                with fake.lock:
                    status, body = fake.handle(self.command, unquote(parts.path), parts.query, raw)
                data = b"" if body is None or self.command == "HEAD" else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("X-Elastic-Product", "Elasticsearch")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _serve

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def concrete(self, name: str) -> list[str] | None:
        names = []
        for part in name.split(","):
            if "*" in part:  # a wildcard matches zero or more indices (allow_no_indices)
                names.extend(sorted(i for i in self.indices if fnmatch.fnmatchcase(i, part)))
            elif part in self.indices:
                names.append(part)
            elif part in self.aliases:
                names.extend(sorted(self.aliases[part]))
            else:
                return None
        return names

    def handle(self, method: str, path: str, query: str, raw: bytes) -> tuple[int, dict | None]:
        parts = [p for p in path.split("/") if p]
        if parts == ["_bulk"]:
            lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
            self.requests.append((method, path, lines))
            return self.bulk(lines)
        body = json.loads(raw) if raw else None
        self.requests.append((method, path, body))
        if not parts and method == "GET":
            return 200, {
                "name": "fake",
                "version": {"number": self.VERSION},
                "tagline": "You Know, for Search",
            }
        if parts == ["_aliases"] and method == "POST":
            # Atomic, as in Elasticsearch: every action is checked before any is applied; a
            # remove of an alias the index does not have fails the whole call.
            for action in body["actions"]:
                ((op, spec),) = action.items()
                if spec["index"] not in self.indices:
                    return _error(404, "index_not_found_exception", spec["index"])
                if op == "remove" and spec["index"] not in self.aliases.get(spec["alias"], set()):
                    return _error(404, "aliases_not_found_exception", spec["alias"])
            for action in body["actions"]:
                ((op, spec),) = action.items()
                targets = self.aliases.setdefault(spec["alias"], set())
                (targets.add if op == "add" else targets.discard)(spec["index"])
                if not targets:
                    del self.aliases[spec["alias"]]
            return 200, {"acknowledged": True}
        if len(parts) == 2 and parts[0] == "_alias":
            if parts[1] not in self.aliases:
                return (
                    (404, None) if method == "HEAD" else _error(404, "aliases_not_found_exception", parts[1])
                )
            targets = sorted(self.aliases[parts[1]])
            return 200, (None if method == "HEAD" else {t: {"aliases": {parts[1]: {}}} for t in targets})
        name = parts[0]
        if len(parts) == 1 and method == "PUT":
            if name in self.indices or name in self.aliases:
                return _error(400, "resource_already_exists_exception", f"index [{name}] already exists")
            self.indices[name] = {
                "settings": body["settings"],
                "mappings": body["mappings"],
                "docs": {},
                "versions": {},
            }
            return 200, {"acknowledged": True, "index": name}
        if len(parts) == 1 and method == "DELETE":
            if any(index not in self.indices for index in name.split(",")):
                return _error(404, "index_not_found_exception", name)
            for index in name.split(","):
                self.indices.pop(index, None)
                for targets in self.aliases.values():
                    targets.discard(index)
            self.aliases = {a: t for a, t in self.aliases.items() if t}
            return 200, {"acknowledged": True}
        targets = self.concrete(name)
        if targets is None:
            return _error(404, "index_not_found_exception", f"no such index [{name}]")
        op = parts[1] if len(parts) > 1 else ""
        if op == "_mapping" and method == "GET":
            return 200, {t: {"mappings": self.indices[t]["mappings"]} for t in targets}
        if op in ("_refresh", "_forcemerge"):
            return 200, {"_shards": {"failed": 0}}
        if op == "_doc":
            (index,) = targets
            docs, versions = self.indices[index]["docs"], self.indices[index]["versions"]
            if method == "GET":
                if parts[2] not in docs:
                    return 404, {"_index": index, "_id": parts[2], "found": False}
                return 200, {
                    "_index": index,
                    "_id": parts[2],
                    "_version": versions.get(parts[2], 1),
                    "found": True,
                    "_source": docs[parts[2]],
                }
            version = self.version_conflict(
                index, parts[2], dict(p.split("=") for p in query.split("&") if p)
            )
            if version is None:
                return _error(409, "version_conflict_engine_exception", parts[2])
            docs[parts[2]], versions[parts[2]] = body, version
            return 200, {"_index": index, "_id": parts[2], "result": "updated", "_version": version}
        if op == "_count":
            return 200, {"count": sum(len(self.indices[t]["docs"]) for t in targets)}
        if op == "_mget":
            (index,) = targets
            docs = self.indices[index]["docs"]
            return 200, {
                "docs": [
                    {"_index": index, "_id": i, "found": True, "_source": docs[i]}
                    if i in docs
                    else {"_index": index, "_id": i, "found": False}
                    for i in body["ids"]
                ]
            }
        if op == "_update":
            (index,) = targets
            doc = self.indices[index]["docs"].get(parts[2])
            if doc is None:
                return _error(404, "document_missing_exception", parts[2])
            merged = {**doc, **body["doc"]}
            problem = self.invalid(index, merged)
            if problem:
                return _error(400, *problem)
            self.indices[index]["docs"][parts[2]] = merged
            return 200, {"result": "updated", "_id": parts[2]}
        if op == "_search":
            return self.search(targets, body)
        return _error(400, "unsupported", f"{method} {path}")

    def version_conflict(self, index: str, doc_id: str, meta: dict) -> int | None:
        """The version a write gets, or None when external versioning refuses it (409)."""
        stored = self.indices[index]["versions"].get(doc_id)
        if meta.get("version_type") in ("external", "external_gte"):
            version = int(meta["version"])
            if stored is None:
                return version
            too_old = version < stored if meta["version_type"] == "external_gte" else version <= stored
            return None if too_old else version
        return (stored or 0) + 1

    def invalid(self, index: str, source: dict) -> tuple[str, str] | None:
        properties = self.indices[index]["mappings"]["properties"]
        unknown = set(source) - set(properties)
        if unknown:
            return "strict_dynamic_mapping_exception", f"unknown fields {sorted(unknown)}"
        vector = source.get("vector")
        if vector is not None and "dims" in properties.get("vector", {}):
            if len(vector) != properties["vector"]["dims"]:
                return "document_parsing_exception", "wrong number of dimensions"
            if abs(float(np.dot(np.float32(vector), np.float32(vector))) - 1.0) > 1e-4:
                return "document_parsing_exception", "dot_product needs unit-length vectors"
        return None

    def bulk(self, lines: list[dict]) -> tuple[int, dict]:
        items = []
        i = 0
        while i < len(lines):
            ((op, meta),) = lines[i].items()
            index, doc_id = meta["_index"], meta["_id"]
            if index not in self.indices and op == "index":
                # Elasticsearch creates a missing index on write, with a dynamic mapping: no
                # _meta, no dense_vector (what drop() must never let a late writer cause).
                self.indices[index] = {
                    "settings": {},
                    "mappings": {
                        "dynamic": "true",
                        "properties": {k: {"type": "object"} for k in lines[i + 1]},
                    },
                    "docs": {},
                    "versions": {},
                }
            if index not in self.indices:
                items.append(
                    {
                        op: {
                            "_index": index,
                            "_id": doc_id,
                            "status": 404,
                            "error": {"type": "index_not_found_exception", "reason": index},
                        }
                    }
                )
                i += 1
                continue
            docs = self.indices[index]["docs"]
            if op == "index":
                source = lines[i + 1]
                i += 2
                problem = self.invalid(index, source)
                if problem:
                    items.append(
                        {
                            op: {
                                "_index": index,
                                "_id": doc_id,
                                "status": 400,
                                "error": {"type": problem[0], "reason": problem[1]},
                            }
                        }
                    )
                    continue
                version = self.version_conflict(index, doc_id, meta)
                if version is None:
                    items.append({op: {"_index": index, "_id": doc_id, "status": 409}})
                    continue
                status = 200 if doc_id in docs else 201
                docs[doc_id] = source
                self.indices[index]["versions"][doc_id] = version
                items.append({op: {"_index": index, "_id": doc_id, "status": status}})
            elif op == "delete":
                i += 1
                version = self.version_conflict(index, doc_id, meta)
                if version is None:
                    items.append({op: {"_index": index, "_id": doc_id, "status": 409}})
                    continue
                found = docs.pop(doc_id, None) is not None
                # A tombstone keeps the version, as Elasticsearch does for index.gc_deletes
                # (60 s): an older re-listing arriving late is refused.
                self.indices[index]["versions"][doc_id] = version
                items.append(
                    {
                        op: {
                            "_index": index,
                            "_id": doc_id,
                            "status": 200 if found else 404,
                            "result": "deleted" if found else "not_found",
                        }
                    }
                )
            else:
                return _error(400, "unsupported", op)
        return 200, {
            "errors": any(not 200 <= next(iter(it.values()))["status"] < 300 for it in items),
            "items": items,
        }

    def search(self, targets: list[str], body: dict) -> tuple[int, dict]:
        unknown = set(body) - {"knn", "size", "track_total_hits", "_source"}
        if unknown:
            return _error(400, "parsing_exception", f"unknown keys {sorted(unknown)}")
        knn = body["knn"]
        assert knn["field"] == "vector" and knn["k"] <= knn["num_candidates"] <= 10_000
        query = np.asarray(knn["query_vector"], dtype=np.float32)
        if abs(float(query @ query) - 1.0) > 1e-4:
            return _error(400, "illegal_argument_exception", "dot_product needs a unit-length query vector")
        hits = []
        for index in targets:
            for doc_id, source in self.indices[index]["docs"].items():
                if clauses_match(knn.get("filter", []), source):
                    dot = float(np.asarray(source["vector"], dtype=np.float32) @ query)
                    hits.append((-(1.0 + dot) / 2.0, doc_id, index, source))
        hits.sort(key=lambda h: (h[0], h[1]))
        out = []
        for neg, doc_id, index, source in hits[: min(knn["k"], body.get("size", 10))]:
            if body.get("_source") is not True:
                source = {k: v for k, v in source.items() if k not in body["_source"]["excludes"]}
            out.append({"_index": index, "_id": doc_id, "_score": -neg, "_source": source})
        return 200, {"hits": {"hits": out}}


# ---------------------------------------------------------------------------------------------
# The contract: the scenarios of tests/test_index_embedded.py
# ---------------------------------------------------------------------------------------------


class Env:
    def __init__(self, runner, index, space, products, vectors, es_url):
        self.runner, self.index, self.space = runner, index, space
        self.products, self.vectors, self.es_url = products, vectors, es_url
        self.created: list[str] = [space.index_name]

    def run(self, coro):
        return self.runner.run(coro)


class IndexContract:
    """Scenarios shared by the fake and the live cluster; `es_url` comes from the subclass."""

    # Float HNSW: the brute-force comparison checks the translation (filters, scores), not
    # int8 quantisation error (TestElasticLive.test_default_int8_index_is_close has that).
    INDEX_TYPE = "hnsw"

    @pytest.fixture(scope="class")
    def env(self, es_url):
        runner = asyncio.Runner()
        tag = uuid.uuid4().hex[:10]
        space = EmbeddingSpace(f"looksynctest{tag}", 1, 16)
        index = ElasticIndex(es_url, alias=f"looksync-test-{tag}", refresh_s=0.0, index_type=self.INDEX_TYPE)
        products, vectors = _products(), _vectors(120)
        env = Env(runner, index, space, products, vectors, es_url)
        try:
            env.run(index.upsert(space, [(p, f"h{p.id}", v) for p, v in zip(products, vectors)]))
            env.run(index.refresh(space))
            yield env
        finally:
            try:  # best effort: a cluster that went away must not hide the real failure
                env.run(
                    index._es.options(ignore_status=404).indices.delete(
                        index=",".join(env.created), ignore_unavailable=True
                    )
                )
            except (TransportError, ApiError):
                pass
            env.run(index.close())
            runner.close()

    @pytest.mark.parametrize("case", FILTER_CASES, ids=lambda c: ",".join(c) or "none")
    def test_filtered_knn_equals_brute_force(self, env, case):
        filters = build_filters(**case)
        query = _vectors(1, seed=9)[0]
        space, hits = env.run(env.index.search(query, env.space, filters, 10))
        allowed = [i for i, p in enumerate(env.products) if filters.matches(p)]
        expected = sorted(allowed, key=lambda i: -float(env.vectors[i] @ query))[:10]
        assert space == env.space
        assert [h.product.id for h in hits] == [env.products[i].id for i in expected]
        assert all(filters.matches(h.product) for h in hits)
        for h, i in zip(hits, expected):
            assert h.product == env.products[i]
            assert h.score == pytest.approx(float(env.vectors[i] @ query), abs=1e-5)
            assert h.vector is None

    def test_search_with_vectors(self, env):
        query = env.vectors[7]
        _, hits = env.run(env.index.search(query, env.space, build_filters(), 3, with_vectors=True))
        assert hits[0].product.id == "x7"
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(hits[0].vector, env.vectors[7])

    def test_upsert_replaces_by_id(self, env):
        original = env.products[0]
        changed = Product(**{**original.to_dict(), "price": 1.0, "title": "renamed"})
        try:
            env.run(env.index.upsert(env.space, [(changed, "new", env.vectors[5])]))
            stored = env.run(env.index.get(env.space, ["x0", "absent"]))
            assert set(stored) == {"x0"}
            env.run(env.index.refresh(env.space))
            assert env.run(env.index.count(env.space)) == 120
            got = stored["x0"]
            assert (got.product.title, got.product.price, got.image_hash) == ("renamed", 1.0, "new")
            np.testing.assert_allclose(got.vector, env.vectors[5])
        finally:
            env.run(env.index.upsert(env.space, [(original, "hx0", env.vectors[0])]))
            env.run(env.index.refresh(env.space))

    def test_update_fields_keeps_the_vector_and_delete_removes(self, env):
        extra = Product("extra", "extra", "Kumo", "shirt", "men", "US", 12.5, "USD", ["M"], True, "")
        env.run(env.index.upsert(env.space, [(extra, "he", env.vectors[3])]))
        assert (
            env.run(env.index.update_fields(env.space, "extra", {"price": 20.0, "in_stock": False}))
            == "applied"
        )
        assert env.run(env.index.update_fields(env.space, "nobody", {"price": 1.0})) == "missing"
        got = env.run(env.index.get(env.space, ["extra"]))["extra"]
        assert (got.product.price, got.product.in_stock, got.image_hash) == (20.0, False, "he")
        np.testing.assert_allclose(got.vector, env.vectors[3])
        env.run(env.index.delete(env.space, ["extra", "never-there"]))
        assert env.run(env.index.get(env.space, ["extra"])) == {}
        env.run(env.index.refresh(env.space))
        assert env.run(env.index.count(env.space)) == 120

    @pytest.mark.parametrize(
        "other, dim",
        [(("clip", 2), 16), (("dinov2", 1), 16), (None, 8)],
        ids=["other-version", "other-model", "wrong-dim"],
    )
    def test_query_vector_of_another_space_is_refused(self, env, other, dim):
        model, version = other or (env.space.model, env.space.version)
        with pytest.raises(FailedPrecondition):
            env.run(
                env.index.search(_vectors(1, dim)[0], EmbeddingSpace(model, version, dim), build_filters(), 5)
            )

    def test_alias_and_meta_record_identity(self, env):
        es = env.index._es
        mapping = env.run(es.indices.get_mapping(index=env.space.index_name)).body
        assert mapping[env.space.index_name]["mappings"]["_meta"] == {
            "looksync": {
                "model": env.space.model,
                "version": 1,
                "dim": 16,
                "family": "clip",
                "modalities": ["image", "text"],
            }
        }
        aliases = env.run(es.indices.get_alias(name=env.index.alias)).body
        assert list(aliases) == [env.space.index_name]
        assert env.run(env.index.space()) == env.space
        with pytest.raises(FailedPrecondition):
            env.run(env.index.ensure(EmbeddingSpace(env.space.model, 1, 32)))
        # a fresh client, as another process would be, sees the same identity
        other = ElasticIndex(env.es_url, alias=env.index.alias)
        try:
            with pytest.raises(FailedPrecondition):
                env.run(other.ensure(EmbeddingSpace(env.space.model, 1, 32)))
            assert env.run(other.space()) == env.space
        finally:
            env.run(other.close())

    def test_the_alias_can_move_to_a_new_space(self, env):
        v2 = EmbeddingSpace(env.space.model, 2, 16)
        env.created.append(v2.index_name)
        env.run(env.index.ensure(v2))  # the alias exists already: it stays where it is
        assert env.run(env.index.space()) == env.space
        try:
            env.run(env.index.set_current(v2))
            assert env.run(env.index.space()) == v2
            # A v1 vector may not search the v2 index the alias now names...
            with pytest.raises(FailedPrecondition):
                env.run(env.index.search(env.vectors[0], env.space, build_filters(), 5, index=v2.index_name))
            # ...but a request that resolved v1 before the move still finishes on the v1 index.
            _, still = env.run(env.index.search(env.vectors[0], env.space, build_filters(), 5))
            assert len(still) == 5
            _, hits = env.run(env.index.search(env.vectors[0], v2, build_filters(), 5))
            assert hits == []
        finally:
            env.run(env.index.set_current(env.space))
        assert env.run(env.index.space()) == env.space

    def test_swap_state_is_shared_through_the_cluster(self, env):
        """What a model swap records (write-also list, previous target) is read back by another
        client, as the gateway, the ingest workers and the CLI are separate processes."""
        v3 = EmbeddingSpace(env.space.model, 3, 16)
        env.created.append(v3.index_name)
        index = env.index
        other = ElasticIndex(env.es_url, alias=index.alias, refresh_s=0.0)
        try:
            env.run(index.ensure(v3, make_current_if_none=False))
            listed = env.run(other.indexes())
            assert listed[env.space.index_name] == env.space and listed[v3.index_name] == v3
            assert env.run(other.write_targets()) == []
            env.run(index.set_write_targets([v3]))
            assert env.run(other.write_targets()) == [v3]

            env.run(index.set_current(v3))
            assert env.run(other.alias_target()) == v3.index_name
            assert env.run(other.previous_target()) == env.space.index_name
            with pytest.raises(FailedPrecondition, match="still behind the alias"):
                env.run(other.drop(v3))

            env.run(index.set_current(env.space))  # a rollback
            assert env.run(other.alias_target()) == env.space.index_name
            assert env.run(other.previous_target()) == v3.index_name
            env.run(other.drop(v3))  # it leaves the write-also and previous aliases with it
            assert v3.index_name not in env.run(index.indexes())
            assert env.run(index.write_targets()) == []
            assert env.run(index.previous_target()) is None
            assert env.run(index.space()) == env.space
        finally:
            env.run(other.close())

    def test_a_concurrent_alias_change_is_refused_whole(self, env):
        """The remove actions of a swap come from a read; if the aliases changed in between,
        the whole call is refused and nothing moves."""
        before = env.run(env.index.alias_target())
        actions = [
            {"remove": {"index": env.space.index_name, "alias": f"{env.index.alias}.never-there"}},
            {"add": {"index": env.space.index_name, "alias": f"{env.index.alias}.half-done"}},
        ]
        with pytest.raises(FailedPrecondition, match="changed meanwhile"):
            env.run(env.index._update_aliases("move", actions))
        es = env.index._es.options(ignore_status=404)
        assert env.run(es.indices.exists_alias(name=f"{env.index.alias}.half-done")).body is False
        assert env.run(env.index.alias_target()) == before

    def test_missing_alias_is_none(self, env):
        lonely = ElasticIndex(env.es_url, alias=f"looksync-test-none-{uuid.uuid4().hex[:8]}")
        try:
            assert env.run(lonely.space()) is None
            nowhere = EmbeddingSpace("never-exported", 1, 16)
            with pytest.raises(FailedPrecondition):
                env.run(lonely.search(env.vectors[0], nowhere, build_filters(), 5))
        finally:
            env.run(lonely.close())


class TestElasticFake(IndexContract):
    @pytest.fixture(scope="class")
    def fake(self):
        server = FakeElasticsearch()
        yield server
        server.stop()

    @pytest.fixture(scope="class")
    def es_url(self, fake):
        return fake.url

    def test_wire_requests(self, env, fake):
        """What went over the wire: the index body, a concrete-index search with size k."""
        name = env.space.index_name
        create = [b for m, p, b in fake.requests if m == "PUT" and p == f"/{name}"]
        assert (
            create
            and create[0]["mappings"] == index_body(env.space, server=(9, 2), index_type="hnsw")["mappings"]
        )
        assert create[0]["settings"]["index.mapping.exclude_source_vectors"] is False
        fake.requests.clear()
        env.run(env.index.search(env.vectors[1], env.space, build_filters(gender="women"), 7))
        searches = [(p, b) for m, p, b in fake.requests if p.endswith("/_search")]
        assert searches == [
            (
                f"/{name}/_search",
                knn_body(env.vectors[1].tolist(), 7, build_filters(gender="women"), 10),
            )
        ]


@pytest.mark.skipif(
    not os.environ.get("LOOKSYNC_ES_URL"),
    reason="LOOKSYNC_ES_URL not set: Elasticsearch live contract tests skipped",
)
class TestElasticLive(IndexContract):
    @pytest.fixture(scope="class")
    def es_url(self):
        return os.environ["LOOKSYNC_ES_URL"]

    def test_default_int8_index_is_close(self, env):
        space = EmbeddingSpace(env.space.model, 7, 16)
        env.created.append(space.index_name)
        index = ElasticIndex(env.es_url, alias=env.index.alias, refresh_s=0.0)  # int8_hnsw
        try:
            env.run(index.upsert(space, [(p, "h", v) for p, v in zip(env.products, env.vectors)]))
            env.run(index.refresh(space))
            query = _vectors(1, seed=9)[0]
            env.run(index.set_current(space))
            _, hits = env.run(index.search(query, space, build_filters(), 10))
            expected = sorted(range(120), key=lambda i: -float(env.vectors[i] @ query))[:10]
            assert len({h.product.id for h in hits} & {env.products[i].id for i in expected}) >= 8
            exact = {p.id: float(v @ query) for p, v in zip(env.products, env.vectors)}
            assert all(abs(h.score - exact[h.product.id]) < 0.03 for h in hits)
        finally:
            env.run(index.set_current(env.space))
            env.run(index.close())


# ---------------------------------------------------------------------------------------------
# An unreachable cluster
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["space", "search", "upsert"])
def test_closed_port_is_unavailable_quickly(call):
    space = EmbeddingSpace("clip", 1, 16)
    product = _products(1)[0]

    async def scenario():
        index = ElasticIndex("http://127.0.0.1:1", timeout_s=1.0)
        try:
            if call == "space":
                await index.space()
            elif call == "search":
                await index.search(_vectors(1)[0], space, build_filters(), 5)
            else:
                await index.upsert(space, [(product, "h", _vectors(1)[0])])
        finally:
            await index.close()

    start = time.monotonic()
    with pytest.raises(Unavailable) as caught:
        asyncio.run(scenario())
    assert time.monotonic() - start < 3.0
    assert "http://127.0.0.1:1" in str(caught.value)
