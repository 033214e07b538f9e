"""Container health probe: asks a Flower daemon's gRPC health service (``--health-server-address``).

``python -m fedclinic.healthcheck HOST:PORT`` exits 0 when the service answers SERVING and 1
otherwise (with one line saying why), which is what Docker's HEALTHCHECK expects.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def probe(address: str, timeout: float = 3.0) -> tuple[bool, str]:
    """``(healthy, reason)`` for the health service at ``address``."""
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.RpcError as err:
        return False, f"health service at {address} unreachable: {err.code().name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fedclinic.healthcheck HOST:PORT", file=sys.stderr)
        return 2
    healthy, reason = probe(args[0])
    print(reason, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
