"""grpc.health.v1.Health, served by grpcio-health-checking's servicer.

The well-kept implementation tracks statuses and runs Watch; this class only
fits it onto our generated base and knows which services the daemon has.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from auraed.generated.health import HealthBase

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthService(HealthBase):
    def __init__(self, services: Iterable[str]) -> None:
        # grpcio-health-checking ships no type information.
        self._servicer: Any = health.HealthServicer()  # type: ignore[no-untyped-call]
        # "" is the server as a whole.
        self._services = ["", *services]

    def check(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        response: health_pb2.HealthCheckResponse = self._servicer.Check(request, context)
        return response

    def watch(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext) -> Iterator[health_pb2.HealthCheckResponse]:
        responses: Iterator[health_pb2.HealthCheckResponse] = self._servicer.Watch(request, context)
        return responses

    def serving(self) -> None:
        for service in self._services:
            self._servicer.set(service, SERVING)

    def shutting_down(self) -> None:
        """Every service NOT_SERVING from now on; Watch streams see the change."""
        self._servicer.enter_graceful_shutdown()
