"""Prometheus metrics and structured (one JSON object a line) logs."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar

from prometheus_client import Counter, Histogram

request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

RPC_SECONDS = Histogram("looksync_rpc_seconds", "RPC latency", ["rpc"], buckets=_BUCKETS)
STAGE_SECONDS = Histogram(
    "looksync_stage_seconds", "Pipeline stage latency", ["rpc", "stage"], buckets=_BUCKETS
)
RPC_ERRORS = Counter("looksync_rpc_errors_total", "RPCs that ended in an error", ["rpc", "code"])
INDEXED = Counter("looksync_indexed_products_total", "Products written to the index", ["source"])


# user:password@ in any URL (Redis, Elasticsearch, an LLM proxy): never in a log line or an error.
_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s:]*:[^/@\s]*@")


def redact(text: str) -> str:
    return _CREDENTIALS.sub(r"\1***@", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": request_id_var.get(),
        }
        for key, value in getattr(record, "fields", {}).items():
            entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str))


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def log(logger: logging.Logger, level: int, msg: str, **fields) -> None:
    logger.log(level, msg, extra={"fields": fields})
