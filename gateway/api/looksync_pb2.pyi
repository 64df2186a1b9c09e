from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelStatusRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("name", "space", "products", "serving", "written")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    WRITTEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    space: EmbeddingSpace
    products: int
    serving: bool
    written: bool
    def __init__(self, name: _Optional[str] = ..., space: _Optional[_Union[EmbeddingSpace, _Mapping]] = ..., products: _Optional[int] = ..., serving: _Optional[bool] = ..., written: _Optional[bool] = ...) -> None: ...

class ModelStatusResponse(_message.Message):
    __slots__ = ("model", "exported_versions", "loaded_versions", "alias", "alias_target", "previous_target", "indexes", "job")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EXPORTED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LOADED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    ALIAS_TARGET_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_TARGET_FIELD_NUMBER: _ClassVar[int]
    INDEXES_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    model: str
    exported_versions: _containers.RepeatedScalarFieldContainer[int]
    loaded_versions: _containers.RepeatedScalarFieldContainer[int]
    alias: str
    alias_target: str
    previous_target: str
    indexes: _containers.RepeatedCompositeFieldContainer[IndexInfo]
    job: Job
    def __init__(self, model: _Optional[str] = ..., exported_versions: _Optional[_Iterable[int]] = ..., loaded_versions: _Optional[_Iterable[int]] = ..., alias: _Optional[str] = ..., alias_target: _Optional[str] = ..., previous_target: _Optional[str] = ..., indexes: _Optional[_Iterable[_Union[IndexInfo, _Mapping]]] = ..., job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ActivateModelRequest(_message.Message):
    __slots__ = ("model", "version", "catalog_path", "grace_s", "min_overlap", "force")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CATALOG_PATH_FIELD_NUMBER: _ClassVar[int]
    GRACE_S_FIELD_NUMBER: _ClassVar[int]
    MIN_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    catalog_path: str
    grace_s: float
    min_overlap: float
    force: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., catalog_path: _Optional[str] = ..., grace_s: _Optional[float] = ..., min_overlap: _Optional[float] = ..., force: _Optional[bool] = ...) -> None: ...

class ActivateModelResponse(_message.Message):
    __slots__ = ("space", "reindex_s", "overlap", "products", "job_id", "job", "failed")
    SPACE_FIELD_NUMBER: _ClassVar[int]
    REINDEX_S_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    space: EmbeddingSpace
    reindex_s: float
    overlap: float
    products: int
    job_id: str
    job: Job
    failed: int
    def __init__(self, space: _Optional[_Union[EmbeddingSpace, _Mapping]] = ..., reindex_s: _Optional[float] = ..., overlap: _Optional[float] = ..., products: _Optional[int] = ..., job_id: _Optional[str] = ..., job: _Optional[_Union[Job, _Mapping]] = ..., failed: _Optional[int] = ...) -> None: ...

class RollbackModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class RollbackModelResponse(_message.Message):
    __slots__ = ("space",)
    SPACE_FIELD_NUMBER: _ClassVar[int]
    space: EmbeddingSpace
    def __init__(self, space: _Optional[_Union[EmbeddingSpace, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "kind", "model", "version", "state", "stage", "done", "total", "error", "started_unix", "updated_unix", "steps", "result", "catalog_path")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    CATALOG_PATH_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    model: str
    version: int
    state: str
    stage: str
    done: int
    total: int
    error: str
    started_unix: float
    updated_unix: float
    steps: _containers.RepeatedScalarFieldContainer[str]
    result: ActivateModelResponse
    catalog_path: str
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[str] = ..., stage: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., error: _Optional[str] = ..., started_unix: _Optional[float] = ..., updated_unix: _Optional[float] = ..., steps: _Optional[_Iterable[str]] = ..., result: _Optional[_Union[ActivateModelResponse, _Mapping]] = ..., catalog_path: _Optional[str] = ...) -> None: ...

class Filters(_message.Message):
    __slots__ = ("categories", "gender", "market", "brands", "sizes", "min_price", "max_price", "in_stock_only")
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    GENDER_FIELD_NUMBER: _ClassVar[int]
    MARKET_FIELD_NUMBER: _ClassVar[int]
    BRANDS_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    MIN_PRICE_FIELD_NUMBER: _ClassVar[int]
    MAX_PRICE_FIELD_NUMBER: _ClassVar[int]
    IN_STOCK_ONLY_FIELD_NUMBER: _ClassVar[int]
    categories: _containers.RepeatedScalarFieldContainer[str]
    gender: str
    market: str
    brands: _containers.RepeatedScalarFieldContainer[str]
    sizes: _containers.RepeatedScalarFieldContainer[str]
    min_price: float
    max_price: float
    in_stock_only: bool
    def __init__(self, categories: _Optional[_Iterable[str]] = ..., gender: _Optional[str] = ..., market: _Optional[str] = ..., brands: _Optional[_Iterable[str]] = ..., sizes: _Optional[_Iterable[str]] = ..., min_price: _Optional[float] = ..., max_price: _Optional[float] = ..., in_stock_only: _Optional[bool] = ...) -> None: ...

class Product(_message.Message):
    __slots__ = ("id", "title", "brand", "category", "gender", "market", "price", "currency", "sizes", "in_stock", "image_url", "retailer", "product_url", "item_id")
    ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    BRAND_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    GENDER_FIELD_NUMBER: _ClassVar[int]
    MARKET_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    IN_STOCK_FIELD_NUMBER: _ClassVar[int]
    IMAGE_URL_FIELD_NUMBER: _ClassVar[int]
    RETAILER_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_URL_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    title: str
    brand: str
    category: str
    gender: str
    market: str
    price: float
    currency: str
    sizes: _containers.RepeatedScalarFieldContainer[str]
    in_stock: bool
    image_url: str
    retailer: str
    product_url: str
    item_id: str
    def __init__(self, id: _Optional[str] = ..., title: _Optional[str] = ..., brand: _Optional[str] = ..., category: _Optional[str] = ..., gender: _Optional[str] = ..., market: _Optional[str] = ..., price: _Optional[float] = ..., currency: _Optional[str] = ..., sizes: _Optional[_Iterable[str]] = ..., in_stock: _Optional[bool] = ..., image_url: _Optional[str] = ..., retailer: _Optional[str] = ..., product_url: _Optional[str] = ..., item_id: _Optional[str] = ...) -> None: ...

class Offer(_message.Message):
    __slots__ = ("product_id", "retailer", "price", "currency", "in_stock", "product_url", "market")
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    RETAILER_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    IN_STOCK_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_URL_FIELD_NUMBER: _ClassVar[int]
    MARKET_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    retailer: str
    price: float
    currency: str
    in_stock: bool
    product_url: str
    market: str
    def __init__(self, product_id: _Optional[str] = ..., retailer: _Optional[str] = ..., price: _Optional[float] = ..., currency: _Optional[str] = ..., in_stock: _Optional[bool] = ..., product_url: _Optional[str] = ..., market: _Optional[str] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("product", "score", "duplicates", "offers")
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    OFFERS_FIELD_NUMBER: _ClassVar[int]
    product: Product
    score: float
    duplicates: int
    offers: _containers.RepeatedCompositeFieldContainer[Offer]
    def __init__(self, product: _Optional[_Union[Product, _Mapping]] = ..., score: _Optional[float] = ..., duplicates: _Optional[int] = ..., offers: _Optional[_Iterable[_Union[Offer, _Mapping]]] = ...) -> None: ...

class EmbeddingSpace(_message.Message):
    __slots__ = ("model", "version", "dim", "family", "modalities")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    dim: int
    family: str
    modalities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., dim: _Optional[int] = ..., family: _Optional[str] = ..., modalities: _Optional[_Iterable[str]] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "ms")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    ms: float
    def __init__(self, stage: _Optional[str] = ..., ms: _Optional[float] = ...) -> None: ...

class SearchTextRequest(_message.Message):
    __slots__ = ("text", "filters", "k", "space")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    text: str
    filters: Filters
    k: int
    space: EmbeddingSpace
    def __init__(self, text: _Optional[str] = ..., filters: _Optional[_Union[Filters, _Mapping]] = ..., k: _Optional[int] = ..., space: _Optional[_Union[EmbeddingSpace, _Mapping]] = ...) -> None: ...

class SearchImageRequest(_message.Message):
    __slots__ = ("image", "text_modifier", "text_weight", "filters", "k", "space")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_MODIFIER_FIELD_NUMBER: _ClassVar[int]
    TEXT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    text_modifier: str
    text_weight: float
    filters: Filters
    k: int
    space: EmbeddingSpace
    def __init__(self, image: _Optional[bytes] = ..., text_modifier: _Optional[str] = ..., text_weight: _Optional[float] = ..., filters: _Optional[_Union[Filters, _Mapping]] = ..., k: _Optional[int] = ..., space: _Optional[_Union[EmbeddingSpace, _Mapping]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "space", "timings", "text_truncated", "request_id")
    HITS_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TEXT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    space: EmbeddingSpace
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    text_truncated: bool
    request_id: str
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., space: _Optional[_Union[EmbeddingSpace, _Mapping]] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., text_truncated: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class SearchLookRequest(_message.Message):
    __slots__ = ("image", "filters", "k_per_layer", "space")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    K_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    filters: Filters
    k_per_layer: int
    space: EmbeddingSpace
    def __init__(self, image: _Optional[bytes] = ..., filters: _Optional[_Union[Filters, _Mapping]] = ..., k_per_layer: _Optional[int] = ..., space: _Optional[_Union[EmbeddingSpace, _Mapping]] = ...) -> None: ...

class LayerResult(_message.Message):
    __slots__ = ("layer", "query", "query_source", "rerank_source", "hits", "box", "region_source")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    QUERY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    RERANK_SOURCE_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    REGION_SOURCE_FIELD_NUMBER: _ClassVar[int]
    layer: str
    query: str
    query_source: str
    rerank_source: str
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    box: Box
    region_source: str
    def __init__(self, layer: _Optional[str] = ..., query: _Optional[str] = ..., query_source: _Optional[str] = ..., rerank_source: _Optional[str] = ..., hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., region_source: _Optional[str] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("left", "top", "right", "bottom")
    LEFT_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    RIGHT_FIELD_NUMBER: _ClassVar[int]
    BOTTOM_FIELD_NUMBER: _ClassVar[int]
    left: int
    top: int
    right: int
    bottom: int
    def __init__(self, left: _Optional[int] = ..., top: _Optional[int] = ..., right: _Optional[int] = ..., bottom: _Optional[int] = ...) -> None: ...

class SearchLookResponse(_message.Message):
    __slots__ = ("layers", "space", "timings", "request_id", "cached", "computed_at_unix", "source", "look_id", "requeued")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LOOK_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEUED_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerResult]
    space: EmbeddingSpace
    timings: _containers.RepeatedCompositeFieldContainer[StageTiming]
    request_id: str
    cached: bool
    computed_at_unix: float
    source: str
    look_id: str
    requeued: bool
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerResult, _Mapping]]] = ..., space: _Optional[_Union[EmbeddingSpace, _Mapping]] = ..., timings: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., request_id: _Optional[str] = ..., cached: _Optional[bool] = ..., computed_at_unix: _Optional[float] = ..., source: _Optional[str] = ..., look_id: _Optional[str] = ..., requeued: _Optional[bool] = ...) -> None: ...

class GetLookMatchesRequest(_message.Message):
    __slots__ = ("look_id", "filters", "k_per_layer", "space", "image")
    LOOK_ID_FIELD_NUMBER: _ClassVar[int]
    FILTERS_FIELD_NUMBER: _ClassVar[int]
    K_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    SPACE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    look_id: str
    filters: Filters
    k_per_layer: int
    space: EmbeddingSpace
    image: bytes
    def __init__(self, look_id: _Optional[str] = ..., filters: _Optional[_Union[Filters, _Mapping]] = ..., k_per_layer: _Optional[int] = ..., space: _Optional[_Union[EmbeddingSpace, _Mapping]] = ..., image: _Optional[bytes] = ...) -> None: ...
