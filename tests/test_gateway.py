"""The gateway over real gRPC, with real Triton and the on-disk index behind it."""

import io
import json
import urllib.request
import uuid

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from clients.client import FilterArgs
from gateway.api import looksync_pb2 as pb
from tests.conftest import wait_for


def _image_bytes(catalog, product) -> bytes:
    return (catalog.parent / product.image_url).read_bytes()


def test_a_products_own_image_finds_it_first(client, catalog, products):
    for product in products[::17]:
        resp = client.search_image(_image_bytes(catalog, product), k=3)
        assert resp.hits[0].product.id == product.id
        assert resp.hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert resp.hits[0].product.title == product.title
        assert (resp.space.model, resp.space.version, resp.space.dim) == ("clip", 1, 64)


FILTERS = [
    FilterArgs(categories=("dress",)),
    FilterArgs(categories=("jeans", "trousers"), gender="men"),
    FilterArgs(gender="women", market="DE"),
    FilterArgs(gender="unisex", in_stock_only=True),
    FilterArgs(brands=("Kumo", "Brisa"), max_price=80.0),
    FilterArgs(sizes=("XS",), min_price=20.0, max_price=60.0),
    FilterArgs(categories=("sneakers", "boots"), sizes=("42",), in_stock_only=True, market="US"),
]


@pytest.mark.parametrize("filters", FILTERS, ids=range(len(FILTERS)))
def test_every_hit_satisfies_every_filter(client, catalog, products, filters):
    from gateway.filters import build_filters

    reference = build_filters(**{k: v for k, v in vars(filters).items()})
    expected = [p for p in products if reference.matches(p)]
    assert expected, "the sample catalog should have products for each filter case"
    for resp in (
        client.search_text("a garment", k=50, filters=filters),
        client.search_image(_image_bytes(catalog, products[3]), k=50, filters=filters),
    ):
        # >=: other tests add products to the shared index; none may be missing.
        assert len(resp.hits) >= min(50, len(expected))
        for hit in resp.hits:
            assert reference.matches(hit.product), hit.product


def test_image_search_with_text_modifier_returns_blended_scores(client, catalog, products):
    image = _image_bytes(catalog, products[0])
    plain = client.search_image(image, k=5)
    blended = client.search_image(image, k=5, text_modifier="in bright red", text_weight=0.5)
    assert blended.hits[0].score < plain.hits[0].score
    assert [t.stage for t in blended.timings] == ["validate_image", "embed", "retrieve", "items"]


def test_naming_a_space_without_an_index_is_refused(client):
    ok = client.search_text("dress", k=1, space=pb.EmbeddingSpace(model="clip", version=1))
    assert ok.space.version == 1
    newest = client.search_text("dress", k=1, space=("clip", 0))  # 0: the newest index of clip
    assert (newest.space.model, newest.space.version) == ("clip", 1)
    with pytest.raises(grpc.RpcError) as err:
        client.search_text("dress", k=1, space=pb.EmbeddingSpace(model="clip", version=2))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "clip v2" in err.value.details() and "products-clip-v1" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.search_text("dress", k=1, space=pb.EmbeddingSpace(model="clip", version=1, dim=1024))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "1024-d" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:  # never reaches the index as a name pattern
        client.search_text("dress", k=1, space=("products-*,clip", 1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "space.model" in err.value.details()


def _jpeg(size=(120, 90)) -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, "PNG")
    return buf.getvalue()


BAD_IMAGES = {
    "empty": (b"", "empty"),
    "truncated jpeg": (_jpeg()[:1500], "truncated"),
    "not an image": (b"<html>hello</html>", "not a supported image format"),
    "decompression bomb": (_bomb(), "over the limit"),
}


@pytest.mark.parametrize("name", BAD_IMAGES)
def test_bad_images_are_invalid_argument(client, name):
    data, message = BAD_IMAGES[name]
    with pytest.raises(grpc.RpcError) as err:
        client.search_image(data, k=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("image:") and message in err.value.details()


BAD_REQUESTS = {
    "k zero": (dict(k=0), "k: 0 is out of range"),
    "k negative": (dict(k=-3), "k: -3 is out of range"),
    "k huge": (dict(k=1_000_000), "k: 1000000 is out of range"),
    "price range inverted": (
        dict(filters=FilterArgs(min_price=50, max_price=10)),
        "min_price 50.0 is above max_price 10.0",
    ),
    "unknown category": (dict(filters=FilterArgs(categories=("spacesuit",))), "unknown category 'spacesuit'"),
    "unknown gender": (dict(filters=FilterArgs(gender="robots")), "filters.gender"),
    "bad market": (dict(filters=FilterArgs(market="USA")), "filters.market"),
    "negative price": (dict(filters=FilterArgs(min_price=-1)), "min_price: -1.0 is negative"),
    "nan price": (dict(filters=FilterArgs(max_price=float("nan"))), "not a finite number"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_requests_are_invalid_argument_naming_the_field(client, name):
    kwargs, message = BAD_REQUESTS[name]
    kwargs = {"k": 5, **kwargs}
    for call in (
        lambda: client.search_text("dress", **kwargs),
        lambda: client.search_image(_jpeg(), **kwargs),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details()


def test_empty_text_is_invalid_argument(client):
    with pytest.raises(grpc.RpcError) as err:
        client.search_text("   ", k=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "text: empty" in err.value.details()


def test_text_beyond_the_context_is_truncated_and_says_so(client):
    long = client.search_text("a long flowing floral summer dress " * 40, k=3)
    assert long.text_truncated and len(long.hits) == 3
    assert not client.search_text("floral summer dress", k=3).text_truncated
    huge = client.search_text("word " * 20000, k=3)  # 100 kB of text: cut, not refused
    assert huge.text_truncated and len(huge.hits) == 3


def _access_lines(gateway, request_id):
    lines = [json.loads(line) for line in gateway.log.read_text().splitlines() if line.startswith("{")]
    return [e for e in lines if e["msg"] == "rpc" and e["request_id"] == request_id]


def test_request_id_is_returned_in_metadata_and_body(gateway):
    request_id = f"req-{uuid.uuid4().hex[:8]}"
    with gateway.client() as c:
        resp, call = c.stub.SearchText.with_call(
            pb.SearchTextRequest(text="coat", k=2), metadata=(("x-request-id", request_id),), timeout=10
        )
    assert resp.request_id == request_id
    assert ("x-request-id", request_id) in call.initial_metadata()
    # The access line is written after the response (a loop callback) and still names the request.
    line = wait_for(lambda: _access_lines(gateway, request_id), what="the access line")[0]
    assert line["rpc"] == "SearchText" and line["code"] == "OK" and line["ms"] > 0


def test_health_and_reflection(gateway, client):
    assert client.health() == "SERVING"
    assert client.health("looksync.v1.LookSearch") == "SERVING"
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"looksync.v1.LookSearch", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint_reports_rpcs_and_stages(gateway, client):
    client.search_text("shirt", k=2)
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics", timeout=5).read().decode()
    )
    assert 'looksync_rpc_seconds_count{rpc="SearchText"}' in body
    assert 'looksync_stage_seconds_count{rpc="SearchText",stage="embed_text"}' in body


def test_gateway_still_healthy_after_bad_input(client):
    for data, _ in BAD_IMAGES.values():
        with pytest.raises(grpc.RpcError):
            client.search_image(data, k=5)
    assert client.health() == "SERVING"
    assert len(client.search_text("jacket", k=4).hits) == 4
