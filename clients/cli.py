"""`looksync`: the command line (docs/ARCHITECTURE.md, "Public interfaces"): add commands, never rename."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import grpc

from gateway.errors import LookSyncError


def _settings():
    from gateway.settings import get_settings

    return get_settings()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("looksync")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "unknown (not installed)"


def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--category", action="append", default=[], help="standard category (repeatable)")
    p.add_argument("--gender", default="", help="women | men | unisex")
    p.add_argument("--market", default="", help="ISO 3166 alpha-2, e.g. US")
    p.add_argument("--brand", action="append", default=[])
    p.add_argument("--size", action="append", default=[])
    p.add_argument("--min-price", type=float)
    p.add_argument("--max-price", type=float)
    p.add_argument("--in-stock", action="store_true")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print the response as JSON")
    p.add_argument("--space", help="search this embedding space, MODEL:VERSION (default: the alias's)")
    _add_connection(p)


def _add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gateway", help="gateway address (default from LOOKSYNC_GATEWAY_URL)")
    p.add_argument("--tls", action="store_true", help="connect over TLS (LOOKSYNC_GATEWAY_TLS)")
    p.add_argument("--ca-file", help="PEM roots of a private CA (LOOKSYNC_GATEWAY_CA_FILE); implies --tls")
    p.add_argument("--server-name", help="the name in the gateway's certificate, when not its address")
    p.add_argument("--token", help="Admin token (default LOOKSYNC_ADMIN_TOKEN)")


def _space(args):
    if not getattr(args, "space", None):
        return None
    model, sep, version = args.space.partition(":")
    if not sep or not version.isdigit():
        raise ValueError(f"--space {args.space!r}: expected MODEL:VERSION, e.g. clip:2 (0 = newest)")
    return (model, int(version))


def _filters(args):
    from clients.client import FilterArgs

    return FilterArgs(
        categories=tuple(args.category),
        gender=args.gender,
        market=args.market,
        brands=tuple(args.brand),
        sizes=tuple(args.size),
        min_price=args.min_price,
        max_price=args.max_price,
        in_stock_only=args.in_stock,
    )


def _print_response(resp, as_json: bool) -> None:
    if as_json:
        from google.protobuf.json_format import MessageToJson

        print(MessageToJson(resp, preserving_proto_field_name=True))
        return
    space = f"{resp.space.model} v{resp.space.version}"
    print(f"{len(resp.hits)} hits  (space {space}, request {resp.request_id})")
    for rank, hit in enumerate(resp.hits, 1):
        p = hit.product
        stock = "in stock" if p.in_stock else "sold out"
        print(
            f"{rank:3d}. {hit.score:6.3f}  {p.id:8s} {p.title:32.32s} {p.brand:12.12s} "
            f"{p.category:9s} {p.gender:6s} {p.market} {p.price:8.2f} {p.currency} {stock}"
        )
    if resp.text_truncated:
        print("note: the text was longer than the model's context and was truncated")
    print("timings: " + ", ".join(f"{t.stage} {t.ms:.1f} ms" for t in resp.timings))


def _client(args):
    from clients.client import LookSyncClient

    s = _settings()
    ca_file = args.ca_file or s.gateway_ca_file
    token = args.token or (s.admin_token.get_secret_value() if s.admin_token else None)
    return LookSyncClient(
        args.gateway or s.gateway_url,
        tls=args.tls or s.gateway_tls or bool(ca_file),
        root_certificates=Path(ca_file).read_bytes() if ca_file else None,
        server_name=args.server_name,
        admin_token=token,
    )


def cmd_search_text(args) -> int:
    with _client(args) as client:
        resp = client.search_text(args.text, k=args.k, filters=_filters(args), space=_space(args))
        _print_response(resp, args.json)
    return 0


def cmd_search_image(args) -> int:
    image = Path(args.image).read_bytes()
    with _client(args) as client:
        resp = client.search_image(
            image,
            k=args.k,
            filters=_filters(args),
            text_modifier=args.text,
            text_weight=args.text_weight,
            space=_space(args),
        )
        _print_response(resp, args.json)
    return 0


def cmd_search_look(args) -> int:
    image = Path(args.image).read_bytes()
    with _client(args) as client:
        resp = client.search_look(image, k_per_layer=args.k, filters=_filters(args), space=_space(args))
    if args.json:
        _print_response(resp, True)
        return 0
    _print_look(resp)
    return 0


def _print_look(resp) -> None:
    import datetime

    when = datetime.datetime.fromtimestamp(resp.computed_at_unix, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    look = f"look {resp.look_id}: " if resp.look_id else ""
    print(
        f"{look}{len(resp.layers)} layers  ({resp.source or 'online'}, computed {when}; space {resp.space.model} v{resp.space.version}, "
        f"request {resp.request_id}{', cached' if resp.cached else ''})"
    )
    for layer in resp.layers:
        where = ""
        if layer.HasField("box"):
            b = layer.box
            where = f" at ({b.left},{b.top})-({b.right},{b.bottom}) by {layer.region_source}"
        print(
            f'\n[{layer.layer}] "{layer.query}"{where}  (query: {layer.query_source}, rerank: {layer.rerank_source})'
        )
        for rank, hit in enumerate(layer.hits, 1):
            p = hit.product
            dup = f"  (+{hit.duplicates} duplicates)" if hit.duplicates else ""
            print(
                f"  {rank:2d}. {hit.score:6.3f}  {p.id:10s} {p.title:30.30s} {p.brand:12.12s} "
                f"{p.price:8.2f} {p.currency}{dup}"
            )
    print("\ntimings: " + ", ".join(f"{t.stage} {t.ms:.1f} ms" for t in resp.timings))


def cmd_triton(args) -> int:
    from gateway.tritonserver import TritonServer

    s = _settings()
    server = TritonServer(
        repository=Path(args.repository or s.model_repository),
        http_port=s.triton_http_port,
        grpc_port=s.triton_grpc_port,
        metrics_port=s.triton_metrics_port,
        work_dir=s.data_dir / "triton",
    )
    log = open(args.log, "a") if args.log else None
    t0 = time.monotonic()
    server.start(timeout_s=args.timeout, log_file=log)
    print(
        f"tritonserver ready in {time.monotonic() - t0:.1f}s (gRPC :{s.triton_grpc_port}, "
        f"HTTP :{s.triton_http_port}, metrics :{s.triton_metrics_port}); Ctrl-C stops it",
        flush=True,
    )
    # Triton runs in its own process group (so a terminal's Ctrl-C reaches us first); make
    # SIGTERM stop it too, or a supervisor's stop would orphan the server.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    try:
        while server.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return server.process.returncode or 0


def cmd_serve(args) -> int:
    from gateway.observability import setup_logging
    from gateway.server import serve

    setup_logging(args.log_level)
    asyncio.run(serve(_settings()))
    return 0


def cmd_index(args) -> int:
    from gateway.embedder import TritonEmbedder
    from gateway.indexer import Indexer, index_catalog, resolve_space
    from gateway.ingest.events import snapshot_seq
    from gateway.server import open_index

    s = _settings()
    as_of = snapshot_seq(args.catalog, args.as_of)  # a missing file or bad --as-of: said first

    async def run():
        embedder = TritonEmbedder(s.triton_url)
        index = open_index(s)
        try:
            space = await resolve_space(embedder, args.model, args.version)
            print(f"indexing {args.catalog} into {space.index_name} ({space})", file=sys.stderr)
            indexer = Indexer(embedder, index, space, batch_size=args.batch_size)
            report = await index_catalog(
                Path(args.catalog),
                indexer,
                progress=not args.quiet,
                as_of_seq=as_of,
                fetch_timeout_s=s.fetch_timeout_s,
            )
            if await index.optimize(space):
                print(f"optimised {space.index_name} for search (ANN index built)", file=sys.stderr)
            return report
        finally:
            await embedder.close()
            await index.close()

    report = asyncio.run(run())
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in report.stage_s.items())
    print(
        f"indexed {report.written} products ({report.embedded} embedded, {report.unchanged} unchanged) "
        f"in {report.wall_s:.1f}s [{stages}]; {len(report.failed)} failed"
    )
    for where, error in report.failed[:20]:
        print(f"  {where}: {error}")
    return 1 if report.failed and not report.written else 0


def cmd_ingest_worker(args) -> int:
    import redis.asyncio as redis
    from prometheus_client import start_http_server

    from gateway.dedup import DedupSettings
    from gateway.embedder import TritonEmbedder
    from gateway.indexer import Indexer, resolve_space
    from gateway.ingest.fetch import FetchPolicy
    from gateway.ingest.worker import IngestWorker, WorkerSettings, run_until_signalled
    from gateway.observability import setup_logging
    from gateway.server import open_index

    s = _settings()
    setup_logging(args.log_level)

    async def run():
        client = redis.from_url(s.redis_url, socket_timeout=10, socket_connect_timeout=3)
        embedder = TritonEmbedder(s.triton_url)
        index = open_index(s)
        try:

            async def space():  # retried by the worker until Triton has a READY version
                return await resolve_space(embedder, s.embedding_model, None)

            def make_indexer(target):
                return Indexer(
                    embedder,
                    index,
                    target,
                    batch_size=s.ingest_batch_size,
                    source="ingest",
                )

            policy = FetchPolicy.from_settings(s)
            worker = IngestWorker(
                client,
                make_indexer,
                index,
                space,
                policy,
                WorkerSettings(
                    batch_size=s.ingest_batch_size,
                    claim_idle_ms=s.ingest_claim_idle_ms,
                    max_tries=s.ingest_max_tries,
                    trim_every_s=s.ingest_trim_every_s,
                    drain_timeout_s=s.ingest_drain_timeout_s,
                    dead_letters_max=s.ingest_dead_letters_max,
                    consumer_idle_s=s.ingest_consumer_idle_s,
                    compact_every_s=s.ingest_compact_every_s,
                    compact_unindexed_rows=s.ingest_compact_unindexed_rows,
                    compact_fragments=s.ingest_compact_fragments,
                    dedup=DedupSettings(s.dedup_image_threshold, s.dedup_title_threshold)
                    if s.dedup_on_ingest
                    else None,
                ),
                consumer=args.consumer,
            )
            await run_until_signalled(worker.run)
        finally:
            await embedder.close()
            await index.close()
            await client.aclose()

    if s.worker_metrics_port:
        start_http_server(s.worker_metrics_port)
    asyncio.run(run())
    return 0


def cmd_publish(args) -> int:
    import redis

    from gateway.ingest.events import STREAM, upsert_event

    # The whole file is read and checked first: a bad line publishes nothing, rather than the
    # lines before it (the workers judge each event; this only refuses what is not JSON).
    events, bad = [], []
    with open(args.file, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as exc:
                bad.append(f"line {number}: not JSON ({exc})")
                continue
            if not isinstance(doc, dict):
                bad.append(f"line {number}: not a JSON object")
                continue
            events.append(json.dumps(upsert_event(doc) if args.as_upserts else doc))
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(f"{args.file}: {len(bad)} bad line(s), nothing published: {shown}")
    client = redis.Redis.from_url(_settings().redis_url, socket_timeout=10)
    for start in range(0, len(events), 500):
        pipe = client.pipeline(transaction=False)
        for event in events[start : start + 500]:
            pipe.xadd(STREAM, {"event": event})
        pipe.execute()
    print(f"published {len(events)} events to {STREAM}")
    return 0


def cmd_models(args) -> int:
    from gateway.embedder import TritonEmbedder
    from gateway.errors import FailedPrecondition
    from gateway.models import Swap, TritonModels, drop_index, restore, rollback
    from gateway.server import open_index

    s = _settings()

    async def run():
        index = open_index(s)
        embedder = TritonEmbedder(s.triton_url)
        models = TritonModels(s.triton_url, s.model_repository, args.model)
        try:
            if args.action == "status":
                loaded = await models.loaded()
                print(f"model {args.model}: exported versions {models.on_disk()} in {s.model_repository}")
                for name, versions in loaded.items():
                    print(f"  Triton {name:24s} loaded {versions}")
                target = await index.alias_target()
                print(f"alias {index.alias} -> {target} (previous: {await index.previous_target()})")
                writes = [w.index_name for w in await index.write_targets()]
                for name, space in (await index.indexes()).items():
                    mark = "*" if name == target else ("+" if name in writes else " ")
                    print(f"  {mark} {name:28s} {space}  {await index.count(space)} products")
                print("  (* serving, + also written by live ingestion)")
            elif args.action == "activate":
                if args.version is None or not args.catalog:
                    raise ValueError("activate needs --version and --catalog")
                if args.no_catch_up or not s.swap_catch_up:
                    # No live ingestion, hence no Redis: no job record and no cross-process lock.
                    swap = Swap(
                        index,
                        embedder,
                        models,
                        args.version,
                        progress=not args.quiet,
                        fetch_timeout_s=s.fetch_timeout_s,
                    )
                    targets = [w.index_name for w in await index.write_targets()]
                    indexes, alias = set(await index.indexes()), await index.alias_target()
                    loaded = (await models.loaded())[f"{args.model}_image"]
                    try:
                        await swap.prepare()
                        await swap.reindex(Path(args.catalog))
                        await swap.validate(Path(args.catalog), args.min_overlap, args.force)
                    except BaseException:  # before the alias moves: back to how it was, as a job does
                        new = swap.report.new.index_name if swap.report else ""
                        await restore(index, models, alias, targets, indexes, loaded, new)
                        raise
                    await swap.switch(args.grace_s)
                    r = swap.report
                    print(
                        f"activated {r.new}: reindex {r.reindex_s:.1f}s, counts {r.counts}, "
                        f"{r.failed} failed, "
                        f"overlap {r.overlap if r.overlap is None else round(r.overlap, 3)}; "
                        f"total {r.steps[-1][1]:.1f}s"
                    )
                else:
                    # The same job as the Admin API's: one swap at a time across all processes,
                    # visible in ModelStatus, rolled back on failure or Ctrl-C.
                    from gateway.jobs import Jobs

                    jobs = Jobs(s, index, embedder)
                    try:
                        job = await jobs.start(
                            args.model, args.version, Path(args.catalog), args.grace_s, args.min_overlap,
                            args.force, progress=not args.quiet,
                        )  # fmt: skip
                        job = await jobs.wait(job.id)
                    finally:
                        await jobs.shutdown(60.0)
                    if job.state != "succeeded":
                        raise FailedPrecondition(f"activation {job.state}: {job.error}")
                    r = job.result
                    print(
                        f"activated {r['space']['model']} v{r['space']['version']}: reindex "
                        f"{r['reindex_s']:.1f}s, {r['products']} products, {r.get('failed', 0)} failed, "
                        f"overlap {round(r['overlap'], 3)} "
                        f"(job {job.id})"
                    )
            elif args.action == "drop":
                if args.version is None:
                    raise ValueError("drop needs --version")
                name = f"products-{args.model}-v{args.version}"
                spaces = await index.indexes()
                if name not in spaces:
                    raise FailedPrecondition(f"no index {name} (indexes: {', '.join(spaces) or 'none'})")
                await drop_index(index, spaces[name])
                print(f"dropped {name}")
            else:
                space = await rollback(index, models)
                print(f"rolled back: alias {index.alias} -> {space.index_name}")
        finally:
            await models.close()
            await embedder.close()
            await index.close()

    asyncio.run(run())
    return 0


def cmd_dedup(args) -> int:
    from gateway.dedup import run_dedup

    s = _settings().model_copy(
        update={"dedup_image_threshold": args.image_threshold, "dedup_title_threshold": args.title_threshold}
    )
    r = asyncio.run(run_dedup(s, full=args.full, progress=not args.quiet))
    print(
        f"dedup ({r.mode}): {r.listings} listings in {r.items} items ({r.grouped_items} with several "
        f"listings); {r.written} listings given an item; {r.pairs_confirmed} pairs joined, "
        f"{r.pairs_refused} refused by the all-pairs check; {r.wall_s:.1f}s"
    )
    return 0


def cmd_calibrate_dedup(args) -> int:
    from dataclasses import asdict

    from gateway.calibrate import calibrate_dedup

    space, result = asyncio.run(
        calibrate_dedup(
            _settings(), args.world, args.model, args.version, args.quantile, apply=not args.dry_run
        )
    )
    if args.json:
        print(json.dumps({"space": space.record(), **asdict(result)}))
    else:
        print(f"{space}: {result.summary()}")
        print("recorded with the index" if not args.dry_run else "dry run: nothing recorded")
    return 0


def cmd_match_looks(args) -> int:
    from gateway.ingest.events import snapshot_seq
    from gateway.offline.job import MatchOptions, match_looks

    if not args.stale and not args.manifest:
        raise ValueError("match-looks: give a MANIFEST.jsonl, or --stale")
    if args.manifest and not Path(args.manifest).is_file():
        raise ValueError(f"match-looks: {args.manifest}: no such file")
    options = MatchOptions(
        manifest=Path(args.manifest) if args.manifest else None,
        stale=args.stale,
        before=snapshot_seq("", args.before) if args.before else None,
        enqueue=args.enqueue,
        resume=not args.no_resume,
        progress=not args.quiet,
        failures_path=Path(args.failures) if args.failures else None,
    )
    report, summary = asyncio.run(match_looks(_settings(), options))
    if args.json:
        print(
            json.dumps(
                {
                    "looks": report.looks,
                    "skipped": report.skipped,
                    "matched": report.matched,
                    "failed": {k: {"reason": f.reason, "detail": f.detail} for k, f in report.failed.items()},
                    "retries": report.retries,
                    "wall_s": round(report.wall_s, 3),
                    "looks_per_s": round(report.looks_per_s, 2),
                    "batch_sizes": report.batch_sizes,
                    "stages_mean_ms": report.stages_mean_ms,
                }
            )
        )
    else:
        print(summary)
    return 0


def cmd_match_worker(args) -> int:
    from prometheus_client import start_http_server

    from gateway.observability import setup_logging
    from gateway.offline.job import match_worker

    s = _settings()
    setup_logging(args.log_level)
    if s.worker_metrics_port:
        start_http_server(s.worker_metrics_port)
    asyncio.run(match_worker(s, args.consumer))
    return 0


def cmd_get_look(args) -> int:
    image = Path(args.image).read_bytes() if args.image else b""
    with _client(args) as client:
        resp = client.get_look_matches(
            args.look_id, k_per_layer=args.k, filters=_filters(args), image=image, space=_space(args)
        )
    if args.json:
        _print_response(resp, True)
        return 0
    _print_look(resp)
    return 0


def cmd_sample_catalog(args) -> int:
    from clients.sample_catalog import generate

    path = generate(Path(args.out), n=args.n, seed=args.seed)
    print(path)
    return 0


def cmd_demo(args) -> int:
    from clients.demo import run_demo

    return run_demo(keep_running=args.keep_running)


def cmd_admin(args) -> int:
    """The gateway's Admin service over gRPC (status, activate, job, cancel, rollback), for
    operators who reach the gateway but not Triton or the index."""
    from google.protobuf.json_format import MessageToJson

    with _client(args) as client:
        if not client.tls:
            print(
                "warning: the Admin token goes over a plaintext channel (use --tls or --ca-file)",
                file=sys.stderr,
            )
        if args.action == "status":
            resp = client.model_status(args.model)
        elif args.action == "rollback":
            resp = client.rollback_model(args.model)
        elif args.action == "job":
            resp = client.get_job(args.job_id)
        elif args.action == "cancel":
            resp = client.cancel_job(args.job_id)
        else:
            if args.version is None or not args.catalog:
                raise ValueError(
                    "admin activate needs --version and --catalog (in the gateway's catalog directory)"
                )
            started = client.activate_model(
                args.version, args.catalog, args.model, args.grace_s, args.min_overlap, args.force
            )
            if args.no_wait:
                resp = started
            else:
                print(f"job {started.job_id} started", file=sys.stderr)
                seen = [None]

                def show(job):
                    line = f"[job {job.id}] {job.state} {job.stage}" + (
                        f" {job.done}/{job.total}" if job.total else ""
                    )
                    if line != seen[0]:
                        print(line, file=sys.stderr, flush=True)
                        seen[0] = line

                resp = client.wait_job(started.job_id, on_update=show)
                if resp.state != "succeeded":
                    print(MessageToJson(resp, preserving_proto_field_name=True))
                    raise ValueError(f"job {resp.id} {resp.state}: {resp.error or resp.stage}")
    print(MessageToJson(resp, preserving_proto_field_name=True))
    return 0


def cmd_loadtest(args) -> int:
    from clients.loadtest import run_cli

    return run_cli(args, address=args.gateway or _settings().gateway_url, filters=_filters(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="looksync", description="LookSync: match looks to products")
    parser.add_argument("--version", action="version", version=f"looksync {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("triton", help="start Triton on the CPU target and wait until ready")
    p.add_argument("--repository", help="model repository (default LOOKSYNC_MODEL_REPOSITORY)")
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--log", help="append Triton's log to this file")
    p.set_defaults(func=cmd_triton)

    p = sub.add_parser("serve", help="run the gRPC gateway")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("index", help="embed and index a catalog (JSON Lines)")
    p.add_argument("catalog")
    p.add_argument("--version", type=int, help="model version (default: newest ready in Triton)")
    p.add_argument(
        "--model",
        default=_settings().embedding_model,
        help="embedding model (space) to index with; each gets its own index, the first becomes the alias's",
    )
    p.add_argument("--batch-size", type=int, default=_settings().index_batch_size)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--as-of",
        help="when the catalog snapshot was taken (stream id or ISO time; default: the file's mtime): "
        "stream events newer than this are never undone by the file",
    )
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search-text", help="search products by text")
    p.add_argument("text")
    _add_filters(p)
    p.set_defaults(func=cmd_search_text)

    p = sub.add_parser("search-image", help="search products by an image (and optional text)")
    p.add_argument("image")
    p.add_argument("--text", default="", help="text modifier, e.g. 'in red'")
    p.add_argument("--text-weight", type=float, default=0.0)
    _add_filters(p)
    p.set_defaults(func=cmd_search_image)

    p = sub.add_parser("search-look", help="products for each garment layer of a look image")
    p.add_argument("image")
    _add_filters(p)
    p.set_defaults(func=cmd_search_look)

    p = sub.add_parser("ingest-worker", help="consume catalog events from Redis Streams into the index")
    p.add_argument("--consumer", help="consumer name (default host-pid)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_ingest_worker)

    p = sub.add_parser("publish", help="publish catalog events (JSON Lines) to the catalog-updates stream")
    p.add_argument("file")
    p.add_argument(
        "--as-upserts",
        action="store_true",
        help="the file holds catalog records: wrap each in product.upsert",
    )
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("models", help="model versions: status | activate | rollback | drop")
    p.add_argument("action", choices=["status", "activate", "rollback", "drop"])
    p.add_argument("--model", default=_settings().embedding_model)
    p.add_argument(
        "--version", type=int, help="activate: the new version (exported already); drop: the index to delete"
    )
    p.add_argument("--catalog", help="activate: the catalog (JSON Lines) to re-embed")
    p.add_argument("--grace-s", type=float, default=60.0, help="keep the old version loaded this long")
    p.add_argument("--min-overlap", type=float, default=0.5, help="golden-query overlap@10 required")
    p.add_argument("--force", action="store_true", help="swap even if validation fails")
    p.add_argument(
        "--no-catch-up",
        action="store_true",
        help="activate: no live ingestion (skip re-applying stream updates published during the rebuild)",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "admin",
        help="the gateway's Admin RPCs: status | activate | job | cancel | rollback (needs the token)",
    )
    p.add_argument("action", choices=["status", "activate", "job", "cancel", "rollback"])
    p.add_argument("--job-id", default="", help="job | cancel: the job (default: the latest)")
    p.add_argument("--no-wait", action="store_true", help="activate: print the job and return at once")
    p.add_argument("--model", default="", help="default: the gateway's embedding model")
    p.add_argument("--version", type=int, help="activate: the new version (exported already)")
    p.add_argument("--catalog", help="activate: the catalog file, in the gateway's catalog directory")
    p.add_argument("--grace-s", type=float, default=60.0)
    p.add_argument("--min-overlap", type=float, default=0.5)
    p.add_argument("--force", action="store_true")
    _add_connection(p)
    p.set_defaults(func=cmd_admin)

    p = sub.add_parser(
        "dedup", help="group listings of the same item across retailers (incremental; --full regroups)"
    )
    p.add_argument("--full", action="store_true", help="regroup the whole catalog")
    p.add_argument(
        "--image-threshold",
        type=float,
        default=_settings().dedup_image_threshold,
        help="image cosine a pair needs (LOOKSYNC_DEDUP_IMAGE_THRESHOLD)",
    )
    p.add_argument(
        "--title-threshold",
        type=float,
        default=_settings().dedup_title_threshold,
        help="title word overlap (Jaccard) a pair needs (LOOKSYNC_DEDUP_TITLE_THRESHOLD)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_dedup)

    p = sub.add_parser(
        "calibrate-dedup",
        help="measure an embedding space's near-duplicate threshold and record it with its index",
    )
    p.add_argument("--world", type=Path, help="a world with planted duplicates (default: one is generated)")
    p.add_argument("--model", help="the space's model (default: the one the alias serves)")
    p.add_argument("--version", type=int, help="with --model: its version (default: its newest index)")
    p.add_argument(
        "--quantile", type=float, default=0.995, help="share of distinct products kept below the threshold"
    )
    p.add_argument("--dry-run", action="store_true", help="measure and print; record nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate_dedup)

    p = sub.add_parser(
        "match-looks",
        help="match a manifest of looks offline (here, or --enqueue for match-worker); --stale re-matches",
    )
    p.add_argument(
        "manifest", nargs="?", help='JSON Lines: {"look_id", "image" (path or URL), "filters"?, "keep"?}'
    )
    p.add_argument("--stale", action="store_true", help="the stored looks of another space (or --before)")
    p.add_argument(
        "--before",
        help="a catalog position (stream id <ms>-<n> or ISO time): looks matched before it are stale",
    )
    p.add_argument("--enqueue", action="store_true", help="queue the looks for `looksync match-worker`")
    p.add_argument("--no-resume", action="store_true", help="match every look, even those already stored")
    p.add_argument(
        "--failures", help="where to write failed looks (default <data_dir>/look-match-failures.jsonl)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_match_looks)

    p = sub.add_parser("match-worker", help="match queued looks (Redis Streams consumer group)")
    p.add_argument("--consumer", help="consumer name (default host-pid)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_match_worker)

    p = sub.add_parser("get-look", help="a look matched offline, by id (GetLookMatches)")
    p.add_argument("look_id")
    p.add_argument("--image", help="the look's image: searched online if the look is not stored")
    _add_filters(p)
    p.set_defaults(func=cmd_get_look)

    p = sub.add_parser("sample-catalog", help="generate the synthetic sample catalog")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_sample_catalog)

    p = sub.add_parser("demo", help="export, serve, index and search the sample catalog end to end")
    p.add_argument("--keep-running", action="store_true", help="leave Triton and the gateway up")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("loadtest", help="drive the gateway at a concurrency or rate; latency percentiles")
    _add_filters(p)  # filters, -k, --gateway, and --json (print the report as JSON)
    from clients.loadtest import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_loadtest)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    except LookSyncError as exc:  # refused or unavailable: one line, not a traceback
        print(f"error: {exc.code.name}: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # a missing file, a bad option value: one line too
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
