"""The commands of offline look matching: `looksync match-looks` and `looksync match-worker`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.errors import FailedPrecondition
from gateway.offline.matcher import (
    Failure,
    JobReport,
    LookMatcher,
    pending_looks,
    read_manifest,
    run_looks,
    stale_looks,
    write_failures,
)


@dataclass
class MatchOptions:
    manifest: Path | None = None
    stale: bool = False
    before: int | None = None  # --stale / resume: catalog position (event_seq)
    enqueue: bool = False  # send to the workers' stream instead of matching here
    resume: bool = True
    progress: bool = True
    failures_path: Path | None = None


def _redis(settings):
    import redis.asyncio as redis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError, TimeoutError

    return redis.from_url(
        settings.redis_url,
        socket_timeout=10,
        socket_connect_timeout=3,
        retry=Retry(ExponentialBackoff(cap=5, base=0.2), 5),
        retry_on_error=[ConnectionError, TimeoutError],
    )


async def match_looks(settings, options: MatchOptions) -> tuple[JobReport, str]:
    """Select the looks (a manifest's, or the stored ones that are stale), skip those already
    matched, then match them here or queue them for `looksync match-worker`."""
    from gateway.embedder import TritonEmbedder
    from gateway.server import open_index

    index = open_index(settings)
    embedder = TritonEmbedder(settings.triton_url)
    report = JobReport()
    try:
        space = await index.space()
        if space is None:
            raise FailedPrecondition("the catalog index is empty: run `looksync index CATALOG.jsonl` first")
        bad: dict[str, Failure] = {}
        if options.stale:
            looks = await stale_looks(index, space, options.before)
        else:
            looks, bad = read_manifest(options.manifest, settings.match_keep, settings.max_k_per_layer)
        report.looks = len(looks)
        todo = (
            await pending_looks(index, space, looks, options.before)
            if options.resume and not options.stale
            else looks
        )
        report.skipped = len(looks) - len(todo)
        if options.enqueue:
            from gateway.offline.worker import enqueue

            client = _redis(settings)
            try:
                await enqueue(client, todo, "stale" if options.stale else "manifest")
            finally:
                await client.aclose()
            report.failed.update(bad)
            where = _write_failures(report, options, settings)
            return report, f"queued {len(todo)} looks for the match workers{where}"
        matcher = LookMatcher(settings, index, embedder, window_s=settings.match_window_ms / 1000)
        await run_looks(
            matcher,
            todo,
            report,
            batch_looks=settings.match_batch_looks,
            max_tries=settings.match_max_tries,
            progress=options.progress,
        )
        report.failed.update(bad)
        where = _write_failures(report, options, settings)
        return report, f"space {space}: {report.summary()}{where}"
    finally:
        await embedder.close()
        await index.close()


def _write_failures(report, options, settings) -> str:
    """This run's failures, replacing the last run's (an empty file when there were none, so
    that what it says is never an earlier job's); the summary's note."""
    path = options.failures_path or settings.data_dir / "look-match-failures.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_failures(path, report.failed)
    return f"; failures in {path}" if report.failed else ""


async def match_worker(settings, consumer: str | None = None) -> None:
    from gateway.embedder import TritonEmbedder
    from gateway.ingest.worker import run_until_signalled
    from gateway.offline.worker import MatchWorker
    from gateway.server import open_index

    index = open_index(settings)
    embedder = TritonEmbedder(settings.triton_url)
    client = _redis(settings)
    try:
        matcher = LookMatcher(settings, index, embedder, window_s=settings.match_window_ms / 1000)
        worker = MatchWorker(
            client,
            matcher,
            batch_looks=settings.match_batch_looks,
            claim_idle_ms=settings.match_claim_idle_ms,
            max_tries=settings.match_max_tries,
            consumer=consumer,
        )
        await run_until_signalled(worker.run)
    finally:
        await embedder.close()
        await index.close()
        await client.aclose()
