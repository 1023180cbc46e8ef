"""aurae.discovery.v0.DiscoveryService: is a daemon here, and which one."""

from __future__ import annotations

from collections.abc import Callable

import grpc

from aurae_sdk.wire.generated.pb.discovery import discovery_pb2 as pb
from auraed import __version__
from auraed.generated.discovery import DiscoveryServiceBase


class DiscoveryService(DiscoveryServiceBase):
    def __init__(self, healthy: Callable[[], bool]) -> None:
        self._healthy = healthy

    def discover(self, request: pb.DiscoverRequest,
                 context: grpc.ServicerContext) -> pb.DiscoverResponse:
        return pb.DiscoverResponse(healthy=self._healthy(), version=__version__)
