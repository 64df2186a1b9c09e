"""Container health check for the LookSync image: exit 0 when healthy, 1 otherwise.

    python healthcheck.py            the gateway: grpc.health.v1 Check("") on
                                     127.0.0.1:$LOOKSYNC_GRPC_PORT must answer SERVING
    python healthcheck.py --worker   the ingest worker (it serves no gRPC): its Prometheus
                                     endpoint 127.0.0.1:$LOOKSYNC_WORKER_METRICS_PORT/metrics

The gateway reports SERVING only while Triton answers and an index is behind the read alias,
so a fresh stack stays "unhealthy" until the catalog has been indexed once. Every check gives
up after --timeout seconds (2 by default). Kept free of project imports so it starts fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request

DEFAULT_GRPC_PORT = 50051  # gateway.settings.Settings.grpc_port
DEFAULT_WORKER_METRICS_PORT = 9465  # gateway.settings.Settings.worker_metrics_port


def grpc_serving(port: int, timeout_s: float, service: str = "") -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def metrics_up(port: int, timeout_s: float) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as resp:
        return resp.status == 200


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="check the ingest worker's metrics port")
    parser.add_argument("--port", type=int, help="override the port read from the environment")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds before giving up")
    args = parser.parse_args(argv)
    try:
        if args.worker:
            port = args.port or int(
                os.environ.get("LOOKSYNC_WORKER_METRICS_PORT", DEFAULT_WORKER_METRICS_PORT)
            )
            ok = metrics_up(port, args.timeout)
            what = f"worker metrics :{port}"
        else:
            port = args.port or int(os.environ.get("LOOKSYNC_GRPC_PORT", DEFAULT_GRPC_PORT))
            ok = grpc_serving(port, args.timeout)
            what = f"gateway gRPC health :{port}"
    except Exception as exc:  # refused, timed out, bad port: all mean "not healthy"
        print(f"unhealthy: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"unhealthy: {what} is not serving", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
