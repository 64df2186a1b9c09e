"""The Admin gRPC service: model status, activation and rollback behind a bearer token."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

import grpc

from gateway.api import looksync_pb2 as pb
from gateway.api import looksync_pb2_grpc as pb_grpc
from gateway.embedder import TritonEmbedder
from gateway.errors import InvalidArgument, LookSyncError
from gateway.models import Swap, TritonModels, rollback
from gateway.observability import RPC_ERRORS, log
from gateway.server import space_pb
from gateway.settings import Settings

logger = logging.getLogger("looksync.admin")


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, settings: Settings, index, embedder: TritonEmbedder):
        self.settings = settings
        self.index = index
        self.embedder = embedder

    async def _authorise(self, context, rpc: str) -> None:
        token = self.settings.admin_token.get_secret_value() if self.settings.admin_token else ""
        header = dict(context.invocation_metadata() or ()).get("authorization", "")
        if not token:
            code, why = (
                grpc.StatusCode.PERMISSION_DENIED,
                "admin RPCs are disabled: LOOKSYNC_ADMIN_TOKEN is not set",
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
            await context.abort(exc.code, str(exc))

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
                return pb.ModelStatusResponse(
                    model=models.model,
                    exported_versions=models.on_disk(),
                    loaded_versions=loaded,
                    alias=self.index.alias,
                    alias_target=target or "",
                    previous_target=await self.index.previous_target() or "",
                    indexes=indexes,
                )
            finally:
                await models.close()

        return await self._guard(context, "ModelStatus", work)

    async def ActivateModel(self, request, context):
        async def work():
            if request.version < 1:
                raise InvalidArgument(f"version: {request.version} is not a version number")
            catalog = Path(request.catalog_path)
            if not catalog.is_file():
                raise InvalidArgument(f"catalog_path: {request.catalog_path!r} is not a readable file")
            models = self._models(request.model)
            try:
                swap = Swap(
                    self.index,
                    self.embedder,
                    models,
                    request.version,
                    progress=False,
                    redis_url=self.settings.redis_url if self.settings.swap_catch_up else None,
                )
                await swap.prepare()
                await swap.reindex(catalog)
                await swap.validate(catalog, request.min_overlap or 0.5, request.force)
                await swap.switch(request.grace_s if request.grace_s > 0 else 60.0)
                r = swap.report
                return pb.ActivateModelResponse(
                    space=space_pb(r.new),
                    reindex_s=r.reindex_s,
                    overlap=r.overlap or 0.0,
                    products=r.counts[1],
                )
            finally:
                await models.close()

        return await self._guard(context, "ActivateModel", work)

    async def RollbackModel(self, request, context):
        async def work():
            models = self._models(request.model)
            try:
                return pb.RollbackModelResponse(space=space_pb(await rollback(self.index, models)))
            finally:
                await models.close()

        return await self._guard(context, "RollbackModel", work)
