"""ElasticsearchDouble (tests/es_double.py) against the behaviour the Elasticsearch 8.17 reference
documents, driven through the official client as the backend drives a real cluster.

Each test names the reference page it checks. Raw HTTP is used only where the client cannot
express the request (other media types, a malformed body).
"""

import http.client
import json

import elasticsearch
import numpy as np
import pytest
from elasticsearch import ApiError, BadRequestError, ConflictError, Elasticsearch, NotFoundError, helpers

from gateway.catalog import Product
from gateway.filters import build_filters
from gateway.index.base import EmbeddingSpace
from gateway.index.elastic import index_body, knn_body, product_source, score_to_cosine
from tests.es_double import UNSUPPORTED, ElasticsearchDouble

# An 8.x client speaks compatible-with=8, which the 8.17 double (like an 8.17 node) accepts; a
# 9.x client is refused by both (test_media_types_of_8x_and_9x_clients shows how), so the
# client-driven tests need the client the project pins (<9).
CLIENT_MAJOR = elasticsearch.__versionstr__.split(".")[0]


class Clock:
    """d.now for tests: time moves only when told to."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def advance(self, seconds):
        self.t += seconds


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def d(clock):
    double = ElasticsearchDouble(version="8.17.6")
    double.now = clock
    yield double
    double.stop()


@pytest.fixture
def es(d):
    if CLIENT_MAJOR != "8":
        pytest.skip("the project pins elasticsearch-py 8.x")
    client = Elasticsearch(d.url, request_timeout=10)
    yield client
    client.close()


def error_of(caught):
    return caught.value.body["error"]


def raw(d, method, path, body=None, headers=None):
    """One HTTP request as bytes on the wire: (status, headers, parsed body)."""
    port = int(d.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(payload) if payload else None


COMPAT8 = "application/vnd.elasticsearch+json; compatible-with=8"
COMPAT9 = "application/vnd.elasticsearch+json; compatible-with=9"

PRODUCTS = {
    "dynamic": "strict",
    "properties": {
        "brand": {"type": "keyword"},
        "sizes": {"type": "keyword"},
        "price": {"type": "scaled_float", "scaling_factor": 100},
        "in_stock": {"type": "boolean"},
        "attrs": {"properties": {"colour": {"type": "keyword"}}},
        "vector": {"type": "dense_vector", "dims": 2, "index": True, "similarity": "dot_product"},
    },
}


def make_products(es, name="products", **settings):
    es.indices.create(index=name, mappings=PRODUCTS, settings={"index.number_of_replicas": 0, **settings})
    return name


# ---------------------------------------------------------------------------------------------
# Cluster info and the media types of the client
# ---------------------------------------------------------------------------------------------


def test_info_reports_the_version_and_every_answer_carries_the_product_header(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/rest-api-root.html"""
    info = es.info()
    assert info["version"]["number"] == "8.17.6"
    assert info["version"]["build_flavor"] == "default"
    assert info["tagline"] == "You Know, for Search"
    assert {
        "lucene_version",
        "minimum_wire_compatibility_version",
        "minimum_index_compatibility_version",
    } <= set(info["version"])
    for path in ("/", "/missing/_search"):
        _, headers, _ = raw(d, "GET", path, headers={"Accept": COMPAT8})
        assert headers["x-elastic-product"] == "Elasticsearch"
        assert headers["content-type"] == "application/json"


def test_media_types_of_8x_and_9x_clients(d):
    """An 8.x node accepts compatible-with 8 (and 7) and refuses 9, the media type elasticsearch-py
    9 sends; https://www.elastic.co/guide/en/elasticsearch/reference/8.17/rest-api-compatibility.html"""
    assert raw(d, "GET", "/", headers={"Accept": COMPAT8})[0] == 200
    assert raw(d, "GET", "/", headers={"Accept": COMPAT8.replace("8", "7")})[0] == 200
    assert raw(d, "GET", "/", headers={"Accept": "application/json"})[0] == 200
    status, _, body = raw(d, "GET", "/", headers={"Accept": COMPAT9})
    assert status == 400 and body["error"]["type"] == "media_type_header_exception"
    assert body["error"]["caused_by"]["reason"].startswith(
        "Accept version must be either version 8 or 7, but found 9."
    )
    # what a 9.x client sends with a body
    status, _, body = raw(d, "PUT", "/x", {}, headers={"Accept": COMPAT9, "Content-Type": COMPAT9})
    assert status == 400 and body["error"]["type"] == "media_type_header_exception"
    assert "x" not in d.indices
    status, _, body = raw(
        d, "PUT", "/x", {}, headers={"Accept": COMPAT8, "Content-Type": COMPAT8.replace("8", "7")}
    )
    assert status == 400 and "must match" in body["error"]["caused_by"]["reason"]
    status, _, body = raw(d, "PUT", "/x", b"{}", headers={"Content-Type": "text/plain"})
    assert (status, body) == (
        406,
        {"error": "Content-Type header [text/plain] is not supported", "status": 406},
    )
    assert raw(d, "PUT", "/x", {}, headers={"Accept": COMPAT8, "Content-Type": COMPAT8})[0] == 200


def test_a_9x_node_accepts_8x_and_9x_clients():
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/rest-api-compatibility.html"""
    d9 = ElasticsearchDouble(version="9.1.0")
    try:
        assert raw(d9, "GET", "/", headers={"Accept": COMPAT8})[0] == 200
        assert raw(d9, "GET", "/", headers={"Accept": COMPAT9})[0] == 200
        status, _, body = raw(d9, "GET", "/", headers={"Accept": COMPAT8.replace("8", "7")})
        assert status == 400
        assert "must be either version 9 or 8, but found 7" in body["error"]["caused_by"]["reason"]
    finally:
        d9.stop()


# ---------------------------------------------------------------------------------------------
# Index management
# ---------------------------------------------------------------------------------------------


def test_create_index_conflicts_names_and_settings(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-create-index.html"""
    resp = es.indices.create(
        index="a", settings={"index": {"refresh_interval": "5s", "number_of_replicas": 0}}, mappings={}
    )
    assert resp.body == {"acknowledged": True, "shards_acknowledged": True, "index": "a"}
    assert d.indices["a"].settings == {
        "index.refresh_interval": "5s",
        "index.number_of_replicas": "0",
        "index.number_of_shards": "1",
    }
    with pytest.raises(BadRequestError) as caught:
        es.indices.create(index="a")
    assert error_of(caught)["type"] == "resource_already_exists_exception"
    assert error_of(caught)["reason"] == f"index [a/{d.indices['a'].uuid}] already exists"
    for bad, why in [("Upper", "must be lowercase"), ("_x", "must not start with '_', '-', or '+'")]:
        with pytest.raises(BadRequestError) as caught:
            es.indices.create(index=bad)
        assert (
            error_of(caught)["type"] == "invalid_index_name_exception" and why in error_of(caught)["reason"]
        )
    es.indices.update_aliases(actions=[{"add": {"index": "a", "alias": "al"}}])
    with pytest.raises(BadRequestError) as caught:
        es.indices.create(index="al")
    assert error_of(caught)["reason"] == "Invalid index name [al], already exists as alias"
    for body, named in [
        ({"aliases": {"x": {}}}, "aliases"),
        ({"settings": {"number_of_shards": 2}}, "number_of_shards"),
    ]:
        with pytest.raises(BadRequestError) as caught:
            es.indices.create(index="b", **body)
        assert error_of(caught)["type"] == UNSUPPORTED and named in error_of(caught)["reason"]
    assert "b" not in d.indices


def test_get_mapping_by_index_alias_list_and_wildcard(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-get-mapping.html"""
    es.indices.create(
        index="products-1", mappings={"_meta": {"v": 1}, "properties": {"a": {"type": "keyword"}}}
    )
    es.indices.create(index="products-2", mappings={"dynamic": "strict"})
    es.indices.update_aliases(actions=[{"add": {"index": "products-2", "alias": "current"}}])
    assert es.indices.get_mapping(index="products-1").body == {
        "products-1": {"mappings": {"_meta": {"v": 1}, "properties": {"a": {"type": "keyword"}}}}
    }
    assert list(es.indices.get_mapping(index="current").body) == ["products-2"]
    assert sorted(es.indices.get_mapping(index="products-1,current").body) == ["products-1", "products-2"]
    assert sorted(es.indices.get_mapping(index="products-*", expand_wildcards="open").body) == [
        "products-1",
        "products-2",
    ]
    assert es.indices.get_mapping(index="nothing-*", allow_no_indices=True).body == {}
    with pytest.raises(NotFoundError) as caught:
        es.indices.get_mapping(index="nothing-*", allow_no_indices=False)
    assert error_of(caught)["type"] == "index_not_found_exception"
    with pytest.raises(NotFoundError) as caught:
        es.indices.get_mapping(index="products-1,missing")
    assert error_of(caught)["reason"] == "no such index [missing]"


def test_put_mapping_adds_fields_under_strict_and_keeps_types(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-put-mapping.html"""
    make_products(es)
    es.indices.put_mapping(index="products", properties={"colour": {"type": "keyword"}}, meta={"v": 2})
    es.index(index="products", id="1", document={"colour": "red"})
    mappings = es.indices.get_mapping(index="products")["products"]["mappings"]
    assert mappings["_meta"] == {"v": 2} and mappings["dynamic"] == "strict"
    es.indices.put_mapping(index="products", meta={"v": 3})
    assert d.indices["products"].mappings["_meta"] == {"v": 3}  # replaced, not merged
    with pytest.raises(BadRequestError) as caught:
        es.indices.put_mapping(index="products", properties={"brand": {"type": "long"}})
    assert error_of(caught)["type"] == "illegal_argument_exception"
    assert error_of(caught)["reason"] == "mapper [brand] cannot be changed from type [keyword] to [long]"


def test_delete_index_leaves_every_alias(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-delete-index.html"""
    es.indices.create(index="a")
    es.indices.create(index="b")
    es.indices.update_aliases(
        actions=[{"add": {"index": "a", "alias": "both"}}, {"add": {"index": "b", "alias": "both"}}]
    )
    es.indices.delete(index="a")
    assert d.aliases == {"both": {"b"}}
    with pytest.raises(NotFoundError) as caught:
        es.indices.delete(index="a")
    assert error_of(caught)["type"] == "index_not_found_exception"
    assert es.indices.delete(index="a,b", ignore_unavailable=True).body == {"acknowledged": True}
    assert d.indices == {} and d.aliases == {}
    with pytest.raises(BadRequestError):
        es.indices.delete(index="*")  # action.destructive_requires_name


def test_refresh_and_forcemerge_answers(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-refresh.html
    https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-forcemerge.html"""
    es.indices.create(index="a")  # one replica by default, unassigned on a single node
    assert es.indices.refresh(index="a")["_shards"] == {"total": 2, "successful": 1, "failed": 0}
    task = es.indices.forcemerge(index="a", max_num_segments=1, wait_for_completion=False).body
    node, _, number = task["task"].partition(":")
    assert node == d.node_id and number.isdigit()
    assert es.indices.forcemerge(index="a", max_num_segments=1)["_shards"]["failed"] == 0


# ---------------------------------------------------------------------------------------------
# Aliases
# ---------------------------------------------------------------------------------------------


def test_alias_exists_and_a_missing_alias(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-get-alias.html"""
    es.indices.create(index="a")
    assert not es.indices.exists_alias(name="al")
    es.indices.update_aliases(actions=[{"add": {"index": "a", "alias": "al"}}])
    assert es.indices.exists_alias(name="al")
    assert es.indices.get_alias(name="al").body == {"a": {"aliases": {"al": {}}}}
    with pytest.raises(NotFoundError) as caught:
        es.indices.get_alias(name="nope")
    assert caught.value.body == {"error": "alias [nope] missing", "status": 404}


def test_alias_actions_on_a_missing_index_apply_nothing(d, es):
    """The call is atomic; https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-aliases.html"""
    es.indices.create(index="a")
    with pytest.raises(NotFoundError) as caught:
        es.indices.update_aliases(
            actions=[{"add": {"index": "a", "alias": "x"}}, {"add": {"index": "missing", "alias": "y"}}]
        )
    assert error_of(caught)["type"] == "index_not_found_exception"
    assert d.aliases == {}


def test_remove_with_must_exist_fails_the_whole_call(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-aliases.html"""
    es.indices.create(index="a")
    with pytest.raises(NotFoundError) as caught:
        es.indices.update_aliases(
            actions=[
                {"add": {"index": "a", "alias": "new"}},
                {"remove": {"index": "a", "alias": "never", "must_exist": True}},
            ]
        )
    assert error_of(caught)["type"] == "aliases_not_found_exception"
    assert error_of(caught)["reason"] == "aliases [never] missing"
    assert d.aliases == {}


def test_remove_without_must_exist_applies_the_other_actions(d, es):
    """8.14+: the call succeeds with errors and per-action results;
    https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-aliases.html"""
    es.indices.create(index="a")
    resp = es.indices.update_aliases(
        actions=[{"remove": {"index": "a", "alias": "never"}}, {"add": {"index": "a", "alias": "new"}}]
    )
    assert resp.body == {
        "acknowledged": True,
        "errors": True,
        "action_results": [
            {
                "action": {"type": "remove", "indices": ["a"], "aliases": ["never"]},
                "status": 404,
                "error": {
                    "type": "aliases_not_found_exception",
                    "reason": "aliases [never] missing",
                    "resource.type": "aliases",
                    "resource.id": "never",
                },
            },
            {"action": {"type": "add", "indices": ["a"], "aliases": ["new"]}, "status": 200},
        ],
    }
    assert d.aliases == {"new": {"a"}}
    assert es.indices.update_aliases(actions=[{"remove": {"index": "a", "alias": "new"}}]).body == {
        "acknowledged": True,
        "errors": False,
    }
    # with nothing left to apply the call fails whole
    with pytest.raises(NotFoundError) as caught:
        es.indices.update_aliases(actions=[{"remove": {"index": "a", "alias": "never"}}])
    assert error_of(caught)["type"] == "aliases_not_found_exception"


def test_an_alias_named_like_an_index_is_refused(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-aliases.html"""
    es.indices.create(index="a")
    es.indices.create(index="b")
    with pytest.raises(BadRequestError) as caught:
        es.indices.update_aliases(actions=[{"add": {"index": "a", "alias": "b"}}])
    assert error_of(caught)["type"] == "invalid_alias_name_exception"
    assert "an index or data stream exists with the same name as the alias" in error_of(caught)["reason"]
    with pytest.raises(BadRequestError) as caught:
        es.indices.update_aliases(actions=[{"remove_index": {"index": "a"}}])
    assert error_of(caught)["type"] == UNSUPPORTED and "remove_index" in error_of(caught)["reason"]


def test_writes_through_a_multi_index_alias_need_one_write_index(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/aliases.html#write-index"""
    es.indices.create(index="a")
    es.indices.create(index="b")
    es.indices.update_aliases(
        actions=[{"add": {"index": "a", "alias": "w"}}, {"add": {"index": "b", "alias": "w"}}]
    )
    with pytest.raises(BadRequestError) as caught:
        es.index(index="w", id="1", document={"x": 1})
    assert error_of(caught)["reason"].startswith("no write index is defined for alias [w].")
    resp = es.bulk(operations=[{"index": {"_index": "w", "_id": "1"}}, {"x": 1}])
    assert resp["errors"] and resp["items"][0]["index"]["error"]["type"] == "illegal_argument_exception"
    es.indices.update_aliases(actions=[{"add": {"index": "b", "alias": "w", "is_write_index": True}}])
    assert es.index(index="w", id="1", document={"x": 1})["_index"] == "b"
    assert es.indices.get_alias(name="w").body == {
        "a": {"aliases": {"w": {}}},
        "b": {"aliases": {"w": {"is_write_index": True}}},
    }
    with pytest.raises(ApiError) as caught:
        es.indices.update_aliases(actions=[{"add": {"index": "a", "alias": "w", "is_write_index": True}}])
    assert caught.value.status_code == 500  # Elasticsearch's IllegalStateException
    assert error_of(caught)["reason"] == "alias [w] has more than one write index [a,b]"


def test_reads_fan_out_through_an_alias(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/aliases.html"""
    for name in ("a", "b"):
        es.indices.create(index=name)
        es.index(index=name, id=f"{name}1", document={"n": 1}, refresh=True)
    es.indices.update_aliases(
        actions=[{"add": {"index": "a", "alias": "r"}}, {"add": {"index": "b", "alias": "r"}}]
    )
    assert es.count(index="r")["count"] == 2
    hits = es.search(index="r", query={"match_all": {}})["hits"]["hits"]
    assert sorted((h["_index"], h["_id"]) for h in hits) == [("a", "a1"), ("b", "b1")]
    assert sorted(es.indices.get_mapping(index="r").body) == ["a", "b"]
    with pytest.raises(BadRequestError) as caught:
        es.get(index="r", id="a1")
    assert error_of(caught)["reason"] == (
        "alias [r] has more than one index associated with it [a, b], can't execute a single index op"
    )


# ---------------------------------------------------------------------------------------------
# Single documents: versions and sequence numbers
# ---------------------------------------------------------------------------------------------


def test_seq_no_counts_every_write_including_a_delete_of_nothing(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/optimistic-concurrency-control.html"""
    make_products(es)
    steps = [
        es.index(index="products", id="a", document={"brand": "K"}),
        es.index(index="products", id="a", document={"brand": "L"}),
        es.update(index="products", id="a", doc={"brand": "M"}),
        es.delete(index="products", id="a"),
    ]
    with pytest.raises(NotFoundError) as caught:
        es.delete(index="products", id="never")
    steps.append(caught.value.body)
    steps.append(es.index(index="products", id="b", document={"brand": "K"}))
    assert [(s["_seq_no"], s["_version"], s["result"]) for s in steps] == [
        (0, 1, "created"),
        (1, 2, "updated"),
        (2, 3, "updated"),
        (3, 4, "deleted"),
        (4, 1, "not_found"),
        (5, 1, "created"),
    ]
    assert all(s["_primary_term"] == 1 for s in steps)
    assert steps[0]["_shards"] == {"total": 1, "successful": 1, "failed": 0}


def test_a_noop_update_keeps_version_and_seq_no(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-update.html"""
    make_products(es)
    es.index(index="products", id="a", document={"brand": "K", "price": 1})
    noop = es.update(index="products", id="a", doc={"brand": "K"})
    assert (noop["result"], noop["_version"], noop["_seq_no"]) == ("noop", 1, 0)
    assert noop["_shards"] == {"total": 0, "successful": 0, "failed": 0}
    assert d.indices["products"].seq_no == 0
    # 1.0 is not 1 to Elasticsearch's comparison of parsed JSON
    assert es.update(index="products", id="a", doc={"price": 1.0})["result"] == "updated"
    forced = es.update(index="products", id="a", doc={"brand": "K"}, detect_noop=False)
    assert (forced["result"], forced["_version"], forced["_seq_no"]) == ("updated", 3, 2)


def test_if_seq_no_conflicts_and_succeeds(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/optimistic-concurrency-control.html"""
    make_products(es)
    for brand in "KLMNOP":
        es.index(index="products", id="a", document={"brand": brand})
    with pytest.raises(ConflictError) as caught:
        es.index(index="products", id="a", document={"brand": "Q"}, if_seq_no=3, if_primary_term=1)
    assert error_of(caught)["type"] == "version_conflict_engine_exception"
    assert error_of(caught)["reason"] == (
        "[a]: version conflict, required seqNo [3], primary term [1]. current document has seqNo [5] and primary term [1]"
    )
    assert error_of(caught)["index"] == "products" and error_of(caught)["shard"] == "0"
    ok = es.index(index="products", id="a", document={"brand": "Q"}, if_seq_no=5, if_primary_term=1)
    assert (ok["_seq_no"], ok["_version"]) == (6, 7)
    with pytest.raises(ConflictError) as caught:
        es.index(index="products", id="nobody", document={}, if_seq_no=0, if_primary_term=1)
    assert error_of(caught)["reason"].endswith("but no document was found")
    with pytest.raises(BadRequestError) as caught:
        es.index(index="products", id="a", document={}, if_seq_no=6)
    assert error_of(caught)["type"] == "action_request_validation_exception"
    assert error_of(caught)["reason"] == "Validation Failed: 1: ifSeqNo is set, but primary term is [0];"


def test_create_of_an_existing_document_conflicts(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-index_.html#docs-index-api-query-params"""
    make_products(es)
    assert es.create(index="products", id="a", document={"brand": "K"})["result"] == "created"
    with pytest.raises(ConflictError) as caught:
        es.create(index="products", id="a", document={"brand": "L"})
    assert (
        error_of(caught)["reason"] == "[a]: version conflict, document already exists (current version [1])"
    )
    with pytest.raises(ConflictError):
        es.index(index="products", id="a", document={"brand": "L"}, op_type="create")
    es.delete(index="products", id="a")
    again = es.create(index="products", id="a", document={"brand": "L"})
    assert (again["result"], again["_version"]) == ("created", 3)


def test_external_and_external_gte_versions(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-index_.html#index-versioning"""
    make_products(es)
    first = es.index(index="products", id="a", document={"brand": "K"}, version=5, version_type="external")
    assert (first["result"], first["_version"]) == ("created", 5)
    with pytest.raises(ConflictError) as caught:
        es.index(index="products", id="a", document={"brand": "L"}, version=5, version_type="external")
    assert error_of(caught)["reason"] == (
        "[a]: version conflict, current version [5] is higher or equal to the one provided [5]"
    )
    same = es.index(index="products", id="a", document={"brand": "L"}, version=5, version_type="external_gte")
    assert (same["result"], same["_version"]) == ("updated", 5)
    with pytest.raises(ConflictError) as caught:
        es.index(index="products", id="a", document={"brand": "M"}, version=4, version_type="external_gte")
    assert error_of(caught)["reason"].endswith("current version [5] is higher than the one provided [4]")
    assert (
        es.index(index="products", id="a", document={"brand": "N"}, version=9, version_type="external")[
            "_version"
        ]
        == 9
    )
    with pytest.raises(BadRequestError) as caught:
        es.index(index="products", id="a", document={"brand": "O"}, version=10)  # internal + version
    assert (
        "internal versioning can not be used for optimistic concurrency control" in error_of(caught)["reason"]
    )


def test_gc_deletes_keeps_a_deleted_version_for_its_window(d, es, clock):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-delete.html#delete-versioning"""
    make_products(es)  # index.gc_deletes defaults to 60s
    es.index(index="products", id="a", document={"brand": "K"}, version=5, version_type="external")
    deleted = es.delete(index="products", id="a", version=6, version_type="external")
    assert (deleted["result"], deleted["_version"]) == ("deleted", 6)
    clock.advance(59)
    with pytest.raises(ConflictError) as caught:
        es.index(index="products", id="a", document={"brand": "old"}, version=4, version_type="external")
    assert "current version [6] is higher or equal to the one provided [4]" in error_of(caught)["reason"]
    clock.advance(2)  # 61 s after the delete: the tombstone is forgotten
    late = es.index(index="products", id="a", document={"brand": "old"}, version=4, version_type="external")
    assert (late["result"], late["_version"]) == ("created", 4)


def test_internal_versions_continue_after_a_delete_within_gc_deletes(d, es, clock):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/index-modules.html#dynamic-index-settings"""
    make_products(es, **{"index.gc_deletes": "500ms"})
    es.index(index="products", id="a", document={"brand": "K"})
    es.delete(index="products", id="a")
    assert es.index(index="products", id="a", document={"brand": "K"})["_version"] == 3
    es.delete(index="products", id="a")
    clock.advance(0.6)
    again = es.index(index="products", id="a", document={"brand": "K"})
    assert (again["result"], again["_version"]) == ("created", 1)


def test_delete_answers_deleted_and_not_found(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-delete.html"""
    make_products(es)
    es.index(index="products", id="a", document={"brand": "K"})
    assert es.delete(index="products", id="a")["result"] == "deleted"
    with pytest.raises(NotFoundError) as caught:
        es.delete(index="products", id="a")
    assert caught.value.body["result"] == "not_found" and "error" not in caught.value.body
    assert "a" in d.indices["products"].tombstones


def test_get_is_real_time_and_filters_source(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-get.html"""
    make_products(es, **{"index.refresh_interval": "-1"})
    es.index(index="products", id="a", document={"brand": "K", "attrs": {"colour": "red"}, "sizes": ["S"]})
    got = es.get(index="products", id="a")
    assert got.body == {
        "_index": "products",
        "_id": "a",
        "_version": 1,
        "_seq_no": 0,
        "_primary_term": 1,
        "found": True,
        "_source": {"brand": "K", "attrs": {"colour": "red"}, "sizes": ["S"]},
    }
    assert es.count(index="products")["count"] == 0  # search is not real time
    assert es.get(index="products", id="a", source_includes="attrs")["_source"] == {
        "attrs": {"colour": "red"}
    }
    assert es.get(index="products", id="a", source_excludes="attrs.*,sizes")["_source"] == {
        "brand": "K",
        "attrs": {},
    }
    assert "_source" not in es.get(index="products", id="a", source=False)
    with pytest.raises(NotFoundError) as caught:
        es.get(index="products", id="nope")
    assert caught.value.body == {"_index": "products", "_id": "nope", "found": False}


def test_update_of_a_missing_document_and_upserts(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-update.html"""
    make_products(es)
    with pytest.raises(NotFoundError) as caught:
        es.update(index="products", id="a", doc={"brand": "K"})
    assert error_of(caught)["type"] == "document_missing_exception"
    assert error_of(caught)["reason"] == "[a]: document missing"
    created = es.update(index="products", id="a", doc={"brand": "K"}, doc_as_upsert=True)
    assert (created.meta.status, created["result"], created["_version"]) == (201, "created", 1)
    es.update(index="products", id="b", doc={"brand": "doc"}, upsert={"brand": "upsert", "sizes": ["S", "M"]})
    assert d.indices["products"].docs["b"]["source"] == {"brand": "upsert", "sizes": ["S", "M"]}
    # objects merge, arrays are replaced whole
    es.update(index="products", id="b", doc={"attrs": {"colour": "red"}, "sizes": ["L"]})
    es.update(index="products", id="b", doc={"attrs": {}})
    assert d.indices["products"].docs["b"]["source"] == {
        "brand": "upsert",
        "sizes": ["L"],
        "attrs": {"colour": "red"},
    }


def test_update_refuses_scripts_and_versions(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-update.html"""
    make_products(es)
    es.index(index="products", id="a", document={"brand": "K"})
    with pytest.raises(BadRequestError) as caught:
        es.update(index="products", id="a", script={"source": "ctx._source.brand = 'L'"})
    assert error_of(caught)["type"] == UNSUPPORTED
    assert "scripts are not implemented by the double" in error_of(caught)["reason"]
    raw_status, _, body = raw(
        d,
        "POST",
        "/products/_update/a?version=1&version_type=external",
        {"doc": {"brand": "L"}},
        headers={"Content-Type": "application/json"},
    )
    assert raw_status == 400 and body["error"]["type"] == "action_request_validation_exception"
    assert "internal versioning can not be used" in body["error"]["reason"]
    with pytest.raises(BadRequestError) as caught:
        es.update(
            index="products", id="a", doc={"brand": "L"}, if_seq_no=0, if_primary_term=1, retry_on_conflict=2
        )
    assert "compare and write operations can not be retried" in error_of(caught)["reason"]
    assert d.indices["products"].docs["a"]["source"] == {"brand": "K"}


def test_mget_by_ids_and_docs(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-multi-get.html"""
    make_products(es)
    es.index(index="products", id="a", document={"brand": "K", "sizes": ["S"]})
    docs = es.mget(index="products", ids=["a", "zz"], source_excludes="sizes")["docs"]
    assert docs == [
        {
            "_index": "products",
            "_id": "a",
            "_version": 1,
            "_seq_no": 0,
            "_primary_term": 1,
            "found": True,
            "_source": {"brand": "K"},
        },
        {"_index": "products", "_id": "zz", "found": False},
    ]
    by_docs = es.mget(index="products", docs=[{"_id": "a"}], source_includes="sizes")["docs"]
    assert by_docs[0]["_source"] == {"sizes": ["S"]}


# ---------------------------------------------------------------------------------------------
# Bulk
# ---------------------------------------------------------------------------------------------


def test_bulk_items_are_applied_independently(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-bulk.html"""
    make_products(es)
    es.index(index="products", id="taken", document={"brand": "K"})
    resp = es.bulk(
        operations=[
            {"index": {"_index": "products", "_id": "a"}},
            {"brand": "K"},
            {"create": {"_index": "products", "_id": "taken"}},
            {"brand": "L"},
            {"update": {"_index": "products", "_id": "missing"}},
            {"doc": {"brand": "M"}},
            {"index": {"_index": "products", "_id": "strict"}},
            {"colour": "red"},
            {"delete": {"_index": "products", "_id": "never"}},
            {"update": {"_index": "products", "_id": "a"}},
            {"script": {"source": "ctx._source.brand = 'Z'"}},
            {"index": {"_index": "products", "_id": "b"}},
            {"brand": "N"},
        ]
    )
    assert resp["errors"] is True
    items = [next(iter(item.items())) for item in resp["items"]]
    assert [(action, entry["status"], entry.get("error", {}).get("type")) for action, entry in items] == [
        ("index", 201, None),
        ("create", 409, "version_conflict_engine_exception"),
        ("update", 404, "document_missing_exception"),
        ("index", 400, "strict_dynamic_mapping_exception"),
        ("delete", 404, None),  # not_found is a result, not an error
        ("update", 400, UNSUPPORTED),
        ("index", 201, None),
    ]
    ok = items[0][1]
    assert set(ok) == {"_index", "_id", "_version", "result", "_shards", "_seq_no", "_primary_term", "status"}
    failed = items[1][1]["error"]
    assert set(failed) == {"type", "reason", "index_uuid", "shard", "index"} and failed["shard"] == "0"
    assert items[4][1]["result"] == "not_found"
    assert sorted(d.indices["products"].docs) == ["a", "b", "taken"]
    assert d.indices["products"].docs["a"]["source"] == {"brand": "K"}


def test_bulk_update_with_if_seq_no(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-bulk.html#bulk-optimistic-concurrency-control"""
    make_products(es)
    es.index(index="products", id="a", document={"brand": "K"})
    resp = es.bulk(
        operations=[
            {"update": {"_index": "products", "_id": "a", "if_seq_no": 0, "if_primary_term": 1}},
            {"doc": {"brand": "L"}},
            {"update": {"_index": "products", "_id": "a", "if_seq_no": 0, "if_primary_term": 1}},
            {"doc": {"brand": "M"}},
        ],
        refresh=True,
    )
    first, second = (item["update"] for item in resp["items"])
    assert (first["status"], first["_seq_no"], first["forced_refresh"]) == (200, 1, True)
    assert second["status"] == 409 and "required seqNo [0]" in second["error"]["reason"]
    assert d.indices["products"].docs["a"]["source"] == {"brand": "L"}


def test_bulk_auto_creates_an_index_unless_disabled(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-index_.html#index-creation"""
    resp = es.bulk(operations=[{"index": {"_index": "fresh", "_id": "1"}}, {"title": "x", "n": 1, "f": 1.5}])
    assert resp["errors"] is False
    assert d.indices["fresh"].mappings["properties"] == {
        "title": {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}},
        "n": {"type": "long"},
        "f": {"type": "float"},
    }
    deleted = es.bulk(operations=[{"delete": {"_index": "other", "_id": "1"}}])["items"][0]["delete"]
    assert deleted["status"] == 404 and deleted["error"]["type"] == "index_not_found_exception"
    assert "other" not in d.indices  # a delete does not create the index it names
    d.auto_create_index = False
    item = es.bulk(operations=[{"index": {"_index": "later", "_id": "1"}}, {"a": 1}])["items"][0]["index"]
    assert item["status"] == 404
    assert item["error"]["reason"] == "no such index [later] and [action.auto_create_index] is [false]"


# ---------------------------------------------------------------------------------------------
# Mapping checks on writes
# ---------------------------------------------------------------------------------------------


def test_strict_mapping_refuses_new_fields(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/dynamic.html"""
    make_products(es)
    with pytest.raises(BadRequestError) as caught:
        es.index(index="products", id="a", document={"brand": "K", "colour": "red"})
    assert error_of(caught)["type"] == "strict_dynamic_mapping_exception"
    assert error_of(caught)["reason"] == (
        "mapping set to strict, dynamic introduction of [colour] within [_doc] is not allowed"
    )
    with pytest.raises(BadRequestError) as caught:
        es.index(index="products", id="a", document={"attrs": {"size": "M"}})
    assert "introduction of [size] within [attrs]" in error_of(caught)["reason"]
    assert d.indices["products"].docs == {} and d.indices["products"].seq_no == -1


def test_binary_quantisation_needs_64_dimensions(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/dense-vector.html#dense-vector-quantization
    (DenseVectorFieldMapper.BBQ_MIN_DIMS)"""

    def vector(dims):
        return {
            "type": "dense_vector",
            "dims": dims,
            "similarity": "cosine",
            "index_options": {"type": "bbq_hnsw"},
        }

    with pytest.raises(BadRequestError) as caught:
        es.indices.create(index="small", mappings={"properties": {"v": vector(63)}})
    assert error_of(caught)["type"] == "mapper_parsing_exception"
    assert "bbq_hnsw does not support dimensions fewer than 64; provided=63" in error_of(caught)["reason"]
    es.indices.create(index="enough", mappings={"properties": {"v": vector(64)}})


def test_dense_vector_dimensions_and_magnitude(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/dense-vector.html#dense-vector-similarity"""
    make_products(es)
    es.indices.put_mapping(
        index="products", properties={"cos": {"type": "dense_vector", "dims": 2, "similarity": "cosine"}}
    )
    cases = [
        ({"vector": [1.0]}, "has a different number of dimensions [1] than defined in the mapping [2]"),
        ({"vector": [1.0, 0.0, 0.0]}, "has more dimensions than defined in the mapping [2]"),
        ({"vector": [0.6, 0.9]}, "The [dot_product] similarity can only be used with unit-length vectors."),
        ({"cos": [0.0, 0.0]}, "The [cosine] similarity does not support vectors with zero magnitude."),
    ]
    for document, reason in cases:
        with pytest.raises(BadRequestError) as caught:
            es.index(index="products", id="a", document=document)
        assert (
            error_of(caught)["type"] == "document_parsing_exception" and reason in error_of(caught)["reason"]
        )
    # |v|^2 = 1.0009: inside the 1e-3 tolerance of 8.15+, outside the 1e-4 of older nodes
    near_unit = {"vector": [0.6, 0.80056]}
    es.index(index="products", id="a", document=near_unit)
    es.index(index="products", id="b", document={"cos": [3.0, 4.0]})  # cosine takes any non-zero length
    old = ElasticsearchDouble(version="8.14.3")
    try:
        with Elasticsearch(old.url) as es_old:
            make_products(es_old)
            with pytest.raises(BadRequestError):
                es_old.index(index="products", id="a", document=near_unit)
    finally:
        old.stop()


def test_type_mismatches_are_document_parsing_errors(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/mapping-types.html"""
    make_products(es)
    es.indices.put_mapping(
        index="products", properties={"n": {"type": "long"}, "blob": {"type": "object", "enabled": False}}
    )
    for document, field in [
        ({"in_stock": "yes"}, "in_stock"),
        ({"n": "abc"}, "n"),
        ({"brand": {"a": 1}}, "brand"),
    ]:
        with pytest.raises(BadRequestError) as caught:
            es.index(index="products", id="a", document=document)
        assert error_of(caught)["type"] == "document_parsing_exception"
        assert error_of(caught)["reason"].startswith(f"failed to parse field [{field}]")
    es.index(index="products", id="a", document={"price": "12.5", "in_stock": "true", "n": 3, "brand": 7})
    es.index(index="products", id="b", document={"blob": {"anything": [1, {"goes": True}]}})


def test_dynamic_mapping_of_new_fields(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/dynamic-field-mapping.html"""
    vector = [0.01 * i + 0.5 for i in range(128)]
    es.index(
        index="auto", id="1", document={"on": True, "obj": {"k": "v"}, "emb": vector, "short": [0.5, 0.25]}
    )
    properties = d.indices["auto"].mappings["properties"]
    assert properties["on"] == {"type": "boolean"}
    assert properties["obj"]["properties"]["k"]["type"] == "text"
    assert properties["emb"]["type"] == "dense_vector" and properties["emb"]["dims"] == 128
    assert properties["short"] == {"type": "float"}
    with pytest.raises(BadRequestError) as caught:
        es.index(index="auto", id="2", document={"when": "2024-01-02"})
    assert error_of(caught)["type"] == UNSUPPORTED and "date detection" in error_of(caught)["reason"]


# ---------------------------------------------------------------------------------------------
# Near real time
# ---------------------------------------------------------------------------------------------


def test_search_sees_a_write_after_a_refresh(d, es, clock):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/near-real-time.html"""
    make_products(es)  # index.refresh_interval defaults to 1s
    es.index(index="products", id="a", document={"brand": "K"})
    assert es.count(index="products")["count"] == 0
    es.indices.refresh(index="products")
    assert es.count(index="products")["count"] == 1
    es.index(index="products", id="b", document={"brand": "K"})
    clock.advance(0.5)
    assert es.search(index="products")["hits"]["total"]["value"] == 1
    clock.advance(0.5)  # one refresh interval after the write
    assert es.search(index="products")["hits"]["total"]["value"] == 2
    forced = es.index(index="products", id="c", document={"brand": "K"}, refresh=True)
    assert forced["forced_refresh"] is True and es.count(index="products")["count"] == 3
    es.index(index="products", id="d", document={"brand": "K"}, refresh="wait_for")
    assert es.count(index="products")["count"] == 4


def test_refresh_interval_minus_one_and_search_idle(d, es, clock):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/index-modules.html#index-refresh-interval-setting"""
    make_products(es, name="off", **{"index.refresh_interval": "-1"})
    es.index(index="off", id="a", document={"brand": "K"})
    clock.advance(3600)
    assert es.count(index="off")["count"] == 0
    with pytest.raises(BadRequestError) as caught:
        es.index(index="off", id="b", document={"brand": "K"}, refresh="wait_for")
    assert error_of(caught)["type"] == UNSUPPORTED
    # Without an explicit interval, a shard with no search for 30 s is search-idle: the next
    # search refreshes it first, so an immediate search sees the write.
    make_products(es, name="idle")
    clock.advance(31)
    es.index(index="idle", id="a", document={"brand": "K"})
    assert es.count(index="idle")["count"] == 1
    es.index(index="idle", id="b", document={"brand": "K"})
    assert es.count(index="idle")["count"] == 1  # no longer idle: waits for the interval


def test_a_deleted_document_is_found_until_the_next_refresh(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/near-real-time.html"""
    make_products(es)
    es.index(index="products", id="a", document={"brand": "K"}, refresh=True)
    es.delete(index="products", id="a")
    assert [h["_id"] for h in es.search(index="products")["hits"]["hits"]] == ["a"]
    with pytest.raises(NotFoundError):
        es.get(index="products", id="a")  # GET is real time
    es.indices.refresh(index="products")
    assert es.search(index="products")["hits"]["hits"] == []


# ---------------------------------------------------------------------------------------------
# kNN search
# ---------------------------------------------------------------------------------------------


def _vector_index(es, name, similarity, vectors):
    es.indices.create(
        index=name,
        mappings={
            "properties": {"v": {"type": "dense_vector", "dims": 2, "index": True, "similarity": similarity}}
        },
    )
    for doc_id, vector in vectors.items():
        es.index(index=name, id=doc_id, document={"v": vector})
    es.indices.refresh(index=name)


def test_knn_scores_per_similarity(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/dense-vector.html#dense-vector-params"""
    unit = {"x": [1.0, 0.0], "y": [0.6, 0.8], "z": [-1.0, 0.0]}
    free = {"x": [2.0, 0.0], "y": [3.0, 4.0], "z": [-1.0, -1.0]}
    expected = {
        ("dot_product", "unit"): {"x": (1 + 0.6) / 2, "y": (1 + 1.0) / 2, "z": (1 - 0.6) / 2},
        ("cosine", "free"): {"x": (1 + 0.6) / 2, "y": (1 + 1.0) / 2, "z": (1 - 1.4 / 2**0.5) / 2},
        ("l2_norm", "free"): {
            "x": 1 / (1 + 1.4**2 + 0.8**2),
            "y": 1 / (1 + 2.4**2 + 3.2**2),
            "z": 1 / (1 + 1.6**2 + 1.8**2),
        },
        ("max_inner_product", "free"): {"x": 1.2 + 1, "y": 5.0 + 1, "z": 1 / (1 + 1.4)},
    }
    query = [0.6, 0.8]
    for (similarity, kind), scores in expected.items():
        _vector_index(es, similarity, similarity, unit if kind == "unit" else free)
        hits = es.search(
            index=similarity, knn={"field": "v", "query_vector": query, "k": 3, "num_candidates": 10}
        )
        got = {h["_id"]: h["_score"] for h in hits["hits"]["hits"]}
        assert got == pytest.approx(scores, rel=1e-5), similarity  # float32 arithmetic
        assert [h["_id"] for h in hits["hits"]["hits"]] == sorted(scores, key=lambda i: -scores[i])
        assert hits["hits"]["max_score"] == pytest.approx(max(scores.values()), rel=1e-5)


def test_knn_filter_with_bool_must_not_terms_and_a_scaled_float_range(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/knn-search.html"""
    make_products(es)
    docs = {
        "a": {"brand": "Kumo", "sizes": ["S", "M"], "price": 15.0, "in_stock": True, "vector": [1.0, 0.0]},
        "b": {"brand": "Brisa", "sizes": ["M", "L"], "price": 20.004, "in_stock": True, "vector": [0.6, 0.8]},
        "c": {"brand": "Brisa", "sizes": ["M"], "price": 9.996, "in_stock": False, "vector": [0.8, 0.6]},
        "d": {"brand": "Brisa", "sizes": ["L"], "price": 12.0, "in_stock": True, "vector": [0.8, 0.6]},
        "e": {"brand": "Brisa", "sizes": ["M"], "price": 20.01, "in_stock": True, "vector": [0.8, 0.6]},
    }
    for doc_id, source in docs.items():
        es.index(index="products", id=doc_id, document=source)
    es.indices.refresh(index="products")
    knn = {
        "field": "vector",
        "query_vector": [1.0, 0.0],
        "k": 10,
        "num_candidates": 100,
        "filter": [
            {"terms": {"sizes": ["M"]}},
            {"bool": {"must_not": [{"term": {"brand": "Kumo"}}]}},
            # scaled_float compares whole cents: 20.004 -> 2000 and 9.996 -> 1000 are inside
            {"range": {"price": {"gte": 10, "lte": 20}}},
        ],
    }
    hits = es.search(index="products", knn=knn, source={"excludes": ["vector"]})["hits"]["hits"]
    assert [h["_id"] for h in hits] == ["c", "b"]
    assert "vector" not in hits[0]["_source"]
    knn["filter"] = {"term": {"in_stock": False}}
    assert [h["_id"] for h in es.search(index="products", knn=knn)["hits"]["hits"]] == ["c"]


def test_knn_request_validation(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/search-search.html"""
    make_products(es)
    es.index(index="products", id="a", document={"vector": [1.0, 0.0]}, refresh=True)

    def refused(knn):
        with pytest.raises(BadRequestError) as caught:
            es.search(index="products", knn={"field": "vector", "query_vector": [1.0, 0.0], **knn})
        return error_of(caught)

    assert refused({"k": 5, "num_candidates": 4})["reason"] == "[num_candidates] cannot be less than [k]"
    assert refused({"k": 5, "num_candidates": 10_001})["reason"] == "[num_candidates] cannot exceed [10000]"
    assert refused({"k": 0, "num_candidates": 4})["reason"] == "[k] must be greater than 0"
    shard = refused({"k": 1, "num_candidates": 10, "query_vector": [1.0, 0.0, 0.0]})
    assert shard["type"] == "search_phase_execution_exception"
    assert shard["root_cause"][0]["reason"] == (
        "The query vector has a different number of dimensions [3] than the document vectors [2]."
    )
    not_unit = refused({"k": 1, "num_candidates": 10, "query_vector": [3.0, 4.0]})
    assert "can only be used with unit-length vectors" in not_unit["root_cause"][0]["reason"]
    wrong_field = refused({"k": 1, "num_candidates": 10, "field": "brand"})
    assert (
        wrong_field["root_cause"][0]["reason"] == "[knn] queries are only supported on [dense_vector] fields"
    )


def test_rescore_vector_exists_from_8_18():
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.18/knn-search.html"""
    body = {
        "knn": {
            "field": "v",
            "query_vector": [1.0, 0.0],
            "k": 1,
            "num_candidates": 10,
            "rescore_vector": {"oversample": 3.0},
        }
    }
    headers = {"Content-Type": "application/json"}
    mappings = {
        "mappings": {"properties": {"v": {"type": "dense_vector", "dims": 2, "similarity": "cosine"}}}
    }
    for version, status in [("8.17.6", 400), ("8.18.0", 200)]:
        double = ElasticsearchDouble(version=version)
        try:
            assert raw(double, "PUT", "/p", mappings, headers=headers)[0] == 200
            got, _, answer = raw(double, "POST", "/p/_search", body, headers=headers)
            assert got == status, answer
            if status == 400:
                assert answer["error"]["type"] == "x_content_parse_exception"
                assert "unknown field [rescore_vector]" in answer["error"]["reason"]
        finally:
            double.stop()


def test_knn_k_size_total_and_source_options(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/knn-search.html"""
    _vector_index(es, "v", "cosine", {str(i): [1.0, 0.1 * i] for i in range(6)})
    resp = es.search(
        index="v", knn={"field": "v", "query_vector": [1.0, 0.0], "k": 4, "num_candidates": 10}, size=2
    )
    assert [h["_id"] for h in resp["hits"]["hits"]] == ["0", "1"]
    assert resp["hits"]["total"] == {"value": 4, "relation": "eq"}
    assert resp["_shards"] == {"total": 1, "successful": 1, "skipped": 0, "failed": 0}
    quiet = es.search(
        index="v",
        knn={"field": "v", "query_vector": [1.0, 0.0], "k": 3, "num_candidates": 3},
        track_total_hits=False,
        source=False,
    )
    assert "total" not in quiet["hits"] and all("_source" not in h for h in quiet["hits"]["hits"])
    defaults = es.search(index="v", knn={"field": "v", "query_vector": [1.0, 0.0]})  # k = size = 10
    assert len(defaults["hits"]["hits"]) == 6


def test_query_and_count_agree(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/query-dsl-bool-query.html
    https://www.elastic.co/guide/en/elasticsearch/reference/8.17/search-count.html"""
    make_products(es)
    for i in range(6):
        source = {"brand": "K" if i % 2 else "L", "sizes": ["S"] if i < 3 else [], "price": float(i)}
        es.index(index="products", id=str(i), document=source)
    es.indices.refresh(index="products")
    queries = [
        {"match_all": {}},
        {"bool": {"filter": {"term": {"brand": "K"}}}},
        {
            "bool": {
                "should": [{"terms": {"brand": ["K"]}}, {"exists": {"field": "sizes"}}],
                "minimum_should_match": 2,
            }
        },
        {"bool": {"must_not": [{"ids": {"values": ["0", "1"]}}]}},
        {"range": {"price": {"gt": 1, "lt": 4}}},
        {"bool": {"should": [{"range": {"price": {"gte": 5}}}, {"ids": {"values": ["0"]}}]}},
    ]
    expected = [6, 3, 1, 4, 2, 2]
    for query, count in zip(queries, expected):
        assert es.count(index="products", query=query)["count"] == count, query
        hits = es.search(index="products", query=query, size=10)["hits"]
        assert hits["total"]["value"] == count
    assert es.search(index="products", query={"match_all": {}})["hits"]["max_score"] == 1.0
    filtered = es.search(index="products", query={"bool": {"filter": {"term": {"brand": "K"}}}})
    assert {h["_score"] for h in filtered["hits"]["hits"]} == {0.0}


# ---------------------------------------------------------------------------------------------
# Loud refusals, the request log, malformed input
# ---------------------------------------------------------------------------------------------


def test_unsupported_requests_are_refused_loudly(d, es):
    """Anything the double does not implement is a 400 looksync_double_unsupported naming it;
    https://www.elastic.co/guide/en/elasticsearch/reference/8.17/common-options.html"""
    make_products(es)
    es.index(index="products", id="a", document={"brand": "K"}, refresh=True)

    def refusal(call):
        with pytest.raises(BadRequestError) as caught:
            call()
        assert error_of(caught)["type"] == UNSUPPORTED
        return error_of(caught)["reason"]

    assert "routing" in refusal(lambda: es.index(index="products", id="a", document={}, routing="r"))
    assert "['avg']" in refusal(lambda: es.search(index="products", aggs={"b": {"avg": {"field": "price"}}}))
    assert "['order']" in refusal(
        lambda: es.search(
            index="products", aggs={"b": {"terms": {"field": "brand", "order": {"_key": "asc"}}}}
        )
    )
    assert "[match]" in refusal(lambda: es.search(index="products", query={"match": {"brand": "K"}}))
    assert "scoring a [term] query" in refusal(
        lambda: es.search(index="products", query={"term": {"brand": "K"}})
    )
    assert "[from]" in refusal(lambda: es.search(index="products", query={"match_all": {}}, from_=5))
    assert "_cat/indices" in refusal(lambda: es.cat.indices())
    assert "require_alias" in refusal(
        lambda: es.bulk(operations=[{"index": {"_index": "products", "_id": "x", "require_alias": True}}, {}])
    )
    assert "filter_path" in refusal(lambda: es.get(index="products", id="a", filter_path="_source"))
    status, _, body = raw(d, "DELETE", "/products/_search")
    assert status == 405 and body["error"].startswith("Incorrect HTTP method for uri [/products/_search]")


def test_requests_are_recorded_with_their_shape(d, es):
    """For request-shape tests: (method, path, query, parsed body), NDJSON as a list of lines;
    https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-bulk.html"""
    make_products(es)
    d.requests.clear()
    es.bulk(operations=[{"index": {"_index": "products", "_id": "a"}}, {"brand": "K"}], refresh="wait_for")
    es.search(index="products", query={"match_all": {}}, size=1)
    # the 8.x client sends bulk as PUT, the reference documents POST: both are the bulk API
    assert [(path, query, body) for _, path, query, body in d.requests] == [
        ("/_bulk", {"refresh": "wait_for"}, [{"index": {"_index": "products", "_id": "a"}}, {"brand": "K"}]),
        ("/products/_search", {}, {"query": {"match_all": {}}, "size": 1}),
    ]
    assert d.requests[1][0] == "POST"


def test_malformed_bodies_are_refused(d, es):
    """https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-bulk.html#docs-bulk-api-desc"""
    headers = {"Content-Type": "application/json"}
    status, _, body = raw(
        d, "POST", "/_bulk", b'{"index": {"_index": "a", "_id": "1"}}\n{"x": 1}', headers=headers
    )
    assert (
        status == 400 and body["error"]["reason"] == "The bulk request must be terminated by a newline [\\n]"
    )
    status, _, body = raw(d, "PUT", "/a", b'{"settings": {}, "settings": {}}', headers=headers)
    assert status == 400 and "Duplicate field 'settings'" in body["error"]["reason"]
    assert d.indices == {}


# ---------------------------------------------------------------------------------------------
# The project's own request bodies go through unchanged
# ---------------------------------------------------------------------------------------------


def test_the_backend_bodies_are_accepted_and_answered_exactly(d, es):
    """index_body / product_source / knn_body of gateway/index/elastic.py on an 8.17 node;
    https://www.elastic.co/guide/en/elasticsearch/reference/8.17/knn-search.html"""
    space = EmbeddingSpace("clip", 1, 16)
    body = index_body(space, server=(8, 17))
    es.indices.create(index=space.index_name, settings=body["settings"], mappings=body["mappings"])
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((30, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    products = [
        Product(
            f"p{i}",
            f"item {i}",
            ["Kumo", "Brisa"][i % 2],
            "dress",
            ["women", "men", "unisex"][i % 3],
            "US",
            round(5.0 + i * 3.3, 2),
            "USD",
            [["S"], ["M", "L"], []][i % 3],
            bool(i % 4),
            "",
        )
        for i in range(30)
    ]
    actions = [
        {
            "_op_type": "index",
            "_index": space.index_name,
            "_id": p.id,
            "_source": product_source(p, f"h{p.id}", v),
        }
        for p, v in zip(products, vectors)
    ]
    ok, errors = helpers.bulk(es, actions, raise_on_error=False)
    assert (ok, errors) == (30, [])
    es.indices.refresh(index=space.index_name)
    filters = build_filters(gender="women", max_price=80.0, in_stock_only=True)
    query = vectors[3]
    resp = es.search(index=space.index_name, body=knn_body(query.tolist(), 5, filters))
    allowed = [i for i, p in enumerate(products) if filters.matches(p)]
    expected = sorted(allowed, key=lambda i: -float(vectors[i] @ query))[:5]
    hits = resp["hits"]["hits"]
    assert [h["_id"] for h in hits] == [products[i].id for i in expected]
    for hit, i in zip(hits, expected):
        assert score_to_cosine(hit["_score"]) == pytest.approx(float(vectors[i] @ query), abs=1e-5)
        assert "vector" not in hit["_source"]


# ---------------------------------------------------------------------------------------------
# Sorting by a field and search_after (the backend's catalog scan)
# https://www.elastic.co/guide/en/elasticsearch/reference/8.17/sort-search-results.html
# https://www.elastic.co/guide/en/elasticsearch/reference/8.17/paginate-search-results.html#search-after
# ---------------------------------------------------------------------------------------------


def test_sort_by_a_keyword_and_page_with_search_after(d, es):
    name = make_products(es)
    for n, brand in enumerate(["delta", "alpha", "charlie", "bravo"]):
        es.index(index=name, id=f"p{n}", document={"brand": brand, "price": n})
    es.index(index=name, id="nobrand", document={"price": 9})
    es.indices.refresh(index=name)
    seen, after = [], None
    while True:
        extra = {"search_after": after} if after is not None else {}
        resp = es.search(index=name, sort=[{"brand": "asc"}], size=2, **extra)
        hits = resp["hits"]["hits"]
        if not hits:
            break
        # Sorted by a field: no score, the sort values instead.
        assert all(h["_score"] is None and len(h["sort"]) == 1 for h in hits)
        assert resp["hits"]["max_score"] is None
        seen += [h["sort"][0] for h in hits]
        after = hits[-1]["sort"]
        if after == [None]:  # the documents without the field come last (missing: _last)
            break
    assert seen == ["alpha", "bravo", "charlie", "delta", None]
    desc = es.search(index=name, sort=[{"brand": {"order": "desc"}}], size=2)["hits"]["hits"]
    assert [h["_source"]["brand"] for h in desc] == ["delta", "charlie"]
    with pytest.raises(BadRequestError):
        es.search(index=name, search_after=["alpha"], size=2)  # search_after needs a sort
    # Paging past a document without the field is refused loudly, never restarted from the top.
    with pytest.raises(BadRequestError) as caught:
        es.search(index=name, sort=[{"brand": "asc"}], size=2, search_after=[None])
    assert error_of(caught)["type"] == "looksync_double_unsupported"


def test_terms_aggregation_counts_every_match_per_term(d, es):
    """A terms aggregation: one bucket per term among the documents the query matches (a
    document holding a term twice counts once), by count descending then key ascending, `size`
    buckets and the rest in `sum_other_doc_count`; hits' `size` and `search_after` do not narrow
    it. https://www.elastic.co/guide/en/elasticsearch/reference/8.17/search-aggregations-bucket-terms-aggregation.html"""
    name = make_products(es)
    docs = {
        "a": {"brand": "K", "sizes": ["S", "M"], "in_stock": True},
        "b": {"brand": "K", "sizes": ["M", "M"], "in_stock": True},
        "c": {"brand": "B", "sizes": ["L"], "in_stock": False},
        "d": {"brand": "A", "sizes": [], "in_stock": True},
        "e": {"sizes": ["S"], "in_stock": True},
    }
    for doc_id, doc in docs.items():
        es.index(index=name, id=doc_id, document=doc)
    es.indices.refresh(index=name)

    def buckets(resp, agg):
        out = resp["aggregations"][agg]
        return [(b["key"], b["doc_count"]) for b in out["buckets"]], out["sum_other_doc_count"]

    resp = es.search(index=name, size=0, aggs={"brands": {"terms": {"field": "brand"}}})
    assert resp["hits"]["hits"] == [] and resp["hits"]["total"]["value"] == 5
    assert buckets(resp, "brands") == ([("K", 2), ("A", 1), ("B", 1)], 0)
    assert resp["aggregations"]["brands"]["doc_count_error_upper_bound"] == 0
    only_stock = es.search(
        index=name,
        size=1,
        query={"bool": {"filter": [{"term": {"in_stock": True}}]}},
        aggs={"sizes": {"terms": {"field": "sizes", "size": 1}}, "brands": {"terms": {"field": "brand"}}},
    )
    assert len(only_stock["hits"]["hits"]) == 1
    assert buckets(only_stock, "sizes") == ([("M", 2)], 2)  # S: a and e; one bucket kept
    assert buckets(only_stock, "brands") == ([("K", 2), ("A", 1)], 0)
    paged = es.search(
        index=name,
        sort=[{"brand": "asc"}],
        search_after=["B"],
        aggregations={"b": {"terms": {"field": "brand"}}},
    )
    assert [h["_id"] for h in paged["hits"]["hits"]] == ["a", "b", "e"]
    assert buckets(paged, "b")[0] == [("K", 2), ("A", 1), ("B", 1)]
    with pytest.raises(BadRequestError):
        es.search(index=name, aggs={"b": {"terms": {"field": "brand", "size": 0}}})


def test_msearch_answers_each_search_in_order_and_fails_them_one_by_one(d, es):
    """Multi search: header/body pairs; each search answered as `_search` would, with its
    status, and one that fails (a missing index) reported in its place without failing the
    others; a body that does not end with a newline fails the request.
    https://www.elastic.co/guide/en/elasticsearch/reference/8.17/search-multi-search.html"""
    _vector_index(es, "vecs", "dot_product", {"x": [1.0, 0.0], "y": [0.6, 0.8], "z": [0.0, 1.0]})
    knn = lambda q: {"knn": {"field": "v", "query_vector": q, "k": 2, "num_candidates": 10}, "_source": False}  # noqa: E731
    resp = es.msearch(
        index="vecs",
        searches=[{}, knn([1.0, 0.0]), {"index": "absent"}, knn([1.0, 0.0]), {}, knn([0.0, 1.0])],
    )
    first, missing, last = resp["responses"]
    alone = es.search(index="vecs", **knn([1.0, 0.0]))
    assert first["status"] == 200 and first["hits"]["hits"] == alone["hits"]["hits"]
    assert [h["_id"] for h in first["hits"]["hits"]] == ["x", "y"] and "_source" not in first["hits"]["hits"][
        0
    ]
    assert missing["status"] == 404 and missing["error"]["type"] == "index_not_found_exception"
    assert [h["_id"] for h in last["hits"]["hits"]] == ["z", "y"]
    unterminated = b'{}\n{"query": {"match_all": {}}}'
    status, _, body = raw(d, "POST", "/vecs/_msearch", unterminated, {"Content-Type": "application/x-ndjson"})
    assert status == 400 and "must be terminated by a newline" in body["error"]["reason"]
