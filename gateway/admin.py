"""The Admin gRPC service: model status, activation jobs and rollback behind a bearer token,
refused on a plaintext listener unless the operator allows it."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

import grpc

from gateway.api import looksync_pb2 as pb
from gateway.api import looksync_pb2_grpc as pb_grpc
from gateway.embedder import TritonEmbedder
from gateway.errors import InvalidArgument, LookSyncError, Unavailable
from gateway.index.base import EmbeddingSpace
from gateway.jobs import JobRecord, Jobs
from gateway.models import TritonModels, rollback
from gateway.observability import RPC_ERRORS, log, redact
from gateway.server import space_pb
from gateway.settings import Settings

logger = logging.getLogger("looksync.admin")


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, settings: Settings, index, embedder: TritonEmbedder):
        self.settings = settings
        self.index = index
        self.embedder = embedder
        self.jobs = Jobs(settings, index, embedder)

    async def _authorise(self, context, rpc: str) -> None:
        token = self.settings.admin_token.get_secret_value() if self.settings.admin_token else ""
        header = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not token:
            code, why = (
                grpc.StatusCode.PERMISSION_DENIED,
                "admin RPCs are disabled: LOOKSYNC_ADMIN_TOKEN is not set",
            )
        elif not self.tls and not self.settings.admin_allow_plaintext:
            code, why = (
                grpc.StatusCode.PERMISSION_DENIED,
                "admin RPCs need TLS (LOOKSYNC_TLS_CERT_FILE and LOOKSYNC_TLS_KEY_FILE): the token would "
                "travel in clear; LOOKSYNC_ADMIN_ALLOW_PLAINTEXT=true allows it on a trusted network",
            )
        elif not header:
            code, why = grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata"
        elif not (header.startswith("Bearer ") and hmac.compare_digest(header[7:].encode(), token.encode())):
            code, why = grpc.StatusCode.PERMISSION_DENIED, "the admin token is not valid"
        else:
            return
        RPC_ERRORS.labels(rpc, code.name).inc()
        log(logger, logging.WARNING, "admin call refused", rpc=rpc, code=code.name)  # never the token
        await context.abort(code, why)

    @property
    def tls(self) -> bool:
        return bool(self.settings.tls_cert_file and self.settings.tls_key_file)

    def _models(self, name: str) -> TritonModels:
        return TritonModels(
            self.settings.triton_url, self.settings.model_repository, name or self.settings.embedding_model
        )

    async def _guard(self, context, rpc: str, work):
        await self._authorise(context, rpc)
        try:
            return await work()
        except LookSyncError as exc:
            RPC_ERRORS.labels(rpc, exc.code.name).inc()
            await context.abort(exc.code, redact(str(exc)))

    def _catalog(self, raw: str) -> Path:
        """The catalog file named by an Admin caller, confined to the catalog directory: the
        caller must not make the gateway read (or probe for) any other file on its disk."""
        if not raw:
            raise InvalidArgument("catalog_path: required (a JSON Lines file in the catalog directory)")
        root = self.settings.catalog_dir
        path = Path(raw)
        path = (path if path.is_absolute() else root / path).resolve()
        if not path.is_relative_to(root):
            raise InvalidArgument(
                f"catalog_path: {raw!r} is outside the catalog directory {root} (LOOKSYNC_ADMIN_CATALOG_DIR)"
            )
        if not path.is_file():
            raise InvalidArgument(f"catalog_path: {raw!r} is not a file in the catalog directory {root}")
        return path

    async def ModelStatus(self, request, context):
        async def work():
            models = self._models(request.model)
            try:
                loaded = (await models.loaded())[f"{models.model}_image"]
                target = await self.index.alias_target()
                writes = {s.index_name for s in await self.index.write_targets()}
                indexes = [
                    pb.IndexInfo(
                        name=name,
                        space=space_pb(space),
                        products=await self.index.count(space),
                        serving=name == target,
                        written=name in writes,
                    )
                    for name, space in (await self.index.indexes()).items()
                ]
                try:
                    job = await self.jobs.get()
                except Unavailable:
                    job = None  # the job store is Redis; the rest of the status still holds
                return pb.ModelStatusResponse(
                    model=models.model,
                    exported_versions=models.on_disk(),
                    loaded_versions=loaded,
                    alias=self.index.alias,
                    alias_target=target or "",
                    previous_target=await self.index.previous_target() or "",
                    indexes=indexes,
                    job=job_pb(job) if job else None,
                )
            finally:
                await models.close()

        return await self._guard(context, "ModelStatus", work)

    async def ActivateModel(self, request, context):
        async def work():
            if request.version < 1:
                raise InvalidArgument(f"version: {request.version} is not a version number")
            if request.grace_s < 0 or request.min_overlap < 0 or request.min_overlap > 1:
                raise InvalidArgument("grace_s must be >= 0 and min_overlap within 0..1")
            catalog = self._catalog(request.catalog_path)
            job = await self.jobs.start(
                request.model or self.settings.embedding_model,
                request.version,
                catalog,
                request.grace_s if request.grace_s > 0 else 60.0,
                request.min_overlap or 0.5,
                request.force,
                confine_to=self.settings.catalog_dir,
            )
            return pb.ActivateModelResponse(job_id=job.id, job=job_pb(job))

        return await self._guard(context, "ActivateModel", work)

    async def GetJob(self, request, context):
        async def work():
            job = await self.jobs.get(request.job_id)
            if job is None:
                raise InvalidArgument(
                    f"job_id: no job {request.job_id!r}" if request.job_id else "job_id: there is no job yet"
                )
            return job_pb(job)

        return await self._guard(context, "GetJob", work)

    async def CancelJob(self, request, context):
        async def work():
            return job_pb(await self.jobs.cancel(request.job_id))

        return await self._guard(context, "CancelJob", work)

    async def RollbackModel(self, request, context):
        async def work():
            interrupted = await self.jobs.interrupted()
            if interrupted is not None:
                job = await self.jobs.roll_back_interrupted(interrupted)
                target = await self.index.alias_target()
                space = (await self.index.indexes()).get(target or "")
                log(logger, logging.INFO, "interrupted activation rolled back", job=job.id)
                return pb.RollbackModelResponse(space=space_pb(space) if space else None)
            models = self._models(request.model)
            try:
                return pb.RollbackModelResponse(space=space_pb(await rollback(self.index, models)))
            finally:
                await models.close()

        return await self._guard(context, "RollbackModel", work)


def job_pb(job: JobRecord) -> pb.Job:
    result = None
    if job.result:
        r = job.result
        result = pb.ActivateModelResponse(
            space=space_pb(EmbeddingSpace(**r["space"])),
            reindex_s=r["reindex_s"],
            overlap=r["overlap"],
            products=r["products"],
            failed=r.get("failed", 0),  # jobs recorded before the field existed
        )
    return pb.Job(
        id=job.id,
        kind=job.kind,
        model=job.model,
        version=job.version,
        state=job.state,
        stage=job.stage,
        done=job.done,
        total=job.total,
        error=job.error,
        started_unix=job.started,
        updated_unix=job.updated,
        steps=job.steps,
        result=result,
        catalog_path=job.catalog_path,
    )
