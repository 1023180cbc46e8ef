"""grpc.health.v1.Health, served by grpcio-health-checking's servicer.

The well-kept implementation tracks statuses and runs Watch; this class only
fits it onto our generated base and knows which services the daemon has.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import grpc
from grpc_health.v1 import health, health_pb2

from auraed.generated.health import HealthBase

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthService(HealthBase):
    def __init__(self, services: Iterable[str]) -> None:
        self._servicer = health.HealthServicer()
        # "" is the server as a whole.
        self._services = ["", *services]

    def check(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        return self._servicer.Check(request, context)

    def watch(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext) -> Iterator[health_pb2.HealthCheckResponse]:
        return self._servicer.Watch(request, context)  # type: ignore[no-any-return]

    def serving(self) -> None:
        for service in self._services:
            self._servicer.set(service, SERVING)

    def shutting_down(self) -> None:
        """Every service NOT_SERVING from now on; Watch streams see the change."""
        self._servicer.enter_graceful_shutdown()
