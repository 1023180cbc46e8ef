#!/usr/bin/env aurae-py
"""Check the serving status of the server and of each service it runs."""

from aurae_sdk.script import client, health

Status = health.HealthCheckResponse.ServingStatus
for service in ("", "aurae.cells.v0.CellService", "aurae.discovery.v0.DiscoveryService",
                "aurae.observe.v0.ObserveService"):
    status = client.health.check(service=service).status
    print(f"{service or '(server)':40} {Status.Name(status)}")
