"""The Elasticsearch index: exact request bodies, filter semantics, and the index contract.

The contract scenarios (the same ones tests/test_index_embedded.py runs on LanceDB) run twice:
against `ElasticsearchDouble` (tests/es_double.py), an in-process HTTP server that implements
the documented Elasticsearch 8.17 behaviour of every call ElasticIndex makes and refuses
anything else, and against a real cluster when LOOKSYNC_ES_URL is set (each run uses its own alias and index
names and deletes them afterwards).
"""

import asyncio
import itertools
import json
import os
import threading
import time
import uuid
from collections import Counter

import numpy as np
import pytest
from elastic_transport import TransportError
from elasticsearch import ApiError

from gateway.catalog import Product
from gateway.errors import FailedPrecondition, InvalidArgument, Unavailable
from gateway.filters import build_filters
from gateway.index.base import EmbeddingSpace
from gateway.index.elastic import (
    _FIELDS,
    ElasticIndex,
    alias_actions,
    check_update,
    filter_clauses,
    index_body,
    knn_body,
    num_candidates,
    product_source,
    row_from_doc,
    score_to_cosine,
    set_alias_actions,
    space_from_meta,
    unit,
    write_actions,
)
from gateway.index.lww import Op
from gateway.index.lww import apply as lww_apply
from tests.es_double import ElasticsearchDouble
from tests.look_store_contract import check_store
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
                # offers (retailer, where to buy) and the item the dedup job grouped it into
                "retailer": {"type": "keyword"},
                "product_url": {"type": "keyword"},
                "item_id": {"type": "keyword"},
                # per-field last-writer-wins state and tombstones (not searchable but deleted)
                "field_seqs": {"type": "object", "enabled": False},
                "deleted": {"type": "boolean"},
                "deleted_seq": {"type": "long"},
                "event_seq": {"type": "long"},
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
    # Elasticsearch refuses binary quantisation under 64 dimensions: say so before it does.
    with pytest.raises(FailedPrecondition, match="at least 64 dimensions"):
        index_body(EmbeddingSpace("clip", 1, 63), server=(9, 0), index_type="bbq_hnsw")


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
            "filter": {
                "bool": {
                    "filter": [
                        {"terms": {"category": ["dress", "jeans"]}},
                        {"terms": {"gender": ["women", "unisex"]}},
                        {"term": {"market": "US"}},
                        {"terms": {"brand": ["Kumo", "O'Neil"]}},
                        {"terms": {"sizes": ["M", "38"]}},
                        {"range": {"price": {"gte": 10.0, "lte": 99.5}}},
                        {"term": {"in_stock": True}},
                    ],
                    # Tombstones stay as documents; no search ever returns them.
                    "must_not": [{"term": {"deleted": True}}],
                }
            },
        },
        "size": 5,
        "track_total_hits": False,
        "_source": {"excludes": ["vector"]},
    }


def test_knn_body_without_filters():
    assert knn_body([1.0, 0.0], 50, build_filters(), num_candidates_factor=10, with_vectors=True) == {
        "knn": {
            "field": "vector",
            "query_vector": [1.0, 0.0],
            "k": 50,
            "num_candidates": 500,
            "filter": {"bool": {"filter": [], "must_not": [{"term": {"deleted": True}}]}},
        },
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


def test_write_actions_create_new_products_and_update_stored_ones_under_their_seq_no():
    a = Product("a1", "Red dress", "Kumo", "dress", "women", "US", 49.99, "USD", ["S", "M"], True, "a.jpg")
    vector = np.array([0.6, 0.8], dtype=np.float32)
    fields = product_source(a, "ha", vector)
    fields.pop("id")
    fields.pop("item_id")  # as ElasticIndex.upsert: only the dedup job sets it
    new, _ = lww_apply(None, Op("upsert", "a1", 100, fields))
    stored = {**new, "field_seqs": dict(new["field_seqs"])}
    updated, outcome = lww_apply(stored, Op("update", "a1", 200, {"price": 39.0}))
    assert outcome == "applied"
    actions = write_actions(
        "products-clip-v1",
        [("a1", None, new, None), ("a1", stored, updated, {"_seq_no": 7, "_primary_term": 1})],
    )
    assert actions[0] == {
        "_op_type": "create",  # refused (409) if another writer created it first
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
            "retailer": "",
            "product_url": "",
            "image_hash": "ha",
            "vector": [float(np.float32(0.6)), float(np.float32(0.8))],
            "deleted": False,
            "deleted_seq": 0,
            "field_seqs": {f: 100 for f in _FIELDS if f not in ("id", "item_id")} | {"image": 100},
            "event_seq": 100,
        },
    }
    assert all(type(x) is float for x in actions[0]["_source"]["vector"])  # plain JSON numbers
    # A metadata update sends only what changed: the price and its position, never the vector.
    assert actions[1] == {
        "_op_type": "update",
        "_index": "products-clip-v1",
        "_id": "a1",
        "if_seq_no": 7,
        "if_primary_term": 1,
        "doc": {"price": 39.0, "field_seqs": {**stored["field_seqs"], "price": 200}, "event_seq": 200},
    }


def test_documents_from_before_per_field_ordering_count_their_version_for_every_field():
    row = row_from_doc(
        {"_id": "x", "_version": 55, "_source": {"title": "t", "price": 1.0, "image_hash": "h"}}
    )
    assert row["field_seqs"] == {"title": 55, "price": 55, "image": 55}
    assert row["deleted"] is False and row["event_seq"] == 55


def test_alias_actions():
    assert alias_actions("products", "products-clip-v1") == [
        {"add": {"index": "products-clip-v1", "alias": "products"}}
    ]
    assert alias_actions("products", "products-clip-v2", ["products-clip-v1"]) == [
        # must_exist: a remove of an alias another process already moved fails the whole call
        {"remove": {"index": "products-clip-v1", "alias": "products", "must_exist": True}},
        {"add": {"index": "products-clip-v2", "alias": "products"}},
    ]
    assert alias_actions("products", "products-clip-v2", ["products-clip-v2"]) == [
        {"add": {"index": "products-clip-v2", "alias": "products"}}
    ]
    # A swap moves the rollback record in the same atomic call.
    assert alias_actions(
        "products", "products-clip-v2", ["products-clip-v1"], "products.previous", ["products-clip-v0"]
    ) == [
        {"remove": {"index": "products-clip-v1", "alias": "products", "must_exist": True}},
        {"add": {"index": "products-clip-v2", "alias": "products"}},
        {"remove": {"index": "products-clip-v0", "alias": "products.previous", "must_exist": True}},
        {"add": {"index": "products-clip-v1", "alias": "products.previous"}},
    ]
    assert set_alias_actions("products.write-also", ["b", "c"], ["a", "b"]) == [
        {"remove": {"index": "a", "alias": "products.write-also", "must_exist": True}},
        {"add": {"index": "c", "alias": "products.write-also"}},
    ]


def test_updates_never_carry_the_vector():
    check_update({"price": 10.0, "in_stock": False})
    for bad in ({"vector": [1.0]}, {"id": "other"}, {"colour": "red"}):
        with pytest.raises(InvalidArgument):
            check_update(bad)


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


# ---------------------------------------------------------------------------------------------
# The contract: the scenarios of tests/test_index_embedded.py
# ---------------------------------------------------------------------------------------------


class Env:
    def __init__(self, runner, index, space, products, vectors, es_url, advance_clock=None):
        self.runner, self.index, self.space = runner, index, space
        self.products, self.vectors, self.es_url = products, vectors, es_url
        self.created: list[str] = [space.index_name]
        # The double's clock can move (refresh interval, gc_deletes); a live cluster's cannot,
        # and the tests that use it hold without it.
        self.advance_clock = advance_clock or (lambda seconds: None)

    def run(self, coro):
        return self.runner.run(coro)


class IndexContract:
    """Scenarios shared by the fake and the live cluster; `es_url` comes from the subclass."""

    # Float HNSW: the brute-force comparison checks the translation (filters, scores), not
    # int8 quantisation error (TestElasticLive.test_default_int8_index_is_close has that).
    INDEX_TYPE = "hnsw"

    @pytest.fixture(scope="class")
    def clock(self):
        return None  # a live cluster's clock cannot be moved

    @pytest.fixture(scope="class")
    def env(self, es_url, clock):
        runner = asyncio.Runner()
        tag = uuid.uuid4().hex[:10]
        space = EmbeddingSpace(f"looksynctest{tag}", 1, 16)
        index = ElasticIndex(es_url, alias=f"looksync-test-{tag}", refresh_s=0.0, index_type=self.INDEX_TYPE)
        products, vectors = _products(), _vectors(120)
        env = Env(runner, index, space, products, vectors, es_url, clock)
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

    def test_neighbours_are_ids_and_scores_of_the_filtered_knn(self, env):
        """The dedup job's read (CatalogIndex.neighbours): per query vector, what search gives,
        as (id, score)."""
        filters = build_filters(categories=["dress"])
        queries = [env.vectors[3], _vectors(1, seed=11)[0]]
        found = env.run(env.index.neighbours(queries, env.space, filters, 4))
        allowed = [i for i, p in enumerate(env.products) if filters.matches(p)]
        for query, near in zip(queries, found):
            expected = sorted(allowed, key=lambda i: -float(env.vectors[i] @ query))[:4]
            assert [pid for pid, _ in near] == [env.products[i].id for i in expected]
            for (_, score), i in zip(near, expected):
                assert score == pytest.approx(float(env.vectors[i] @ query), abs=1e-5)

    def test_categories_and_a_one_category_scan_agree_with_the_full_scan(self, env):
        """What the dedup job reads: live products per category (a terms aggregation) and one
        category's products (search_after pages with a term filter)."""

        async def scan(**kw):
            return [s.product async for batch in env.index.scan(env.space, batch_size=7, **kw) for s in batch]

        everything = env.run(scan())
        counts = env.run(env.index.categories(env.space))
        assert counts == dict(Counter(p.category for p in everything)) and sum(counts.values()) == len(
            everything
        )
        jeans = env.run(scan(category="jeans"))
        assert [p.id for p in jeans] == sorted(p.id for p in everything if p.category == "jeans")

    def test_look_matches_one_per_look_newest_wins(self, env):
        env.created.append(env.index.look_matches.name)
        env.run(check_store(env.index.look_matches))

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

    def test_a_calibrated_dedup_threshold_travels_with_the_space(self, env):
        """Recorded in the index's mapping _meta (updatable on a live index, replaced whole),
        read back by another client, cleared again; identity and equality are untouched."""
        other = ElasticIndex(env.es_url, alias=env.index.alias, refresh_s=0.0)
        try:
            env.run(env.index.set_dedup_threshold(env.space, 0.9931))
            for client in (env.index, other):
                space = env.run(client.space())
                assert space == env.space and space.dedup_threshold == pytest.approx(0.9931)
                assert env.run(client.space_of(env.space.index_name)).dedup_threshold == pytest.approx(0.9931)
            meta = env.run(env.index._es.indices.get_mapping(index=env.space.index_name)).body
            assert meta[env.space.index_name]["mappings"]["_meta"]["looksync"]["dim"] == 16
            env.run(env.index.set_dedup_threshold(env.space, None))
            assert env.run(other.space()).dedup_threshold is None
        finally:
            env.run(env.index.set_dedup_threshold(env.space, None))
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
        # What a swap sends when another process moved the alias after our read: the remove
        # of the alias we saw (gone now) and the add. must_exist makes the whole call fail.
        stale = alias_actions(f"{env.index.alias}.half-done", env.space.index_name)
        stale.insert(
            0,
            {
                "remove": {
                    "index": env.space.index_name,
                    "alias": f"{env.index.alias}.moved",
                    "must_exist": True,
                }
            },
        )
        with pytest.raises(FailedPrecondition, match="changed meanwhile"):
            env.run(env.index._update_aliases("move", stale))
        es = env.index._es.options(ignore_status=404)
        assert env.run(es.indices.exists_alias(name=f"{env.index.alias}.half-done")).body is False
        assert env.run(env.index.alias_target()) == before

    def test_without_must_exist_a_stale_remove_is_skipped_and_the_rest_applies(self, env):
        """Why every remove says must_exist: 8.14+ applies the other actions and only reports
        the missing alias (errors: true), which the backend refuses to call a success."""
        es = env.index._es.options(ignore_status=404)
        half = f"{env.index.alias}.half-moved"
        actions = [
            {"remove": {"index": env.space.index_name, "alias": f"{env.index.alias}.moved-away"}},
            {"add": {"index": env.space.index_name, "alias": half}},
        ]
        with pytest.raises(FailedPrecondition, match="only in part"):
            env.run(env.index._update_aliases("move", actions))
        assert env.run(es.indices.exists_alias(name=half)).body is True  # the half-move happened
        env.run(
            env.index._update_aliases("undo", [{"remove": {"index": env.space.index_name, "alias": half}}])
        )

    def _fresh(self, env, tag: str) -> EmbeddingSpace:
        space = EmbeddingSpace(f"{env.space.model}{tag}", 1, 16)
        env.created.append(space.index_name)
        return space

    def test_writers_racing_updates_of_different_fields_lose_none(self, env):
        """Four clients (four connections, as four workers) apply interleaved updates of
        different fields of the same products, each in its own order."""
        space = self._fresh(env, "race")
        ids = [p.id for p in env.products[:6]]
        env.run(env.index.upsert(space, [(p, "h", v, 100) for p, v in zip(env.products[:6], env.vectors)]))
        fields = [
            ("price", lambda i: float(i)),
            ("title", lambda i: f"t{i}"),
            ("in_stock", lambda i: i % 2 == 0),
            ("brand", lambda i: f"b{i}"),
        ]
        ops = [
            (name, pid, 1000 + n, value(n))
            for n in range(40)
            for pid in ids
            for name, value in [fields[n % 4]]
        ]
        rng = __import__("random").Random(3)
        clients = [
            ElasticIndex(env.es_url, alias=env.index.alias, refresh_s=0.0, index_type=self.INDEX_TYPE)
            for _ in range(4)
        ]
        try:
            shares = [ops[w::4] for w in range(4)]
            for share in shares:
                rng.shuffle(share)

            async def writer(client, share):
                for name, pid, seq, value in share:
                    assert await client.update_fields(space, pid, {name: value}, seq) in ("applied", "stale")

            async def race():
                await asyncio.gather(*(writer(c, share) for c, share in zip(clients, shares)))

            env.run(race())
        finally:
            for c in clients:
                env.run(c.close())
        got = env.run(env.index.get(space, ids))
        for pid in ids:
            last = {
                name: max((seq, value) for n2, p2, seq, value in ops if p2 == pid and n2 == name)
                for name, _ in fields
            }
            p = got[pid].product
            assert (p.price, p.title, p.in_stock, p.brand) == tuple(
                last[n][1] for n in ("price", "title", "in_stock", "brand")
            ), pid

    def test_an_older_upsert_after_a_newer_update_keeps_the_update(self, env):
        space = self._fresh(env, "older")
        p = env.products[0]
        env.run(env.index.upsert(space, [(p, "h100", env.vectors[0], 100)]))
        assert env.run(env.index.update_fields(space, p.id, {"price": 5.0}, 300)) == "applied"
        relisted = Product(**{**p.to_dict(), "title": "Renamed at 200", "price": 2.0})
        env.run(env.index.upsert(space, [(relisted, "h200", env.vectors[1], 200)]))
        got = env.run(env.index.get(space, [p.id]))[p.id]
        # The upsert at 200 wins every field the update at 300 did not set, image included.
        assert (got.product.title, got.product.price, got.image_hash) == ("Renamed at 200", 5.0, "h200")
        np.testing.assert_allclose(got.vector, unit(env.vectors[1]), atol=1e-6)

    def test_a_redelivered_older_upsert_after_a_delete_never_resurrects(self, env):
        """Deletes are tombstone documents: however long after the delete an older upsert is
        redelivered (past index.gc_deletes, when Elasticsearch has forgotten its own delete
        tombstones), the product stays deleted; a newer upsert re-lists it."""
        space = self._fresh(env, "tomb")
        p = env.products[1]
        env.run(env.index.upsert(space, [(p, "h", env.vectors[2], 100)]))
        env.run(env.index.delete(space, [p.id], 300))
        env.advance_clock(120)  # past the default index.gc_deletes (60 s)
        env.run(env.index.upsert(space, [(p, "h", env.vectors[2], 200)]))
        assert env.run(env.index.get(space, [p.id])) == {}
        env.run(env.index.refresh(space))
        assert env.run(env.index.count(space)) == 0
        hits = env.run(env.index.search(env.vectors[2], space, build_filters(), 5))[1]
        assert hits == []
        env.run(env.index.upsert(space, [(p, "h", env.vectors[2], 400)]))
        assert list(env.run(env.index.get(space, [p.id]))) == [p.id]

    def test_missing_alias_is_none(self, env):
        lonely = ElasticIndex(env.es_url, alias=f"looksync-test-none-{uuid.uuid4().hex[:8]}")
        try:
            assert env.run(lonely.space()) is None
            nowhere = EmbeddingSpace("never-exported", 1, 16)
            with pytest.raises(FailedPrecondition):
                env.run(lonely.search(env.vectors[0], nowhere, build_filters(), 5))
        finally:
            env.run(lonely.close())


class TestElasticDouble(IndexContract):
    """The contract against tests/es_double.py, the in-process Elasticsearch 8.17 double."""

    @pytest.fixture(scope="class")
    def fake(self):
        server = ElasticsearchDouble(version="8.17.6")
        yield server
        server.stop()

    @pytest.fixture(scope="class")
    def es_url(self, fake):
        return fake.url

    @pytest.fixture(scope="class")
    def clock(self, fake):
        def advance(seconds: float) -> None:
            before = fake.now
            fake.now = lambda: before() + seconds

        return advance

    def test_wire_requests(self, env, fake):
        """What went over the wire: the index body, a concrete-index search with size k."""
        name = env.space.index_name
        create = [b for m, p, q, b in fake.requests if m == "PUT" and p == f"/{name}"]
        assert (
            create
            and create[0]["mappings"] == index_body(env.space, server=(8, 17), index_type="hnsw")["mappings"]
        )
        fake.requests.clear()
        env.run(env.index.search(env.vectors[1], env.space, build_filters(gender="women"), 7))
        searches = [(p, b) for m, p, q, b in fake.requests if p.endswith("/_search")]
        assert searches == [
            (
                f"/{name}/_search",
                knn_body(env.vectors[1].tolist(), 7, build_filters(gender="women"), 10),
            )
        ]

    def test_client_and_server_share_a_major(self, env, fake):
        """The 8.x client's compatibility headers, which the 8.x server accepts (a 9.x client's
        compatible-with=9 is refused by an 8.x server: the double models that)."""
        import elasticsearch

        assert elasticsearch.__version__[0] == 8
        fake.requests.clear()
        env.run(env.index.count(env.space))
        assert fake.requests  # the call went through the header check

    def test_metadata_updates_never_resend_the_vector(self, env, fake):
        space, p = self._fresh(env, "novec"), env.products[5]
        env.run(env.index.upsert(space, [(p, "h", env.vectors[5], 100)]))
        fake.requests.clear()
        assert env.run(env.index.update_fields(space, p.id, {"price": 77.0}, 200)) == "applied"
        bulks = [b for m, path, q, b in fake.requests if path.endswith("_bulk")]
        assert bulks and all("vector" not in json.dumps(b) for b in bulks)
        reads = [q for m, path, q, b in fake.requests if path.endswith("_mget")]
        assert reads and all(q.get("_source_excludes") == "vector" for q in reads)


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


def test_one_elasticsearch_major_in_every_install_and_deployment():
    """Client and server must share a major (an 8.x server refuses a 9.x client's headers):
    pyproject's extra, the constraints file the images install with, the gateway image (which
    installs that extra under the constraints) and compose's server all name the same one."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    (pin,) = re.findall(r'"elasticsearch\[async\]([^"]+)"', (root / "pyproject.toml").read_text())
    assert ">=8." in pin and "<9" in pin, pin
    (locked,) = re.findall(r"^elasticsearch==(\d+)\.", (root / "constraints.txt").read_text(), re.M)
    assert locked == "8"
    dockerfile = (root / "deploy/Dockerfile").read_text()
    assert re.search(r"pip install -c constraints\.txt \"\.\[[^\]]*elasticsearch", dockerfile), dockerfile
    compose = (root / "deploy/docker-compose.yml").read_text()
    (server,) = re.findall(r"elasticsearch/elasticsearch:(\d+)\.", compose)
    assert server == "8"
    import elasticsearch

    assert elasticsearch.__version__[0] == 8


def test_a_slow_search_ends_at_the_requests_deadline_not_the_client_timeout():
    # The cluster answers searches only when released; the client's own timeout is 5 s. A
    # search given 0.3 s of the request's deadline is DeadlineExceeded long before 5 s.
    from gateway.errors import DeadlineExceeded

    space = EmbeddingSpace("clip", 1, 16)
    fake = ElasticsearchDouble()
    release = threading.Event()

    async def scenario():
        index = ElasticIndex(fake.url, timeout_s=5.0)
        try:
            await index.upsert(space, [(p, "h", v) for p, v in zip(_products(3), _vectors(3))])
            await index.refresh(space)
            fake.hold_searches = release
            start = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="deadline"):
                await index.search(_vectors(1)[0], space, build_filters(), 3, timeout_s=0.3)
            took = time.monotonic() - start
            release.set()
            fake.hold_searches = None
            _, hits = await index.search(_vectors(1)[0], space, build_filters(), 3, timeout_s=5.0)
            return took, hits
        finally:
            release.set()
            await index.close()

    try:
        took, hits = asyncio.run(scenario())
    finally:
        fake.stop()
    assert took < 2.5, took  # the deadline (0.3 s) plus a loaded machine's margin, not 5 s
    assert len(hits) == 3  # the held request did not break the client for the next one


def test_an_answer_from_part_of_the_shards_is_unavailable_never_a_shorter_answer():
    """Every copy of one shard down: Elasticsearch answers searches and counts 200 with the other
    shards' hits and the failure in `_shards` (partial results are allowed by default). A kNN
    answer, a dedup scan, a category census or a swap's count from part of the catalog would
    pass for the whole, so each is Unavailable naming the shards."""
    from gateway.errors import Unavailable

    space = EmbeddingSpace("clip", 1, 16)
    fake = ElasticsearchDouble()
    products, vectors = _products(40), _vectors(40)
    reads = {
        "search": lambda index: index.search(vectors[0], space, build_filters(), 40),
        "neighbours": lambda index: index.neighbours([vectors[0]], space, build_filters(), 40),
        "count": lambda index: index.count(space),
        "categories": lambda index: index.categories(space),
        "scan": lambda index: _drain(index.scan(space, batch_size=7)),
        "listings": lambda index: index.listings(space, [p.item_id or p.id for p in products]),
        "look matches": lambda index: index.look_matches.count(),
    }

    async def scenario():
        index = ElasticIndex(fake.url, refresh_s=0.0, index_type="hnsw")
        try:
            await index.upsert(space, [(p, "h", v) for p, v in zip(products, vectors)])
            await index.refresh(space)
            whole = {name: await read(index) for name, read in reads.items()}
            fake.lost_shard = {space.index_name: "node left", index.look_matches.name: "node left"}
            refused = {}
            for name, read in reads.items():
                with pytest.raises(Unavailable) as err:
                    await read(index)
                refused[name] = str(err.value)
            fake.lost_shard = {}
            again = {name: await read(index) for name, read in reads.items()}
            return whole, refused, again
        finally:
            await index.close()

    try:
        whole, refused, again = asyncio.run(scenario())
    finally:
        fake.stop()
    assert whole["count"] == 40 and len(whole["search"][1]) == 40 and len(whole["scan"]) == 40
    for name, message in refused.items():
        assert "from 1 of 2 shards (node left)" in message, (name, message)
    assert again["count"] == 40 and len(again["scan"]) == 40  # nothing was left broken


async def _drain(batches) -> list:
    return [s async for batch in batches for s in batch]
