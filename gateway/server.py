"""The gateway: a grpc.aio server with LookSearch, health, reflection and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from functools import partial

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from gateway.api import looksync_pb2 as pb
from gateway.api import looksync_pb2_grpc as pb_grpc
from gateway.embedder import TritonEmbedder
from gateway.errors import InvalidArgument, LookSyncError
from gateway.filters import from_proto
from gateway.index.base import CatalogIndex, EmbeddingSpace
from gateway.look.pipeline import LookResult, LookSearcher, LookSettings
from gateway.observability import RPC_ERRORS, RPC_SECONDS, STAGE_SECONDS, log, request_id_var
from gateway.search import Deadline, Searcher, SearchResult, check_k
from gateway.settings import Settings

logger = logging.getLogger("looksync.gateway")
RESPONSE_MARGIN_S = 0.015
SERVICE = pb.DESCRIPTOR.services_by_name["LookSearch"].full_name


def open_index(settings: Settings) -> CatalogIndex:
    if settings.index_backend == "embedded":
        from gateway.index.embedded import EmbeddedIndex

        return EmbeddedIndex(
            settings.embedded_dir,
            settings.index_alias,
            settings.index_refresh_s,
            ann_min_rows=settings.ann_min_rows,
            exact_max_rows=settings.exact_max_rows,
            exact_cache_mb=settings.exact_cache_mb,
        )
    if not settings.es_url:
        raise SystemExit("LOOKSYNC_INDEX_BACKEND=elasticsearch needs LOOKSYNC_ES_URL (http://host:9200)")
    from gateway.index.elastic import ElasticIndex

    return ElasticIndex(
        settings.es_url,
        alias=settings.index_alias,
        refresh_s=settings.index_refresh_s,
        timeout_s=settings.es_timeout_s,
        num_candidates_factor=settings.es_num_candidates_factor,
        m=settings.es_hnsw_m,
        ef_construction=settings.es_hnsw_ef_construction,
        index_type=settings.es_index_type,
        shards=settings.es_shards,
        replicas=settings.es_replicas,
    )


def build_look_searcher(settings: Settings, embedder: TritonEmbedder, index: CatalogIndex) -> LookSearcher:
    from gateway.cache import make_cache
    from gateway.look.localizer import BodyZoneLocalizer
    from gateway.look.querygen import FallbackQueryGenerator, LLMQueryGenerator, ZeroShot
    from gateway.look.rerank import LLMReranker

    llm_queries = llm_reranker = None
    if settings.llm_base_url and settings.llm_model:
        from gateway.llm import LLMClient

        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
        llm = LLMClient(settings.llm_base_url, settings.llm_model, key)
        llm_queries, llm_reranker = LLMQueryGenerator(llm), LLMReranker(llm)
    segmenter = None
    if settings.segmentation:
        from gateway.look.segment_localizer import FlorenceSam2Localizer

        segmenter = FlorenceSam2Localizer(
            settings.triton_url, ground_model=settings.ground_model, mask_model=settings.mask_model
        )
    localizer = BodyZoneLocalizer()
    if settings.localizer == "detector":
        from gateway.look.detector import DetectorLocalizer

        localizer = DetectorLocalizer(embedder, settings.detector_model)
    fallback = FallbackQueryGenerator(embedder, localizer, ZeroShot(embedder), segmenter)
    return LookSearcher(
        embedder,
        index,
        fallback,
        llm_queries,
        llm_reranker,
        LookSettings(
            settings.max_k_per_layer,
            settings.look_candidates,
            settings.dedup_threshold,
            settings.llm_timeout_s,
        ),
        settings.max_look_pixels,
        settings.triton_timeout_s,
        result_cache=make_cache(settings.cache, "look", settings.redis_url, settings.cache_ttl_s, 1000),
        text_cache=make_cache(settings.cache, "text", settings.redis_url, settings.cache_ttl_s, 20000),
        segmenter=segmenter,
    )


def _hit(product, score: float, duplicates: int = 0, offers=()) -> pb.Hit:
    return pb.Hit(
        product=pb.Product(**product.to_dict()),
        score=score,
        duplicates=duplicates,
        offers=[
            pb.Offer(
                product_id=o.id,
                retailer=o.retailer,
                price=o.price,
                currency=o.currency,
                in_stock=o.in_stock,
                product_url=o.product_url,
                market=o.market,
            )
            for o in offers
        ],
    )


def space_pb(space: EmbeddingSpace) -> pb.EmbeddingSpace:
    return pb.EmbeddingSpace(
        model=space.model,
        version=space.version,
        dim=space.dim,
        family=space.family,
        modalities=list(space.modalities),
    )


def _timings_pb(timings) -> list[pb.StageTiming]:
    return [pb.StageTiming(stage=name, ms=ms) for name, ms in timings.stages]


def _look_response(result: LookResult, request_id: str) -> pb.SearchLookResponse:
    layers = []
    for outcome in result.layers:
        q = outcome.query
        layers.append(
            pb.LayerResult(
                layer=q.layer,
                query=q.query,
                query_source=q.source,
                rerank_source=outcome.rerank_source,
                hits=[
                    _hit(c.hit.product, c.hit.score, c.duplicates, c.hit.offers) for c in outcome.candidates
                ],
                box=pb.Box(**dict(zip(("left", "top", "right", "bottom"), q.region.box)))
                if q.region
                else None,
                region_source=q.region.source if q.region else "",
            )
        )
    return pb.SearchLookResponse(
        layers=layers,
        space=space_pb(result.space),
        timings=_timings_pb(result.timings),
        request_id=request_id,
        cached=result.cached,
        computed_at_unix=result.computed_at,
        source=result.source,
        look_id=result.look_id,
        requeued=result.requeued,
    )


def _space_from_proto(msg) -> EmbeddingSpace | None:
    if not msg.model:
        if msg.version or msg.dim:
            # A pin without its model would silently answer from whatever the alias serves.
            raise InvalidArgument("space.model: required when space.version or space.dim is set")
        return None
    return EmbeddingSpace(msg.model, msg.version, msg.dim)


def _response(result: SearchResult, request_id: str) -> pb.SearchResponse:
    hits = [_hit(h.product, h.score, 0, h.offers) for h in result.hits]
    space = space_pb(result.space)
    timings = [pb.StageTiming(stage=name, ms=ms) for name, ms in result.timings.stages]
    return pb.SearchResponse(
        hits=hits,
        space=space,
        timings=timings,
        text_truncated=result.text_truncated,
        request_id=request_id,
    )


class Undecodable:
    """A request whose bytes are not a valid message (e.g. invalid UTF-8 in a string field)."""

    def __init__(self, kind: str, error: str):
        self.kind, self.error = kind, error


def _lenient(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return Undecodable(cls.__name__, str(exc))

    return parse


def add_look_search(servicer, server) -> None:
    """Like the generated add_LookSearchServicer_to_server, but a request that does not decode
    reaches the servicer (and gets INVALID_ARGUMENT) instead of grpcio's generic INTERNAL."""
    methods = {
        "SearchText": (pb.SearchTextRequest, servicer.SearchText),
        "SearchImage": (pb.SearchImageRequest, servicer.SearchImage),
        "SearchLook": (pb.SearchLookRequest, servicer.SearchLook),
        "GetLookMatches": (pb.GetLookMatchesRequest, servicer.GetLookMatches),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            method, request_deserializer=_lenient(cls), response_serializer=lambda m: m.SerializeToString()
        )
        for name, (cls, method) in methods.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class LookSearchServicer(pb_grpc.LookSearchServicer):
    def __init__(
        self, searcher: Searcher, look_searcher: LookSearcher, settings: Settings, look_matches=None
    ):
        self.searcher = searcher
        self.look_searcher = look_searcher
        self.look_matches = look_matches  # gateway/offline/serve.py: GetLookMatches
        self.settings = settings
        self.in_flight = 0
        self._handlers: set[asyncio.Task] = set()
        self.draining = False

    async def drain(self, grace_s: float) -> None:
        """SIGTERM: the server has stopped taking calls; requests in flight get the grace
        period to finish, then end with UNAVAILABLE (a retry goes to another replica) just
        before grpcio's own hard stop would cancel them without a useful status."""
        self.draining = True
        pending = set(self._handlers)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=max(0.1, grace_s - 1.0))
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)

    def _deadline(self, context) -> Deadline:
        remaining = context.time_remaining()
        default = self.settings.request_timeout_s
        if remaining is None:
            return Deadline.after(default)
        # Keep a little of the client's deadline for building and sending the answer.
        return Deadline.after(min(remaining - RESPONSE_MARGIN_S, default * 10))

    async def _run(self, rpc: str, context, handler, respond=None, request=None):
        metadata = dict(context.invocation_metadata() or ())
        request_id = metadata.get("x-request-id") or uuid.uuid4().hex
        request_id_var.set(request_id)
        await context.send_initial_metadata((("x-request-id", request_id),))
        if self.in_flight >= self.settings.max_in_flight:
            # Shed load at once: queueing past the limit would only turn into deadline errors.
            RPC_ERRORS.labels(rpc, "RESOURCE_EXHAUSTED").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.in_flight} requests in flight, the limit is {self.settings.max_in_flight}; retry later",
            )
        if isinstance(request, Undecodable):
            RPC_ERRORS.labels(rpc, "INVALID_ARGUMENT").inc()
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {request.kind} ({request.error})"
            )
        self.in_flight += 1
        task = asyncio.current_task()
        self._handlers.add(task)
        start = time.perf_counter()
        code = "OK"
        try:
            result = await handler(self._deadline(context))
            for stage, ms in result.timings.stages:
                STAGE_SECONDS.labels(rpc, stage).observe(ms / 1000.0)
            return (respond or _response)(result, request_id)
        except LookSyncError as exc:
            code = exc.code.name
            log(logger, logging.INFO, "request refused", rpc=rpc, code=code, error=str(exc))
            await context.abort(exc.code, str(exc))
        except asyncio.CancelledError:
            if not self.draining:
                code = "CANCELLED"  # the client went away
                raise
            code = "UNAVAILABLE"
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down; retry (another replica answers)"
            )
        except Exception:
            code = "INTERNAL"
            logger.exception("unexpected error in %s", rpc)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")
        finally:
            self.in_flight -= 1
            self._handlers.discard(task)
            elapsed = time.perf_counter() - start
            RPC_SECONDS.labels(rpc).observe(elapsed)
            if code != "OK":
                RPC_ERRORS.labels(rpc, code).inc()
            # The access line is written on the loop's next turn, once the response is on its
            # way: formatting and writing it cost ~0.2 ms of every call's latency (SearchText
            # overhead p50 4.1 -> 3.9 ms, benchmarks/look_e2e.py --text-only). The request id
            # goes with it: call_soon runs the callback in a copy of this context.
            asyncio.get_running_loop().call_soon(
                partial(log, logger, logging.INFO, "rpc", rpc=rpc, code=code, ms=round(elapsed * 1000, 2))
            )

    async def SearchText(self, request, context):
        s = self.settings

        async def handle(deadline):
            return await self.searcher.search_text(
                request.text,
                from_proto(request.filters),
                check_k(request.k, s.max_k),
                deadline,
                _space_from_proto(request.space),
            )

        return await self._run("SearchText", context, handle, request=request)

    async def SearchImage(self, request, context):
        s = self.settings

        async def handle(deadline):
            return await self.searcher.search_image(
                request.image,
                request.text_modifier,
                request.text_weight,
                from_proto(request.filters),
                check_k(request.k, s.max_k),
                deadline,
                _space_from_proto(request.space),
            )

        return await self._run("SearchImage", context, handle, request=request)

    async def SearchLook(self, request, context):
        s = self.settings

        async def handle(deadline):
            return await self.look_searcher.search_look(
                request.image,
                from_proto(request.filters),
                check_k(request.k_per_layer, s.max_k_per_layer, "k_per_layer"),
                deadline,
                _space_from_proto(request.space),
            )

        return await self._run("SearchLook", context, handle, _look_response, request=request)

    async def GetLookMatches(self, request, context):
        s = self.settings

        async def handle(deadline):
            return await self.look_matches.get(
                request.look_id,
                from_proto(request.filters),
                check_k(request.k_per_layer, s.max_k_per_layer, "k_per_layer"),
                deadline,
                _space_from_proto(request.space),
                request.image,
            )

        return await self._run("GetLookMatches", context, handle, _look_response, request=request)


async def _watch_health(
    health_servicer, embedder: TritonEmbedder, index: CatalogIndex, stop: asyncio.Event
) -> None:
    """SERVING only while Triton answers and an index is behind the alias (readiness)."""
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    while not stop.is_set():
        try:
            ok = await embedder.live() and await index.space() is not None
        except Exception:
            ok = False
        status = serving if ok else not_serving
        await health_servicer.set("", status)
        await health_servicer.set(SERVICE, status)
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except TimeoutError:
            pass


async def serve(settings: Settings, ready: asyncio.Event | None = None) -> None:
    embedder = TritonEmbedder(settings.triton_url)
    index = open_index(settings)
    searcher = Searcher(embedder, index, settings.triton_timeout_s, settings.max_image_pixels)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.max_request_bytes),
            ("grpc.max_send_message_length", 64 << 20),
        ]
    )
    look_searcher = build_look_searcher(settings, embedder, index)
    from gateway.offline.serve import LookMatchReader

    look_matches = LookMatchReader(index, look_searcher, settings.redis_url, settings.match_requeue_share)
    search_servicer = LookSearchServicer(searcher, look_searcher, settings, look_matches)
    add_look_search(search_servicer, server)
    from gateway.admin import AdminServicer

    admin = AdminServicer(settings, index, embedder)
    pb_grpc.add_AdminServicer_to_server(admin, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    admin_service = pb.DESCRIPTOR.services_by_name["Admin"].full_name
    reflection.enable_server_reflection(
        (SERVICE, admin_service, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    if settings.tls_cert_file and settings.tls_key_file:
        credentials = grpc.ssl_server_credentials(
            [(settings.tls_key_file.read_bytes(), settings.tls_cert_file.read_bytes())]
        )
        bound = server.add_secure_port(address, credentials)
    elif settings.tls_cert_file or settings.tls_key_file:
        raise SystemExit("TLS needs both LOOKSYNC_TLS_CERT_FILE and LOOKSYNC_TLS_KEY_FILE")
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise SystemExit(f"cannot listen on {address}")
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr="0.0.0.0")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch_health(health_servicer, embedder, index, stop))
    log(
        logger,
        logging.INFO,
        "gateway listening",
        address=address,
        metrics_port=settings.metrics_port,
        triton=settings.triton_url,
        backend=settings.index_backend,
    )
    if ready is not None:
        ready.set()
    await stop.wait()
    # Graceful: stop taking calls, let in-flight ones finish within the grace period.
    log(logger, logging.INFO, "shutting down", grace_s=settings.shutdown_grace_s)
    await health_servicer.enter_graceful_shutdown()
    # An activation that has not reached its commit point rolls back (gateway/jobs.py).
    await asyncio.gather(
        server.stop(settings.shutdown_grace_s),
        search_servicer.drain(settings.shutdown_grace_s),
        admin.jobs.shutdown(60.0),
    )
    watcher.cancel()
    await look_matches.close()
    await embedder.close()
    await index.close()
