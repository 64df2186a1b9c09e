"""ElasticsearchDouble: an in-process HTTP stand-in for an Elasticsearch 8.17 node.

No Elasticsearch server can run where the tests run, so the Elasticsearch backend
(gateway/index/elastic.py) is exercised against this double instead. It answers over real HTTP,
so the official `elasticsearch` client talks to it unchanged (product header, compatible-with
media types, NDJSON bulk bodies).

What it implements is a short list of APIs and options, each following the Elasticsearch 8.17
reference page linked next to it. Everything else is refused loudly: an HTTP 400 whose error
type is `looksync_double_unsupported` and whose reason names the API, query parameter, body key
or query type, so that a test can never pass because the double silently ignored something a
real cluster would have acted on.

Error reasons are Elasticsearch's texts, except that the `[line:column]` prefix real parsing
errors start with is left out (the double does not track where in the JSON a value was).

One node, and one shard per index: `_seq_no` is a per-index counter from 0, `_primary_term`
is always 1, and `index.number_of_shards` other than 1 is refused. Time comes from `d.now`
(default `time.monotonic`), so tests move it to let `index.refresh_interval` or
`index.gc_deletes` elapse without sleeping. One lock serialises every request: each request is
applied atomically.

Where the double has to guess at real behaviour it says so in a comment; where it could check
against Elasticsearch's own behaviour it follows it, even when that differs from a simpler
model (for example, deleting a missing document still consumes a `_seq_no`).
"""

from __future__ import annotations

import copy
import gzip
import itertools
import json
import math
import re
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import numpy as np

REF = "https://www.elastic.co/guide/en/elasticsearch/reference/8.17/"
UNSUPPORTED = "looksync_double_unsupported"
PRIMARY_TERM = 1
NUM_CANDS_LIMIT = 10_000
MAX_RESULT_WINDOW = 10_000
DEFAULT_TRACK_TOTAL_HITS = 10_000
SEARCH_IDLE_AFTER_S = 30.0
DEFAULT_REFRESH_S = 1.0
DEFAULT_GC_DELETES_S = 60.0
# Parameters every Elasticsearch API accepts and that change nothing a test can observe here.
# https://www.elastic.co/guide/en/elasticsearch/reference/8.17/common-options.html
HARMLESS_PARAMS = frozenset({"error_trace", "human", "pretty"})
NOT_FOUND = -1  # Elasticsearch's Versions.NOT_FOUND: no live document and no remembered tombstone

# Lucene version shipped by each minor, as reported by `GET /` (cosmetic; nothing reads it).
_LUCENE = {(8, 15): "9.11.1", (8, 16): "9.12.0", (8, 17): "9.12.0", (8, 18): "9.12.1", (8, 19): "9.12.2"}


# ---------------------------------------------------------------------------------------------
# Errors, shaped as Elasticsearch shapes them
# https://www.elastic.co/guide/en/elasticsearch/reference/8.17/common-options.html#common-options-error-options
# ---------------------------------------------------------------------------------------------


class EsError(Exception):
    """An error answered as `{"error": {"root_cause": [...], "type", "reason", ...}, "status"}`."""

    def __init__(
        self,
        status: int,
        kind: str,
        reason: str,
        *,
        caused_by: dict | None = None,
        root_cause: list[dict] | None = None,
        **fields: Any,
    ):
        super().__init__(f"{kind}: {reason}")
        self.status, self.kind, self.reason = status, kind, reason
        self.caused_by, self.root_cause, self.fields = caused_by, root_cause, fields

    def item(self) -> dict:
        """The error object alone, as a bulk item or an alias action result carries it."""
        out = {"type": self.kind, "reason": self.reason, **self.fields}
        if self.caused_by:
            out["caused_by"] = self.caused_by
        return out

    def body(self) -> dict:
        root = self.root_cause or [{"type": self.kind, "reason": self.reason, **self.fields}]
        return {"error": {"root_cause": root, **self.item()}, "status": self.status}


class PlainError(Exception):
    """The few errors Elasticsearch answers as `{"error": "text", "status": n}`."""

    def __init__(self, status: int, text: str, extra: dict | None = None):
        super().__init__(text)
        self.status, self.text, self.extra = status, text, extra or {}

    def body(self) -> dict:
        return {**self.extra, "error": self.text, "status": self.status}


def unsupported(what: str) -> EsError:
    return EsError(
        400, UNSUPPORTED, f"{what} is not implemented by the Elasticsearch double (tests/es_double.py)"
    )


def illegal(reason: str, **fields: Any) -> EsError:
    return EsError(400, "illegal_argument_exception", reason, **fields)


def validation(messages: list[str]) -> EsError:
    reason = "Validation Failed: " + "".join(f"{i}: {m};" for i, m in enumerate(messages, 1))
    return EsError(400, "action_request_validation_exception", reason)


def index_not_found(name: str, suffix: str = "", resource_type: str = "index_or_alias") -> EsError:
    return EsError(
        404,
        "index_not_found_exception",
        f"no such index [{name}]{suffix}",
        **{"resource.type": resource_type, "resource.id": name, "index_uuid": "_na_", "index": name},
    )


def aliases_not_found(names: list[str]) -> EsError:
    return EsError(
        404,
        "aliases_not_found_exception",
        f"aliases [{', '.join(names)}] missing",
        **{"resource.type": "aliases", "resource.id": names[0] if len(names) == 1 else names},
    )


def parse_error(reason: str) -> EsError:
    return EsError(400, "x_content_parse_exception", reason)


# ---------------------------------------------------------------------------------------------
# Small value helpers
# ---------------------------------------------------------------------------------------------


def _parse_version(number: str) -> tuple[int, int]:
    major, minor = number.split("-")[0].split(".")[:2]
    return int(major), int(minor)


_TIME_UNITS = {"nanos": 1e-9, "micros": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_time(setting: str, value: Any) -> float:
    """A time setting in seconds; "-1" stays -1 (disabled). Units are required, as in
    https://www.elastic.co/guide/en/elasticsearch/reference/8.17/api-conventions.html#time-units"""
    text = str(value).strip()
    if text in ("-1", "0"):
        return float(text)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(nanos|micros|ms|s|m|h|d)", text)
    if not match:
        raise illegal(
            f"failed to parse setting [{setting}] with value [{value}] as a time value: unit is missing or unrecognized"
        )
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


def parse_bool_param(name: str, value: str, default: bool) -> bool:
    # An empty value (`?pretty`) means the default; anything but true/false is refused.
    if value == "":
        return default
    if value in ("true", "false"):
        return value == "true"
    raise illegal(f"Failed to parse value [{value}] as only [true] or [false] are allowed.")


def parse_long_param(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise illegal(f"Failed to parse long parameter [{name}] with value [{value}]") from None


def _java_round(x: float) -> int:
    return math.floor(x + 0.5)


def _f32(x: float) -> float:
    """A float32 result as Elasticsearch prints it (the shortest digits of the float32)."""
    return float(str(np.float32(x)))


def _java_float(x: float) -> str:
    f = np.float32(x)
    if f == 0:
        return "-0.0" if math.copysign(1.0, float(f)) < 0 else "0.0"
    if 1e-3 <= abs(f) < 1e7:
        text = str(f)
        return text if "." in text or "e" in text else text + ".0"
    mantissa, _, exponent = np.format_float_scientific(f, unique=True).partition("e")
    if "." not in mantissa or mantissa.endswith("."):
        mantissa = mantissa.rstrip(".") + ".0"
    return f"{mantissa}E{int(exponent)}"


def _preview(vector: list[float]) -> str:
    # Elasticsearch quotes the first five elements of an invalid vector.
    shown = ", ".join(_java_float(v) for v in vector[:5])
    return f" Preview of invalid vector: [{shown}{', ...' if len(vector) >= 5 else ''}]"


def _glob(pattern: str, name: str) -> bool:
    # Elasticsearch wildcards know only `*` (no `?` or character classes).
    return re.fullmatch(".*".join(re.escape(p) for p in pattern.split("*")), name) is not None


def _json_equal(a: Any, b: Any) -> bool:
    """Equality as Elasticsearch's noop detection sees parsed JSON: 1 and 1.0 differ, as do
    true and 1 (Java compares an Integer, a Double and a Boolean as different objects)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    return a == b


def _merge(old: dict, changes: dict) -> dict:
    """The partial-document merge of _update: objects merge recursively, anything else
    (arrays included) is replaced.
    https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-update.html"""
    out = dict(old)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _values_at(source: dict, path: str) -> list:
    """Every leaf value at a dotted path, through arrays and through dotted keys
    (`{"a.b": 1}` and `{"a": {"b": 1}}` are the same field), arrays flattened, nulls dropped."""
    out: list = []

    def walk(node: Any, parts: list[str]) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, parts)
            return
        if not parts:
            if node is not None:
                out.append(node)
            return
        if not isinstance(node, dict):
            return
        for i in range(1, len(parts) + 1):
            key = ".".join(parts[:i])
            if key in node:
                walk(node[key], parts[i:])

    walk(source, path.split("."))
    return out


def _filter_source(source: dict, includes: list[str], excludes: list[str]) -> dict:
    """Source filtering by dotted-path patterns (`*` wildcards); an include names a field or
    any object above it.
    https://www.elastic.co/guide/en/elasticsearch/reference/8.17/search-fields.html#source-filtering"""

    def matches(patterns: list[str], path: str) -> bool:
        return any(_glob(p, path) for p in patterns)

    def could_include_below(path: str) -> bool:
        # Descend into an object only when some include pattern can name a field inside it.
        below = path + "."
        for pattern in includes:
            head = pattern.split("*")[0]
            if pattern.startswith(below) or (
                "*" in pattern and (below.startswith(head) or head.startswith(below))
            ):
                return True
        return False

    def walk(node: Any, prefix: str, included: bool) -> Any:
        if isinstance(node, list):
            kept = [walk(x, prefix, included) for x in node]
            return [x for x in kept if x is not _DROP]
        if not isinstance(node, dict):
            return node if included else _DROP
        out = {}
        for key, value in node.items():
            path = f"{prefix}{key}"
            if matches(excludes, path):
                continue
            inside = included or matches(includes, path)
            if not inside and not (isinstance(value, (dict, list)) and could_include_below(path)):
                continue
            kept = walk(value, path + ".", inside)
            if kept is _DROP or (not inside and kept in ({}, [])):
                continue
            out[key] = kept
        return out

    return walk(source, "", not includes)


_DROP = object()


# ---------------------------------------------------------------------------------------------
# Mappings: the field types the double understands
# https://www.elastic.co/guide/en/elasticsearch/reference/8.17/mapping-types.html
# ---------------------------------------------------------------------------------------------

INTEGER_TYPES = {"long": 2**63, "integer": 2**31, "short": 2**15, "byte": 2**7}
FLOAT_TYPES = ("double", "float", "half_float")
NUMERIC_TYPES = frozenset({*INTEGER_TYPES, *FLOAT_TYPES, "scaled_float"})
SIMILARITIES = ("l2_norm", "dot_product", "cosine", "max_inner_product")
# The oldest server each dense_vector index_options type exists on.
# https://www.elastic.co/guide/en/elasticsearch/reference/8.17/dense-vector.html
VECTOR_INDEX_TYPES = {
    "hnsw": (8, 0),
    "int8_hnsw": (8, 12),
    "int4_hnsw": (8, 15),
    "bbq_hnsw": (8, 16),
    "flat": (8, 13),
    "int8_flat": (8, 13),
    "int4_flat": (8, 15),
    "bbq_flat": (8, 16),
}
# Binary quantisation needs at least this many dimensions (bbq_hnsw, bbq_flat).
# https://www.elastic.co/guide/en/elasticsearch/reference/8.17/dense-vector.html#dense-vector-quantization
BBQ_MIN_DIMS = 64
_FIELD_PARAMS = {
    "keyword": {"type", "ignore_above", "fields"},
    "text": {"type", "fields"},
    "boolean": {"type"},
    "scaled_float": {"type", "scaling_factor"},
    "dense_vector": {"type", "dims", "element_type", "index", "similarity", "index_options"},
    "object": {"type", "properties", "enabled", "dynamic"},
    **{t: {"type"} for t in (*INTEGER_TYPES, *FLOAT_TYPES)},
}


def _is_object(definition: dict) -> bool:
    return definition.get("type", "object") == "object"


def _dynamic_value(value: Any, where: str) -> str:
    # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/dynamic.html
    text = str(value).lower() if isinstance(value, bool) else value
    if text in ("true", "false", "strict"):
        return text
    if text == "runtime":
        raise unsupported(f"[dynamic: runtime] on [{where}]")
    raise EsError(400, "mapper_parsing_exception", f"Could not convert [{where}.dynamic] to boolean")


class Index:
    """The state of one index (one shard). Fields are plain attributes so tests can look."""

    def __init__(self, name: str, settings: dict, mappings: dict, now: float):
        self.name = name
        self.uuid = uuid.uuid4().hex[:22]
        self.settings = settings  # flat dotted keys
        self.mappings = mappings  # {"dynamic"?, "_meta"?, "properties"?}
        self.docs: dict[str, dict] = {}  # id -> {source, _version, _seq_no, _primary_term, written_at}
        self.tombstones: dict[str, dict] = {}  # id -> {version, seq_no, deleted_at}
        self.seq_no = -1  # the last one assigned: the first write gets 0
        self.visible: dict[str, dict] = {}  # what search sees: the docs as of the last refresh
        self.pending: list[tuple[float, str, dict | None]] = []  # changes since that refresh
        self.last_refresh = now
        self.last_search = now
        self.created_at = now

    # dict-style access keeps `d.indices[name]["docs"]` working for tests that prefer it
    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    @property
    def replicas(self) -> int:
        return int(self.settings.get("index.number_of_replicas", 1))

    @property
    def refresh_interval(self) -> float:
        return parse_time("index.refresh_interval", self.settings.get("index.refresh_interval", "1s"))

    @property
    def gc_deletes(self) -> float:
        return parse_time("index.gc_deletes", self.settings.get("index.gc_deletes", "60s"))

    def write_shards(self) -> dict:
        # One primary, `number_of_replicas` copies that a single node can never assign.
        return {"total": 1 + self.replicas, "successful": 1, "failed": 0}

    def error_fields(self) -> dict:
        return {"index_uuid": self.uuid, "shard": "0", "index": self.name}

    def next_seq_no(self) -> int:
        self.seq_no += 1
        return self.seq_no

    def refresh(self, until: float | None = None) -> None:
        """Make changes visible to search: all of them, or those made up to `until`."""
        while self.pending and (until is None or self.pending[0][0] <= until):
            _, doc_id, record = self.pending.pop(0)
            if record is None:
                self.visible.pop(doc_id, None)
            else:
                self.visible[doc_id] = record
        self.last_refresh = until if until is not None else self.last_refresh

    def catch_up(self, now: float, searching: bool) -> None:
        """Apply the periodic refreshes that `index.refresh_interval` would have run by `now`.

        Near real time: https://www.elastic.co/guide/en/elasticsearch/reference/8.17/near-real-time.html
        and index.refresh_interval / search idle:
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/index-modules.html#index-refresh-interval-setting
        A scheduled refresh is modelled as happening one interval after the oldest change it has
        not yet made visible (the real timer ticks every interval, so a change is visible at
        most one interval after it was made). When the interval is not set explicitly, a shard
        that saw no search for 30 s is search-idle: it skips scheduled refreshes, and the next
        search refreshes it first.
        """
        interval = self.refresh_interval
        explicit = "index.refresh_interval" in self.settings
        idle_from = math.inf if explicit else self.last_search + SEARCH_IDLE_AFTER_S
        if interval >= 0:
            while self.pending:
                tick = self.pending[0][0] + interval
                if tick > now or tick >= idle_from:
                    break
                self.refresh(until=tick)
        if searching:
            if now >= idle_from and self.pending:
                self.refresh()
                self.last_refresh = now
            self.last_search = now


# ---------------------------------------------------------------------------------------------
# The query DSL subset, parsed once (index-independent) and bound per index (mapping-dependent)
# https://www.elastic.co/guide/en/elasticsearch/reference/8.17/query-dsl.html
# ---------------------------------------------------------------------------------------------


class ShardFailure(Exception):
    """A failure while running a query on one index's shard (a real cluster reports it per shard)."""

    def __init__(self, kind: str, reason: str, caused_by: dict | None = None):
        super().__init__(reason)
        self.kind, self.reason, self.caused_by = kind, reason, caused_by

    def item(self) -> dict:
        out = {"type": self.kind, "reason": self.reason}
        if self.caused_by:
            out["caused_by"] = self.caused_by
        return out


def _one_key(obj: Any, where: str) -> tuple[str, Any]:
    if not isinstance(obj, dict) or len(obj) != 1:
        raise EsError(
            400, "parsing_exception", f"[{where}] query malformed, must start with a single query name"
        )
    ((key, value),) = obj.items()
    return key, value


def _field_and_spec(body: Any, kind: str) -> tuple[str, Any]:
    if not isinstance(body, dict) or len(body) != 1:
        raise EsError(
            400, "parsing_exception", f"[{kind}] query doesn't support multiple fields, found {sorted(body)}"
        )
    ((field, spec),) = body.items()
    return field, spec


def parse_query(query: Any) -> tuple:
    """A query as a small tuple tree; refuses query types and options the double lacks."""
    kind, body = _one_key(query, "query")
    if kind == "match_all":
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/query-dsl-match-all-query.html
        if body not in ({}, None):
            raise unsupported(f"[match_all] option(s) {sorted(body)}")
        return ("match_all",)
    if kind == "bool":
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/query-dsl-bool-query.html
        if not isinstance(body, dict):
            raise EsError(
                400, "parsing_exception", "[bool] query malformed, no start_object after query name"
            )
        extra = set(body) - {"must", "filter", "should", "must_not", "minimum_should_match"}
        if extra:
            raise unsupported(f"[bool] option(s) {sorted(extra)}")
        clauses = {}
        for occur in ("must", "filter", "should", "must_not"):
            value = body.get(occur, [])
            clauses[occur] = [parse_query(q) for q in (value if isinstance(value, list) else [value])]
        msm = body.get("minimum_should_match")
        if msm is not None:
            if isinstance(msm, bool) or not re.fullmatch(r"-?\d+", str(msm)):
                raise unsupported(f"[bool] minimum_should_match [{msm}] (only whole numbers are)")
            msm = int(msm)
            if msm < 0:
                msm = max(0, len(clauses["should"]) + msm)
        return ("bool", clauses["must"], clauses["filter"], clauses["should"], clauses["must_not"], msm)
    if kind == "term":
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/query-dsl-term-query.html
        field, spec = _field_and_spec(body, kind)
        if isinstance(spec, dict):
            extra = set(spec) - {"value"}
            if extra:
                raise unsupported(f"[term] option(s) {sorted(extra)}")
            if "value" not in spec:
                raise EsError(400, "parsing_exception", "[term] query requires a value")
            spec = spec["value"]
        if isinstance(spec, (list, dict)) or spec is None:
            raise EsError(
                400, "parsing_exception", f"[term] query does not support array of values for [{field}]"
            )
        return ("term", field, spec)
    if kind == "terms":
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/query-dsl-terms-query.html
        if not isinstance(body, dict):
            raise EsError(400, "parsing_exception", "[terms] query malformed")
        extra = [k for k in body if k in ("boost", "_name")]
        if extra or len(body) != 1:
            raise unsupported(f"[terms] option(s) {sorted(extra) or sorted(body)}")
        ((field, values),) = body.items()
        if isinstance(values, dict):
            raise unsupported("[terms] lookup (a terms query reading its values from a document)")
        if not isinstance(values, list) or any(isinstance(v, (list, dict)) or v is None for v in values):
            raise EsError(400, "parsing_exception", f"[terms] query does not support [{field}]")
        return ("terms", field, list(values))
    if kind == "range":
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/query-dsl-range-query.html
        field, spec = _field_and_spec(body, kind)
        if not isinstance(spec, dict):
            raise EsError(
                400, "parsing_exception", f"[range] query malformed, no start_object after field [{field}]"
            )
        extra = set(spec) - {"gte", "gt", "lte", "lt"}
        if extra:
            raise unsupported(f"[range] option(s) {sorted(extra)}")
        return ("range", field, dict(spec))
    if kind == "exists":
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/query-dsl-exists-query.html
        if not isinstance(body, dict) or set(body) != {"field"}:
            raise unsupported(f"[exists] option(s) {sorted(set(body or {}) - {'field'})}")
        return ("exists", body["field"])
    if kind == "ids":
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/query-dsl-ids-query.html
        if not isinstance(body, dict) or set(body) != {"values"}:
            raise unsupported(f"[ids] option(s) {sorted(set(body or {}) - {'values'})}")
        return ("ids", {str(v) for v in body["values"]})
    raise unsupported(f"the query type [{kind}]")


def _parse_aggs(raw: Any) -> dict[str, tuple[str, int]]:
    """Top-level `terms` aggregations only: name -> (field, size).
    https://www.elastic.co/guide/en/elasticsearch/reference/8.17/search-aggregations.html"""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise parse_error("Expected [START_OBJECT] under [aggs]")
    out = {}
    for name, body in raw.items():
        if not isinstance(body, dict) or not body:
            raise parse_error(f"Missing definition for aggregation [{name}]")
        kinds = sorted(set(body) - {"meta"})
        if kinds != ["terms"]:
            raise unsupported(f"the aggregation(s) {kinds} of [{name}] (top-level [terms] only)")
        terms = body["terms"]
        if not isinstance(terms, dict) or "field" not in terms:
            raise unsupported(f"[terms] aggregation [{name}] without a [field] (scripts)")
        extra = sorted(set(terms) - {"field", "size"})
        if extra:
            raise unsupported(f"the [terms] option(s) {extra} of [{name}]")
        size = terms.get("size", 10)
        if isinstance(size, bool) or not isinstance(size, int):
            raise parse_error(f"[terms] failed to parse field [size] of [{name}]")
        if size <= 0:
            raise illegal(f"[size] must be greater than 0. Found [{size}] in [{name}]")
        out[name] = (terms["field"], size)
    return out


def _terms_buckets(field: str, size: int, docs: list) -> dict:
    """A terms aggregation over the matching documents: one bucket per distinct term (a document
    counts once per term it holds), ordered by count descending then key ascending (the default
    `order`), the first `size` returned and the rest summed in `sum_other_doc_count`. One shard
    per index here, so the counts are exact (`doc_count_error_upper_bound` 0).
    https://www.elastic.co/guide/en/elasticsearch/reference/8.17/search-aggregations-bucket-terms-aggregation.html"""
    counts: dict[str, int] = {}
    for index, source in docs:
        resolved = resolve_field(index.mappings.get("properties", {}), field)
        if resolved is None:
            continue  # unmapped in this index: no buckets from it
        definition, path = resolved
        if definition.get("type") != "keyword":
            raise unsupported(f"a [terms] aggregation on field [{field}] of type [{definition.get('type')}]")
        for term in set(_doc_terms(definition, _values_at(source, path))):
            counts[term] = counts.get(term, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "doc_count_error_upper_bound": 0,
        "sum_other_doc_count": sum(c for _, c in ranked[size:]),
        "buckets": [{"key": k, "doc_count": c} for k, c in ranked[:size]],
    }


def resolve_field(properties: dict, name: str) -> tuple[dict, str] | None:
    """(field mapping, path of its values in _source), through objects and multi-fields."""
    parts = name.split(".")
    node = properties
    for i, part in enumerate(parts):
        definition = node.get(part)
        if definition is None:
            return None
        if i == len(parts) - 1:
            return definition, ".".join(parts)
        if _is_object(definition):
            node = definition.get("properties", {})
            continue
        sub = definition.get("fields", {}).get(parts[i + 1])
        if sub is not None and i + 1 == len(parts) - 1:
            return sub, ".".join(parts[: i + 1])
        return None
    return None


def _keyword_term(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return None


def _to_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if value in ("true", "false", ""):
        return value == "true"
    return None


def _to_number(value: Any, ftype: str, definition: dict) -> float | int:
    """A value as the field type indexes it; raises ValueError when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(value)
    number = float(value) if not isinstance(value, int) else value
    if isinstance(number, float) and not math.isfinite(number):
        raise ValueError(value)
    if ftype in INTEGER_TYPES:
        number = int(number) if isinstance(number, int) else int(math.trunc(number))
        if not -INTEGER_TYPES[ftype] <= number < INTEGER_TYPES[ftype]:
            raise ValueError(value)
        return number
    if ftype == "scaled_float":
        return _java_round(float(number) * float(definition["scaling_factor"]))
    if ftype == "float":
        return float(np.float32(number))
    if ftype == "half_float":
        return float(np.float16(number))
    return float(number)


def _doc_terms(definition: dict, values: list) -> list:
    """What a document indexed for a field: the terms a term/range query compares against."""
    ftype = definition.get("type", "object")
    out: list = []
    for value in values:
        if ftype == "keyword":
            term = _keyword_term(value)
            if term is not None and len(term) <= int(definition.get("ignore_above", 2**31)):
                out.append(term)
        elif ftype == "boolean":
            parsed = _to_bool(value)
            if parsed is not None:
                out.append(parsed)
        elif ftype in NUMERIC_TYPES:
            try:
                out.append(_to_number(value, ftype, definition))
            except ValueError:
                pass
        else:
            out.append(value)
    return out


def _number_failure(value: Any) -> ShardFailure:
    return ShardFailure("number_format_exception", f'For input string: "{value}"')


def _range_test(definition: dict, field: str, bounds: dict) -> Callable[[Any], bool]:
    ftype = definition.get("type", "object")
    if ftype == "keyword":
        lo = {k: _keyword_term(v) for k, v in bounds.items()}
        return lambda t: (
            ("gte" not in lo or t >= lo["gte"])
            and ("gt" not in lo or t > lo["gt"])
            and ("lte" not in lo or t <= lo["lte"])
            and ("lt" not in lo or t < lo["lt"])
        )
    if ftype not in NUMERIC_TYPES:
        raise unsupported(f"a [range] query on field [{field}] of type [{ftype}]")
    parsed = {}
    for key, raw in bounds.items():
        if raw is None:
            continue
        try:
            parsed[key] = float(raw) if not isinstance(raw, bool) else math.nan
        except (TypeError, ValueError):
            raise _number_failure(raw) from None
        if math.isnan(parsed[key]):
            raise _number_failure(raw)
    if ftype in INTEGER_TYPES or ftype == "scaled_float":
        factor = float(definition.get("scaling_factor", 1.0)) if ftype == "scaled_float" else 1.0
        lo, hi = -math.inf, math.inf
        # Integer-valued fields turn decimal bounds into whole ones (scaled_float after scaling):
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/number.html#scaled-float-params
        if "gte" in parsed:
            lo = max(lo, math.ceil(parsed["gte"] * factor))
        if "gt" in parsed:
            lo = max(lo, math.ceil(np.nextafter(parsed["gt"] * factor, math.inf)))
        if "lte" in parsed:
            hi = min(hi, math.floor(parsed["lte"] * factor))
        if "lt" in parsed:
            hi = min(hi, math.floor(np.nextafter(parsed["lt"] * factor, -math.inf)))
        return lambda t: lo <= t <= hi
    conv = {"float": np.float32, "half_float": np.float16}.get(ftype, float)
    b = {k: float(conv(v)) for k, v in parsed.items()}
    return lambda t: (
        ("gte" not in b or t >= b["gte"])
        and ("gt" not in b or t > b["gt"])
        and ("lte" not in b or t <= b["lte"])
        and ("lt" not in b or t < b["lt"])
    )


def _query_term(definition: dict, field: str, value: Any, scoring: bool) -> Any:
    """The term a term/terms query looks for in this field, or _DROP when it can match nothing."""
    ftype = definition.get("type", "object")
    if ftype in ("keyword", "boolean") and scoring:
        # A term query on keyword/boolean scores by BM25, which the double does not model.
        raise unsupported(
            f"scoring a [term] query on [{ftype}] field [{field}] (use it in a filter or must_not)"
        )
    if ftype == "keyword":
        return _keyword_term(value)
    if ftype == "boolean":
        parsed = _to_bool(value)
        if parsed is None:
            raise ShardFailure(
                "illegal_argument_exception",
                f"Can't parse boolean value [{value}], expected [true] or [false]",
            )
        return parsed
    if ftype in NUMERIC_TYPES:
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            raise _number_failure(value) from None
        if math.isnan(number):
            raise _number_failure(value)
        if ftype in INTEGER_TYPES and number != math.floor(number):
            return _DROP  # a whole-number field never holds 1.5
        return _to_number(value if isinstance(value, int) else number, ftype, definition)
    raise unsupported(f"a [term]/[terms] query on field [{field}] of type [{ftype}]")


def bind_query(node: tuple, index: Index, scoring: bool) -> Callable[[str, dict], float | None]:
    """The query as a predicate over (id, source) for one index: the score, or None when the
    document does not match. Constant-score queries score 1.0; filter clauses add nothing."""
    kind = node[0]
    properties = index.mappings.get("properties", {})
    if kind == "match_all":
        return lambda _id, _src: 1.0
    if kind == "ids":
        ids = node[1]
        return lambda doc_id, _src: 1.0 if doc_id in ids else None
    if kind == "bool":
        must = [bind_query(q, index, scoring) for q in node[1]]
        filters = [bind_query(q, index, False) for q in node[2]]
        should = [bind_query(q, index, scoring) for q in node[3]]
        must_not = [bind_query(q, index, False) for q in node[4]]
        msm = node[5]
        if msm is None:  # one should clause must match only when nothing else is required
            msm = 1 if should and not must and not filters else 0

        def run_bool(doc_id: str, src: dict) -> float | None:
            score = 0.0
            for q in must:
                s = q(doc_id, src)
                if s is None:
                    return None
                score += s
            if any(q(doc_id, src) is None for q in filters):
                return None
            if any(q(doc_id, src) is not None for q in must_not):
                return None
            matched = 0
            for q in should:
                s = q(doc_id, src)
                if s is not None:
                    matched += 1
                    score += s
            return score if matched >= msm else None

        return run_bool
    field = node[1]
    resolved = resolve_field(properties, field)
    if resolved is None:
        return lambda _id, _src: None  # an unmapped field matches nothing
    definition, path = resolved
    ftype = definition.get("type", "object")
    if kind == "exists":
        if ftype == "text":
            return lambda _id, src: (
                1.0 if any(isinstance(v, (str, int, float)) for v in _values_at(src, path)) else None
            )
        if _is_object(definition):
            return lambda _id, src: 1.0 if any(True for _ in _leaves(_values_at(src, path))) else None
        if ftype == "dense_vector":
            return lambda _id, src: 1.0 if _values_at(src, path) else None
        return lambda _id, src: 1.0 if _doc_terms(definition, _values_at(src, path)) else None
    if ftype == "text":
        raise unsupported(f"a [{kind}] query on [text] field [{field}] (analysis is not modelled)")
    if _is_object(definition) or ftype == "dense_vector":
        raise unsupported(f"a [{kind}] query on field [{field}] of type [{ftype}]")
    if kind in ("term", "terms"):
        values = [node[2]] if kind == "term" else node[2]
        wanted = [t for t in (_query_term(definition, field, v, scoring and kind == "term") for v in values)]
        wanted = [t for t in wanted if t is not _DROP and t is not None]
        return lambda _id, src: (
            1.0 if any(t in wanted for t in _doc_terms(definition, _values_at(src, path))) else None
        )
    if kind == "range":
        test = _range_test(definition, field, node[2])
        return lambda _id, src: (
            1.0 if any(test(t) for t in _doc_terms(definition, _values_at(src, path))) else None
        )
    raise unsupported(f"the query type [{kind}]")


def _leaves(values: list) -> Any:
    for value in values:
        if isinstance(value, dict):
            yield from _leaves(list(value.values()))
        elif isinstance(value, list):
            yield from _leaves(value)
        elif value is not None:
            yield value


# ---------------------------------------------------------------------------------------------
# The HTTP front
# ---------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    double: ElasticsearchDouble


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real node; every response has a length
    server: _Server

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self) -> None:
        raw = self._read_body()
        status, payload = self.server.double.handle(self.command, self.path, self.headers, raw)
        data = b"" if payload is None else json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        # The client refuses a 2xx answer without this header.
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/api-conventions.html
        self.send_header("X-Elastic-Product", "Elasticsearch")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _serve

    def log_message(self, *args: Any) -> None:
        pass


# (methods implemented here -> handler name, methods Elasticsearch answers there that the double
# does not). A method in neither set gets Elasticsearch's 405.
_ROUTES: dict[tuple, tuple[dict[str, str], set[str]]] = {
    (): ({"GET": "info", "HEAD": "ping"}, set()),
    ("_bulk",): ({"POST": "bulk", "PUT": "bulk"}, set()),
    ("_aliases",): ({"POST": "update_aliases"}, {"GET"}),
    ("_alias", "{name}"): ({"GET": "get_alias", "HEAD": "head_alias"}, set()),
    ("{index}",): ({"PUT": "create_index", "DELETE": "delete_index"}, {"GET", "HEAD"}),
    ("{index}", "_mapping"): ({"GET": "get_mapping", "PUT": "put_mapping", "POST": "put_mapping"}, set()),
    ("{index}", "_refresh"): ({"POST": "refresh", "GET": "refresh"}, set()),
    ("{index}", "_forcemerge"): ({"POST": "forcemerge"}, set()),
    ("{index}", "_search"): ({"POST": "search", "GET": "search"}, set()),
    ("{index}", "_msearch"): ({"POST": "msearch", "GET": "msearch"}, set()),
    ("{index}", "_count"): ({"POST": "count", "GET": "count"}, set()),
    ("{index}", "_mget"): ({"POST": "mget", "GET": "mget"}, set()),
    ("{index}", "_bulk"): ({"POST": "bulk", "PUT": "bulk"}, set()),
    ("{index}", "_doc"): ({}, {"POST"}),
    ("{index}", "_doc", "{id}"): (
        {"GET": "get_doc", "PUT": "index_doc", "POST": "index_doc", "DELETE": "delete_doc"},
        {"HEAD"},
    ),
    ("{index}", "_create", "{id}"): ({"PUT": "create_doc", "POST": "create_doc"}, set()),
    ("{index}", "_update", "{id}"): ({"POST": "update_doc"}, set()),
}

_MEDIA = re.compile(r"^\s*application/(?:vnd\.elasticsearch\+)?(json|x-ndjson)\s*(;.*)?$", re.I)


class ElasticsearchDouble:
    """An Elasticsearch node in this process. See the module docstring for what it promises."""

    def __init__(self, version: str = "8.17.6", auto_create_index: bool = True):
        self.version = version
        self.server = _parse_version(version)
        # action.auto_create_index: a write to a missing index creates it, with dynamic mappings.
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-index_.html#index-creation
        self.auto_create_index = auto_create_index
        self.indices: dict[str, Index] = {}
        self.aliases: dict[str, set[str]] = {}
        self.write_flags: dict[tuple[str, str], bool] = {}  # (alias, index) -> is_write_index as set
        self.requests: list[tuple[str, str, dict, Any]] = []
        self.now: Callable[[], float] = time.monotonic
        # Test control, not an Elasticsearch behaviour: while set to an unset Event, _search
        # requests wait for it (a slow cluster, without guessing how slow).
        self.hold_searches: threading.Event | None = None
        # Test control: index name -> reason. That index answers searches and counts as if it had
        # two primary shards and every copy of the second were unreachable: Elasticsearch then
        # answers 200 with the first shard's hits and the failure in `_shards` (partial results
        # are allowed by default: `allow_partial_search_results`, search-search.html), which a
        # client must check. Documents go to the lost shard by a stable hash of their _id.
        self.lost_shard: dict[str, str] = {}
        self.lock = threading.Lock()
        self.node_id = uuid.uuid4().hex[:22]
        self.cluster_uuid = uuid.uuid4().hex[:22]
        self._tasks = itertools.count(1)
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.double = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # A short poll keeps stop() quick: shutdown() waits for the loop to notice.
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -- request plumbing ---------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: Any, raw: bytes) -> tuple[int, Any]:
        parts = urlsplit(target)
        segments = [unquote(s) for s in parts.path.split("/") if s]
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        hold = self.hold_searches
        if hold is not None and segments[-1:] in (["_search"], ["_msearch"]):
            hold.wait(60)
        with self.lock:
            body, body_error = self._decode(segments, headers, raw)
            self.requests.append((method, parts.path, query, body))
            try:
                self._check_media_types(headers, raw)
                if body_error is not None:
                    raise body_error
                return self._route(method, segments, query, body)
            except EsError as exc:
                return exc.status, (None if method == "HEAD" else exc.body())
            except PlainError as exc:
                return exc.status, (None if method == "HEAD" else exc.body())
            except ShardFailure as exc:  # a shard failure outside search: report it whole
                return 400, EsError(400, exc.kind, exc.reason, caused_by=exc.caused_by).body()
            except Exception as exc:  # a bug in the double: answer it loudly rather than drop the connection
                return 500, EsError(
                    500, "looksync_double_internal_error", f"{type(exc).__name__}: {exc}"
                ).body()

    def _decode(self, segments: list[str], headers: Any, raw: bytes) -> tuple[Any, EsError | None]:
        if not raw:
            return None, None
        try:
            if (headers.get("Content-Encoding") or "").lower() == "gzip":
                raw = gzip.decompress(raw)
            text = raw.decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            return None, parse_error(f"unreadable request body: {exc}")
        if segments and segments[-1] in ("_bulk", "_msearch"):
            return self._parse_ndjson(text, segments[-1][1:])
        try:
            return json.loads(text, object_pairs_hook=_no_duplicates), None
        except (ValueError, DuplicateKey) as exc:
            return text, parse_error(f"{exc}")

    def _parse_ndjson(self, text: str, api: str) -> tuple[Any, EsError | None]:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-bulk.html#docs-bulk-api-desc
        if not text.endswith("\n"):
            return text, illegal(f"The {api} request must be terminated by a newline [\\n]")
        lines = []
        for number, line in enumerate(text.split("\n")[:-1], 1):
            if not line.strip():
                continue
            try:
                lines.append(json.loads(line, object_pairs_hook=_no_duplicates))
            except (ValueError, DuplicateKey) as exc:
                return text, parse_error(f"[{number}:1] {exc}")
        return lines, None

    def _check_media_types(self, headers: Any, raw: bytes) -> None:
        """Accept / Content-Type with `compatible-with`: a server of major N accepts N and N-1.
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/rest-api-compatibility.html
        (a 9.x client sends compatible-with=9, which an 8.x server refuses with this error)."""
        accept = headers.get("Accept")
        content_type = headers.get("Content-Type")
        major = self.server[0]

        def version_of(value: str | None) -> int | None:
            match = re.search(r"compatible-with\s*=\s*(\d+)", value or "")
            return int(match.group(1)) if match else None

        def refuse(detail: str) -> EsError:
            headers_named = "[Accept, Content-Type]" if raw else "[Accept]"
            return EsError(
                400,
                "media_type_header_exception",
                f"Invalid media-type value on headers {headers_named}",
                caused_by={"type": "status_exception", "reason": detail},
            )

        a_version, c_version = version_of(accept), version_of(content_type)
        a = major if a_version is None else a_version
        c = major if c_version is None else c_version
        if not major - 1 <= a <= major:
            raise refuse(
                f"Accept version must be either version {major} or {major - 1}, but found {a}. Accept={accept}"
            )
        if raw:
            if not content_type:
                raise PlainError(406, "Content-Type header is missing")
            if not _MEDIA.match(content_type):
                raise PlainError(406, f"Content-Type header [{content_type}] is not supported")
            if not major - 1 <= c <= major:
                raise refuse(
                    f"Content-Type version must be either version {major} or {major - 1}, but found {c}. "
                    f"Content-Type={content_type}"
                )
            if a != c or (a_version is None) != (c_version is None):
                raise refuse(
                    "A compatible version is required on both Content-Type and Accept headers if either one has "
                    f"requested a compatible version and the compatible versions must match. Accept={accept}, "
                    f"Content-Type={content_type}"
                )

    def _route(self, method: str, segments: list[str], query: dict, body: Any) -> tuple[int, Any]:
        args: dict[str, str] = {}
        if not segments:
            key: tuple = ()
        elif segments[0].startswith("_") and not (
            len(segments) == 1 and method == "PUT" and (segments[0],) not in _ROUTES
        ):
            key = (segments[0], *("{name}" for _ in segments[1:]))
            if len(segments) > 1:
                args["name"] = segments[1]
        else:
            # PUT /_name is a create-index request for a bad name, as on a real node.
            args["index"] = segments[0]
            key = ("{index}", *segments[1:2], *("{id}" for _ in segments[2:3]), *segments[3:])
            if len(segments) == 3:
                args["id"] = segments[2]
        path = "/" + "/".join(segments)
        route = _ROUTES.get(key)
        if route is None:
            raise unsupported(f"the API [{method} {path}]")
        handlers, known = route
        if method in handlers:
            return getattr(self, "_api_" + handlers[method])(method, args, query, body)
        if method in known:
            raise unsupported(f"the API [{method} {path}]")
        allowed = ", ".join(sorted(set(handlers) | known))
        raise PlainError(
            405, f"Incorrect HTTP method for uri [{path}] and method [{method}], allowed: [{allowed}]"
        )

    def _params(self, query: dict, allowed: set[str], api: str) -> dict:
        unknown = sorted(set(query) - allowed - HARMLESS_PARAMS)
        if unknown:
            raise unsupported(f"the query parameter(s) {unknown} of [{api}]")
        return query

    @staticmethod
    def _no_body(body: Any, method: str, path: str) -> None:
        if body is not None:
            raise illegal(f"request [{method} {path}] does not support having a body")

    @staticmethod
    def _body_keys(body: Any, allowed: set[str], api: str) -> dict:
        if body is None:
            return {}
        if not isinstance(body, dict):
            raise parse_error(f"[{api}] request body must be an object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise unsupported(f"the body key(s) {unknown} of [{api}]")
        return body

    # -- names and aliases --------------------------------------------------------------------

    @staticmethod
    def _check_index_name(name: str, kind: str = "index") -> None:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-create-index.html#indices-create-api-path-params
        exc = "invalid_index_name_exception" if kind == "index" else "invalid_alias_name_exception"
        label = "index" if kind == "index" else "alias"
        fields = {"index_uuid": "_na_", "index": name} if kind == "index" else {}

        def bad(why: str) -> EsError:
            # InvalidIndexNameException joins with ", ", InvalidAliasNameException with ": ".
            sep = ", " if kind == "index" else ": "
            return EsError(400, exc, f"Invalid {label} name [{name}]{sep}{why}", **fields)

        if kind == "index" and name.lower() != name:
            raise bad("must be lowercase")
        if ":" in name:
            raise bad("must not contain ':'")
        forbidden = [c for c in '\\/*?"<>| ,#' if c in name]
        if forbidden:
            raise bad('must not contain the following characters [ , ", *, \\, <, |, ,, >, /, ?]')
        if name[:1] in ("_", "-", "+"):
            raise bad("must not start with '_', '-', or '+'")
        if name in (".", ".."):
            raise bad("must not be '.' or '..'")
        if len(name.encode()) > 255:
            raise bad("index name is too long, (" + str(len(name.encode())) + " > 255)")

    def _resolve(
        self,
        expression: str,
        *,
        allow_no_indices: bool = True,
        ignore_unavailable: bool = False,
        expand_wildcards: str = "open",
    ) -> list[str]:
        """Concrete index names for a read: names, aliases (fanned out), comma lists, wildcards.
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/api-conventions.html#api-multi-index"""
        expand = set(expand_wildcards.split(","))
        if not expand <= {"open", "closed", "hidden", "all", "none"}:
            raise illegal(f"No enum constant for expand_wildcards [{expand_wildcards}]")
        names: list[str] = []
        for part in expression.split(","):
            if not part:
                continue
            if part.startswith("-"):
                raise unsupported(f"the index exclusion [{part}]")
            if part == "_all" or "*" in part:
                if "none" in expand or not expand & {"open", "all"}:
                    continue
                pattern = "*" if part == "_all" else part
                for name in sorted(self.indices):
                    if _glob(pattern, name):
                        names.append(name)
                for alias in sorted(self.aliases):
                    if _glob(pattern, alias):
                        names.extend(sorted(self.aliases[alias]))
            elif part in self.indices:
                names.append(part)
            elif part in self.aliases:
                names.extend(sorted(self.aliases[part]))
            elif not ignore_unavailable:
                raise index_not_found(part)
        names = list(dict.fromkeys(names))
        if not names and not allow_no_indices:
            raise index_not_found(expression)
        return names

    def _single_index(self, name: str) -> Index:
        """The one index a single-document read targets (an alias must name exactly one)."""
        if name in self.indices:
            return self.indices[name]
        targets = sorted(self.aliases.get(name, ()))
        if not targets:
            raise index_not_found(name)
        if len(targets) > 1:
            raise illegal(
                f"alias [{name}] has more than one index associated with it [{', '.join(targets)}], "
                "can't execute a single index op"
            )
        return self.indices[targets[0]]

    def _write_index(self, name: str, external_delete: bool | None = None) -> Index:
        """The index a write lands in: the index, an alias's write index, or a new index.
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/aliases.html#write-index"""
        if name in self.indices:
            return self.indices[name]
        if name in self.aliases:
            targets = sorted(self.aliases[name])
            flagged = [t for t in targets if self.write_flags.get((name, t)) is True]
            if len(targets) == 1 and self.write_flags.get((name, targets[0])) is not False:
                return self.indices[targets[0]]
            if len(flagged) == 1:
                return self.indices[flagged[0]]
            raise illegal(
                f"no write index is defined for alias [{name}]. The write index may be explicitly disabled using "
                "is_write_index=false or the alias points to multiple indices without one being designated as a "
                "write index"
            )
        if external_delete is False:
            # A delete does not create the index it names (unless externally versioned).
            raise index_not_found(name)
        self._check_index_name(name)
        if not self.auto_create_index:
            raise index_not_found(name, " and [action.auto_create_index] is [false]", "index_expression")
        index = Index(name, {"index.number_of_shards": "1", "index.number_of_replicas": "1"}, {}, self.now())
        self.indices[name] = index
        return index

    # -- cluster ------------------------------------------------------------------------------

    def _api_info(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/rest-api-root.html
        self._params(query, set(), "GET /")
        self._no_body(body, method, "/")
        major, minor = self.server
        lucene = _LUCENE.get(self.server, "9.12.0" if major == 8 else "10.2.2")
        return 200, {
            "name": "looksync-double",
            "cluster_name": "looksync-double",
            "cluster_uuid": self.cluster_uuid,
            "version": {
                "number": self.version,
                "build_flavor": "default",
                "build_type": "docker",
                "build_hash": "0" * 40,
                "build_date": "2025-01-01T00:00:00.000Z",
                "build_snapshot": False,
                "lucene_version": lucene,
                "minimum_wire_compatibility_version": "7.17.0" if major == 8 else "8.18.0",
                "minimum_index_compatibility_version": "7.0.0" if major == 8 else "8.0.0",
            },
            "tagline": "You Know, for Search",
        }

    def _api_ping(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        # HEAD / is the client's ping; https://www.elastic.co/guide/en/elasticsearch/reference/8.17/rest-api-root.html
        self._params(query, set(), "HEAD /")
        return 200, None

    # -- index management ---------------------------------------------------------------------

    def _normalise_settings(self, raw: Any) -> dict:
        """Settings as flat `index.*` keys; only the settings the double honours are accepted.
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/index-modules.html"""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise parse_error("[settings] must be an object")
        flat: dict[str, Any] = {}

        def walk(node: dict, prefix: str) -> None:
            for key, value in node.items():
                if isinstance(value, dict):
                    walk(value, f"{prefix}{key}.")
                else:
                    flat[prefix + key] = value

        walk(raw, "")
        out = {}
        for key, value in flat.items():
            full = key if key.startswith("index.") else f"index.{key}"
            out[full] = value
        for key, value in out.items():
            if key == "index.number_of_shards":
                if str(value) != "1":
                    raise unsupported(
                        f"[index.number_of_shards: {value}] (one shard only: per-shard _seq_no and routing)"
                    )
            elif key == "index.number_of_replicas":
                if not re.fullmatch(r"\d+", str(value)):
                    raise illegal(f"Failed to parse value [{value}] for setting [index.number_of_replicas]")
            elif key in ("index.refresh_interval", "index.gc_deletes"):
                parse_time(key, value)
            elif key == "index.mapping.exclude_source_vectors":
                if self.server < (9, 2):
                    raise illegal(
                        f"unknown setting [{key}] please check that any required plugins are installed, or check "
                        "the breaking changes documentation for removed settings"
                    )
                if str(value).lower() != "false":
                    raise unsupported(f"[{key}: {value}] (vectors left out of _source)")
            else:
                raise unsupported(f"the index setting [{key}]")
        if self.server >= (9, 2) and "index.mapping.exclude_source_vectors" not in out:
            # 9.2 leaves vectors out of _source by default, which the double does not model.
            raise unsupported("an index without [index.mapping.exclude_source_vectors: false] on 9.2+")
        out.setdefault("index.number_of_shards", "1")
        out.setdefault("index.number_of_replicas", "1")
        return {k: str(v) for k, v in out.items()}

    def _check_field(self, name: str, definition: Any, path: str) -> dict:
        """One field mapping, validated; returns it with dotted property names expanded.
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/mapping-params.html"""
        where = f"{path}{name}"
        if not isinstance(definition, dict):
            raise EsError(
                400, "mapper_parsing_exception", f"Expected map for property [fields] on field [{where}]"
            )
        ftype = definition.get("type", "object")
        if ftype not in _FIELD_PARAMS:
            raise unsupported(f"the field type [{ftype}] of [{where}]")
        extra = sorted(set(definition) - _FIELD_PARAMS[ftype])
        if extra:
            raise unsupported(f"the mapping parameter(s) {extra} of [{where}] (type [{ftype}])")
        out = dict(definition)
        if ftype == "object":
            if "enabled" in out and not isinstance(out["enabled"], bool):
                raise EsError(
                    400, "mapper_parsing_exception", f"Failed to parse mapping: [enabled] of [{where}]"
                )
            if "dynamic" in out:
                out["dynamic"] = _dynamic_value(out["dynamic"], where)
            out["properties"] = self._check_properties(out.get("properties", {}), f"{where}.")
            if not out["properties"] and "properties" not in definition:
                del out["properties"]
        elif ftype in ("keyword", "text") and "fields" in out:
            subs = out["fields"]
            if not isinstance(subs, dict):
                raise EsError(
                    400, "mapper_parsing_exception", f"Expected map for property [fields] on field [{where}]"
                )
            for sub, sub_def in subs.items():
                if not isinstance(sub_def, dict) or sub_def.get("type") not in ("keyword", "text"):
                    raise unsupported(f"the multi-field [{where}.{sub}] (only keyword/text sub-fields are)")
                self._check_field(sub, sub_def, f"{where}.")
        elif ftype == "scaled_float":
            if "scaling_factor" not in out:
                raise EsError(
                    400,
                    "mapper_parsing_exception",
                    "Failed to parse mapping: Field [scaling_factor] is required",
                )
            factor = out["scaling_factor"]
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
                raise EsError(
                    400,
                    "mapper_parsing_exception",
                    f"[scaling_factor] must be a positive number, got [{factor}]",
                )
        elif ftype == "dense_vector":
            self._check_vector_mapping(where, out)
        return out

    def _check_vector_mapping(self, where: str, out: dict) -> None:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/dense-vector.html
        if out.get("element_type", "float") != "float":
            raise unsupported(f"[element_type: {out['element_type']}] on [{where}] (float vectors only)")
        dims = out.get("dims")
        if dims is not None and (
            isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= 4096
        ):
            raise EsError(
                400,
                "mapper_parsing_exception",
                f"The number of dimensions should be in the range [1, 4096] but was [{dims}]",
            )
        if "index" in out and not isinstance(out["index"], bool):
            raise EsError(400, "mapper_parsing_exception", f"Failed to parse mapping: [index] of [{where}]")
        similarity = out.get("similarity")
        if similarity is not None and similarity not in SIMILARITIES:
            raise EsError(
                400,
                "mapper_parsing_exception",
                f"Unknown value [{similarity}] for field [similarity] - accepted values are [{', '.join(SIMILARITIES)}]",
            )
        options = out.get("index_options")
        if options is not None:
            if out.get("index") is False:
                raise EsError(
                    400,
                    "mapper_parsing_exception",
                    "Field [index_options] requires field [index] to be configured and set to true",
                )
            if not isinstance(options, dict) or options.get("type") not in VECTOR_INDEX_TYPES:
                raise EsError(
                    400,
                    "mapper_parsing_exception",
                    f"Unknown vector index options type [{(options or {}).get('type')}] for field [{where}]",
                )
            if self.server < VECTOR_INDEX_TYPES[options["type"]]:
                raise EsError(
                    400,
                    "mapper_parsing_exception",
                    f"Unknown vector index options type [{options['type']}] for field [{where}]",
                )
            if options["type"].startswith("bbq") and isinstance(dims, int) and dims < BBQ_MIN_DIMS:
                # DenseVectorFieldMapper.BBQ_MIN_DIMS; the mapper's IllegalArgumentException comes
                # back wrapped as a mapping failure.
                raise EsError(
                    400,
                    "mapper_parsing_exception",
                    f"Failed to parse mapping: {options['type']} does not support dimensions fewer than "
                    f"{BBQ_MIN_DIMS}; provided={dims}",
                )
            extra = sorted(set(options) - {"type", "m", "ef_construction", "confidence_interval"})
            if extra:
                raise unsupported(f"the index_options parameter(s) {extra} of [{where}]")

    def _check_properties(self, properties: Any, path: str) -> dict:
        if not isinstance(properties, dict):
            raise EsError(
                400,
                "mapper_parsing_exception",
                f"Expected map for property [properties] on [{path or '_doc'}]",
            )
        out: dict = {}
        for name, definition in properties.items():
            if "." in name:
                # A dotted name is shorthand for objects: {"a.b": {...}} is {"a": {"properties": {"b": ...}}}.
                head, rest = name.split(".", 1)
                nested = {"properties": {rest: definition}}
                merged = self._check_field(head, nested, path)
                if head in out and _is_object(out[head]):
                    out[head].setdefault("properties", {}).update(merged["properties"])
                else:
                    out[head] = merged
                continue
            out[name] = self._check_field(name, definition, path)
        return out

    def _check_mappings(self, raw: Any) -> dict:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/mapping.html
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise parse_error("[mappings] must be an object")
        extra = sorted(set(raw) - {"dynamic", "_meta", "properties"})
        if extra:
            raise unsupported(f"the mapping key(s) {extra}")
        out: dict = {}
        if "dynamic" in raw:
            out["dynamic"] = _dynamic_value(raw["dynamic"], "_doc")
        if "_meta" in raw:
            if not isinstance(raw["_meta"], dict):
                raise EsError(400, "mapper_parsing_exception", "[_meta] must be an object")
            out["_meta"] = copy.deepcopy(raw["_meta"])
        if "properties" in raw:
            out["properties"] = self._check_properties(raw["properties"], "")
        return out

    def _api_create_index(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-create-index.html
        self._params(query, {"timeout", "master_timeout"}, "create index")
        name = args["index"]
        spec = self._body_keys(body, {"settings", "mappings", "aliases"}, "create index")
        if spec.get("aliases"):
            raise unsupported("[aliases] in a create index request")
        self._check_index_name(name)
        if name in self.indices:
            index = self.indices[name]
            raise EsError(
                400,
                "resource_already_exists_exception",
                f"index [{name}/{index.uuid}] already exists",
                index_uuid=index.uuid,
                index=name,
            )
        if name in self.aliases:
            raise EsError(
                400,
                "invalid_index_name_exception",
                f"Invalid index name [{name}], already exists as alias",
                index_uuid="_na_",
                index=name,
            )
        settings = self._normalise_settings(spec.get("settings"))
        mappings = self._check_mappings(spec.get("mappings"))
        self.indices[name] = Index(name, settings, mappings, self.now())
        return 200, {"acknowledged": True, "shards_acknowledged": True, "index": name}

    def _api_delete_index(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-delete-index.html
        params = self._params(query, {"ignore_unavailable", "timeout", "master_timeout"}, "delete index")
        self._no_body(body, method, "/" + args["index"])
        ignore = parse_bool_param("ignore_unavailable", params.get("ignore_unavailable", "false"), False)
        names = []
        for part in args["index"].split(","):
            if "*" in part or part == "_all":
                # action.destructive_requires_name defaults to true in 8.x.
                raise illegal("Wildcard expressions or all indices are not allowed")
            if part in self.aliases:
                raise illegal(
                    f"The provided expression [{part}] matches an alias, specify the corresponding concrete indices instead."
                )
            if part in self.indices:
                names.append(part)
            elif not ignore:
                raise index_not_found(part)
        for name in names:
            del self.indices[name]
            for alias in list(self.aliases):
                self.aliases[alias].discard(name)
                self.write_flags.pop((alias, name), None)
                if not self.aliases[alias]:
                    del self.aliases[alias]
        return 200, {"acknowledged": True}

    def _api_get_mapping(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-get-mapping.html
        params = self._params(
            query,
            {"allow_no_indices", "expand_wildcards", "ignore_unavailable", "master_timeout"},
            "get mapping",
        )
        self._no_body(body, method, f"/{args['index']}/_mapping")
        names = self._resolve(args["index"], **self._resolve_options(params))
        return 200, {name: {"mappings": copy.deepcopy(self.indices[name].mappings)} for name in names}

    @staticmethod
    def _resolve_options(params: dict, allow_no_indices: bool = True) -> dict:
        return {
            "allow_no_indices": parse_bool_param(
                "allow_no_indices", params.get("allow_no_indices", ""), allow_no_indices
            ),
            "ignore_unavailable": parse_bool_param(
                "ignore_unavailable", params.get("ignore_unavailable", ""), False
            ),
            "expand_wildcards": params.get("expand_wildcards", "open"),
        }

    def _api_put_mapping(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-put-mapping.html
        self._params(query, {"timeout", "master_timeout"}, "put mapping")
        spec = self._body_keys(body, {"properties", "_meta", "dynamic"}, "put mapping")
        update = self._check_mappings(spec)
        names = self._resolve(args["index"], allow_no_indices=False)
        merged = {}
        for name in names:  # every index first: the update applies to all of them or none
            current = self.indices[name].mappings
            result = copy.deepcopy(current)
            if "dynamic" in update:
                result["dynamic"] = update["dynamic"]
            if "_meta" in update:
                result["_meta"] = update["_meta"]  # _meta is replaced whole, never merged
            if "properties" in update:
                result["properties"] = self._merge_properties(
                    current.get("properties", {}), update["properties"], ""
                )
            merged[name] = result
        for name, result in merged.items():
            self.indices[name].mappings = result
        return 200, {"acknowledged": True}

    def _merge_properties(self, current: dict, update: dict, path: str) -> dict:
        """New fields are added (even under `dynamic: strict`); an existing field keeps its type.
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-put-mapping.html#updating-field-mappings"""
        out = copy.deepcopy(current)
        for name, new in update.items():
            old = out.get(name)
            if old is None:
                out[name] = new
                continue
            old_type, new_type = old.get("type", "object"), new.get("type", "object")
            if old_type != new_type:
                raise illegal(
                    f"mapper [{path}{name}] cannot be changed from type [{old_type}] to [{new_type}]"
                )
            if old_type == "object":
                merged = dict(old)
                for key in ("enabled", "dynamic"):
                    if key in new:
                        merged[key] = new[key]
                merged["properties"] = self._merge_properties(
                    old.get("properties", {}), new.get("properties", {}), f"{path}{name}."
                )
                out[name] = merged
                continue
            changes = []
            for key in sorted(set(old) | set(new)):
                if key in ("type", "fields"):
                    continue
                if key == "ignore_above" and key in new:
                    continue  # updatable in place
                if not _json_equal(old.get(key), new.get(key)) and key in new:
                    changes.append(
                        f"Cannot update parameter [{key}] from [{old.get(key)}] to [{new.get(key)}]"
                    )
            if changes:
                raise illegal(
                    f"Mapper for [{path}{name}] conflicts with existing mapper:\n\t" + "\n\t".join(changes)
                )
            merged = {**old, **{k: v for k, v in new.items() if k != "fields"}}
            if "fields" in new:
                merged["fields"] = self._merge_properties(
                    old.get("fields", {}), new["fields"], f"{path}{name}."
                )
            out[name] = merged
        return out

    # -- aliases ------------------------------------------------------------------------------

    def _alias_names(self, name: str) -> list[str]:
        if "*" in name or name == "_all":
            raise unsupported(f"alias wildcards ([{name}])")
        return [n for n in name.split(",") if n]

    def _api_head_alias(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-alias-exists.html
        self._params(query, set(), "alias exists")
        names = self._alias_names(args["name"])
        return (200 if all(n in self.aliases for n in names) else 404), None

    def _api_get_alias(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-get-alias.html
        self._params(query, set(), "get alias")
        self._no_body(body, method, f"/_alias/{args['name']}")
        names = self._alias_names(args["name"])
        out: dict[str, dict] = {}
        for alias in names:
            for index in sorted(self.aliases.get(alias, ())):
                entry: dict = {}
                flag = self.write_flags.get((alias, index))
                if flag is not None:
                    entry["is_write_index"] = flag
                out.setdefault(index, {"aliases": {}})["aliases"][alias] = entry
        missing = [n for n in names if n not in self.aliases]
        if missing:
            # Elasticsearch answers a plain-text error next to whatever it did find.
            text = (
                f"alias [{missing[0]}] missing"
                if len(missing) == 1
                else f"aliases [{','.join(missing)}] missing"
            )
            raise PlainError(404, text, out)
        return 200, out

    def _api_update_aliases(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        """POST /_aliases: atomic, all actions or none.
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-aliases.html

        From 8.14 a `remove` (without must_exist) of an alias the index does not have no longer
        fails the call: the other actions are applied and the response carries `errors: true`
        and one `action_results` entry per action. The shape here follows Elasticsearch's
        IndicesAliasesResponse as of 8.14 (errors, then action_results with action {type,
        indices, aliases}, status and, for a failure, the aliases_not_found_exception); whether
        such a remove failed is decided against the aliases as they were before the call. When
        no action at all is left to apply, the whole call still fails with 404
        aliases_not_found_exception. A `remove` with must_exist: true is checked in order
        against the aliases as the earlier actions of the call left them, and fails the call.
        """
        self._params(query, {"timeout", "master_timeout"}, "update aliases")
        spec = self._body_keys(body, {"actions"}, "update aliases")
        actions = spec.get("actions")
        if not isinstance(actions, list) or not actions:
            raise validation(["Must specify at least one alias action"])
        parsed = []
        for action in actions:
            if not isinstance(action, dict) or len(action) != 1:
                raise parse_error("[aliases] each action must be an object with one action type")
            ((kind, params),) = action.items()
            if kind == "remove_index":
                raise unsupported("the alias action [remove_index]")
            if kind not in ("add", "remove"):
                raise parse_error(f"[aliases] unknown field [{kind}]")
            allowed = (
                {"index", "alias", "is_write_index"} if kind == "add" else {"index", "alias", "must_exist"}
            )
            self._body_keys(params, allowed, f"alias action {kind}")
            if "index" not in params:
                raise illegal("One of [index] or [indices] is required")
            if "alias" not in params:
                raise illegal("One of [alias] or [aliases] is required")
            index, alias = str(params["index"]), str(params["alias"])
            if "*" in index or "," in index or index in self.aliases:
                raise unsupported(f"alias action [index: {index}] naming anything but one concrete index")
            if "*" in alias or "," in alias:
                raise unsupported(f"alias action [alias: {alias}] naming anything but one alias")
            parsed.append((kind, index, alias, params))
        # Resolution first: an action naming a missing index fails the whole call.
        for _, index, _, _ in parsed:
            if index not in self.indices:
                raise index_not_found(index)
        before = {a: set(t) for a, t in self.aliases.items()}
        plan = {a: set(t) for a, t in self.aliases.items()}
        flags = dict(self.write_flags)
        results: list[tuple[str, str, str, EsError | None]] = []
        applied = 0
        for kind, index, alias, params in parsed:
            if kind == "add":
                self._check_index_name(alias, kind="alias")
                if alias in self.indices:
                    raise EsError(
                        400,
                        "invalid_alias_name_exception",
                        f"Invalid alias name [{alias}]: an index or data stream exists with the same name as the alias",
                        index_uuid=self.indices[alias].uuid,
                        index=alias,
                    )
                plan.setdefault(alias, set()).add(index)
                flags.pop((alias, index), None)
                if "is_write_index" in params and params["is_write_index"] is not None:
                    flags[(alias, index)] = bool(params["is_write_index"])
                results.append((kind, index, alias, None))
                applied += 1
                continue
            must_exist = params.get("must_exist")
            if must_exist:
                if index not in plan.get(alias, set()):
                    raise aliases_not_found([alias])
            elif index not in before.get(alias, set()):
                results.append((kind, index, alias, aliases_not_found([alias])))
                continue
            plan.get(alias, set()).discard(index)
            flags.pop((alias, index), None)
            results.append((kind, index, alias, None))
            applied += 1
        if applied == 0:
            raise aliases_not_found(sorted({alias for _, _, alias, _ in parsed}))
        plan = {a: t for a, t in plan.items() if t}
        for alias, targets in plan.items():
            writers = sorted(t for t in targets if flags.get((alias, t)) is True)
            if len(writers) > 1:
                # Elasticsearch reports this as an IllegalStateException: a 500, not a 400.
                raise EsError(
                    500,
                    "illegal_state_exception",
                    f"alias [{alias}] has more than one write index [{','.join(writers)}]",
                )
        self.aliases = plan
        self.write_flags = {k: v for k, v in flags.items() if k[1] in plan.get(k[0], ())}
        errors = any(err is not None for *_, err in results)
        response: dict = {"acknowledged": True, "errors": errors}
        if errors:
            response["action_results"] = [
                {
                    "action": {"type": kind, "indices": [index], "aliases": [alias]},
                    "status": 200 if err is None else err.status,
                    **({"error": err.item()} if err is not None else {}),
                }
                for kind, index, alias, err in results
            ]
        return 200, response

    # -- refresh and force-merge --------------------------------------------------------------

    def _api_refresh(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-refresh.html
        params = self._params(
            query, {"allow_no_indices", "expand_wildcards", "ignore_unavailable"}, "refresh"
        )
        self._no_body(body, method, f"/{args['index']}/_refresh")
        names = self._resolve(args["index"], **self._resolve_options(params))
        now = self.now()
        for name in names:
            index = self.indices[name]
            index.catch_up(now, searching=False)
            index.refresh()
            index.last_refresh = now
        total = sum(1 + self.indices[n].replicas for n in names)
        return 200, {"_shards": {"total": total, "successful": len(names), "failed": 0}}

    def _api_forcemerge(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/indices-forcemerge.html
        params = self._params(query, {"max_num_segments", "wait_for_completion"}, "force merge")
        self._no_body(body, method, f"/{args['index']}/_forcemerge")
        if (
            "max_num_segments" in params
            and parse_long_param("max_num_segments", params["max_num_segments"]) < 1
        ):
            raise illegal("max_num_segments must be at least 1")
        names = self._resolve(args["index"])
        if not parse_bool_param("wait_for_completion", params.get("wait_for_completion", ""), True):
            return 200, {"task": f"{self.node_id}:{next(self._tasks)}"}
        total = sum(1 + self.indices[n].replicas for n in names)
        return 200, {"_shards": {"total": total, "successful": len(names), "failed": 0}}

    # -- documents: parsing against the mapping -----------------------------------------------

    def _vector_problem(self, vector: list, definition: dict, field: str, doc_id: str) -> str | None:
        dims = definition.get("dims")
        described = f"The [dense_vector] field [{field}] in doc [document with id '{doc_id}']"
        if dims is not None and len(vector) > dims:
            return f"{described} has more dimensions than defined in the mapping [{dims}]"
        if dims is not None and len(vector) != dims:
            return f"{described} has a different number of dimensions [{len(vector)}] than defined in the mapping [{dims}]"
        return self._magnitude_problem(
            vector, definition.get("similarity", "cosine") if definition.get("index", True) else None
        )

    def _magnitude_problem(self, vector: list, similarity: str | None) -> str | None:
        """dot_product needs unit-length float vectors; cosine refuses zero vectors.
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/dense-vector.html#dense-vector-similarity
        The unit-length tolerance on the squared magnitude is 1e-3 from 8.15 (1e-4 before)."""
        v = np.asarray(vector, dtype=np.float32)
        squared = float(np.dot(v, v))
        eps = 1e-3 if self.server >= (8, 15) else 1e-4
        if similarity == "dot_product" and abs(squared - 1.0) > eps:
            return "The [dot_product] similarity can only be used with unit-length vectors." + _preview(
                vector
            )
        if similarity == "cosine" and math.sqrt(squared) == 0.0:
            return "The [cosine] similarity does not support vectors with zero magnitude." + _preview(vector)
        return None

    def _parse_document(self, index: Index, doc_id: str, source: Any) -> dict | None:
        """Check a document against the mapping; returns the mapping with any dynamically added
        fields (None when nothing is added). Errors are Elasticsearch's 400s for the same input.
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/dynamic-mapping.html"""
        if not isinstance(source, dict):
            raise EsError(400, "document_parsing_exception", "failed to parse: source is not an object")
        mappings = copy.deepcopy(index.mappings)
        root_dynamic = mappings.get("dynamic", "true")
        properties = mappings.setdefault("properties", {})
        changed = self._parse_object(source, properties, "", root_dynamic, doc_id)
        if not changed:
            return None
        return mappings

    def _parse_object(self, obj: dict, properties: dict, path: str, dynamic: str, doc_id: str) -> bool:
        changed = False
        for raw_key, value in obj.items():
            parts = raw_key.split(".")
            # A dotted key walks (or creates) the objects it names.
            node_props, node_path, node_dynamic = properties, path, dynamic
            for part in parts[:-1]:
                definition = node_props.get(part)
                if definition is None:
                    if node_dynamic == "strict":
                        raise self._strict(part, node_path)
                    if node_dynamic == "false":
                        node_props = None
                        break
                    definition = node_props[part] = {"properties": {}}
                    changed = True
                if not _is_object(definition):
                    raise EsError(
                        400,
                        "document_parsing_exception",
                        f"Could not dynamically add mapping for field [{node_path}{raw_key}]. "
                        f"Existing mapping for [{node_path}{part}] must be of type object but found [{definition['type']}].",
                    )
                if definition.get("enabled") is False:
                    node_props = None
                    break
                node_dynamic = definition.get("dynamic", node_dynamic)
                node_path = f"{node_path}{part}."
                node_props = definition.setdefault("properties", {})
            if node_props is None:
                continue
            changed |= self._parse_field(parts[-1], value, node_props, node_path, node_dynamic, doc_id)
        return changed

    @staticmethod
    def _strict(name: str, path: str) -> EsError:
        within = path[:-1] if path else "_doc"
        return EsError(
            400,
            "strict_dynamic_mapping_exception",
            f"mapping set to strict, dynamic introduction of [{name}] within [{within}] is not allowed",
        )

    def _parse_field(
        self, name: str, value: Any, properties: dict, path: str, dynamic: str, doc_id: str
    ) -> bool:
        full = f"{path}{name}"
        definition = properties.get(name)
        if value is None or (isinstance(value, list) and not value):
            return False  # nulls and empty arrays index nothing and add no mapping
        if definition is None:
            if dynamic == "strict":
                raise self._strict(name, path)
            if dynamic == "false":
                return False
            definition = self._dynamic_definition(full, value)
            if definition is None:
                return False
            properties[name] = definition
            self._parse_field(name, value, properties, path, dynamic, doc_id)
            return True
        ftype = definition.get("type", "object")
        if ftype == "object":
            if definition.get("enabled") is False:
                return False  # kept in _source, never parsed
            changed = False
            for item in value if isinstance(value, list) else [value]:
                if not isinstance(item, dict):
                    raise EsError(
                        400,
                        "document_parsing_exception",
                        f"object mapping for [{full}] tried to parse field [{name}] as object, but found a concrete value",
                    )
                sub_dynamic = definition.get("dynamic", dynamic)
                changed |= self._parse_object(
                    item, definition.setdefault("properties", {}), f"{full}.", sub_dynamic, doc_id
                )
            return changed
        if ftype == "dense_vector":
            if not isinstance(value, list) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in value
            ):
                raise self._field_failure(
                    full, ftype, doc_id, value, "illegal_argument_exception", "expected an array of numbers"
                )
            problem = self._vector_problem(value, definition, full, doc_id)
            if problem:
                raise EsError(
                    400,
                    "document_parsing_exception",
                    f"failed to parse: {problem}",
                    caused_by={"type": "illegal_argument_exception", "reason": problem},
                )
            if definition.get("dims") is None:
                definition["dims"] = len(value)
                return True
            return False
        for item in self._flatten(value):
            if isinstance(item, dict):
                raise self._field_failure(
                    full, ftype, doc_id, item, "illegal_state_exception", "Can't get text on a START_OBJECT"
                )
            if ftype == "boolean" and _to_bool(item) is None:
                raise self._field_failure(
                    full,
                    ftype,
                    doc_id,
                    item,
                    "illegal_argument_exception",
                    f"Failed to parse value [{item}] as only [true] or [false] are allowed.",
                )
            if ftype in NUMERIC_TYPES:
                try:
                    _to_number(item, ftype, definition)
                except ValueError:
                    raise self._field_failure(
                        full, ftype, doc_id, item, "number_format_exception", f'For input string: "{item}"'
                    ) from None
        return False

    @staticmethod
    def _flatten(value: Any) -> list:
        if isinstance(value, list):
            return [x for v in value for x in ElasticsearchDouble._flatten(v)]
        return [value]

    @staticmethod
    def _field_failure(field: str, ftype: str, doc_id: str, value: Any, cause: str, detail: str) -> EsError:
        shown = (
            json.dumps(value)
            if isinstance(value, (dict, list))
            else str(value).lower()
            if isinstance(value, bool)
            else value
        )
        return EsError(
            400,
            "document_parsing_exception",
            f"failed to parse field [{field}] of type [{ftype}] in document with id '{doc_id}'. Preview of field's value: '{shown}'",
            caused_by={"type": cause, "reason": detail},
        )

    def _dynamic_definition(self, field: str, value: Any) -> dict | None:
        """The mapping Elasticsearch's dynamic mapping gives a new field.
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/dynamic-field-mapping.html"""
        sample = value
        if isinstance(value, list):
            # An array of 128..4096 floats becomes a dense_vector (8.11+); otherwise its first value decides.
            if 128 <= len(value) <= 4096 and all(isinstance(x, float) for x in value):
                return {
                    "type": "dense_vector",
                    "dims": len(value),
                    "index": True,
                    "similarity": "cosine",
                    "index_options": {"type": "int8_hnsw", "m": 16, "ef_construction": 100},
                }
            flat = [x for x in self._flatten(value) if x is not None]
            if not flat:
                return None
            sample = flat[0]
        if isinstance(sample, bool):
            return {"type": "boolean"}
        if isinstance(sample, int):
            return {"type": "long"}
        if isinstance(sample, float):
            return {"type": "float"}
        if isinstance(sample, dict):
            return {"properties": {}}
        if isinstance(sample, str):
            if re.match(r"^\d{4}[-/]\d{2}[-/]\d{2}", sample):
                raise unsupported(
                    f"date detection (the string [{sample}] of new field [{field}] would map as a date)"
                )
            return {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}}
        return None

    # -- documents: versioning and the write path ---------------------------------------------

    def _current(self, index: Index, doc_id: str, now: float) -> tuple[dict | None, dict | None]:
        """(live document, remembered delete). A delete is remembered for index.gc_deletes.
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-delete.html#delete-versioning"""
        doc = index.docs.get(doc_id)
        if doc is not None:
            return doc, None
        tomb = index.tombstones.get(doc_id)
        if tomb is not None and now - tomb["deleted_at"] > index.gc_deletes:
            del index.tombstones[doc_id]
            tomb = None
        return None, tomb

    @staticmethod
    def _versioning(
        params: dict, op: str, where: str = ""
    ) -> tuple[tuple[int, int] | None, int | None, str, list[str]]:
        """(if_seq_no/if_primary_term, version, version_type, validation errors) of a write.
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/optimistic-concurrency-control.html
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-index_.html#index-versioning"""
        errors: list[str] = []

        def as_long(key: str) -> int | None:
            if key not in params or params[key] is None:
                return None
            value = params[key]
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            return parse_long_param(key, str(value))

        seq_no, term, version = as_long("if_seq_no"), as_long("if_primary_term"), as_long("version")
        version_type = str(params.get("version_type") or "internal")
        if version_type == "external_gt":
            version_type = "external"
        if version_type not in ("internal", "external", "external_gte"):
            raise illegal(f"No version type match [{version_type}]")
        if seq_no is not None and seq_no < 0:
            raise illegal(f"sequence numbers must be non negative. got [{seq_no}].")
        if term is not None and term < 0:
            raise illegal(f"primary term must be non negative. got [{term}]")
        term = term or None  # 0 means "not given"
        upper = version_type.upper()
        if op == "create":
            if version_type != "internal":
                errors.append("create operations only support internal versioning. use index instead")
            elif version is not None:
                errors.append("create operations do not support explicit versions. use index instead")
            if seq_no is not None:
                errors.append("create operations do not support compare and set. use index instead")
        else:
            if version_type != "internal" and (version is None or version < 0):
                errors.append(
                    f"illegal version value [{-3 if version is None else version}] for version type [{upper}]"
                )
            if version_type == "internal" and version is not None:
                errors.append(
                    "internal versioning can not be used for optimistic concurrency control. "
                    "Please use `if_seq_no` and `if_primary_term` instead"
                )
            if seq_no is not None and (version_type != "internal" or version is not None):
                errors.append("compare and write operations can not use versioning")
        if seq_no is not None and term is None:
            errors.append("ifSeqNo is set, but primary term is [0]")
        if term is not None and seq_no is None:
            errors.append(f"ifSeqNo is unassigned, but primary term is [{term}]")
        cas = (seq_no, term) if seq_no is not None and term is not None else None
        return cas, version, version_type, errors

    def _conflict(self, index: Index, doc_id: str, explanation: str) -> EsError:
        return EsError(
            409,
            "version_conflict_engine_exception",
            f"[{doc_id}]: version conflict, {explanation}",
            **index.error_fields(),
        )

    def _plan_version(
        self,
        index: Index,
        doc_id: str,
        op: str,
        cas: tuple[int, int] | None,
        version: int | None,
        version_type: str,
        now: float,
    ) -> tuple[int, dict | None]:
        """The version a write gets, or a 409 as InternalEngine decides it (VersionType rules)."""
        doc, tomb = self._current(index, doc_id, now)
        current = doc["_version"] if doc else tomb["version"] if tomb else NOT_FOUND
        if cas is not None:
            if doc is None:
                raise self._conflict(
                    index,
                    doc_id,
                    f"required seqNo [{cas[0]}], primary term [{cas[1]}]. but no document was found",
                )
            if (doc["_seq_no"], doc["_primary_term"]) != cas:
                raise self._conflict(
                    index,
                    doc_id,
                    f"required seqNo [{cas[0]}], primary term [{cas[1]}]. current document has seqNo "
                    f"[{doc['_seq_no']}] and primary term [{doc['_primary_term']}]",
                )
        if op == "create" and doc is not None:
            raise self._conflict(index, doc_id, f"document already exists (current version [{current}])")
        if version_type == "internal":
            return (1 if current == NOT_FOUND else current + 1), doc
        assert version is not None
        if current != NOT_FOUND:
            if version_type == "external" and current >= version:
                raise self._conflict(
                    index,
                    doc_id,
                    f"current version [{current}] is higher or equal to the one provided [{version}]",
                )
            if version_type == "external_gte" and current > version:
                raise self._conflict(
                    index, doc_id, f"current version [{current}] is higher than the one provided [{version}]"
                )
        return version, doc

    def _store(self, index: Index, doc_id: str, source: dict | None, version: int, now: float) -> dict:
        seq_no = index.next_seq_no()
        if source is None:
            index.docs.pop(doc_id, None)
            index.tombstones[doc_id] = {"version": version, "seq_no": seq_no, "deleted_at": now}
            record = None
        else:
            index.tombstones.pop(doc_id, None)
            record = {
                "source": source,
                "_version": version,
                "_seq_no": seq_no,
                "_primary_term": PRIMARY_TERM,
                "written_at": now,
            }
            index.docs[doc_id] = record
        index.pending.append((now, doc_id, record))
        return {"_version": version, "_seq_no": seq_no, "_primary_term": PRIMARY_TERM}

    def _index_op(
        self,
        index: Index,
        doc_id: str,
        op: str,
        source: Any,
        cas: tuple[int, int] | None,
        version: int | None,
        version_type: str,
    ) -> dict:
        now = self.now()
        index.catch_up(now, searching=False)
        mapping_update = self._parse_document(index, doc_id, source)
        if mapping_update is not None:
            # The dynamic mapping update reaches the cluster before the write itself, so it
            # stays even when the write then fails a version check.
            index.mappings = mapping_update
        new_version, existing = self._plan_version(index, doc_id, op, cas, version, version_type, now)
        stored = self._store(index, doc_id, copy.deepcopy(source), new_version, now)
        created = existing is None
        return {"result": "created" if created else "updated", "status": 201 if created else 200, **stored}

    def _delete_op(
        self, index: Index, doc_id: str, cas: tuple[int, int] | None, version: int | None, version_type: str
    ) -> dict:
        """A delete of a missing document still takes a _seq_no and leaves a tombstone, and
        answers not_found (404), as Elasticsearch's engine does."""
        now = self.now()
        index.catch_up(now, searching=False)
        new_version, existing = self._plan_version(index, doc_id, "delete", cas, version, version_type, now)
        stored = self._store(index, doc_id, None, new_version, now)
        found = existing is not None
        return {"result": "deleted" if found else "not_found", "status": 200 if found else 404, **stored}

    def _update_op(self, index: Index, doc_id: str, spec: dict, cas: tuple[int, int] | None) -> dict:
        """The _update API's read-merge-write.
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-update.html"""
        now = self.now()
        index.catch_up(now, searching=False)
        doc, _ = self._current(index, doc_id, now)
        if doc is None:
            if "upsert" in spec or spec.get("doc_as_upsert"):
                # doc_as_upsert wins over an upsert document when both are given.
                source = spec["doc"] if spec.get("doc_as_upsert") else spec["upsert"]
                return self._index_op(index, doc_id, "create", source, None, None, "internal")
            raise EsError(
                404, "document_missing_exception", f"[{doc_id}]: document missing", **index.error_fields()
            )
        if cas is not None and (doc["_seq_no"], doc["_primary_term"]) != cas:
            raise self._conflict(
                index,
                doc_id,
                f"required seqNo [{cas[0]}], primary term [{cas[1]}]. current document has seqNo "
                f"[{doc['_seq_no']}] and primary term [{doc['_primary_term']}]",
            )
        merged = _merge(doc["source"], spec["doc"])
        if spec.get("detect_noop", True) and _json_equal(merged, doc["source"]):
            return {
                "result": "noop",
                "status": 200,
                "_version": doc["_version"],
                "_seq_no": doc["_seq_no"],
                "_primary_term": doc["_primary_term"],
                "noop": True,
            }
        return self._index_op(
            index, doc_id, "index", merged, (doc["_seq_no"], doc["_primary_term"]), None, "internal"
        )

    @staticmethod
    def _refresh_policy(params: dict) -> str:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-refresh.html
        value = params.get("refresh", "false")
        if value in ("", "true"):
            return "true"
        if value in ("false", "wait_for"):
            return value
        raise illegal(f"Unknown value for refresh: [{value}].")

    def _apply_refresh(self, policy: str, indices: list[Index]) -> bool:
        """Refresh after a write; True when the response should say forced_refresh."""
        if policy == "false":
            return False
        for index in indices:
            if policy == "wait_for" and index.refresh_interval < 0:
                # A real node would wait for a refresh that never comes.
                raise unsupported(
                    "[refresh=wait_for] on an index with refresh disabled (it would wait forever)"
                )
            index.refresh()
            index.last_refresh = self.now()
        return policy == "true"

    def _write_response(self, index: Index, doc_id: str, result: dict, forced: bool) -> dict:
        out = {
            "_index": index.name,
            "_id": doc_id,
            "_version": result["_version"],
            "result": result["result"],
            "_shards": {"total": 0, "successful": 0, "failed": 0}
            if result.get("noop")
            else index.write_shards(),
            "_seq_no": result["_seq_no"],
            "_primary_term": result["_primary_term"],
        }
        if forced and not result.get("noop"):
            out["forced_refresh"] = True
        return out

    @staticmethod
    def _check_id(doc_id: str) -> None:
        if len(doc_id.encode()) > 512:
            raise validation(
                [
                    f"id [{doc_id}] is too long, must be no longer than 512 bytes but was: {len(doc_id.encode())}"
                ]
            )

    # -- single-document APIs -----------------------------------------------------------------

    _WRITE_PARAMS = {"if_seq_no", "if_primary_term", "version", "version_type", "refresh", "timeout"}

    def _api_index_doc(
        self, method: str, args: dict, query: dict, body: Any, endpoint: str = "_doc"
    ) -> tuple[int, Any]:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-index_.html
        params = self._params(query, self._WRITE_PARAMS | {"op_type"}, f"index ({endpoint})")
        op = params.get("op_type", "create" if endpoint == "_create" else "index")
        if endpoint == "_create" and op != "create":
            raise illegal(f"opType must be 'create', found: [{op}]")
        if op not in ("index", "create"):
            raise illegal(f"opType must be 'create' or 'index', found: [{op}]")
        doc_id = args["id"]
        cas, version, version_type, errors = self._versioning(params, op)
        if body is None:
            errors.insert(0, "source is missing")
        if errors:
            raise validation(errors)
        self._check_id(doc_id)
        policy = self._refresh_policy(params)
        index = self._write_index(args["index"])
        result = self._index_op(index, doc_id, op, body, cas, version, version_type)
        forced = self._apply_refresh(policy, [index])
        return result["status"], self._write_response(index, doc_id, result, forced)

    def _api_create_doc(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-index_.html#docs-index-api-request
        return self._api_index_doc(method, args, query, body, endpoint="_create")

    def _api_delete_doc(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-delete.html
        params = self._params(query, self._WRITE_PARAMS, "delete")
        self._no_body(body, method, f"/{args['index']}/_doc/{args['id']}")
        cas, version, version_type, errors = self._versioning(params, "delete")
        if errors:
            raise validation(errors)
        policy = self._refresh_policy(params)
        index = self._write_index(args["index"], external_delete=version_type != "internal")
        result = self._delete_op(index, args["id"], cas, version, version_type)
        forced = self._apply_refresh(policy, [index])
        return result["status"], self._write_response(index, args["id"], result, forced)

    def _api_update_doc(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-update.html
        if "version" in query or "version_type" in query:
            # The REST layer refuses these for _update before anything else.
            raise validation(
                [
                    "internal versioning can not be used for optimistic concurrency control. Please use `if_seq_no` and `if_primary_term` instead"
                ]
            )
        params = self._params(
            query, {"if_seq_no", "if_primary_term", "retry_on_conflict", "refresh", "timeout"}, "update"
        )
        spec = self._update_spec(body, "update")
        retries = parse_long_param("retry_on_conflict", params.get("retry_on_conflict", "0"))
        cas, errors = self._update_validation(args["id"], params, spec, retries)
        if errors:
            raise validation(errors)
        policy = self._refresh_policy(params)
        index = self._write_index(args["index"])
        result = self._update_op(index, args["id"], spec, cas)
        forced = self._apply_refresh(policy, [index])
        return result["status"], self._write_response(index, args["id"], result, forced)

    def _update_spec(self, body: Any, api: str) -> dict:
        if isinstance(body, dict) and "script" in body:
            raise unsupported("[script] in an update (scripts are not implemented by the double)")
        spec = self._body_keys(body, {"doc", "doc_as_upsert", "upsert", "detect_noop"}, api)
        for key in ("doc", "upsert"):
            if key in spec and not isinstance(spec[key], dict):
                raise parse_error(f"[{api}] [{key}] must be an object")
        for key in ("doc_as_upsert", "detect_noop"):
            if key in spec and not isinstance(spec[key], bool):
                raise parse_error(f"[{api}] [{key}] must be a boolean")
        return spec

    def _update_validation(
        self, doc_id: str, params: dict, spec: dict, retries: int
    ) -> tuple[tuple[int, int] | None, list[str]]:
        cas, _, _, errors = self._versioning(
            {k: params.get(k) for k in ("if_seq_no", "if_primary_term")}, "index"
        )
        if retries < 0:
            errors.append("retry_on_conflict must be greater than or equal to 0")
        if cas is not None:
            if retries > 0:
                errors.append("compare and write operations can not be retried")
            if spec.get("doc_as_upsert"):
                errors.append("compare and write operations can not be used with upsert")
            if "upsert" in spec:
                errors.append("upsert requests don't support `if_seq_no` and `if_primary_term`")
        if "doc" not in spec:
            errors.append("script or doc is missing")
        if len(doc_id.encode()) > 512:
            errors.append(
                f"id [{doc_id}] is too long, must be no longer than 512 bytes but was: {len(doc_id.encode())}"
            )
        return cas, errors

    def _source_params(self, params: dict) -> tuple[bool, list[str], list[str]]:
        """(_source wanted, includes, excludes) from the _source* query parameters.
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-get.html#get-source-filtering"""
        raw = params.get("_source")
        includes = [p for p in params.get("_source_includes", "").split(",") if p]
        excludes = [p for p in params.get("_source_excludes", "").split(",") if p]
        if raw in (None, "", "true"):
            return True, includes, excludes
        if raw == "false":
            return False, [], []
        return True, includes + [p for p in raw.split(",") if p], excludes

    def _found(
        self, index: Index, doc_id: str, doc: dict, source_opts: tuple[bool, list[str], list[str]]
    ) -> dict:
        out = {
            "_index": index.name,
            "_id": doc_id,
            "_version": doc["_version"],
            "_seq_no": doc["_seq_no"],
            "_primary_term": doc["_primary_term"],
            "found": True,
        }
        wanted, includes, excludes = source_opts
        if wanted:
            out["_source"] = _filter_source(copy.deepcopy(doc["source"]), includes, excludes)
        return out

    def _check_realtime(self, params: dict) -> None:
        if not parse_bool_param("realtime", params.get("realtime", ""), True):
            raise unsupported("[realtime=false] (reads from the last refresh)")

    def _api_get_doc(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        # Real time: the latest write, refreshed or not.
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-get.html#realtime
        params = self._params(query, {"_source", "_source_excludes", "_source_includes", "realtime"}, "get")
        self._no_body(body, method, f"/{args['index']}/_doc/{args['id']}")
        self._check_realtime(params)
        index = self._single_index(args["index"])
        doc, _ = self._current(index, args["id"], self.now())
        if doc is None:
            return 404, {"_index": index.name, "_id": args["id"], "found": False}
        return 200, self._found(index, args["id"], doc, self._source_params(params))

    def _api_mget(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-multi-get.html
        params = self._params(query, {"_source", "_source_excludes", "_source_includes", "realtime"}, "mget")
        self._check_realtime(params)
        spec = self._body_keys(body, {"ids", "docs"}, "mget")
        if "ids" in spec and "docs" in spec:
            raise unsupported("[ids] and [docs] together in one mget")
        if "docs" in spec:
            items = []
            for entry in spec["docs"]:
                entry = self._body_keys(entry, {"_id", "_index"}, "mget docs entry")
                if "_id" not in entry:
                    raise validation(["id is missing for doc 0"])
                items.append((str(entry.get("_index", args["index"])), str(entry["_id"])))
        else:
            ids = spec.get("ids", [])
            if not isinstance(ids, list):
                raise parse_error("[mget] [ids] must be an array")
            items = [(args["index"], str(i)) for i in ids]
        if not items:
            raise validation(["no documents to get"])
        source_opts = self._source_params(params)
        now = self.now()
        docs = []
        for name, doc_id in items:
            try:
                index = self._single_index(name)
            except EsError as exc:
                docs.append(
                    {"_index": name, "_id": doc_id, "error": {"root_cause": [exc.item()], **exc.item()}}
                )
                continue
            doc, _ = self._current(index, doc_id, now)
            if doc is None:
                docs.append({"_index": index.name, "_id": doc_id, "found": False})
            else:
                docs.append(self._found(index, doc_id, doc, source_opts))
        return 200, {"docs": docs}

    # -- bulk ---------------------------------------------------------------------------------

    def _api_bulk(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        """NDJSON bulk: each item applied on its own, in order; one failing leaves the rest.
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/docs-bulk.html"""
        params = self._params(query, {"refresh", "timeout"}, "bulk")
        policy = self._refresh_policy(params)
        if not isinstance(body, list) or not body:
            raise validation(["no requests added"])
        default_index = args.get("index")
        operations = []
        errors: list[str] = []
        i = 0
        while i < len(body):
            line = body[i]
            if not isinstance(line, dict) or len(line) != 1:
                raise illegal(
                    f"Malformed action/metadata line [{i + 1}], expected START_OBJECT or END_OBJECT but found [{type(line).__name__}]"
                )
            ((action, meta),) = line.items()
            if action not in ("index", "create", "update", "delete"):
                raise illegal(
                    f"Malformed action/metadata line [{i + 1}], expected one of [create, delete, index, update] but found [{action}]"
                )
            allowed = {"_index", "_id", "if_seq_no", "if_primary_term", "version", "version_type"}
            if action == "update":
                allowed = {"_index", "_id", "if_seq_no", "if_primary_term", "retry_on_conflict"}
            self._body_keys(meta, allowed, f"bulk {action} metadata")
            payload = None
            if action != "delete":
                if i + 1 >= len(body):
                    raise illegal(
                        f"Malformed action/metadata line [{i + 1}], expected a source line after it"
                    )
                payload = body[i + 1]
                i += 2
            else:
                i += 1
            name = meta.get("_index", default_index)
            if name is None:
                errors.append("index is missing")
                continue
            if "_id" not in meta:
                if action == "index" or action == "create":
                    raise unsupported("bulk index/create without [_id] (auto-generated ids)")
                errors.append("id is missing")
                continue
            doc_id = str(meta["_id"])
            op = "create" if action == "create" else action
            if action == "update":
                try:
                    spec = self._update_spec(payload, "bulk update")
                except EsError as exc:
                    if exc.kind != UNSUPPORTED:
                        raise
                    # A script is refused for its item only; the other items still run.
                    operations.append((action, str(name), doc_id, exc, None, None, "internal"))
                    continue
                retries = parse_long_param("retry_on_conflict", str(meta.get("retry_on_conflict", 0)))
                cas, item_errors = self._update_validation(doc_id, meta, spec, retries)
                operations.append((action, str(name), doc_id, spec, cas, None, "internal"))
            else:
                cas, version, version_type, item_errors = self._versioning(meta, op)
                if action != "delete" and not isinstance(payload, dict):
                    item_errors.append("source is missing")
                operations.append((action, str(name), doc_id, payload, cas, version, version_type))
            errors.extend(item_errors)
        if errors:
            # BulkRequest.validate: any invalid item refuses the whole request.
            raise validation(errors)
        items = []
        touched: dict[str, Index] = {}
        for action, name, doc_id, payload, cas, version, version_type in operations:
            try:
                if isinstance(payload, EsError):
                    raise payload
                if action == "delete":
                    index = self._write_index(name, external_delete=version_type != "internal")
                    result = self._delete_op(index, doc_id, cas, version, version_type)
                else:
                    index = self._write_index(name)
                    if action == "update":
                        result = self._update_op(index, doc_id, payload, cas)
                    else:
                        result = self._index_op(index, doc_id, action, payload, cas, version, version_type)
            except EsError as exc:
                target = self.indices.get(name)
                items.append(
                    {
                        action: {
                            "_index": target.name if target else name,
                            "_id": doc_id,
                            "status": exc.status,
                            "error": exc.item(),
                        }
                    }
                )
                continue
            touched[index.name] = index
            items.append(
                {action: {**self._write_response(index, doc_id, result, False), "status": result["status"]}}
            )
        forced = self._apply_refresh(policy, list(touched.values()))
        if forced:
            for item in items:
                (entry,) = item.values()
                if "error" not in entry and entry.get("result") != "noop":
                    entry["forced_refresh"] = True
        return 200, {
            "took": 1,
            "errors": any("error" in next(iter(it.values())) for it in items),
            "items": items,
        }

    # -- search and count ---------------------------------------------------------------------

    def _search_targets(self, args: dict, params: dict, now: float) -> list[Index]:
        names = self._resolve(args["index"], **self._resolve_options(params))
        indices = [self.indices[n] for n in names]
        for index in indices:
            index.catch_up(now, searching=True)
        return indices

    def _parse_source_option(self, value: Any) -> tuple[bool, list[str], list[str]]:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/search-fields.html#source-filtering
        if value is None or value is True:
            return True, [], []
        if value is False:
            return False, [], []
        if isinstance(value, str):
            return True, [value], []
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return True, list(value), []
        if isinstance(value, dict):
            self._body_keys(value, {"includes", "excludes"}, "_source")

            def as_list(v: Any) -> list[str]:
                return [v] if isinstance(v, str) else list(v or [])

            return True, as_list(value.get("includes")), as_list(value.get("excludes"))
        raise parse_error("[_source] must be a boolean, a string, an array or an object")

    def _answering(self, index: Index):
        """The documents a search over `index` sees, and the failure of its lost shard if a test
        set one (`lost_shard`)."""
        reason = self.lost_shard.get(index.name)
        if reason is None:
            return index.visible.items(), None
        docs = [(d, r) for d, r in index.visible.items() if zlib.crc32(d.encode()) % 2 == 0]
        failure = {
            "shard": 1,
            "index": index.name,
            "node": self.node_id,
            "reason": {"type": "node_not_connected_exception", "reason": reason},
        }
        return docs, failure

    def _shard_count(self, targets: list[Index]) -> int:
        return sum(2 if index.name in self.lost_shard else 1 for index in targets)

    def _shards(self, total: int, failures: list[dict]) -> dict:
        out = {"total": total, "successful": total - len(failures), "skipped": 0, "failed": len(failures)}
        if failures:
            out["failures"] = failures
        return out

    def _shard_failure(self, index: Index, exc: ShardFailure) -> dict:
        return {"shard": 0, "index": index.name, "node": self.node_id, "reason": exc.item()}

    @staticmethod
    def _all_shards_failed(phase: str, failures: list[dict]) -> EsError:
        first = failures[0]["reason"]
        return EsError(
            400,
            "search_phase_execution_exception",
            "all shards failed",
            root_cause=[f["reason"] for f in failures[:1]],
            phase=phase,
            grouped=True,
            failed_shards=failures,
            caused_by=first,
        )

    def _api_search(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/search-search.html
        params = self._params(query, {"allow_no_indices", "expand_wildcards", "ignore_unavailable"}, "search")
        spec = self._body_keys(
            body,
            {
                "knn",
                "query",
                "size",
                "from",
                "track_total_hits",
                "_source",
                "sort",
                "search_after",
                "aggs",
                "aggregations",
            },
            "search",
        )
        if "aggs" in spec and "aggregations" in spec:
            raise parse_error("Found two aggregation definitions: [aggs] and [aggregations]")
        aggs = _parse_aggs(spec.get("aggs", spec.get("aggregations")))
        if "from" in spec:
            raise unsupported("[from] in a search (paging)")
        size = spec.get("size", 10)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise illegal(f"[size] parameter cannot be negative, found [{size}]")
        if size > MAX_RESULT_WINDOW:
            raise illegal(
                f"Result window is too large, from + size must be less than or equal to: [{MAX_RESULT_WINDOW}] but was [{size}]. "
                "See the scroll api for a more efficient way to request large data sets. This limit can be set by changing "
                "the [index.max_result_window] index level setting."
            )
        track = spec.get("track_total_hits", DEFAULT_TRACK_TOTAL_HITS)
        if not isinstance(track, (bool, int)) or (not isinstance(track, bool) and track < 0):
            raise illegal(f"[track_total_hits] parameter must be positive or equals to -1, got {track}")
        source_opts = self._parse_source_option(spec.get("_source"))
        knn = self._parse_knn(spec["knn"], size) if "knn" in spec else None
        parsed_query = parse_query(spec["query"]) if "query" in spec else None
        if knn is not None and parsed_query is not None:
            raise unsupported("[knn] together with [query] (hybrid scoring)")
        sort = _parse_sort(spec.get("sort"), spec.get("search_after"))
        if sort is not None and knn is not None:
            raise unsupported("[sort] with [knn]")
        if aggs and knn is not None:
            raise unsupported("[aggs] with [knn] (aggregations over the k nearest)")
        now = self.now()
        targets = self._search_targets(args, params, now)
        failures: list[dict] = []
        scored: list[tuple[float, str, str, dict]] = []
        for index in targets:
            docs, lost = self._answering(index)
            if lost is not None:
                failures.append(lost)
            try:
                if knn is not None:
                    scored.extend(self._knn_index(index, knn, docs))
                else:
                    matcher = bind_query(parsed_query or ("match_all",), index, scoring=True)
                    for doc_id, record in docs:
                        score = matcher(doc_id, record["source"])
                        if score is not None:
                            scored.append((_f32(score), index.name, doc_id, record["source"]))
            except ShardFailure as exc:
                failures.append(self._shard_failure(index, exc))
        if targets and len(failures) == self._shard_count(targets):
            raise self._all_shards_failed("dfs" if knn is not None else "query", failures)
        # Ties: Elasticsearch orders equal scores by shard and Lucene doc id (roughly index
        # order); the double orders them by index name then _id, which is stable and close.
        scored.sort(key=lambda h: (-h[0], h[1], h[2]))
        matched = scored  # aggregations count every match, whatever search_after and size keep
        if knn is not None:
            scored = scored[: knn["k"]]
        if sort is not None:
            scored = _sorted_after(scored, *sort)
        hits = []
        for score, name, doc_id, source in scored[:size]:
            hit = {"_index": name, "_id": doc_id, "_score": score}
            if sort is not None:  # sorted by a field: no scores, the sort values instead
                hit["_score"] = None
                hit["sort"] = [source.get(sort[0])]
            wanted, includes, excludes = source_opts
            if wanted:
                hit["_source"] = _filter_source(copy.deepcopy(source), includes, excludes)
            hits.append(hit)
        out_hits: dict = {}
        if track is not False:
            total = len(scored)
            limit = math.inf if track is True or track == -1 else track
            out_hits["total"] = {
                "value": int(min(total, limit)),
                "relation": "eq" if total <= limit else "gte",
            }
        out_hits["max_score"] = scored[0][0] if scored and size > 0 and sort is None else None
        out_hits["hits"] = hits
        out = {
            "took": 1,
            "timed_out": False,
            "_shards": self._shards(self._shard_count(targets), failures),
            "hits": out_hits,
        }
        if aggs:
            by_name = {index.name: index for index in targets}
            out["aggregations"] = {
                name: _terms_buckets(field, size_, [(by_name[n], src) for _, n, _, src in matched])
                for name, (field, size_) in aggs.items()
            }
        return 200, out

    def _api_msearch(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        """NDJSON pairs of header and search body; each search answered on its own, in order, a
        failing one as its error and status among the others' answers (the request itself 200).
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/search-multi-search.html"""
        self._params(query, set(), "msearch")
        if not isinstance(body, list) or not body:
            raise validation(["no requests added"])
        if len(body) % 2:
            raise parse_error("msearch: a header line without its search body")
        responses = []
        for header, search in zip(body[0::2], body[1::2]):
            self._body_keys(header, {"index"}, "msearch header")
            target = {"index": header.get("index", args["index"])}
            try:
                status, answer = self._api_search("POST", target, {}, search)
                responses.append({**answer, "status": status})
            except EsError as exc:
                responses.append({**exc.body(), "status": exc.status})
        return 200, {"took": 1, "responses": responses}

    def _parse_knn(self, raw: Any, size: int) -> dict:
        """Top-level approximate kNN, answered exactly here (brute force).
        https://www.elastic.co/guide/en/elasticsearch/reference/8.17/knn-search.html"""
        if isinstance(raw, list):
            raise unsupported("several [knn] searches in one request")
        if not isinstance(raw, dict):
            raise parse_error("[knn] must be an object")
        if "rescore_vector" in raw and self.server < (8, 18):
            raise parse_error("[knn] unknown field [rescore_vector]")
        known = {"field", "query_vector", "k", "num_candidates", "filter", "rescore_vector"}
        if "similarity" in raw:
            raise unsupported("[knn.similarity] (a minimum similarity)")
        self._body_keys(raw, known, "knn")
        if "field" not in raw:
            raise parse_error("[knn] failed to parse object: Required [field]")
        vector = raw.get("query_vector")
        if vector is None:
            raise illegal("either [query_vector_builder] or [query_vector] must be provided")
        if not isinstance(vector, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in vector
        ):
            raise parse_error("[knn] [query_vector] must be an array of numbers")
        k = raw.get("k", size)
        if isinstance(k, bool) or not isinstance(k, int):
            raise parse_error("[knn] [k] must be an integer")
        candidates = raw.get("num_candidates", round(min(NUM_CANDS_LIMIT, 1.5 * k)))
        if isinstance(candidates, bool) or not isinstance(candidates, int):
            raise parse_error("[knn] [num_candidates] must be an integer")
        # Elasticsearch checks these while building the search request: a plain 400.
        if k < 1:
            raise illegal("[k] must be greater than 0")
        if candidates < k:
            raise illegal("[num_candidates] cannot be less than [k]")
        if candidates > NUM_CANDS_LIMIT:
            raise illegal(f"[num_candidates] cannot exceed [{NUM_CANDS_LIMIT}]")
        rescore = raw.get("rescore_vector")
        if rescore is not None:
            # 8.18+: oversample then rescore quantised hits with the raw vectors; exact kNN has
            # nothing to rescore, so the double checks the option and changes nothing.
            self._body_keys(rescore, {"oversample"}, "knn.rescore_vector")
            oversample = rescore.get("oversample")
            if isinstance(oversample, bool) or not isinstance(oversample, (int, float)) or oversample < 1:
                raise illegal(f"[oversample] must be >= 1.0, got [{oversample}]")
        filters = raw.get("filter", [])
        filters = [parse_query(q) for q in (filters if isinstance(filters, list) else [filters])]
        return {
            "field": raw["field"],
            "vector": [float(x) for x in vector],
            "k": k,
            "filter": ("bool", [], filters, [], [], None),
        }

    def _knn_index(self, index: Index, knn: dict, docs=None) -> list[tuple[float, str, str, dict]]:
        """One index's exact kNN: filter first, then the k best by the field's similarity.
        Scores: https://www.elastic.co/guide/en/elasticsearch/reference/8.17/dense-vector.html#dense-vector-similarity"""
        field = knn["field"]
        resolved = resolve_field(index.mappings.get("properties", {}), field)
        if resolved is None:
            raise ShardFailure("illegal_argument_exception", f"field [{field}] does not exist in the mapping")
        definition, path = resolved
        if definition.get("type") != "dense_vector":
            raise ShardFailure(
                "illegal_argument_exception", "[knn] queries are only supported on [dense_vector] fields"
            )
        if definition.get("index") is False:
            raise ShardFailure(
                "illegal_argument_exception",
                f"to perform knn search on field [{field}], its mapping must have [index] set to [true]",
            )
        dims = definition.get("dims")
        query = knn["vector"]
        if dims is not None and len(query) != dims:
            raise ShardFailure(
                "illegal_argument_exception",
                f"The query vector has a different number of dimensions [{len(query)}] than the document vectors [{dims}].",
            )
        similarity = definition.get("similarity", "cosine")
        problem = self._magnitude_problem(query, similarity)
        if problem:
            raise ShardFailure("illegal_argument_exception", problem)
        matcher = bind_query(knn["filter"], index, scoring=False)
        q = np.asarray(query, dtype=np.float32)
        if similarity == "cosine":
            q = q / np.float32(np.linalg.norm(q))
        scored = []
        for doc_id, record in index.visible.items() if docs is None else docs:
            values = _values_at(record["source"], path)
            if not values or matcher(doc_id, record["source"]) is None:
                continue
            v = np.asarray(values, dtype=np.float32)
            if similarity == "cosine":
                v = v / np.float32(np.linalg.norm(v))
                score = max((1.0 + float(np.dot(q, v))) / 2.0, 0.0)
            elif similarity == "dot_product":
                score = max((1.0 + float(np.dot(q, v))) / 2.0, 0.0)
            elif similarity == "l2_norm":
                diff = q - v
                score = 1.0 / (1.0 + float(np.dot(diff, diff)))
            else:  # max_inner_product
                dot = float(np.dot(q, v))
                score = 1.0 / (1.0 - dot) if dot < 0 else dot + 1.0
            scored.append((_f32(score), index.name, doc_id, record["source"]))
        scored.sort(key=lambda h: (-h[0], h[2]))
        return scored[: knn["k"]]

    def _api_count(self, method: str, args: dict, query: dict, body: Any) -> tuple[int, Any]:
        # Counts what search sees (refreshed documents).
        # https://www.elastic.co/guide/en/elasticsearch/reference/8.17/search-count.html
        params = self._params(query, {"allow_no_indices", "expand_wildcards", "ignore_unavailable"}, "count")
        spec = self._body_keys(body, {"query"}, "count")
        parsed = parse_query(spec["query"]) if "query" in spec else ("match_all",)
        targets = self._search_targets(args, params, self.now())
        count, failures = 0, []
        for index in targets:
            docs, lost = self._answering(index)
            if lost is not None:
                failures.append(lost)
            try:
                matcher = bind_query(parsed, index, scoring=False)
                count += sum(1 for doc_id, record in docs if matcher(doc_id, record["source"]) is not None)
            except ShardFailure as exc:
                failures.append(self._shard_failure(index, exc))
        if targets and len(failures) == self._shard_count(targets):
            raise self._all_shards_failed("query", failures)
        return 200, {"count": count, "_shards": self._shards(self._shard_count(targets), failures)}


class DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    # Elasticsearch's JSON parser refuses an object with the same key twice.
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(f"Duplicate field '{key}'")
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Sorting by a field and search_after paging (what the backend's catalog scan uses)
# https://www.elastic.co/guide/en/elasticsearch/reference/8.17/sort-search-results.html
# https://www.elastic.co/guide/en/elasticsearch/reference/8.17/paginate-search-results.html#search-after
# ---------------------------------------------------------------------------------------------


def _parse_sort(raw: Any, after: Any) -> tuple[str, str, Any] | None:
    """One keyword field, asc or desc: `[{"id": "asc"}]` or `[{"id": {"order": "desc"}}]`.
    search_after needs a sort and one value per sort field."""
    if raw is None:
        if after is not None:
            raise illegal("Cannot use [search_after] without a sort")
        return None
    if not isinstance(raw, list) or len(raw) != 1 or not isinstance(raw[0], dict) or len(raw[0]) != 1:
        raise unsupported("[sort] other than one field")
    ((name, order),) = raw[0].items()
    if isinstance(order, dict):
        order = order.get("order", "asc")
    if order not in ("asc", "desc"):
        raise parse_error(f"[sort] unknown order [{order}]")
    if after is not None and (not isinstance(after, list) or len(after) != 1):
        raise illegal("search_after has 1 value(s) per sort field; got a different count")
    if after is not None and after[0] is None:
        # The sort value of a document without the field. Real clusters differ by version on
        # paging past it (https://github.com/elastic/elasticsearch/issues/66242); restarting
        # from the top would make a scan loop, so it is refused.
        raise unsupported("[search_after] with a null value (paging past documents without the sort field)")
    return name, order, None if after is None else after[0]


def _sorted_after(scored: list, name: str, order: str, after: Any) -> list:
    """Hits in field order (documents without the field last, as `missing: _last`), only those
    after the search_after value."""
    present = [h for h in scored if h[3].get(name) is not None]
    missing = [h for h in scored if h[3].get(name) is None]
    present.sort(key=lambda h: h[3][name], reverse=order == "desc")
    if after is not None:
        present = [h for h in present if (h[3][name] > after if order == "asc" else h[3][name] < after)]
    return present + missing
