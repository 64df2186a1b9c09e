"""Model activation as a background job (docs/ARCHITECTURE.md, "Model versions and swaps").

A swap re-embeds the whole catalog: minutes to hours, far longer than any RPC should stay
open. `ActivateModel` therefore starts a job and returns its id; the job's record lives in
Redis, so every gateway (and the CLI) reports the same state:

    looksync:swap-lock:<alias>   the running job's id; SET NX with a TTL the job renews. One
                                 swap at a time across all processes; a dead process's lapses.
    looksync:job:<id>            the job (JSON): state, stage, progress, steps, and the state
                                 from *before* it started (alias target, write targets, loaded
                                 versions), which is what a rollback restores.
    looksync:job-latest:<alias>  the latest job's id.

A job whose record says "running" but whose lock is gone belongs to a process that died: it
reads as "interrupted". Its write targets are still in place, so live ingestion kept the new
index complete: ActivateModel with the same version resumes it (the rebuild skips products
already embedded), RollbackModel or CancelJob restores the state from before it.

The commit point is the alias move. Before it, a failure or a cancel (CancelJob, SIGTERM)
restores the previous state and drops the half-built index (it missed writes once it stopped
being a write target, so it could not be resumed exactly). After it, only the grace period and
the unloading of the old version remain; an interruption there leaves a state that a retry
finishes and a rollback undoes.

A job that finds its lock held by another job (its heartbeat was late past the TTL: a starved
machine, a long Redis outage, and meanwhile another gateway resumed it) stops where it is and
undoes nothing: the state is the other job's now, and restoring "before" would drop the index
that job is building. Its record is left as it was, so it reads as interrupted (or as resumed,
when the other job has said so). The alias move checks the lock first, so a job that lost it
never commits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.embedder import TritonEmbedder
from gateway.errors import FailedPrecondition, InvalidArgument, LookSyncError, Unavailable
from gateway.ingest.events import HOLDS
from gateway.ingest.fetch import FetchPolicy
from gateway.models import Swap, SwapReport, TritonModels, restore, rollback
from gateway.observability import log, redact

logger = logging.getLogger("looksync.jobs")

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"
INTERRUPTED, ROLLED_BACK = "interrupted", "rolled_back"
RECORD_TTL_S = 30 * 24 * 3600

# Renew the lock only if it is still ours; returns 0 when another job holds it now.
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


@dataclass
class Before:
    """What a rollback of the job restores."""

    alias_target: str | None
    write_targets: list[str]
    indexes: list[str]
    loaded: list[int]


@dataclass
class JobRecord:
    id: str
    model: str
    version: int
    catalog_path: str
    before: Before
    kind: str = "activate"
    state: str = RUNNING
    stage: str = "queued"
    done: int = 0
    total: int = 0
    error: str = ""
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    steps: list[str] = field(default_factory=list)
    result: dict = field(default_factory=dict)
    new_index: str = ""  # the index the job builds, once known
    committed: bool = False  # the alias has moved to the new index
    owner: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> JobRecord:
        """A record written by this or another release (unknown keys ignored, missing ones
        defaulted), so that a rolling deploy never makes a job unreadable."""
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        before = data.get("before") or {}
        data["before"] = Before(
            **{k: before.get(k) for k in ("alias_target", "write_targets", "indexes", "loaded")}
        )
        data["before"].write_targets = data["before"].write_targets or []
        data["before"].indexes = data["before"].indexes or []
        data["before"].loaded = data["before"].loaded or []
        return cls(**data)


class Jobs:
    """Starts, runs, reports, cancels and rolls back activation jobs for one gateway."""

    def __init__(self, settings, index, embedder: TritonEmbedder):
        self.settings = settings
        self.index = index
        self.embedder = embedder
        self.lock_key = f"looksync:swap-lock:{index.alias}"
        self.latest_key = f"looksync:job-latest:{index.alias}"
        self.ttl_ms = int(settings.swap_lock_ttl_s * 1000)
        self._running: dict[str, tuple[JobRecord, asyncio.Task]] = {}  # this process's jobs
        self._lost: set[str] = set()  # this process's jobs whose lock another job holds now
        self._redis: aioredis.Redis | None = None
        self._save_lock = asyncio.Lock()  # saves land in order: the last one wins

    # --- Redis ------------------------------------------------------------------------------

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = aioredis.Redis.from_url(
                self.settings.redis_url, socket_timeout=5, socket_connect_timeout=2
            )
        return self._redis

    async def _call(self, what: str, op):
        try:
            return await op
        except (RedisError, OSError) as exc:
            # Never the URL: it may carry a password.
            raise Unavailable(
                f"Redis (activation jobs: {what}) cannot be reached: {type(exc).__name__}"
            ) from None

    async def _save(self, job: JobRecord) -> None:
        async with self._save_lock:
            job.updated = time.time()
            body = job.to_json()
            await self._call("save", self.redis.set(f"looksync:job:{job.id}", body, ex=RECORD_TTL_S))

    async def get(self, job_id: str = "") -> JobRecord | None:
        """The job as every process sees it; "" = the latest one."""
        if not job_id:
            latest = await self._call("read", self.redis.get(self.latest_key))
            if latest is None:
                return None
            job_id = latest.decode()
        raw = await self._call("read", self.redis.get(f"looksync:job:{job_id}"))
        if raw is None:
            return None
        job = JobRecord.from_json(raw)
        if job.state == RUNNING and job.id not in self._running:
            holder = await self._call("read", self.redis.get(self.lock_key))
            if holder is None or holder.decode() != job.id:
                job.state = INTERRUPTED
        return job

    # --- start ------------------------------------------------------------------------------

    def _models(self, model: str) -> TritonModels:
        return TritonModels(self.settings.triton_url, self.settings.model_repository, model)

    async def _snapshot(self, models: TritonModels) -> Before:
        return Before(
            alias_target=await self.index.alias_target(),
            write_targets=[s.index_name for s in await self.index.write_targets()],
            indexes=sorted(await self.index.indexes()),
            loaded=(await models.loaded())[f"{models.model}_image"],
        )

    async def start(
        self,
        model: str,
        version: int,
        catalog: Path,
        grace_s: float,
        min_overlap: float,
        force: bool,
        confine_to: Path | None = None,
        progress: bool = False,
    ) -> JobRecord:
        """Takes the lock and starts the job in this process; `confine_to`: the catalog's local
        images must lie under it (Admin callers); `progress`: print the steps (the CLI)."""
        models = self._models(model)
        try:
            if version not in models.on_disk():
                raise FailedPrecondition(
                    f"{model} version {version} is not exported in the model repository "
                    f"(exported: {models.on_disk()})"
                )
            job = JobRecord(
                id=uuid.uuid4().hex[:16],
                model=model,
                version=version,
                catalog_path=str(catalog),
                before=Before(None, [], [], []),
                owner=f"{socket.gethostname()}:{os.getpid()}",
            )
            # This process's own job refuses a second one even if its lock lapsed for a moment
            # (a heartbeat late on a starved machine): the lock is for the other processes.
            mine = next(iter(self._running), None)  # the id of this process's job, if any
            took = mine is None and await self._call(
                "lock", self.redis.set(self.lock_key, job.id, nx=True, px=self.ttl_ms)
            )
            if not took:
                holder = mine or (await self._call("lock", self.redis.get(self.lock_key)) or b"?").decode()
                running = await self.get(holder)
                what = f"{running.model} v{running.version}, stage {running.stage}" if running else "starting"
                raise FailedPrecondition(
                    f"another activation is running (job {holder}: {what}); one at a time — "
                    "wait for it (GetJob) or cancel it (CancelJob)"
                )
            try:
                previous = await self.get()
                if previous is not None and previous.state == INTERRUPTED:
                    if (previous.model, previous.version) != (model, version):
                        raise FailedPrecondition(
                            f"job {previous.id} ({previous.model} v{previous.version}) was interrupted at "
                            f"stage {previous.stage}: retry that version to finish it, or roll it back "
                            "(RollbackModel or CancelJob) first"
                        )
                    # Resume: the state to restore on failure is the one from before the first try.
                    job.before, job.new_index, job.committed = (
                        previous.before,
                        previous.new_index,
                        previous.committed,
                    )
                    job.steps = [*previous.steps, f"resumed interrupted job {previous.id}"]
                    previous.state, previous.error = FAILED, f"interrupted; resumed as job {job.id}"
                    await self._save(previous)
                else:
                    job.before = await self._snapshot(models)
                await self._save(job)
                await self._call("save", self.redis.set(self.latest_key, job.id))
            except BaseException:
                await self._release(job.id)
                raise
        except BaseException:
            await models.close()
            raise
        task = asyncio.create_task(
            self._run(job, models, catalog, grace_s, min_overlap, force, confine_to, progress)
        )
        self._running[job.id] = (job, task)
        task.add_done_callback(lambda _t: self._running.pop(job.id, None))
        log(logger, logging.INFO, "activation started", job=job.id, model=model, version=version)
        return job

    async def _release(self, job_id: str) -> None:
        try:
            await self.redis.eval(_RELEASE, 1, self.lock_key, job_id)
        except (RedisError, OSError):
            pass  # the lock lapses on its own

    # --- run --------------------------------------------------------------------------------

    async def _heartbeat(self, job: JobRecord, task: asyncio.Task) -> None:
        """Renews the lock, publishes progress, and turns a CancelJob from any process into a
        cancellation of this task."""
        every = self.ttl_ms / 3000
        while True:
            await asyncio.sleep(every)
            try:
                # Our lock may have lapsed (a long Redis outage) and someone may have taken it.
                renewed = await self.redis.eval(_RENEW, 1, self.lock_key, job.id, self.ttl_ms)
                if not renewed and not await self.redis.set(self.lock_key, job.id, nx=True, px=self.ttl_ms):
                    self._lose(job)
                    task.cancel()
                    return
                if await self.redis.exists(f"looksync:job-cancel:{job.id}"):
                    job.error = "cancelled (CancelJob)"
                    task.cancel()
                    return
                await self._save(job)
            except (RedisError, OSError, LookSyncError) as exc:
                log(logger, logging.WARNING, "job heartbeat failed; retrying", job=job.id, error=str(exc))

    def _lose(self, job: JobRecord) -> None:
        job.error = "lost the activation lock to another process"
        self._lost.add(job.id)
        log(
            logger,
            logging.WARNING,
            "activation lock taken by another job; stopping, undoing nothing",
            job=job.id,
        )

    async def _still_ours(self, job: JobRecord) -> bool:
        """Renews the lock; False only when Redis says another job holds it."""
        try:
            if await self.redis.eval(_RENEW, 1, self.lock_key, job.id, self.ttl_ms):
                return True
            return not await self.redis.exists(self.lock_key) and bool(
                await self.redis.set(self.lock_key, job.id, nx=True, px=self.ttl_ms)
            )
        except (RedisError, OSError):
            return True  # unknown: the state is this job's as far as anyone can tell

    async def wait(self, job_id: str) -> JobRecord:
        """Until this process's job has ended; its final record."""
        if job_id in self._running:
            await asyncio.gather(self._running[job_id][1], return_exceptions=True)
        return await self.get(job_id)

    async def _run(self, job, models, catalog, grace_s, min_overlap, force, confine_to, progress) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(job, asyncio.current_task()))
        swap = Swap(
            self.index,
            self.embedder,
            models,
            job.version,
            progress=progress,
            redis_url=self.settings.redis_url if self.settings.swap_catch_up else None,
            fetch_timeout_s=self.settings.fetch_timeout_s,
            fetch_policy=FetchPolicy.from_settings(self.settings),
        )
        earlier = list(job.steps)  # from the interrupted try this job resumes, if any

        async def stage(name: str, done: int = 0, total: int = 0) -> None:
            job.stage, job.done, job.total = name, done, total
            if swap.report:
                job.steps = earlier + [step for step, _ in swap.report.steps]
            await self._save(job)

        last_save = [0.0]

        def on_progress(done: int, total: int) -> None:
            job.done, job.total = done, total
            if time.monotonic() - last_save[0] > 1.0:  # the heartbeat saves the rest
                last_save[0] = time.monotonic()
                asyncio.ensure_future(self._quiet_save(job))

        try:
            try:
                if not job.committed:
                    await stage("load")
                    await swap.prepare()
                    job.new_index = swap.report.new.index_name
                    await stage("reindex")
                    await swap.reindex(catalog, on_progress=on_progress, confine_to=confine_to)
                    await stage("validate")
                    await swap.validate(catalog, min_overlap, force)
                    await stage("switch")
                    # The commit point: never move the alias under a lock another job holds.
                    if not await self._still_ours(job):
                        self._lose(job)
                        raise asyncio.CancelledError
                    await swap.move()
                    job.committed = True
                else:
                    await self._resume_committed(job, swap)
                await stage("grace", 0, int(grace_s))
                await swap.unload_old(grace_s)
                await stage("unloaded")
            except asyncio.CancelledError:
                if job.id in self._lost or not await self._still_ours(job):
                    self._lost.add(job.id)
                    raise  # the other job owns the state now: nothing to undo (module docstring)
                if job.committed and not job.error:
                    # The gateway is shutting down after the alias moved: leave the job for a
                    # retry (which finishes the grace period) or a rollback. It reads as
                    # interrupted as soon as its lock is released below.
                    raise
                job.error = job.error or "cancelled (the gateway is shutting down)"
                await self._undo(job, models)
                job.state = CANCELLED
                raise
            except Exception as exc:
                job.error = redact(str(exc)) or type(exc).__name__
                log(logger, logging.WARNING, "activation failed", job=job.id, error=job.error)
                if not await self._still_ours(job):
                    self._lost.add(job.id)  # the failure may be the other job's doing: leave it be
                elif not job.committed:
                    await self._restore(job, models)
                job.state = FAILED
                return
            r = swap.report
            job.result = {
                "space": asdict(r.new),
                "reindex_s": r.reindex_s,
                "overlap": r.overlap or 0.0,
                "products": r.counts[1],
                "failed": r.failed,
            }
            job.state, job.stage = SUCCEEDED, "done"
            log(logger, logging.INFO, "activation succeeded", job=job.id, space=str(r.new))
        finally:
            heartbeat.cancel()
            if job.id in self._lost:
                self._lost.discard(job.id)  # its record stays as the job that took over left it
            else:
                await self._quiet_save(job)
                await self._release(job.id)
            await models.close()

    async def _quiet_save(self, job: JobRecord) -> None:
        try:
            await self._save(job)
        except LookSyncError as exc:
            log(logger, logging.WARNING, "could not save the job", job=job.id, error=str(exc))

    async def _resume_committed(self, job: JobRecord, swap: Swap) -> None:
        """The alias had moved when the job was interrupted: only the grace period and the
        unloading of the old version remain."""
        spaces = await self.index.indexes()
        new = spaces.get(job.new_index)
        old = spaces.get(job.before.alias_target or "")
        if new is None or await self.index.alias_target() != job.new_index:
            raise FailedPrecondition(
                f"the alias no longer points at {job.new_index}: nothing to resume (roll back instead)"
            )
        swap.report = SwapReport(old, new)
        swap.report.counts = (0, await self.index.count(new))

    async def _undo(self, job: JobRecord, models: TritonModels) -> None:
        """After the commit point: the alias moves back (a rollback); before it: the state
        from before the job is restored."""
        if job.committed:
            space = await rollback(self.index, models)
            job.steps.append(f"rolled back: alias -> {space.index_name}")
        else:
            await self._restore(job, models)

    async def _restore(self, job: JobRecord, models: TritonModels) -> None:
        """Back to the state from before the job (not past the commit point: see the module)."""
        b = job.before
        await restore(self.index, models, b.alias_target, b.write_targets, b.indexes, b.loaded, job.new_index)
        try:
            await self.redis.hdel(HOLDS, f"swap:{job.model}:{job.version}")
        except (RedisError, OSError):
            pass  # the hold expires on its own
        job.steps.append("rolled back: write targets, Triton versions and the new index restored")
        log(logger, logging.INFO, "activation rolled back", job=job.id)

    # --- cancel and roll back -----------------------------------------------------------------

    async def cancel(self, job_id: str = "") -> JobRecord:
        job = await self.get(job_id)
        if job is None:
            raise InvalidArgument(f"job_id: no job {job_id!r}" if job_id else "job_id: there is no job yet")
        if job.state == RUNNING:
            if job.id in self._running:
                mine, task = self._running[job.id]
                mine.error = "cancelled (CancelJob)"
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return await self.get(job.id)
            # Another gateway runs it: its heartbeat sees the flag and cancels.
            await self._call("cancel", self.redis.set(f"looksync:job-cancel:{job.id}", 1, ex=RECORD_TTL_S))
            return job
        if job.state == INTERRUPTED:
            return await self.roll_back_interrupted(job)
        raise FailedPrecondition(f"job {job.id} is {job.state}: nothing to cancel")

    async def roll_back_interrupted(self, job: JobRecord) -> JobRecord:
        took = await self._call("lock", self.redis.set(self.lock_key, job.id, nx=True, px=self.ttl_ms))
        if not took:
            raise FailedPrecondition("another activation is running; try again once it is done")
        models = self._models(job.model)
        try:
            await self._undo(job, models)
            job.state = ROLLED_BACK
            await self._save(job)
            return job
        finally:
            await models.close()
            await self._release(job.id)

    async def interrupted(self) -> JobRecord | None:
        job = await self.get()
        return job if job is not None and job.state == INTERRUPTED else None

    async def shutdown(self, timeout_s: float) -> None:
        """SIGTERM: cancel this process's jobs (each rolls back if it has not committed)."""
        tasks = [task for _, task in self._running.values()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
        if self._redis is not None:
            await self._redis.aclose()
