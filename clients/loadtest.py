"""`looksync loadtest`: drive the gateway over gRPC and report latency honestly.

Two ways to apply load:

- **closed loop** (`concurrency`): N requests in flight; each worker sends its next request
  when the previous one answers. Measures capacity at that concurrency.
- **open loop** (`rate`): requests are sent on a fixed or Poisson schedule whatever the server
  does, so queueing shows. Latency is measured from each request's *scheduled* send time, not
  the moment it actually left (which is later when the generator or `max_inflight` held it
  back): a stall is charged to every request it delays, not only to the one it hit
  (coordinated omission). The time from the actual send is kept too, as `service`.

Requests come from a weighted mix of SearchText (queries from a file), SearchImage and
SearchLook (images from folders). Each request has a deadline; a run ends after a duration or
a request count, whichever comes first, and never later than `time_limit_s`.

One `grpc.aio` channel per process (TLS with `tls`, `root_certificates` and `server_name`, as
`LookSyncClient` connects); with `processes > 1` each spawned process drives its share
(concurrency, rate and count are split) and the parent merges the results. Every process reports
its CPU time over wall time, so a reader can tell whether the generator was the bottleneck.

Latencies go into an HDR-style log-linear histogram (`LatencyHistogram`, relative error under
0.4%) that merges across processes. `run_load(config)` is the API the CLI and benchmark scripts
use; `LoadReport` prints a table, writes JSON and a latency plot.

This module imports only the standard library at import time (the CLI builds its parser from
it); grpc, numpy, Pillow and the generated API are imported where they are used.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import math
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("text", "image", "look", "match")
RPC_OF = {"text": "SearchText", "image": "SearchImage", "look": "SearchLook", "match": "GetLookMatches"}
PERCENTILES = (50.0, 90.0, 95.0, 99.0)
DEFAULT_QUERIES = (
    "red summer dress",
    "black leather jacket",
    "white sneakers",
    "blue slim jeans",
    "striped t-shirt",
    "wool coat for winter",
    "checked shirt",
    "beige trousers",
)
# A process whose CPU time is this share of its wall time could not have sent faster.
SATURATED_CPU_SHARE = 0.85


# ---------------------------------------------------------------------------------------------
# Histogram


class LatencyHistogram:
    """HDR-style log-linear histogram of durations, recorded as integer nanoseconds.

    Values under 2**(sub_bits+1) ns get a bucket each; above that every power-of-two range is
    split into 2**sub_bits equal buckets, so a bucket is at most 1/2**sub_bits as wide as the
    values in it (0.78% for sub_bits=7). Percentiles report the bucket's midpoint, within half
    that (0.39%) of every value in the bucket; min, max, count and sum are exact. Buckets live
    in a dict (sparse), so merging across processes or time windows is adding counts.
    """

    __slots__ = ("sub_bits", "counts", "count", "total_s", "min_s", "max_s")

    def __init__(self, sub_bits: int = 7):
        self.sub_bits = sub_bits
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total_s = 0.0
        self.min_s = math.inf
        self.max_s = 0.0

    def _index(self, ns: int) -> int:
        shift = ns.bit_length() - self.sub_bits - 1
        if shift <= 0:
            return ns
        return (shift << self.sub_bits) + (ns >> shift)

    def _midpoint_ns(self, index: int) -> float:
        b = self.sub_bits
        if index < (2 << b):
            return float(index)
        shift = (index >> b) - 1
        low = (index - (shift << b)) << shift
        return low + ((1 << shift) - 1) / 2.0

    def record(self, seconds: float) -> None:
        ns = int(seconds * 1e9) if seconds > 0 else 0
        i = self._index(ns)
        counts = self.counts
        counts[i] = counts.get(i, 0) + 1
        self.count += 1
        self.total_s += seconds
        if seconds < self.min_s:
            self.min_s = seconds
        if seconds > self.max_s:
            self.max_s = seconds

    def record_many(self, seconds) -> None:
        """Record an array of durations at once (numpy, vectorised)."""
        import numpy as np

        values = np.maximum(np.asarray(seconds, dtype=np.float64).ravel(), 0.0)
        if not values.size:
            return
        ns = (values * 1e9).astype(np.int64)
        _, bit_length = np.frexp(ns.astype(np.float64))  # exact below 2**53 ns (104 days)
        shift = np.maximum(bit_length.astype(np.int64) - self.sub_bits - 1, 0)
        index = (shift << self.sub_bits) + (ns >> shift)
        keys, n = np.unique(index, return_counts=True)
        counts = self.counts
        for k, c in zip(keys.tolist(), n.tolist()):
            counts[k] = counts.get(k, 0) + c
        self.count += int(values.size)
        self.total_s += float(values.sum())
        self.min_s = min(self.min_s, float(values.min()))
        self.max_s = max(self.max_s, float(values.max()))

    def merge(self, other: LatencyHistogram) -> LatencyHistogram:
        if other.sub_bits != self.sub_bits:
            raise ValueError("cannot merge histograms of different precision")
        counts = self.counts
        for k, c in other.counts.items():
            counts[k] = counts.get(k, 0) + c
        self.count += other.count
        self.total_s += other.total_s
        self.min_s = min(self.min_s, other.min_s)
        self.max_s = max(self.max_s, other.max_s)
        return self

    def percentiles(self, ps) -> list[float]:
        """Nearest-rank percentiles (p in 0..100) in seconds; nan when empty."""
        ps = list(ps)
        if not self.count:
            return [math.nan] * len(ps)
        keys = sorted(self.counts)
        cumulative = list(itertools.accumulate(self.counts[k] for k in keys))
        out = []
        for p in ps:
            if p >= 100.0:
                out.append(self.max_s)
                continue
            rank = max(1, math.ceil(p / 100.0 * self.count - 1e-9))
            j = bisect.bisect_left(cumulative, rank)
            value = self._midpoint_ns(keys[j]) / 1e9
            out.append(min(max(value, self.min_s), self.max_s))
        return out

    def percentile(self, p: float) -> float:
        return self.percentiles([p])[0]

    @property
    def mean_s(self) -> float:
        return self.total_s / self.count if self.count else math.nan

    def summary_ms(self) -> dict[str, float | int | None]:
        """count, min, mean, p50/p90/p95/p99, max in milliseconds (None when empty)."""
        values = self.percentiles(PERCENTILES)
        out: dict[str, float | int | None] = {"count": self.count}
        if not self.count:
            out.update({k: None for k in ("min", "mean", "p50", "p90", "p95", "p99", "max")})
            return out
        out["min"] = self.min_s * 1e3
        out["mean"] = self.mean_s * 1e3
        for p, v in zip(PERCENTILES, values):
            out[f"p{p:g}"] = v * 1e3
        out["max"] = self.max_s * 1e3
        return out

    def to_dict(self) -> dict:
        return {
            "unit": "ns",
            "sub_bits": self.sub_bits,
            "count": self.count,
            "sum_s": self.total_s,
            "min_s": self.min_s if self.count else None,
            "max_s": self.max_s,
            "buckets": [[k, self.counts[k]] for k in sorted(self.counts)],
        }

    @classmethod
    def from_dict(cls, data: dict) -> LatencyHistogram:
        h = cls(data["sub_bits"])
        h.counts = {int(k): int(c) for k, c in data["buckets"]}
        h.count = int(data["count"])
        h.total_s = float(data["sum_s"])
        h.min_s = math.inf if data["min_s"] is None else float(data["min_s"])
        h.max_s = float(data["max_s"])
        return h


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class LoadConfig:
    address: str = "127.0.0.1:50051"
    tls: bool = False  # connect over TLS (implied by root_certificates)
    root_certificates: bytes | None = None  # PEM roots of a private CA; the system's otherwise
    server_name: str | None = None  # the name in the gateway's certificate, when not its address
    space: tuple[str, int] | None = None  # (model, version) every request pins; None: the alias's
    concurrency: int = 4  # closed loop: requests in flight (summed over processes)
    rate: float | None = None  # open loop: target requests/s (summed over processes)
    schedule: str = "poisson"  # open loop: "poisson" | "fixed"
    duration_s: float | None = None  # measured phase; None with requests=None means 10 s
    requests: int | None = None  # measured requests (summed over processes)
    warmup_s: float = 0.0  # load applied, not recorded, before the measured phase
    time_limit_s: float = 600.0  # hard cap on the measured phase, whatever else is set
    timeout_s: float = 5.0  # deadline of every request
    texts: list[str] = field(default_factory=list)
    images: list[bytes] = field(default_factory=list)
    looks: list[bytes] = field(default_factory=list)
    look_ids: list[str] = field(default_factory=list)  # GetLookMatches: looks matched offline
    mix: dict[str, float] | None = None  # kind -> weight; default: equal over kinds with payloads
    k: int = 10
    k_per_layer: int = 5
    filters: object | None = None  # clients.client.FilterArgs
    processes: int = 1
    max_inflight: int = 1000  # open loop: per process; beyond it sends wait (and that is measured)
    server_timings: bool = False
    window_s: float = 1.0  # timeline resolution
    progress: bool = False  # print a line per window while running (the CLI turns it on)
    seed: int = 0
    connect_timeout_s: float = 10.0
    grace_s: float = 2.0  # after the phase and one timeout, wait this long, then cancel what is left
    sources: dict[str, str] = field(default_factory=dict)  # where payloads came from (for the JSON)

    @property
    def mode(self) -> str:
        return "open" if self.rate is not None else "closed"

    def payloads(self, kind: str) -> list:
        return {"text": self.texts, "image": self.images, "look": self.looks, "match": self.look_ids}[kind]

    def weights(self) -> dict[str, float]:
        if self.mix is None:
            mix = {kind: 1.0 for kind in KINDS if self.payloads(kind)}
        else:
            mix = {kind: float(w) for kind, w in self.mix.items() if w > 0}
        return mix

    def validate(self) -> None:
        if self.mix is not None:
            unknown = set(self.mix) - set(KINDS)
            if unknown:
                raise ValueError(f"mix: unknown request kinds {sorted(unknown)}; kinds: {', '.join(KINDS)}")
            if any(w < 0 or not math.isfinite(w) for w in self.mix.values()):
                raise ValueError("mix: weights must be finite and >= 0")
        weights = self.weights()
        if not weights:
            raise ValueError("nothing to send: give text queries, images or looks (and a mix above 0)")
        for kind in weights:
            if not self.payloads(kind):
                raise ValueError(f"mix has {kind}={weights[kind]:g} but no {kind} payloads were given")
        if self.processes < 1:
            raise ValueError("processes must be >= 1")
        if self.rate is not None:
            if not (self.rate > 0 and math.isfinite(self.rate)):
                raise ValueError("rate must be > 0")
            if self.schedule not in ("poisson", "fixed"):
                raise ValueError("schedule is 'poisson' or 'fixed'")
            if self.max_inflight < 1:
                raise ValueError("max_inflight must be >= 1")
        elif not 1 <= self.processes <= self.concurrency:
            raise ValueError(f"concurrency ({self.concurrency}) must be >= 1 and >= processes")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("duration must be > 0")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be >= 1")
        if self.timeout_s <= 0 or self.time_limit_s <= 0 or self.warmup_s < 0 or self.window_s <= 0:
            raise ValueError("timeout, time limit and window must be > 0, warmup >= 0")

    def phase_s(self) -> float:
        """Length of the measured phase at most (requests may end it earlier)."""
        if self.duration_s is None and self.requests is None:
            return min(10.0, self.time_limit_s)
        return min(self.duration_s or math.inf, self.time_limit_s)

    def summary(self) -> dict:
        filters = self.filters
        return {
            "address": self.address,
            "tls": self.tls or self.root_certificates is not None,
            "private_ca": self.root_certificates is not None,
            "server_name": self.server_name,
            "space": f"{self.space[0]}:{self.space[1]}" if self.space is not None else None,
            "mode": self.mode,
            "concurrency": self.concurrency if self.mode == "closed" else None,
            "rate": self.rate,
            "schedule": self.schedule if self.mode == "open" else None,
            "duration_s": self.duration_s,
            "requests": self.requests,
            "warmup_s": self.warmup_s,
            "timeout_s": self.timeout_s,
            "processes": self.processes,
            "max_inflight": self.max_inflight if self.mode == "open" else None,
            "mix": self.weights(),
            "k": self.k,
            "k_per_layer": self.k_per_layer,
            "filters": dict(vars(filters)) if filters is not None else None,
            "payloads": {kind: len(self.payloads(kind)) for kind in KINDS},
            "sources": self.sources,
            "seed": self.seed,
        }


@dataclass
class _Share:
    """What one process drives."""

    worker: int
    concurrency: int
    rate: float | None
    phase_offset_s: float  # fixed schedule: stagger processes so the merged stream stays even
    requests: int | None


def _split(total: int, n: int, i: int) -> int:
    return total // n + (1 if i < total % n else 0)


def _shares(cfg: LoadConfig) -> list[_Share]:
    n = cfg.processes
    shares = []
    for i in range(n):
        rate = cfg.rate / n if cfg.rate is not None else None
        shares.append(
            _Share(
                worker=i,
                concurrency=_split(cfg.concurrency, n, i),
                rate=rate,
                phase_offset_s=i / cfg.rate if cfg.rate is not None else 0.0,
                requests=_split(cfg.requests, n, i) if cfg.requests is not None else None,
            )
        )
    return shares


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class RpcStats:
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)  # OK, from scheduled send
    service: LatencyHistogram = field(default_factory=LatencyHistogram)  # OK, from actual send
    stage_ms: dict[str, float] = field(default_factory=dict)  # sums over responses
    stage_n: dict[str, int] = field(default_factory=dict)
    timed: int = 0  # responses whose stage timings were read
    timed_service_ms: float = 0.0  # their service times, summed
    timed_stages_ms: float = 0.0  # their stage times, summed
    # Per response: time from send to answer minus its stages (the gateway overhead's spread).
    overhead: LatencyHistogram = field(default_factory=LatencyHistogram)

    def merge(self, other: RpcStats) -> RpcStats:
        self.sent += other.sent
        self.ok += other.ok
        for code, n in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n
        self.latency.merge(other.latency)
        self.service.merge(other.service)
        for stage, ms in other.stage_ms.items():
            self.stage_ms[stage] = self.stage_ms.get(stage, 0.0) + ms
            self.stage_n[stage] = self.stage_n.get(stage, 0) + other.stage_n[stage]
        self.timed += other.timed
        self.timed_service_ms += other.timed_service_ms
        self.timed_stages_ms += other.timed_stages_ms
        self.overhead.merge(other.overhead)
        return self

    def server_timings(self) -> dict | None:
        if not self.timed:
            return None
        service = self.timed_service_ms / self.timed
        stages = self.timed_stages_ms / self.timed
        return {
            "responses": self.timed,
            "stages_mean_ms": {s: self.stage_ms[s] / self.stage_n[s] for s in self.stage_ms},
            "stages_total_mean_ms": stages,
            "end_to_end_mean_ms": service,
            # Client-measured time from send to answer minus what the gateway's stages account
            # for: gRPC, (de)serialisation, loopback network, servicer glue, client event loop.
            "gateway_overhead_mean_ms": service - stages,
            "gateway_overhead_ms": dict(
                zip(("p50", "p90", "p99"), (v * 1e3 for v in self.overhead.percentiles((50, 90, 99))))
            ),
        }


@dataclass
class _Window:
    ok: int = 0
    errors: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def merge(self, other: _Window) -> _Window:
        self.ok += other.ok
        self.errors += other.errors
        self.latency.merge(other.latency)
        return self


@dataclass
class WorkerStats:
    worker: int
    rpcs: dict[str, RpcStats] = field(default_factory=dict)
    windows: dict[int, _Window] = field(default_factory=dict)
    start: float = 0.0  # time.monotonic() when load began (shared by all processes)
    measure_start: float = 0.0  # start + warmup
    last_done: float = 0.0  # last measured completion
    cpu_s: float = 0.0
    wall_s: float = 0.0
    max_lag_s: float = 0.0  # open loop: actual send later than scheduled, worst case
    lag_sum_s: float = 0.0
    lag_n: int = 0
    max_inflight: int = 0
    abandoned: int = 0  # still in flight past deadline + grace at the end (cancelled)
    unsent: int = 0  # open loop: scheduled in the measured phase, never sent by the hard stop


class LoadReport:
    """Merged results of a run. `to_dict()` is what `--out` writes."""

    def __init__(self, config: LoadConfig, workers: list[WorkerStats]):
        self.config = config
        self.workers = workers
        self.rpcs: dict[str, RpcStats] = {}
        self.windows: dict[int, _Window] = {}
        for w in workers:
            for rpc, stats in w.rpcs.items():
                self.rpcs.setdefault(rpc, RpcStats()).merge(stats)
            for i, win in w.windows.items():
                self.windows.setdefault(i, _Window()).merge(win)
        self.measure_start = min(w.measure_start for w in workers)
        last = max(w.last_done for w in workers)
        self.elapsed_s = max(last - self.measure_start, 0.0)

    @property
    def sent(self) -> int:
        return sum(s.sent for s in self.rpcs.values())

    @property
    def ok(self) -> int:
        return sum(s.ok for s in self.rpcs.values())

    @property
    def errors(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.rpcs.values():
            for code, n in s.errors.items():
                out[code] = out.get(code, 0) + n
        unsent = sum(w.unsent for w in self.workers)
        if unsent:
            out["UNSENT"] = unsent  # client-side: scheduled, never sent (not per RPC)
        return dict(sorted(out.items()))

    @property
    def throughput(self) -> float:
        """OK requests per second over the measured phase (first send to last answer)."""
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def _merged(self, attr: str) -> LatencyHistogram:
        h = LatencyHistogram()
        for s in self.rpcs.values():
            h.merge(getattr(s, attr))
        return h

    @property
    def latency(self) -> LatencyHistogram:
        return self._merged("latency")

    @property
    def service(self) -> LatencyHistogram:
        return self._merged("service")

    def cpu_shares(self) -> list[float]:
        return [w.cpu_s / w.wall_s if w.wall_s > 0 else 0.0 for w in self.workers]

    def timeline(self) -> list[dict]:
        out = []
        window_s = self.config.window_s
        for i in sorted(self.windows):
            win = self.windows[i]
            p50, p99 = win.latency.percentiles([50, 99])
            # The last window is cut short by the end of the run.
            span = min(window_s, max(self.elapsed_s - i * window_s, 1e-9))
            out.append(
                {
                    "t_s": i * window_s,
                    "span_s": span,
                    "ok": win.ok,
                    "errors": win.errors,
                    "ok_per_s": win.ok / span,
                    "p50_ms": None if math.isnan(p50) else p50 * 1e3,
                    "p99_ms": None if math.isnan(p99) else p99 * 1e3,
                    "max_ms": win.latency.max_s * 1e3 if win.latency.count else None,
                }
            )
        return out

    def to_dict(self) -> dict:
        rpcs = {}
        for rpc, s in sorted(self.rpcs.items()):
            rpcs[rpc] = {
                "sent": s.sent,
                "ok": s.ok,
                "errors": dict(sorted(s.errors.items())),
                "throughput_rps": s.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0,
                "latency_ms": s.latency.summary_ms(),
                "service_ms": s.service.summary_ms(),
                "server_timings": s.server_timings(),
            }
        shares = self.cpu_shares()
        return {
            "config": self.config.summary(),
            "elapsed_s": self.elapsed_s,
            "sent": self.sent,
            "ok": self.ok,
            "errors": self.errors,
            "throughput_rps": self.throughput,
            "latency_ms": self.latency.summary_ms(),
            "service_ms": self.service.summary_ms(),
            "latency_basis": "latency_ms: OK calls, from the scheduled send time (open loop) or the issue "
            "time (closed loop) to the answer; service_ms: from the actual send",
            "rpcs": rpcs,
            "generator": {
                "processes": len(self.workers),
                "cpu_share_max": max(shares, default=0.0),
                "saturated": any(s >= SATURATED_CPU_SHARE for s in shares),
                "workers": [
                    {
                        "worker": w.worker,
                        "cpu_s": w.cpu_s,
                        "wall_s": w.wall_s,
                        "cpu_share": share,
                        "max_send_lag_ms": w.max_lag_s * 1e3,
                        "mean_send_lag_ms": w.lag_sum_s / w.lag_n * 1e3 if w.lag_n else 0.0,
                        "max_inflight": w.max_inflight,
                        "abandoned": w.abandoned,
                        "unsent": w.unsent,
                    }
                    for w, share in zip(self.workers, shares)
                ],
            },
            "timeline": self.timeline(),
            "histograms": {rpc: s.latency.to_dict() for rpc, s in sorted(self.rpcs.items())},
        }

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    def format_table(self) -> str:
        cfg = self.config
        if cfg.mode == "open":
            load = f"open loop, {cfg.schedule} schedule at {cfg.rate:g} req/s"
        else:
            load = f"closed loop, concurrency {cfg.concurrency}"
        target = cfg.address + (" (TLS)" if cfg.tls or cfg.root_certificates is not None else "")
        if cfg.space is not None:
            target += f", space {cfg.space[0]}:{cfg.space[1]}"
        lines = [
            f"loadtest {target}: {load}, {cfg.processes} process(es), "
            f"measured {self.elapsed_s:.2f} s, timeout {cfg.timeout_s:g} s",
            "",
            f"{'rpc':12s} {'sent':>7s} {'ok':>7s} {'errors':>6s} {'ok/s':>8s} "
            f"{'p50':>8s} {'p90':>8s} {'p95':>8s} {'p99':>8s} {'max':>8s}  latency of OK calls, ms",
        ]

        def row(name: str, sent: int, ok: int, errors: int, hist: LatencyHistogram) -> str:
            rate = ok / self.elapsed_s if self.elapsed_s > 0 else 0.0
            cells = [*hist.percentiles(PERCENTILES), hist.max_s if hist.count else math.nan]
            text = " ".join(f"{v * 1e3:8.2f}" if not math.isnan(v) else f"{'-':>8s}" for v in cells)
            return f"{name:12s} {sent:7d} {ok:7d} {errors:6d} {rate:8.1f} {text}"

        for rpc, s in sorted(self.rpcs.items()):
            lines.append(row(rpc, s.sent, s.ok, sum(s.errors.values()), s.latency))
        lines.append(row("all", self.sent, self.ok, sum(self.errors.values()), self.latency))
        if cfg.mode == "open":
            lines.append(
                row("(service)", self.sent, self.ok, sum(self.errors.values()), self.service)
                + "  <- from actual send"
            )
        if self.errors:
            parts = []
            for code, n in self.errors.items():
                by_rpc = ", ".join(
                    f"{rpc} {s.errors[code]}" for rpc, s in sorted(self.rpcs.items()) if code in s.errors
                )
                parts.append(f"{code} {n}" + (f" ({by_rpc})" if by_rpc else ""))
            per = "; ".join(parts)
            lines.append(f"\nerrors: {per}")
        timed = [(rpc, s.server_timings()) for rpc, s in sorted(self.rpcs.items()) if s.timed]
        if timed:
            lines.append("\nserver stages, mean ms (end to end = send to answer at the client):")
            for rpc, t in timed:
                stages = ", ".join(f"{k} {v:.2f}" for k, v in t["stages_mean_ms"].items())
                lines.append(
                    f"  {rpc:12s} {stages}; end to end {t['end_to_end_mean_ms']:.2f}, "
                    f"gateway overhead {t['gateway_overhead_mean_ms']:.2f} "
                    f"(p50 {t['gateway_overhead_ms']['p50']:.2f})"
                )
        shares = self.cpu_shares()
        gen = ", ".join(f"{s:.0%}" for s in shares)
        lag = max(w.max_lag_s for w in self.workers) * 1e3
        note = ""
        if any(s >= SATURATED_CPU_SHARE for s in shares):
            note = "  <- a generator process was CPU-bound: add --processes or lower the load"
        lines.append(
            f"\ngenerator CPU (process time / wall time per process): {gen}"
            + (f"; worst send lag behind schedule {lag:.1f} ms" if cfg.mode == "open" else "")
            + note
        )
        abandoned = sum(w.abandoned for w in self.workers)
        if abandoned:
            lines.append(f"{abandoned} request(s) were still in flight at the end and were cancelled")
        unsent = sum(w.unsent for w in self.workers)
        if unsent:
            lines.append(f"{unsent} scheduled request(s) were never sent before the hard stop (UNSENT)")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Latency by percentile, latency over time and throughput over time, as a PNG."""
        path = Path(path)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("plots need matplotlib: pip install 'looksync[bench]'") from None
        _plot_matplotlib(_plot_data(self), path)
        return path


# ---------------------------------------------------------------------------------------------
# The driver: one process, one channel, one event loop


class _Driver:
    def __init__(self, cfg: LoadConfig, share: _Share):
        import grpc

        from gateway.api import looksync_pb2 as pb
        from gateway.api import looksync_pb2_grpc as pb_grpc

        self.grpc = grpc
        self.cfg = cfg
        self.share = share
        self.rng = random.Random(cfg.seed * 1000 + share.worker)
        self.stats = WorkerStats(worker=share.worker)
        options = [
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20),
        ]
        if cfg.tls or cfg.root_certificates is not None:
            if cfg.server_name:
                options.append(("grpc.ssl_target_name_override", cfg.server_name))
            creds = grpc.ssl_channel_credentials(root_certificates=cfg.root_certificates)
            self.channel = grpc.aio.secure_channel(cfg.address, creds, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(cfg.address, options=options)
        stub = pb_grpc.LookSearchStub(self.channel)
        filters = cfg.filters.to_proto() if cfg.filters is not None else pb.Filters()
        space = pb.EmbeddingSpace(model=cfg.space[0], version=cfg.space[1]) if cfg.space else None
        # Messages are built once and reused: sending serialises, nothing mutates them.
        self.requests = {
            "text": [pb.SearchTextRequest(text=t, k=cfg.k, filters=filters, space=space) for t in cfg.texts],
            "image": [
                pb.SearchImageRequest(image=b, k=cfg.k, filters=filters, space=space) for b in cfg.images
            ],
            "look": [
                pb.SearchLookRequest(image=b, k_per_layer=cfg.k_per_layer, filters=filters, space=space)
                for b in cfg.looks
            ],
            "match": [
                pb.GetLookMatchesRequest(look_id=i, k_per_layer=cfg.k_per_layer, filters=filters, space=space)
                for i in cfg.look_ids
            ],
        }
        self.methods = {
            "text": stub.SearchText,
            "image": stub.SearchImage,
            "look": stub.SearchLook,
            "match": stub.GetLookMatches,
        }
        weights = cfg.weights()
        self.kinds = [k for k in KINDS if k in weights]
        self.weights = [weights[k] for k in self.kinds]
        self.total_weight = sum(self.weights)
        self.credit = [0.0] * len(self.kinds)
        for kind in self.kinds:
            self.stats.rpcs[RPC_OF[kind]] = RpcStats()
        self.inflight = 0
        self.measured = 0  # measured requests issued

    async def connect(self) -> None:
        try:
            await asyncio.wait_for(self.channel.channel_ready(), self.cfg.connect_timeout_s)
        except TimeoutError:
            raise ConnectionError(
                f"no gateway at {self.cfg.address} after {self.cfg.connect_timeout_s:g} s "
                + (
                    "over TLS (check --ca-file and --server-name)"
                    if self.cfg.tls or self.cfg.root_certificates is not None
                    else "(plaintext; a TLS gateway needs --tls or --ca-file)"
                )
            ) from None

    async def close(self) -> None:
        await self.channel.close()

    def _next_kind(self) -> str:
        # Smooth weighted round robin: the mix is exact within one request at any point.
        best = 0
        for i, w in enumerate(self.weights):
            self.credit[i] += w
            if self.credit[i] > self.credit[best]:
                best = i
        self.credit[best] -= self.total_weight
        return self.kinds[best]

    async def _call(self, kind: str, scheduled: float, measured: bool) -> None:
        cfg = self.cfg
        request = self.rng.choice(self.requests[kind])
        self.inflight += 1
        if self.inflight > self.stats.max_inflight:
            self.stats.max_inflight = self.inflight
        sent = time.monotonic()
        response = None
        try:
            response = await self.methods[kind](request, timeout=cfg.timeout_s)
            code = "OK"
        except self.grpc.aio.AioRpcError as exc:
            code = exc.code().name
        except asyncio.CancelledError:
            code = "CANCELLED"
            if measured:
                self.stats.abandoned += 1
                self._record(kind, code, scheduled, sent, time.monotonic(), None)
            raise
        except Exception as exc:  # a client-side failure: count it, keep going
            code = f"CLIENT_{type(exc).__name__}"
        finally:
            self.inflight -= 1
        if measured:
            self._record(kind, code, scheduled, sent, time.monotonic(), response)

    def _record(self, kind: str, code: str, scheduled: float, sent: float, done: float, response) -> None:
        st = self.stats
        rpc = st.rpcs[RPC_OF[kind]]
        rpc.sent += 1
        window_index = int((done - st.measure_start) / self.cfg.window_s)
        window = st.windows.get(window_index)
        if window is None:
            window = st.windows[window_index] = _Window()
        if done > st.last_done:
            st.last_done = done
        if code != "OK":
            rpc.errors[code] = rpc.errors.get(code, 0) + 1
            window.errors += 1
            return
        rpc.ok += 1
        window.ok += 1
        latency = done - scheduled
        rpc.latency.record(latency)
        rpc.service.record(done - sent)
        window.latency.record(latency)
        if self.cfg.server_timings and response is not None:
            total = 0.0
            for t in response.timings:
                rpc.stage_ms[t.stage] = rpc.stage_ms.get(t.stage, 0.0) + t.ms
                rpc.stage_n[t.stage] = rpc.stage_n.get(t.stage, 0) + 1
                total += t.ms
            rpc.timed += 1
            rpc.timed_service_ms += (done - sent) * 1e3
            rpc.timed_stages_ms += total
            rpc.overhead.record(done - sent - total / 1e3)

    def _may_issue(self, now: float, end_at: float) -> tuple[bool, bool]:
        """(go on, measured) for a request scheduled at `now`."""
        if now >= end_at:
            return False, False
        measured = now >= self.stats.measure_start
        if measured and self.share.requests is not None and self.measured >= self.share.requests:
            return False, False
        if measured:
            self.measured += 1
        return True, measured

    async def _closed_worker(self, end_at: float) -> None:
        while True:
            now = time.monotonic()
            go, measured = self._may_issue(now, end_at)
            if not go:
                return
            await self._call(self._next_kind(), now, measured)

    async def _open_scheduler(self, end_at: float, tasks: set) -> None:
        share, cfg = self.share, self.cfg
        slots = asyncio.Semaphore(cfg.max_inflight)
        step = 0  # fixed schedule: send i is at start + offset + i / rate, never a running sum
        scheduled = self.stats.start + share.phase_offset_s
        if cfg.schedule == "poisson":
            scheduled = self.stats.start + self.rng.expovariate(share.rate)
        measured = False  # the request at `scheduled` is counted but not sent yet
        try:
            while True:
                # A slot that lands on a window edge up to float rounding belongs to the later
                # window, so the count of fixed slots in [measure_start, end_at) is exact.
                nudge = 1e-9 if cfg.schedule == "fixed" else 0.0
                go, measured = self._may_issue(scheduled + nudge, end_at)
                if not go:
                    return
                delay = scheduled - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    await asyncio.sleep(0)  # behind schedule: send now, but let answers in
                await slots.acquire()  # waiting here is charged to the request (scheduled time)
                lag = time.monotonic() - scheduled
                if measured:
                    self.stats.lag_sum_s += max(lag, 0.0)
                    self.stats.lag_n += 1
                    if lag > self.stats.max_lag_s:
                        self.stats.max_lag_s = lag
                task = asyncio.create_task(self._call(self._next_kind(), scheduled, measured))
                measured = False
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                task.add_done_callback(lambda _t: slots.release())
                step += 1
                if cfg.schedule == "poisson":
                    scheduled += self.rng.expovariate(share.rate)
                else:
                    scheduled = self.stats.start + share.phase_offset_s + step / share.rate
        except asyncio.CancelledError:
            # Stopped at the hard stop with a backlog: the requests scheduled but never sent
            # count as UNSENT errors (expected number for the rest of the phase), so an
            # overloaded run cannot look better by sending less.
            span = max(end_at - max(scheduled, self.stats.measure_start), 0.0) * share.rate
            if cfg.schedule == "fixed":  # the slots after this one that fall before end_at
                later = max(math.ceil(span - 1e-9) - (1 if scheduled >= self.stats.measure_start else 0), 0)
            else:  # Poisson: the expected number of arrivals left
                later = round(span)
            if share.requests is not None:
                later = min(later, share.requests - self.measured)
            self.stats.unsent += int(measured) + int(later)
            raise

    async def _report_progress(self, end_at: float) -> None:
        """One line per finished window on stderr (per process): rate, p50/p99, errors."""
        st, window_s = self.stats, self.cfg.window_s
        index = 0
        while True:
            due = st.measure_start + (index + 1) * window_s
            await asyncio.sleep(max(due - time.monotonic(), 0.0))
            w = st.windows.get(index, _Window())
            p50, p99 = (w.latency.percentile(p) * 1e3 if w.latency.count else float("nan") for p in (50, 99))
            print(
                f"[loadtest p{self.share.worker} {(index + 1) * window_s:6.1f}s] {w.ok / window_s:7.1f} ok/s  "
                f"p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  errors {w.errors}",
                file=sys.stderr,
                flush=True,
            )
            index += 1
            if due >= end_at:
                return

    async def run(self, start: float) -> WorkerStats:
        cfg, st = self.cfg, self.stats
        st.start = start
        st.measure_start = start + cfg.warmup_s
        st.last_done = st.measure_start
        end_at = st.measure_start + cfg.phase_s()
        delay = start - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        cpu0, wall0 = time.process_time(), time.monotonic()
        tasks: set[asyncio.Task] = set()
        if cfg.mode == "closed":
            tasks.update(
                asyncio.create_task(self._closed_worker(end_at)) for _ in range(self.share.concurrency)
            )
            drivers = set(tasks)
        else:
            drivers = {asyncio.create_task(self._open_scheduler(end_at, tasks))}
        if cfg.progress:
            drivers_progress = asyncio.create_task(self._report_progress(end_at))
        # Everything is bounded: issuing stops at end_at, each call at its deadline.
        hard_stop = end_at + cfg.timeout_s + cfg.grace_s
        await asyncio.wait(drivers, timeout=max(hard_stop - time.monotonic(), 0.0))
        pending = [t for t in (tasks | drivers) if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(hard_stop - time.monotonic(), 0.0))
        leftover = [t for t in (tasks | drivers) if not t.done()]
        for t in leftover:
            t.cancel()
        if leftover:
            await asyncio.gather(*leftover, return_exceptions=True)
        if cfg.progress:
            drivers_progress.cancel()
        for t in drivers:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()
        st.cpu_s = time.process_time() - cpu0
        st.wall_s = time.monotonic() - wall0
        return st


async def _drive_one(cfg: LoadConfig, share: _Share) -> WorkerStats:
    driver = _Driver(cfg, share)
    try:
        await driver.connect()
        return await driver.run(time.monotonic() + 0.01)
    finally:
        await driver.close()


def _worker_main(cfg: LoadConfig, share: _Share, queue, go, start_at) -> None:
    """Entry of a spawned load process: connect, report ready, wait for the common start."""

    async def main():
        driver = _Driver(cfg, share)
        try:
            await driver.connect()
            queue.put(("ready", share.worker, None))
            loop = asyncio.get_running_loop()
            released = await loop.run_in_executor(None, go.wait, cfg.connect_timeout_s + 60.0)
            if not released:
                raise TimeoutError("the parent never gave the start signal")
            return await driver.run(start_at.value)
        finally:
            await driver.close()

    try:
        queue.put(("result", share.worker, asyncio.run(main())))
    except BaseException:
        queue.put(("error", share.worker, traceback.format_exc()))


def _run_processes(cfg: LoadConfig) -> list[WorkerStats]:
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")  # never fork a process that may hold gRPC state
    results = ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    procs = [
        ctx.Process(target=_worker_main, args=(cfg, share, results, go, start_at), daemon=True)
        for share in _shares(cfg)
    ]
    for p in procs:
        p.start()
    try:

        def collect(kind: str, timeout_s: float) -> dict[int, object]:
            got: dict[int, object] = {}
            deadline = time.monotonic() + timeout_s
            while len(got) < len(procs):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"load processes: {len(got)} of {len(procs)} {kind} in {timeout_s:g} s"
                    )
                try:
                    what, worker, payload = results.get(timeout=min(left, 1.0))
                except queue_mod.Empty:
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"load process exited with {dead[0].exitcode}") from None
                    continue
                if what == "error":
                    raise RuntimeError(f"load process {worker} failed:\n{payload}")
                got[worker] = payload
            return got

        collect("ready", cfg.connect_timeout_s + 60.0)
        start_at.value = time.monotonic() + 0.05
        go.set()
        bound = 0.05 + cfg.warmup_s + cfg.phase_s() + cfg.timeout_s + 30.0
        stats = collect("result", bound)
        for p in procs:
            p.join(10)
        return [stats[i] for i in sorted(stats)]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)


async def run_load(config: LoadConfig) -> LoadReport:
    """Apply the configured load to `config.address` and return the merged report.

    With `processes > 1` the load processes are started with the "spawn" method, so a script
    calling this must guard its entry point with `if __name__ == "__main__":`.
    """
    config.validate()
    if config.processes == 1:
        workers = [await _drive_one(config, _shares(config)[0])]
    else:
        loop = asyncio.get_running_loop()
        workers = await loop.run_in_executor(None, _run_processes, config)
    return LoadReport(config, workers)


# ---------------------------------------------------------------------------------------------
# Inputs


def parse_mix(text: str) -> dict[str, float]:
    """'text=0.6,image=0.3,look=0.1' -> {'text': 0.6, ...}."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        kind, sep, weight = part.partition("=")
        kind = kind.strip()
        if not sep or kind not in KINDS:
            raise ValueError(f"--mix: expected kind=weight with kind in {', '.join(KINDS)}, got {part!r}")
        try:
            mix[kind] = float(weight)
        except ValueError:
            raise ValueError(f"--mix: {weight!r} is not a number") from None
    return mix


def read_queries(path: str | Path) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


def read_images(folder: str | Path) -> list[bytes]:
    """Every regular, non-hidden file in the folder, sorted by name, as bytes (not checked:
    bad images are sent as they are, to exercise the gateway's validation)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# Plots


def _plot_data(report: LoadReport) -> dict:
    series = {**{rpc: s.latency for rpc, s in sorted(report.rpcs.items())}, "all": report.latency}
    count = report.latency.count
    # x = log10(1 / (1 - p)): 0 at the median's left edge, 1 at 90%, 2 at 99%, ...
    x_max = max(1.0, min(5.0, math.log10(max(count, 1))))
    xs = [x_max * i / 200 for i in range(201)]
    ps = [100.0 * (1.0 - 10.0**-x) for x in xs]
    curves = {}
    for name, hist in series.items():
        if hist.count:
            curves[name] = list(zip(xs, (v * 1e3 for v in hist.percentiles(ps))))
    labels = {0: "0%", 1: "90%", 2: "99%", 3: "99.9%", 4: "99.99%", 5: "99.999%"}
    timeline = report.timeline()
    over_time = {}
    for key, name in (("p50_ms", "p50"), ("p99_ms", "p99"), ("max_ms", "max")):
        points = [(w["t_s"] + w["span_s"] / 2, w[key]) for w in timeline if w[key] is not None]
        if points:
            over_time[name] = points
    rate = [
        (w["t_s"] + w["span_s"] / 2, w["ok_per_s"])
        for w in timeline
        if w["span_s"] >= report.config.window_s / 2
    ]
    cfg = report.config
    load = f"rate {cfg.rate:g}/s ({cfg.schedule})" if cfg.mode == "open" else f"concurrency {cfg.concurrency}"
    return {
        "title": f"looksync loadtest {cfg.address}: {load}, {report.ok} ok in {report.elapsed_s:.1f} s",
        "percentile": curves,
        "percentile_ticks": [(x, labels[x]) for x in range(int(x_max) + 1)],
        "x_max": x_max,
        "over_time": over_time,
        "rate": {"ok/s": rate} if rate else {},
    }


COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]


def _plot_matplotlib(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 11))
    fig.suptitle(data["title"])
    ax = axes[0]
    for name, pts in data["percentile"].items():
        ax.plot([x for x, _ in pts], [y for _, y in pts], label=name)
    ticks = data["percentile_ticks"]
    ax.set_xticks([x for x, _ in ticks], [label for _, label in ticks])
    ax.set(
        title="latency by percentile (OK calls)", xlabel="percentile", ylabel="ms", xlim=(0, data["x_max"])
    )
    for ax, key, title, unit in (
        (axes[1], "over_time", "latency over time (OK calls, by completion)", "ms"),
        (axes[2], "rate", "throughput over time", "ok/s"),
    ):
        for name, pts in data[key].items():
            ax.plot([x for x, _ in pts], [y for _, y in pts], label=name, marker=".")
        ax.set(title=title, xlabel="seconds", ylabel=unit)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `looksync loadtest` (the CLI adds the filter options, -k, --gateway, --json)."""
    g = p.add_argument_group("requests")
    g.add_argument("--text-queries", metavar="FILE", help="SearchText queries, one a line")
    g.add_argument("--images", metavar="DIR", help="images for SearchImage (every file is sent as is)")
    g.add_argument("--looks", metavar="DIR", help="look images for SearchLook")
    g.add_argument(
        "--look-ids", metavar="FILE", help="ids of looks matched offline, one a line (GetLookMatches)"
    )
    g.add_argument(
        "--mix",
        help="weights, e.g. text=0.6,image=0.3,look=0.1 (default: equal over the sources given; "
        "with no source, built-in text queries)",
    )
    g.add_argument("--k-per-layer", type=int, default=5, help="SearchLook k_per_layer")
    g = p.add_argument_group("load")
    g.add_argument("--concurrency", type=int, default=4, help="closed loop: requests in flight (default 4)")
    g.add_argument("--rate", type=float, help="open loop: target requests/s (instead of --concurrency)")
    g.add_argument("--schedule", choices=("poisson", "fixed"), default="poisson", help="open-loop send times")
    g.add_argument("--duration", type=float, help="seconds of measured load (default 10 unless --requests)")
    g.add_argument(
        "--requests", type=int, help="measured requests (whichever of this and --duration ends first)"
    )
    g.add_argument("--warmup", type=float, default=0.0, help="seconds of load before measuring")
    g.add_argument("--timeout", type=float, default=5.0, help="deadline of each request, seconds")
    g.add_argument("--time-limit", type=float, default=600.0, help="hard cap on the measured phase, seconds")
    g.add_argument("--processes", type=int, default=1, help="load-generating processes (default 1)")
    g.add_argument(
        "--max-inflight", type=int, default=1000, help="open loop: per-process cap on calls in flight"
    )
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("report")
    g.add_argument("--server-timings", action="store_true", help="aggregate the gateway's per-stage timings")
    g.add_argument("--out", metavar="FILE", help="write the report as JSON")
    g.add_argument("--plot", metavar="PNG", help="write latency plots")
    g.add_argument("--window", type=float, default=1.0, help="timeline resolution, seconds")


def parse_space(text: str | None) -> tuple[str, int] | None:
    """--space MODEL:VERSION (0 = the model's newest) -> (model, version); None when not given."""
    if not text:
        return None
    model, sep, version = text.partition(":")
    if not model or not sep or not version.isdigit():
        raise ValueError(f"--space {text!r}: expected MODEL:VERSION, e.g. clip:2 (0 = newest)")
    return model, int(version)


def connection_from_args(args) -> dict:
    """TLS options as the other commands take them: --tls, --ca-file (implies TLS),
    --server-name, with LOOKSYNC_GATEWAY_TLS and LOOKSYNC_GATEWAY_CA_FILE as defaults."""
    from gateway.settings import get_settings

    s = get_settings()
    ca_file = getattr(args, "ca_file", None) or s.gateway_ca_file
    return {
        "tls": bool(getattr(args, "tls", False) or s.gateway_tls or ca_file),
        "root_certificates": Path(ca_file).read_bytes() if ca_file else None,
        "server_name": getattr(args, "server_name", None),
    }


def config_from_args(args, address: str, filters=None) -> LoadConfig:
    """The CLI's options (its connection options and --space included) as a LoadConfig."""
    space = parse_space(getattr(args, "space", None))
    connection = connection_from_args(args)
    texts = read_queries(args.text_queries) if args.text_queries else []
    images = read_images(args.images) if args.images else []
    looks = read_images(args.looks) if args.looks else []
    look_ids = read_queries(args.look_ids) if args.look_ids else []
    sources = {
        k: v
        for k, v in (
            ("text", args.text_queries),
            ("image", args.images),
            ("look", args.looks),
            ("match", args.look_ids),
        )
        if v
    }
    if not (texts or images or looks or look_ids) and not args.mix:
        texts = list(DEFAULT_QUERIES)
        sources["text"] = "built-in queries"
    return LoadConfig(
        address=address,
        **connection,
        space=space,
        concurrency=args.concurrency,
        rate=args.rate,
        schedule=args.schedule,
        duration_s=args.duration,
        requests=args.requests,
        warmup_s=args.warmup,
        time_limit_s=args.time_limit,
        timeout_s=args.timeout,
        texts=texts,
        images=images,
        looks=looks,
        look_ids=look_ids,
        mix=parse_mix(args.mix) if args.mix else None,
        k=args.k,
        k_per_layer=args.k_per_layer,
        filters=filters,
        processes=args.processes,
        max_inflight=args.max_inflight,
        server_timings=args.server_timings,
        window_s=args.window,
        progress=True,
        seed=args.seed,
        sources=sources,
    )


def run_cli(args, address: str, filters=None) -> int:
    try:
        cfg = config_from_args(args, address, filters)
        cfg.validate()
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(run_load(cfg))
    except (ConnectionError, RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, allow_nan=False))
    else:
        print(report.format_table())
    if args.out:
        report.write_json(args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        report.plot(args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if report.ok else 1
