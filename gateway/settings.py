"""The one typed settings object: every knob is a `LOOKSYNC_*` environment variable."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOOKSYNC_", extra="ignore")

    # Triton
    triton_url: str = Field("127.0.0.1:8001", description="Triton gRPC address")
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    model_repository: Path = REPO_ROOT / "model_repository"
    embedding_model: str = Field("clip", description="model name: Triton serves <name>_image/_text")
    triton_timeout_s: float = Field(10.0, description="deadline for one Triton call")

    # Catalog index
    index_backend: Literal["embedded", "elasticsearch"] = "embedded"
    data_dir: Path = REPO_ROOT / ".looksync"
    index_alias: str = "products"
    es_url: str | None = None
    es_num_candidates_factor: int = Field(10, description="kNN num_candidates = k x this (100..10000)")
    es_hnsw_m: int = Field(16, description="HNSW graph degree of new Elasticsearch indexes")
    es_hnsw_ef_construction: int = Field(100, description="HNSW build beam of new Elasticsearch indexes")
    es_timeout_s: float = Field(5.0, description="deadline for one Elasticsearch request")
    es_index_type: Literal["hnsw", "int8_hnsw", "bbq_hnsw"] = Field(
        "int8_hnsw", description="vector index of new Elasticsearch indexes (docs/DEPLOYMENT.md sizes them)"
    )
    es_shards: int = Field(1, ge=1, description="primary shards of new Elasticsearch indexes")
    es_replicas: int | None = Field(
        None, ge=0, description="replicas of new indexes (None: the cluster's default)"
    )
    # How often the embedded backend looks for writes of other processes (seconds).
    index_refresh_s: float = 0.5
    ann_min_rows: int = Field(50_000, description="embedded index: build an ANN index from this size on")
    exact_max_rows: int = Field(
        20_000, description="embedded index: exact search when a filter leaves <= this"
    )
    exact_cache_mb: float = Field(
        1024,
        ge=0,
        description="embedded index: memory per table for the vectors exact search scores (0: read them from disk)",
    )

    # Other services
    redis_url: str = "redis://127.0.0.1:6379/0"
    swap_catch_up: bool = Field(
        True,
        description="model swaps re-apply stream updates/deletes published during the rebuild (needs Redis)",
    )
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_api_key: SecretStr | None = None
    admin_token: SecretStr | None = None
    admin_allow_plaintext: bool = Field(
        False, description="serve Admin RPCs on a plaintext listener (the token then travels in clear)"
    )
    admin_catalog_dir: Path | None = Field(
        None,
        description="ActivateModel reads catalogs only under this directory (default <data_dir>/catalogs)",
    )
    swap_lock_ttl_s: float = Field(
        30.0, description="activation lock lease: a dead gateway's job reads as interrupted after this"
    )
    llm_timeout_s: float = Field(8.0, description="cap for one LLM call (also capped by the deadline)")

    # Look search
    localizer: Literal["detector", "zones"] = Field(
        "detector",
        description="without an LLM: garments from the garment detector (body zones while it is not served), or body zones only",
    )
    detector_model: str = Field("garment_detector", description="Triton model of the garment detector")
    segmentation: bool = Field(False, description="rerank fallback uses Florence-2 + SAM2 garment masks")
    ground_model: str = "florence2_ground"
    mask_model: str = "sam2_mask"
    look_candidates: int = Field(30, description="candidates per layer before dedup and rerank")
    dedup_threshold: float = Field(0.97, description="image-vector cosine at which products collapse")
    cache: Literal["memory", "redis", "off"] = Field("memory", description="query/result caches")
    cache_ttl_s: float = 300.0

    # Offline look matching (gateway/offline/)
    match_keep: int = Field(30, description="candidates stored per garment (read-time filters drop some)")
    match_batch_looks: int = Field(32, description="looks matched at once by a job or worker")
    match_window_ms: float = Field(10.0, description="how long Triton calls of those looks are gathered")
    match_claim_idle_ms: int = Field(30_000, description="a look request pending this long: taken over")
    match_max_tries: int = Field(3, description="tries before a failing look is dead-lettered")
    match_requeue_share: float = Field(
        0.3, description="GetLookMatches re-queues a look when this share of its candidates is gone"
    )

    # Gateway
    gateway_url: str = Field("127.0.0.1:50051", description="where clients find the gateway")
    gateway_tls: bool = Field(False, description="clients connect to the gateway over TLS")
    gateway_ca_file: Path | None = Field(None, description="clients: PEM roots for a private CA")
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 50051
    metrics_port: int = 9464
    request_timeout_s: float = Field(5.0, description="deadline when the client sets none")
    max_in_flight: int = Field(64, description="search RPCs served at once; beyond: RESOURCE_EXHAUSTED")
    tls_cert_file: Path | None = Field(None, description="PEM certificate: serve gRPC over TLS")
    tls_key_file: Path | None = Field(None, description="PEM private key for tls_cert_file")
    max_request_bytes: int = 16 << 20
    max_image_pixels: int = Field(40_000_000, description="SearchImage: largest image accepted (pixels)")
    max_look_pixels: int = Field(
        30_000_000,
        description="SearchLook: largest look accepted (pixels); docs/ARCHITECTURE.md gives the memory it bounds",
    )
    max_k: int = 200
    max_k_per_layer: int = 50
    shutdown_grace_s: float = 5.0

    # Items (gateway/dedup.py): the thresholds `looksync dedup` and ingestion use
    dedup_image_threshold: float = Field(0.5, description="image cosine two listings of one item need")
    dedup_title_threshold: float = Field(0.9, description="title word overlap two listings of one item need")
    dedup_on_ingest: bool = Field(True, description="the ingest worker puts new listings into existing items")

    # Ingestion
    index_batch_size: int = 32
    ingest_batch_size: int = 64
    ingest_claim_idle_ms: int = Field(30_000, description="pending this long: taken from its consumer")
    ingest_max_tries: int = Field(5, description="deliveries before a failing event is dead-lettered")
    worker_metrics_port: int = 9465
    fetch_max_bytes: int = 10 << 20
    fetch_timeout_s: float = Field(
        10.0, description="per image fetch: ingestion, `looksync index`, activations"
    )
    fetch_allowed_hosts: str = Field("", description="comma-separated; empty = any public host")
    fetch_allow_private: bool = False
    fetch_allow_loopback: bool = False
    fetch_local_dir: Path | None = Field(
        None, description="events may name local image files under this directory (refused otherwise)"
    )
    ingest_drain_timeout_s: float = Field(30.0, description="SIGTERM: time to finish the batch in hand")
    ingest_trim_every_s: float = Field(30.0, description="how often a worker trims the stream and group")
    ingest_dead_letters_max: int = Field(100_000, description="dead letters kept (oldest dropped)")
    ingest_compact_every_s: float = Field(
        300.0, description="how often a worker checks whether the embedded index needs compacting (0: never)"
    )
    ingest_compact_unindexed_rows: int = Field(
        10_000,
        description="rows outside the embedded index's indexes (new or rewritten) that make it compact",
    )
    ingest_compact_fragments: int = Field(
        256, description="fragments of the embedded table that make it compact"
    )
    ingest_consumer_idle_s: float = Field(
        3600.0, description="a consumer with nothing pending, idle this long, is removed from the group"
    )

    @property
    def embedded_dir(self) -> Path:
        return self.data_dir / "index"

    @property
    def catalog_dir(self) -> Path:
        return (self.admin_catalog_dir or self.data_dir / "catalogs").resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
