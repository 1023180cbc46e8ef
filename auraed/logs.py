"""The daemon's own structured log.

Every record goes to stderr (logfmt by default, JSON lines with
`--log-format json`) and into a LogRing that GetAuraeDaemonLogStream
followers read. Context goes in `extra=`: `log.info("cell allocated",
extra={"cell": "web"})` prints `... msg="cell allocated" cell=web`.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from auraed.output.ring import LogRing, LogRingHandler

# Attributes every LogRecord has; anything else came in through `extra=`.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _context(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


_BARE_VALUE = re.compile(r"[\w\-./:@]+")


def _logfmt_value(value: object) -> str:
    text = str(value)
    if _BARE_VALUE.fullmatch(text):
        return text
    return json.dumps(text)


class _OnceFormatter(logging.Formatter):
    """Formats a record once, however many handlers (stderr, the ring) print it."""

    def format(self, record: logging.LogRecord) -> str:
        cached = record.__dict__.get("_formatted")
        if cached is not None and cached[0] is self:
            return str(cached[1])
        line = self.render(record)
        record._formatted = (self, line)  # a "_" name: never printed as context
        return line

    def render(self, record: logging.LogRecord) -> str:
        raise NotImplementedError


class LogfmtFormatter(_OnceFormatter):
    def render(self, record: logging.LogRecord) -> str:
        fields = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_context(record),
        }
        line = " ".join(f"{key}={_logfmt_value(value)}" for key, value in fields.items())
        if record.exc_info:
            line += " error=" + json.dumps(self.formatException(record.exc_info))
        return line


class JsonFormatter(_OnceFormatter):
    def render(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        return json.dumps(fields, default=str)


def configure(*, verbose: bool, log_format: str, ring: LogRing) -> None:
    """Send the `auraed` loggers to stderr and to `ring`."""
    formatter: logging.Formatter = JsonFormatter() if log_format == "json" else LogfmtFormatter()
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(formatter)
    to_ring = LogRingHandler(ring)
    to_ring.setFormatter(formatter)
    root = logging.getLogger("auraed")
    root.handlers[:] = [stderr, to_ring]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    # Neither format prints where a record was logged from, nor its thread or process: spare
    # every record the stack walk (findCaller) and the lookups. In a burst of cell lifecycles
    # (four records each) the walk alone was a quarter of the daemon's time in logging
    # (py-spy). The logging HOWTO's "Optimization" section names these switches.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
