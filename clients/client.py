"""Python client for the LookSync gateway, for app backends and operators."""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.api import looksync_pb2 as pb
from gateway.api import looksync_pb2_grpc as pb_grpc


@dataclass
class FilterArgs:
    categories: tuple[str, ...] = ()
    gender: str = ""
    market: str = ""
    brands: tuple[str, ...] = ()
    sizes: tuple[str, ...] = ()
    min_price: float | None = None
    max_price: float | None = None
    in_stock_only: bool = False

    def to_proto(self) -> pb.Filters:
        msg = pb.Filters(
            categories=list(self.categories),
            gender=self.gender,
            market=self.market,
            brands=list(self.brands),
            sizes=list(self.sizes),
            in_stock_only=self.in_stock_only,
        )
        if self.min_price is not None:
            msg.min_price = self.min_price
        if self.max_price is not None:
            msg.max_price = self.max_price
        return msg


class LookSyncClient:
    """One channel per client object: create it once and reuse it (channels are expensive)."""

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        timeout_s: float = 10.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        server_name: str | None = None,
        admin_token: str | None = None,
    ):
        """tls: connect over TLS (with `root_certificates`, PEM, for a private CA; the system's
        roots otherwise; `server_name` when the certificate names another host than the address).
        admin_token: sent as `authorization: Bearer ...` on Admin calls only."""
        self.address = address
        self.timeout_s = timeout_s
        self.admin_token = admin_token
        options = [("grpc.max_send_message_length", 64 << 20)]
        self.tls = bool(tls or root_certificates)
        if self.tls:
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.LookSearchStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def search_text(
        self,
        text: str,
        k: int = 10,
        filters: FilterArgs | None = None,
        space: pb.EmbeddingSpace | tuple[str, int] | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> pb.SearchResponse:
        request = pb.SearchTextRequest(text=text, k=k, filters=(filters or FilterArgs()).to_proto())
        if space is not None:
            request.space.CopyFrom(as_space(space))
        return self.stub.SearchText(request, timeout=timeout_s or self.timeout_s, metadata=_meta(request_id))

    def search_image(
        self,
        image: bytes,
        k: int = 10,
        filters: FilterArgs | None = None,
        text_modifier: str = "",
        text_weight: float = 0.0,
        space: pb.EmbeddingSpace | tuple[str, int] | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> pb.SearchResponse:
        request = pb.SearchImageRequest(
            image=image,
            k=k,
            filters=(filters or FilterArgs()).to_proto(),
            text_modifier=text_modifier,
            text_weight=text_weight,
        )
        if space is not None:
            request.space.CopyFrom(as_space(space))
        return self.stub.SearchImage(request, timeout=timeout_s or self.timeout_s, metadata=_meta(request_id))

    def search_look(
        self,
        image: bytes,
        k_per_layer: int = 5,
        filters: FilterArgs | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
        space: pb.EmbeddingSpace | tuple[str, int] | None = None,
    ) -> pb.SearchLookResponse:
        request = pb.SearchLookRequest(
            image=image, k_per_layer=k_per_layer, filters=(filters or FilterArgs()).to_proto()
        )
        if space is not None:
            request.space.CopyFrom(as_space(space))
        return self.stub.SearchLook(request, timeout=timeout_s or self.timeout_s, metadata=_meta(request_id))

    def get_look_matches(
        self,
        look_id: str,
        k_per_layer: int = 5,
        filters: FilterArgs | None = None,
        image: bytes = b"",
        timeout_s: float | None = None,
        request_id: str | None = None,
        space: pb.EmbeddingSpace | tuple[str, int] | None = None,
    ) -> pb.SearchLookResponse:
        """A look matched offline, by id; with `image`, a miss is searched online instead."""
        request = pb.GetLookMatchesRequest(
            look_id=look_id,
            k_per_layer=k_per_layer,
            filters=(filters or FilterArgs()).to_proto(),
            image=image,
        )
        if space is not None:
            request.space.CopyFrom(as_space(space))
        return self.stub.GetLookMatches(
            request, timeout=timeout_s or self.timeout_s, metadata=_meta(request_id)
        )

    def health(self, service: str = "", timeout_s: float = 2.0) -> str:
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    # --- Admin (operators; needs the token) -----------------------------------------------

    def _admin_meta(self):
        if not self.admin_token:
            raise ValueError("Admin calls need an admin token (LOOKSYNC_ADMIN_TOKEN or --token)")
        return (("authorization", f"Bearer {self.admin_token}"),)

    def model_status(self, model: str = "", timeout_s: float | None = None) -> pb.ModelStatusResponse:
        return self.admin.ModelStatus(
            pb.ModelStatusRequest(model=model),
            timeout=timeout_s or self.timeout_s,
            metadata=self._admin_meta(),
        )

    def activate_model(
        self,
        version: int,
        catalog_path: str,
        model: str = "",
        grace_s: float = 60.0,
        min_overlap: float = 0.5,
        force: bool = False,
        timeout_s: float | None = None,
    ) -> pb.ActivateModelResponse:
        """Starts the swap as a job on the gateway and returns at once (`job_id`); follow it
        with `get_job` or `wait_job`. `catalog_path` is in the gateway's catalog directory."""
        request = pb.ActivateModelRequest(
            model=model,
            version=version,
            catalog_path=catalog_path,
            grace_s=grace_s,
            min_overlap=min_overlap,
            force=force,
        )
        return self.admin.ActivateModel(
            request, timeout=timeout_s or self.timeout_s, metadata=self._admin_meta()
        )

    def get_job(self, job_id: str = "", timeout_s: float | None = None) -> pb.Job:
        """An activation job ("" = the latest)."""
        return self.admin.GetJob(
            pb.GetJobRequest(job_id=job_id), timeout=timeout_s or self.timeout_s, metadata=self._admin_meta()
        )

    def cancel_job(self, job_id: str = "", timeout_s: float = 120.0) -> pb.Job:
        """Cancels a running job (it rolls back) or rolls back an interrupted one."""
        return self.admin.CancelJob(
            pb.CancelJobRequest(job_id=job_id), timeout=timeout_s, metadata=self._admin_meta()
        )

    def wait_job(
        self, job_id: str, poll_s: float = 1.0, on_update=None, timeout_s: float = 24 * 3600
    ) -> pb.Job:
        """Polls until the job has ended (any state but running); `on_update(job)` on each poll."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get_job(job_id)
            if on_update is not None:
                on_update(job)
            if job.state != "running":
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still running after {timeout_s:.0f} s")
            time.sleep(poll_s)

    def rollback_model(self, model: str = "", timeout_s: float | None = None) -> pb.RollbackModelResponse:
        return self.admin.RollbackModel(
            pb.RollbackModelRequest(model=model),
            timeout=timeout_s or self.timeout_s,
            metadata=self._admin_meta(),
        )

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> LookSyncClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def as_space(space: pb.EmbeddingSpace | tuple[str, int]) -> pb.EmbeddingSpace:
    """A space to search, as a message or (model, version)."""
    if isinstance(space, pb.EmbeddingSpace):
        return space
    model, version = space
    return pb.EmbeddingSpace(model=model, version=version)


def _meta(request_id: str | None):
    return (("x-request-id", request_id),) if request_id else None
