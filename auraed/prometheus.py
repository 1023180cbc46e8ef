"""The opt-in Prometheus endpoint (`--metrics-address`): per-cell usage as text exposition.

Plain HTTP without authentication, unlike the API: so it listens only where it is asked to,
on a Unix socket (mode 0600, like the API socket) or a loopback TCP address; any other address
needs --metrics-allow-remote. Every scrape reads the cgroups afresh (see runtime/metrics.py).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, MetricsHandler, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aurae_sdk.wire.targets import TargetError, parse_target
from auraed.runtime.metrics import cell_usage
from auraed.runtime.workloads import Workloads

log = logging.getLogger("auraed.metrics")


class MetricsAddressError(ValueError):
    """The --metrics-address cannot be used; the message says why."""


@dataclass(frozen=True)
class MetricsAddress:
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_metrics_address(text: str, *, allow_remote: bool = False) -> MetricsAddress:
    """A Unix socket path or HOST:PORT; a TCP address must be loopback unless allow_remote."""
    try:
        target = parse_target(text)
    except TargetError as error:
        raise MetricsAddressError(str(error)) from None
    if target.kind == "unix":
        return MetricsAddress("unix", path=target.display)
    host, _, port = target.display.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not allow_remote and not _is_loopback(host):
        raise MetricsAddressError(
            f"{text}: not a loopback address; the metrics endpoint has no authentication, so "
            "listening beyond this machine needs --metrics-allow-remote")
    return MetricsAddress("tcp", host=host, port=int(port))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        pass
    try:
        resolved = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(resolved) and all(
        ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in resolved)


class CellCollector(Collector):
    """Each cell's cgroup counters, and the daemon's own counts, at scrape time."""

    def __init__(self, workloads: Workloads) -> None:
        self.workloads = workloads

    def collect(self) -> Iterator[Metric]:
        usage = cell_usage(self.workloads)
        counters = {
            "cpu_usage_seconds": ("CPU time used by the cell and its child cells", "cpu_usage_usec", 1e-6),
            "cpu_user_seconds": ("CPU time in user mode", "cpu_user_usec", 1e-6),
            "cpu_system_seconds": ("CPU time in kernel mode", "cpu_system_usec", 1e-6),
            "cpu_periods": ("CPU quota enforcement periods (cpu.max)", "cpu_periods", 1),
            "cpu_throttled_periods": ("Periods in which the cell was throttled", "cpu_throttled_periods", 1),
            "cpu_throttled_seconds": ("Time the cell spent throttled", "cpu_throttled_usec", 1e-6),
            "oom_kills": ("Processes of the cell the OOM killer killed", "oom_kills", 1),
        }
        gauges = {
            "memory_bytes": ("Memory the cell uses now", "memory_current_bytes"),
            "memory_peak_bytes": ("Most memory the cell has used", "memory_peak_bytes"),
            "memory_limit_bytes": ("The cell's memory.max", "memory_max_bytes"),
            "pids": ("Processes and threads in the cell", "pids_current"),
        }
        for name, (documentation, attribute, scale) in counters.items():
            counter = CounterMetricFamily(f"aurae_cell_{name}", documentation, labels=["cell"])
            for cell in usage:
                value = getattr(cell.metrics, attribute)
                if value is not None:
                    counter.add_metric([cell.name.path], value * scale)
            yield counter
        for name, (documentation, attribute) in gauges.items():
            gauge = GaugeMetricFamily(f"aurae_cell_{name}", documentation, labels=["cell"])
            for cell in usage:
                value = getattr(cell.metrics, attribute)
                if value is not None:
                    gauge.add_metric([cell.name.path], value)
            yield gauge
        running = GaugeMetricFamily("aurae_cell_executables_running",
                                    "Executables running in the cell", labels=["cell"])
        for cell in usage:
            running.add_metric([cell.name.path], cell.executables_running)
        yield running
        yield GaugeMetricFamily("aurae_cells", "Cells allocated", value=len(usage))
        yield CounterMetricFamily("aurae_events", "Lifecycle events so far (the newest sequence "
                                  "number)", value=self.workloads.events.last_sequence)


class _UnixHTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        # HTTPServer.server_bind wants a (host, port) to name itself by.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", 0


class _IPv6HTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _QuietHandler(MetricsHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would drown the daemon's log


class MetricsEndpoint:
    """Serves the registry over HTTP on one address, on its own threads."""

    def __init__(self, address: MetricsAddress, workloads: Workloads) -> None:
        self.address = address
        self.registry = CollectorRegistry()
        self.registry.register(CellCollector(workloads))
        self.registry.register(ProcessCollector(namespace="auraed", registry=None))
        handler = _QuietHandler.factory(self.registry)
        self._server: ThreadingHTTPServer
        if address.kind == "unix":
            # socketserver takes a path for AF_UNIX; the stubs only know (host, port).
            self._server = _UnixHTTPServer(address.path, handler)  # type: ignore[arg-type]
        elif ":" in address.host:
            self._server = _IPv6HTTPServer((address.host, address.port), handler)
        else:
            self._server = ThreadingHTTPServer((address.host, address.port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics",
                                        daemon=True)

    @property
    def port(self) -> int:
        """The TCP port it listens on (the one the kernel chose for port 0)."""
        return int(self._server.server_address[1]) if self.address.kind == "tcp" else 0

    def start(self) -> None:
        self._thread.start()
        log.info("metrics endpoint listening", extra={"address": str(self.address),
                                                       "port": self.port})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self.address.kind == "unix":
            try:
                os.unlink(self.address.path)
            except FileNotFoundError:
                pass
