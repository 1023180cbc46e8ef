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
    def __init__(self, services: Iterable[str] | None = None) -> None:
        """`services`: what serving() reports by default; None: every service of the daemon
        (auraed.generated.registry, imported then: it loads every service's messages)."""
        # grpcio-health-checking ships no type information.
        self._servicer: Any = health.HealthServicer()  # type: ignore[no-untyped-call]
        self._services = None if services is None else list(services)
        # "" is the daemon as a whole: SERVING only once every service is.
        self._servicer.set("", NOT_SERVING)  # type: ignore[no-untyped-call]

    def check(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        response: health_pb2.HealthCheckResponse = self._servicer.Check(request, context)
        return response

    def watch(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext) -> Iterator[health_pb2.HealthCheckResponse]:
        responses: Iterator[health_pb2.HealthCheckResponse] = self._servicer.Watch(request, context)
        return responses

    def serving(self, services: Iterable[str] | None = None) -> None:
        """`services` SERVING; by default every service of the daemon, and "" with them. A
        service not named yet is unknown to Check (NOT_FOUND), as it is to the server."""
        if services is None:
            if self._services is None:
                from auraed.generated.registry import SERVICE_NAMES

                self._services = list(SERVICE_NAMES)
            services = ["", *self._services]
        for service in services:
            self._servicer.set(service, SERVING)

    def shutting_down(self) -> None:
        """Every service NOT_SERVING from now on; Watch streams see the change."""
        self._servicer.enter_graceful_shutdown()
