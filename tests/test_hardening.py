"""Hardening: a corpus of bad (and odd-but-valid) inputs, access control, TLS, load shedding,
a dead cache, and fuzzing of request validation and image decoding."""

import io
import json
import subprocess
import threading

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clients.client import FilterArgs, LookSyncClient
from clients.looks import compose_look
from export.triton.preprocess import InvalidImage, decode_image
from gateway.api import looksync_pb2 as pb
from gateway.api import looksync_pb2_grpc as pb_grpc
from gateway.errors import InvalidArgument
from gateway.filters import build_filters
from tests.conftest import (
    eps_bytes,
    free_port,
    looksync,
    looksync_env,
    metric,
    psd_bytes,
    start_gateway,
    wait_for,
)
from tests.llm_stub import Reply, ScriptedLLM, candidate_ids

OK, INVALID = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT


def _img(mode: str, size=(64, 48), fmt="PNG", **save) -> bytes:
    buf = io.BytesIO()
    if mode == "I;16":
        img = Image.fromarray(
            (np.arange(size[0] * size[1]).reshape(size[1], size[0]) * 7 % 65535).astype(np.uint16)
        )
    else:
        img = Image.new(
            mode,
            size,
            {
                "RGB": (200, 20, 20),
                "CMYK": (0, 200, 200, 0),
                "P": 3,
                "L": 128,
                "RGBA": (10, 200, 10, 128),
                "1": 1,
            }[mode],
        )
    img.save(buf, fmt, **save)
    return buf.getvalue()


def _gif_animated() -> bytes:
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buf, "PNG")  # 81 MP: header-only refusal
    return buf.getvalue()


def _png_zero_width() -> bytes:
    good = _img("RGB", (4, 4))
    return good[:16] + (0).to_bytes(4, "big") + good[20:]


JPEG = _img("RGB", (120, 90), "JPEG")


def _look_bytes(fmt: str) -> bytes:
    """A noisy look-sized image (noise keeps the file large, so half of it is a real cut)."""
    rng = np.random.default_rng(4)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (256, 192, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


# name -> (rpc, request, expected code, fragment of the message)
CORPUS = {
    "image: zero bytes": ("image", dict(image=b""), INVALID, "image is empty"),
    "image: truncated JPEG": (
        "image",
        dict(image=_img("RGB", (300, 300), "JPEG")[:900]),
        INVALID,
        "truncated",
    ),
    "image: truncated PNG": ("image", dict(image=_img("RGB", (300, 300), "PNG")[:200]), INVALID, "image"),
    "image: decompression bomb": ("image", dict(image=_bomb()), INVALID, "over the limit"),
    # 1 x 20000: a few hundred bytes that the resize to the model's input would make gigabytes.
    "image: a 1-pixel strip": ("image", dict(image=_img("RGB", (1, 20_000))), INVALID, "times the other"),
    "image: long but plausible": ("image", dict(image=_img("RGB", (40, 3000))), OK, None),
    "image: PDF bytes": (
        "image",
        dict(image=b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n"),
        INVALID,
        "not a supported image",
    ),
    "image: HTML bytes": ("image", dict(image=b"<!doctype html><p>hi"), INVALID, "not a supported image"),
    "image: zero width PNG": ("image", dict(image=_png_zero_width()), INVALID, "image"),
    "image: CMYK JPEG": ("image", dict(image=_img("CMYK", fmt="JPEG")), OK, None),
    "image: 16-bit PNG": ("image", dict(image=_img("I;16")), OK, None),
    "image: palette PNG": ("image", dict(image=_img("P")), OK, None),
    "image: 1-bit PNG": ("image", dict(image=_img("1")), OK, None),
    "image: grey JPEG": ("image", dict(image=_img("L", fmt="JPEG")), OK, None),
    "image: RGBA PNG": ("image", dict(image=_img("RGBA")), OK, None),
    "image: animated GIF": ("image", dict(image=_gif_animated()), OK, None),
    "image: 1x1 pixel": ("image", dict(image=_img("RGB", (1, 1))), OK, None),
    "image: huge but valid (20 MP)": ("image", dict(image=_img("RGB", (5000, 4000))), OK, None),
    "image: WebP": ("image", dict(image=_img("RGB", fmt="WEBP")), OK, None),
    "image: truncated WebP": ("image", dict(image=_look_bytes("WEBP")[:2000]), INVALID, "image"),
    # Formats outside JPEG, PNG, WebP, GIF: refused from the header, never decoded.
    "image: TIFF": (
        "image",
        dict(image=_img("RGB", (32, 32), "TIFF")),
        INVALID,
        "not a supported image format",
    ),
    "image: BMP": (
        "image",
        dict(image=_img("RGB", (32, 32), "BMP")),
        INVALID,
        "not a supported image format",
    ),
    "image: EPS": ("image", dict(image=eps_bytes()), INVALID, "not a supported image format"),
    "image: PSD": ("image", dict(image=psd_bytes()), INVALID, "not a supported image format"),
    "image: text weight 1.5": (
        "image",
        dict(image=JPEG, text_modifier="red", text_weight=1.5),
        INVALID,
        "text_weight",
    ),
    "image: text weight NaN": (
        "image",
        dict(image=JPEG, text_modifier="red", text_weight=float("nan")),
        INVALID,
        "text_weight",
    ),
    "text: empty": ("text", dict(text=""), INVALID, "text: empty"),
    "text: 10k characters": ("text", dict(text="floral " * 1500), OK, None),
    "text: emoji": ("text", dict(text="👗🔥✨ dress 👠"), OK, None),
    "text: right-to-left": ("text", dict(text="فستان أحمر طويل مع أكمام"), OK, None),
    "text: control characters": ("text", dict(text="red\x00dress\x07\u202e"), OK, None),
    "text: zero-width characters only": (
        "text",
        dict(text="\u200b\u2060\ufeff \u200d"),
        INVALID,
        "empty text",
    ),
    "text: one emoji": ("text", dict(text="\U0001f457"), OK, None),
    "space: a version without its model": (
        "text",
        dict(text="dress", space=pb.EmbeddingSpace(version=99)),
        INVALID,
        "space.model: required",
    ),
    "space: negative dim": (
        "text",
        dict(text="dress", space=pb.EmbeddingSpace(model="clip", dim=-5)),
        INVALID,
        "space.dim: -5",
    ),
    "k: zero": ("text", dict(text="dress", k=0), INVALID, "k: 0"),
    "k: 1e9": ("text", dict(text="dress", k=1_000_000_000), INVALID, "k: 1000000000"),
    "k: negative": ("text", dict(text="dress", k=-1), INVALID, "k: -1"),
    "price: NaN": ("text", dict(text="dress", filters=FilterArgs(min_price=float("nan"))), INVALID, "finite"),
    "price: infinite": (
        "text",
        dict(text="dress", filters=FilterArgs(max_price=float("inf"))),
        INVALID,
        "finite",
    ),
    "price: negative": ("text", dict(text="dress", filters=FilterArgs(min_price=-5)), INVALID, "negative"),
    "price: inverted range": (
        "text",
        dict(text="dress", filters=FilterArgs(min_price=9, max_price=1)),
        INVALID,
        "above max_price",
    ),
    "filters: empty": ("text", dict(text="dress", filters=FilterArgs()), OK, None),
    "filters: unknown category": (
        "text",
        dict(text="dress", filters=FilterArgs(categories=("spacesuit",))),
        INVALID,
        "unknown category",
    ),
    "filters: unknown gender": (
        "text",
        dict(text="dress", filters=FilterArgs(gender="cats")),
        INVALID,
        "filters.gender",
    ),
    "filters: bad market": (
        "text",
        dict(text="dress", filters=FilterArgs(market="Narnia")),
        INVALID,
        "filters.market",
    ),
    "filters: empty brand": (
        "text",
        dict(text="dress", filters=FilterArgs(brands=("",))),
        INVALID,
        "empty value",
    ),
    "filters: 51 brands": (
        "text",
        dict(text="dress", filters=FilterArgs(brands=tuple(f"b{i}" for i in range(51)))),
        INVALID,
        "at most 50",
    ),
    "filters: brand of 300 chars": (
        "text",
        dict(text="dress", filters=FilterArgs(brands=("x" * 300,))),
        INVALID,
        "longer than",
    ),
    "filters: case-insensitive values": (
        "text",
        dict(text="dress", filters=FilterArgs(categories=("DRESS",), gender="Women", market="de")),
        OK,
        None,
    ),
    "look: zero bytes": ("look", dict(image=b""), INVALID, "image is empty"),
    "look: not an image": ("look", dict(image=b"GIF87a"), INVALID, "not a supported image"),
    "look: truncated JPEG": (
        "look",
        dict(image=_look_bytes("JPEG")[: len(_look_bytes("JPEG")) // 2]),
        INVALID,
        "truncated",
    ),
    "look: truncated PNG": ("look", dict(image=_look_bytes("PNG")[:3000]), INVALID, "image"),
    "look: truncated WebP": ("look", dict(image=_look_bytes("WEBP")[:2000]), INVALID, "image"),
    "look: TIFF": (
        "look",
        dict(image=_img("RGB", (64, 64), "TIFF")),
        INVALID,
        "not a supported image format",
    ),
    "look: k_per_layer 0": ("look", dict(image=compose_look({}), k_per_layer=0), INVALID, "k_per_layer: 0"),
    "look: k_per_layer 1e6": (
        "look",
        dict(image=compose_look({}), k_per_layer=10**6),
        INVALID,
        "k_per_layer",
    ),
    "look: unknown category filter": (
        "look",
        dict(image=compose_look({}), filters=FilterArgs(categories=("robe",))),
        INVALID,
        "unknown category",
    ),
}


def _call(client, rpc, kwargs):
    if rpc == "text":
        return client.search_text(**{"k": 5, **kwargs})
    if rpc == "image":
        return client.search_image(**{"k": 5, **kwargs})
    return client.search_look(**{"k_per_layer": 3, **kwargs})


def test_the_corpus_has_at_least_30_cases():
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("name", CORPUS)
def test_bad_input_corpus(client, name):
    rpc, kwargs, code, fragment = CORPUS[name]
    if code == OK:
        resp = _call(client, rpc, kwargs)
        assert (resp.layers if rpc == "look" else resp.hits) is not None
        return
    with pytest.raises(grpc.RpcError) as err:
        _call(client, rpc, kwargs)
    assert err.value.code() == code, err.value.details()
    assert fragment in err.value.details()


def test_messages_over_the_size_limit_are_resource_exhausted(client):
    with pytest.raises(grpc.RpcError) as err:
        client.search_image(b"\xff" * (17 << 20), k=3)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_invalid_utf8_on_the_wire_is_invalid_argument(gateway):
    # Field 1 (text), length-delimited, with bytes that are not UTF-8: only a raw client can send it.
    raw = b"\x0a\x04\xff\xfe\xfd\xfc\x18\x05"
    channel = grpc.insecure_channel(gateway.address)
    call = channel.unary_unary(
        "/looksync.v1.LookSearch/SearchText",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as err:
        call(raw, timeout=5)
    assert err.value.code() == INVALID and "not a valid SearchTextRequest" in err.value.details()
    channel.close()


def test_gateway_is_healthy_after_the_corpus(client):
    for rpc, kwargs, _, _ in CORPUS.values():
        try:
            _call(client, rpc, kwargs)
        except grpc.RpcError:
            pass
    assert client.health() == "SERVING"
    assert len(client.search_text("linen shirt", k=3).hits) == 3


# --- access control, load shedding, dead cache ------------------------------------------------


@pytest.fixture(scope="module")
def slow_llm():
    def script(kind, body):
        if kind == "QueryAnswer":
            return Reply(status=500)
        return Reply({"ranking": candidate_ids(body)}, delay_s=1.5)

    stub = ScriptedLLM(script=script).start()
    yield stub
    stub.stop()


REDIS_PASSWORD = "hunter2-redis-password"


@pytest.fixture(scope="module")
def guarded(triton, indexed, slow_llm, catalog, tmp_path_factory):
    env = looksync_env(
        triton,
        indexed,
        LOOKSYNC_ADMIN_TOKEN="s3cret-admin-token",
        LOOKSYNC_ADMIN_ALLOW_PLAINTEXT="true",
        LOOKSYNC_MAX_IN_FLIGHT="1",
        LOOKSYNC_LLM_BASE_URL=slow_llm.base_url,
        LOOKSYNC_LLM_MODEL="stub",
        LOOKSYNC_CACHE="redis",
        # Nobody listens there; the password must never reach an error or a log line.
        LOOKSYNC_REDIS_URL=f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0",
        LOOKSYNC_ADMIN_CATALOG_DIR=str(catalog.parent),
    )
    gw = start_gateway(env, tmp_path_factory.mktemp("guarded") / "gateway.log")
    yield gw
    gw.stop()


def _admin(address, token=None):
    channel = grpc.insecure_channel(address)
    stub = pb_grpc.AdminStub(channel)
    meta = (("authorization", f"Bearer {token}"),) if token else None
    return channel, lambda: stub.ModelStatus(pb.ModelStatusRequest(), metadata=meta, timeout=10)


def test_admin_rpcs_need_the_token(guarded, gateway):
    for address, token, code, needle in (
        (guarded.address, None, grpc.StatusCode.UNAUTHENTICATED, "missing"),
        (guarded.address, "wrong", grpc.StatusCode.PERMISSION_DENIED, "not valid"),
        (gateway.address, "anything", grpc.StatusCode.PERMISSION_DENIED, "disabled"),
    ):
        channel, call = _admin(address, token)
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code and needle in err.value.details()
        channel.close()
    channel, call = _admin(guarded.address, "s3cret-admin-token")
    status = call()
    channel.close()
    assert (
        status.model == "clip"
        and list(status.loaded_versions) == [1]
        and status.alias_target == "products-clip-v1"
    )
    assert "s3cret-admin-token" not in guarded.log.read_text()


def test_no_secret_in_admin_errors_or_logs(guarded, catalog):
    # Activation jobs live in Redis, which is down here: UNAVAILABLE, fast, without the URL's
    # password; the status still answers (without a job).
    admin = LookSyncClient(guarded.address, admin_token="s3cret-admin-token", timeout_s=20)
    with pytest.raises(grpc.RpcError) as err:
        admin.activate_model(1, catalog.name)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert "Redis" in err.value.details() and REDIS_PASSWORD not in err.value.details()
    assert not admin.model_status().HasField("job")
    admin.close()
    assert REDIS_PASSWORD not in guarded.log.read_text()


def test_admin_is_refused_on_a_plaintext_listener_by_default(triton, indexed, tmp_path):
    env = looksync_env(triton, indexed, LOOKSYNC_ADMIN_TOKEN="plain-admin-token")
    gw = start_gateway(env, tmp_path / "gateway.log")
    try:
        admin = LookSyncClient(gw.address, admin_token="plain-admin-token")
        for call in (admin.model_status, admin.get_job, lambda: admin.activate_model(2, "c.jsonl")):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "need TLS" in err.value.details() and "ADMIN_ALLOW_PLAINTEXT" in err.value.details()
        assert len(admin.search_text("dress", k=1).hits) == 1  # searches are not affected
        admin.close()
    finally:
        gw.stop()


def test_over_the_concurrency_limit_is_resource_exhausted(guarded, slow_llm, catalog, products):
    look = compose_look({"feet": catalog.parent / products[10].image_url})
    outcomes = []
    release = threading.Event()

    def one():
        with guarded.client() as c:
            try:
                c.search_look(look, k_per_layer=3, timeout_s=60)
                outcomes.append("OK")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)

    slow_llm.requests.clear()
    slow_llm.script = lambda kind, body: (
        Reply(status=500) if kind == "QueryAnswer" else Reply({"ranking": candidate_ids(body)}, hold=release)
    )
    first = threading.Thread(target=one)
    first.start()
    try:
        slow_llm.wait_for("Ranking")  # the first request now holds the only slot
        one()
    finally:
        release.set()
    first.join(60)
    assert sorted(outcomes) == ["OK", "RESOURCE_EXHAUSTED"]


def test_a_dead_cache_is_bypassed(guarded, slow_llm, catalog, products):
    # LOOKSYNC_CACHE=redis points at a port nobody listens on: look search, which reads and
    # writes the result cache, still answers, and each lookup counts as a cache error.
    slow_llm.script = lambda kind, body: Reply(status=500)  # fallbacks: no LLM time involved
    look = compose_look({"feet": catalog.parent / products[12].image_url})
    errors = metric(guarded.metrics_port, "looksync_cache_lookups_total", cache="look", result="error")
    with guarded.client() as c:
        assert c.search_look(look, k_per_layer=2, timeout_s=60).layers
    assert (
        metric(guarded.metrics_port, "looksync_cache_lookups_total", cache="look", result="error")
        == errors + 1
    )


# --- TLS ----------------------------------------------------------------------------------


def test_tls_when_a_certificate_is_configured(triton, indexed, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    env = looksync_env(
        triton,
        indexed,
        LOOKSYNC_TLS_CERT_FILE=str(cert),
        LOOKSYNC_TLS_KEY_FILE=str(key),
        LOOKSYNC_ADMIN_TOKEN="tls-admin-token",
    )
    gw = start_gateway(env, tmp_path / "gateway.log", wait_serving=False, probe=False)
    try:
        # The project's own client, over TLS with the private CA, searching and calling Admin.
        secure = LookSyncClient(
            gw.address,
            root_certificates=cert.read_bytes(),
            server_name="localhost",
            admin_token="tls-admin-token",
        )

        def answers():
            try:
                return secure.search_text("dress", k=2, timeout_s=5)
            except grpc.RpcError:
                return None

        assert len(wait_for(answers, what="the TLS gateway").hits) == 2
        status = secure.model_status()
        assert status.model == "clip" and list(status.loaded_versions) == [1]
        secure.close()
        with gw.client() as plain, pytest.raises(grpc.RpcError) as err:
            plain.search_text("dress", k=2, timeout_s=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # And the CLI, with the same options.
        cli = looksync(
            "admin", "status", "--gateway", gw.address, "--ca-file", str(cert), "--server-name", "localhost",
            "--token", "tls-admin-token", env=env,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["alias_target"] == "products-clip-v1"
        refused = looksync("admin", "status", "--gateway", gw.address, "--ca-file", str(cert),
                           "--server-name", "localhost", "--token", "wrong", env=env)  # fmt: skip
        assert refused.returncode == 2 and refused.stderr.startswith("error: PERMISSION_DENIED")
    finally:
        gw.stop()


# --- fuzzing ------------------------------------------------------------------------------

_text = st.text(max_size=60)


@settings(max_examples=300, deadline=None)
@given(
    categories=st.lists(_text, max_size=4),
    gender=_text,
    market=_text,
    brands=st.lists(_text, max_size=4),
    sizes=st.lists(_text, max_size=4),
    lo=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    hi=st.none() | st.floats(allow_nan=True, allow_infinity=True),
    stock=st.booleans(),
)
def test_filter_validation_never_fails_any_other_way(
    categories, gender, market, brands, sizes, lo, hi, stock
):
    try:
        f = build_filters(categories, gender, market, brands, sizes, lo, hi, stock)
    except InvalidArgument as exc:
        assert str(exc).startswith("filters")
        return
    assert f.min_price is None or f.max_price is None or f.min_price <= f.max_price


_SEEDS = [
    _img("RGB", (40, 30), "PNG"),
    _img("RGB", (40, 30), "JPEG"),
    _gif_animated(),
    _img("RGB", fmt="WEBP"),
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(_SEEDS),
    edits=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 4000),
    junk=st.binary(max_size=64),
)
def test_image_decoding_never_fails_any_other_way(seed, edits, cut, junk):
    data = bytearray(seed)
    for pos, value in edits:
        if data:
            data[pos % len(data)] = value
    data = bytes(data[: max(cut, 1)]) + junk if cut < len(data) else bytes(data)
    try:
        img = decode_image(data, max_pixels=4_000_000)
    except InvalidImage:
        return
    assert img.mode == "RGB" and img.size[0] > 0
