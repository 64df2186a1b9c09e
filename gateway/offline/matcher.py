"""Offline look matching: SearchLook's pipeline run for many looks at once, results stored.

    manifest (JSON Lines) -> LookRequest per line (bad lines: failures, never the end of the job)
        -> already matched in this space, same request?  skip (resumable)
        -> LookMatcher: images read, the same LookSearcher as SearchLook, many looks in flight,
           their Triton calls merged (gateway/offline/batching.py)
        -> LookMatches per look, written to the index backend (gateway/index/look_matches.py)

`run_manifest` is the single-machine job (`looksync match-looks`); the Redis Streams worker
(gateway/offline/worker.py) feeds the same LookMatcher from a consumer group.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter as Tally
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from gateway.cache import NoCache
from gateway.errors import DeadlineExceeded, InvalidArgument, LookSyncError, ModelNotLoaded, Unavailable
from gateway.filters import build_filters
from gateway.index.base import CatalogIndex, EmbeddingSpace
from gateway.index.embedded import wall_clock_seq
from gateway.ingest.fetch import FetchError, FetchPolicy, fetch
from gateway.look.stored import to_stored
from gateway.observability import log
from gateway.offline.batching import CoalescingEmbedder, CoalescingIndex
from gateway.offline.record import LookMatches, LookRequest
from gateway.search import Deadline

logger = logging.getLogger("looksync.offline")
MATCHED = Counter("looksync_match_looks_total", "Looks matched offline", ["outcome"])
FAILURES = Counter("looksync_match_failures_total", "Looks whose matching failed", ["reason"])
STAGES = Histogram(
    "looksync_match_stage_seconds",
    "Per-look pipeline stage time in offline matching",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LAST_COMPUTED = Gauge("looksync_match_last_computed_unix", "When the newest stored look match was computed")

FILTER_KEYS = {"categories", "gender", "market", "brands", "sizes", "min_price", "max_price", "in_stock_only"}
# Reasons a look will never match however often it is tried: recorded and not retried.
PERMANENT = {
    "invalid_request",
    "invalid_image",
    "fetch_bad_url",
    "fetch_bad_redirect",
    "fetch_too_many_redirects",
    "fetch_not_found",
    "fetch_too_large",
    "fetch_not_image",
    "fetch_forbidden_scheme",
    "fetch_forbidden_host",
    "fetch_forbidden_address",
    "fetch_forbidden_path",
}
# HTTP answers that say the image is not there and will not be (a 503 may pass).
GONE = ("HTTP 404 ", "HTTP 410 ")


@dataclass
class Failure:
    reason: str
    detail: str

    @property
    def permanent(self) -> bool:
        return self.reason in PERMANENT or (
            self.reason == "fetch_http_status" and any(code in self.detail for code in GONE)
        )


@dataclass
class MatchOutcome:
    records: list[LookMatches] = field(default_factory=list)
    failures: dict[str, Failure] = field(default_factory=dict)  # look id -> why


def parse_manifest_line(line: str, base: Path | None, keep: int, max_keep: int) -> LookRequest:
    """One manifest line: {"look_id", "image" (path or URL), optional "filters" (as the
    Filters message: categories, gender, market, brands, sizes, min_price, max_price,
    in_stock_only), optional "market" (shorthand), optional "keep"}. InvalidArgument names
    what is wrong."""
    try:
        doc = json.loads(line)
    except ValueError as exc:
        raise InvalidArgument(f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("a line must be a JSON object")
    look_id, image = doc.get("look_id"), doc.get("image")
    if not isinstance(look_id, str) or not look_id.strip() or len(look_id) > 256:
        raise InvalidArgument("look_id: a non-empty string of at most 256 characters is required")
    if not isinstance(image, str) or not image.strip():
        raise InvalidArgument(f"look {look_id!r}: image (a path or an http(s) URL) is required")
    filters = doc.get("filters")
    filters = {} if filters is None else filters
    if not isinstance(filters, dict):
        raise InvalidArgument(f"look {look_id!r}: filters must be an object")
    if doc.get("market") and not filters.get("market"):
        filters = {**filters, "market": doc["market"]}
    unknown = set(filters) - FILTER_KEYS
    if unknown:
        raise InvalidArgument(f"look {look_id!r}: unknown filter {sorted(unknown)[0]!r}")
    try:
        build_filters(**filters)
    except InvalidArgument as exc:
        raise InvalidArgument(f"look {look_id!r}: {exc}") from None
    want = doc.get("keep", keep)
    if not isinstance(want, int) or isinstance(want, bool) or not 1 <= want <= max_keep:
        raise InvalidArgument(f"look {look_id!r}: keep {want!r} is out of range 1..{max_keep}")
    if "://" not in image and base is not None and not Path(image).is_absolute():
        image = str((base / image).resolve())  # workers elsewhere get a path they can open
    return LookRequest(look_id.strip(), image, filters, want)


def read_manifest(path: Path, keep: int, max_keep: int) -> tuple[list[LookRequest], dict[str, Failure]]:
    """The manifest's looks, and its bad lines as failures (keyed `line N` when the line has
    no usable look id). A look id given twice: the last line wins."""
    looks: dict[str, LookRequest] = {}
    bad: dict[str, Failure] = {}
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:  # a look id must not change under our hands
                    raise InvalidArgument(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
                req = parse_manifest_line(line, path.parent, keep, max_keep)
            except InvalidArgument as exc:
                bad[f"line {n}"] = Failure("invalid_request", f"line {n}: {exc}")
                continue
            looks.pop(req.look_id, None)
            looks[req.look_id] = req
    return list(looks.values()), bad


class LookMatcher:
    """SearchLook's LookSearcher with merged Triton calls and no result cache (every look is
    computed, and a batch never fills the gateway's cache)."""

    def __init__(self, settings, index: CatalogIndex, embedder, window_s: float = 0.01):
        from gateway.server import build_look_searcher

        self.settings = settings
        self.index = index
        self.embedder = CoalescingEmbedder(embedder, window_s=window_s)
        self.searches = CoalescingIndex(index, window_s=window_s)
        self.searcher = build_look_searcher(settings, self.embedder, self.searches)
        self.searcher.result_cache = NoCache()
        # URLs only: a manifest's local paths are the operator's own and read directly.
        self.policy = FetchPolicy.from_settings(
            settings, max_bytes=settings.max_request_bytes, local_dir=None
        )
        self.look_timeout_s = max(settings.request_timeout_s, 60.0)
        self.stage_ms: Tally = Tally()  # summed per-look stage times (latency, waits included)
        self.looks = 0

    async def space(self) -> EmbeddingSpace:
        space = await self.index.space()
        if space is None:
            raise Unavailable("the catalog index is empty: run `looksync index CATALOG.jsonl` first")
        return space

    async def _image(self, ref: str) -> bytes:
        if "://" in ref:
            return await fetch(ref, self.policy)
        path = Path(ref)
        try:  # the manifest is the operator's own: its local paths are read as they are
            if path.stat().st_size > self.settings.max_request_bytes:
                raise FetchError("too_large", f"{ref}: over {self.settings.max_request_bytes} bytes")
            return await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise FetchError("not_found", f"{ref}: {exc.strerror or exc}") from None

    async def _one(self, req: LookRequest, space: EmbeddingSpace, position: int) -> LookMatches | Failure:
        try:
            image = await self._image(req.image)
            result = await self.searcher.search_look(
                image, build_filters(**req.filters), req.keep, Deadline.after(self.look_timeout_s), space
            )
        except FetchError as exc:
            return Failure(f"fetch_{exc.reason}", str(exc))
        except InvalidArgument as exc:
            return Failure("invalid_image", str(exc))
        except (Unavailable, ModelNotLoaded) as exc:  # a dependency: Triton (or its model), the index
            return Failure("unavailable", str(exc))
        except DeadlineExceeded as exc:  # this look was too slow: counted against its tries
            return Failure("deadline", str(exc))
        except LookSyncError as exc:
            return Failure(type(exc).__name__, str(exc))
        except Exception as exc:  # one look's surprise never ends the batch
            logger.exception("look %s failed", req.look_id)
            return Failure("internal_error", f"{type(exc).__name__}: {exc}"[:300])
        for stage, ms in result.timings.stages:
            STAGES.labels(stage).observe(ms / 1000)
            self.stage_ms[stage] += ms
        self.looks += 1
        return LookMatches(req.look_id, result.space, time.time(), position, req, to_stored(result.layers))

    async def match(self, requests: list[LookRequest]) -> MatchOutcome:
        """Match the looks concurrently (their Triton calls merged) and store the results in
        one write. Raises Unavailable when the index, Triton or its model was down for any of
        them (the caller waits and retries the batch); per-look failures come back in the
        outcome."""
        space = await self.space()
        position = wall_clock_seq()
        results = await asyncio.gather(*(self._one(r, space, position) for r in requests))
        out = MatchOutcome()
        for req, result in zip(requests, results):
            if isinstance(result, Failure):
                out.failures[req.look_id] = result
            else:
                out.records.append(result)
        down = [f for f in out.failures.values() if f.reason == "unavailable"]
        # A swap during the batch: its answers belong to the old space and must not replace
        # answers of the new one; they are matched again (in the new space).
        now = await self.index.space()
        if now is not None and (now.model, now.version) != (space.model, space.version):
            for r in out.records:
                out.failures[r.look_id] = Failure("space_changed", f"matched in {space}, now {now} serves")
            out.records = []
        await self.index.look_matches.put(out.records)
        if down:
            # A dependency is down: the caller waits and runs the batch again (what was matched
            # is stored; matching it again writes the same record), spending no look's tries.
            raise Unavailable(down[0].detail)
        for failure in out.failures.values():
            FAILURES.labels(failure.reason).inc()
        MATCHED.labels("matched").inc(len(out.records))
        if out.records:
            LAST_COMPUTED.set(max(r.computed_at for r in out.records))
        return out


async def pending_looks(
    index: CatalogIndex, space: EmbeddingSpace, looks: list[LookRequest], min_position: int | None = None
) -> list[LookRequest]:
    """The looks not yet matched for this request in this space (at or after min_position)."""
    todo = []
    for start in range(0, len(looks), 500):
        chunk = looks[start : start + 500]
        stored = await index.look_matches.get([r.look_id for r in chunk], strong=True)
        for req in chunk:
            rec = stored.get(req.look_id)
            fresh = (
                rec is not None
                and rec.in_space(space)
                and rec.request.digest() == req.digest()
                and (min_position is None or rec.catalog_position >= min_position)
            )
            if not fresh:
                todo.append(req)
    return todo


async def stale_looks(
    index: CatalogIndex, space: EmbeddingSpace, before: int | None = None
) -> list[LookRequest]:
    """Stored looks matched in another space, or before a catalog position: their requests."""
    out = []
    async for batch in index.look_matches.scan():
        for rec in batch:
            if not rec.in_space(space) or (before is not None and rec.catalog_position < before):
                out.append(rec.request)
    return out


@dataclass
class JobReport:
    looks: int = 0  # in the manifest (or selected as stale)
    skipped: int = 0  # already matched (resume)
    matched: int = 0
    failed: dict[str, Failure] = field(default_factory=dict)
    retries: int = 0
    wall_s: float = 0.0
    batch_sizes: dict[str, dict[str, float]] = field(default_factory=dict)  # CoalescingEmbedder.stats
    stages_mean_ms: dict[str, float] = field(default_factory=dict)

    @property
    def looks_per_s(self) -> float:
        return self.matched / self.wall_s if self.wall_s else 0.0

    def summary(self) -> str:
        reasons = Tally(f.reason for f in self.failed.values())
        failed = ", ".join(f"{n} {r}" for r, n in reasons.most_common()) or "none"
        return (
            f"{self.matched} looks matched, {self.skipped} already matched, failed: {failed}; "
            f"{self.wall_s:.1f}s ({self.looks_per_s:.1f} looks/s)"
        )


async def run_looks(
    matcher: LookMatcher,
    looks: list[LookRequest],
    report: JobReport,
    batch_looks: int = 32,
    max_tries: int = 3,
    progress: bool = True,
    retry_pause_s: float = 1.0,
) -> JobReport:
    """Match `looks` in batches, two batches in flight (one computing while the other is
    written); failures that may pass later are retried up to max_tries, after the rest."""
    from tqdm import tqdm

    start = time.perf_counter()
    bar = tqdm(total=len(looks), unit="look", desc="matching looks", disable=not progress)
    tries: Tally = Tally()
    slots = asyncio.Semaphore(2)

    async def batch(chunk: list[LookRequest], again: list[LookRequest]) -> None:
        async with slots:
            wait = retry_pause_s
            while True:
                try:
                    outcome = await matcher.match(chunk)
                    break
                except Unavailable as exc:  # a dependency is down: wait for it, lose nothing
                    log(
                        logger,
                        logging.WARNING,
                        "waiting for a dependency",
                        error=str(exc)[:300],
                        sleep_s=wait,
                    )
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, 10.0)
        report.matched += len(outcome.records)
        bar.update(len(outcome.records))
        for req in chunk:
            failure = outcome.failures.get(req.look_id)
            if failure is None:
                report.failed.pop(req.look_id, None)
                continue
            tries[req.look_id] += 1
            report.failed[req.look_id] = failure
            if not failure.permanent and tries[req.look_id] < max_tries:
                again.append(req)
            else:
                bar.update(1)
                log(logger, logging.WARNING, "look failed", look_id=req.look_id, reason=failure.reason)

    todo, pause = list(looks), retry_pause_s
    while todo:
        again: list[LookRequest] = []
        await asyncio.gather(
            *(batch(todo[i : i + batch_looks], again) for i in range(0, len(todo), batch_looks))
        )
        if again:  # failures that may pass later: once more, after the rest, with a pause
            report.retries += len(again)
            await asyncio.sleep(pause)
            pause *= 2
        todo = again
    bar.close()
    await matcher.index.look_matches.optimize()
    report.wall_s = time.perf_counter() - start
    report.batch_sizes = {**matcher.embedder.stats(), "knn": matcher.searches.stats()}
    report.stages_mean_ms = {k: round(v / max(matcher.looks, 1), 2) for k, v in matcher.stage_ms.items()}
    return report


def write_failures(path: Path, failures: dict[str, Failure]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for look_id, f in failures.items():
            fh.write(json.dumps({"look_id": look_id, "reason": f.reason, "detail": f.detail}) + "\n")
