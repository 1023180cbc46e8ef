"""aurae_sdk: the typed Python client of the Aurae Standard Library.

    import aurae_sdk

    with aurae_sdk.connect() as client:
        client.cells.allocate(cell={"name": "web", "cpu": {"weight": 200}})
        client.cells.start(cell_name="web", executable={"name": "app", "command": "sleep 60"})

Declared state: `aurae_sdk.apply(client, node)` makes the node run what an
`aurae_sdk.declared.Node` declares (`plan` shows what would change, `delete`
removes it); `aurae_sdk.manifest.load("node.yaml")` reads the same from YAML.

Service modules with their message types: `aurae_sdk.cells`,
`aurae_sdk.observe`, ... one per proto package (aurae_sdk.generated.PACKAGES).
Importing this package is cheap: grpc and the service modules load on first use,
and `aurae_sdk.wire` (which the daemon imports) loads nothing of the client.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# The package table only (pure data): no service module, no grpc.
from aurae_sdk.generated import PACKAGES

if TYPE_CHECKING:
    from aurae_sdk.allocations import cleanup
    from aurae_sdk.cell_tree import alist_cells, alist_pages, list_cells, list_pages
    from aurae_sdk.client import AsyncClient, Client, connect, connect_async
    from aurae_sdk.config import ClientConfig, ConfigError, load_config
    from aurae_sdk.declared import apply, delete, plan
    from aurae_sdk.errors import (
        AlreadyExists,
        AuraeError,
        DeadlineExceeded,
        FailedPrecondition,
        Internal,
        InvalidArgument,
        NotFound,
        PermissionDenied,
        Unauthenticated,
        Unavailable,
        Unimplemented,
    )
    from aurae_sdk.fleet import Fleet
    from aurae_sdk.generated.exports import *  # the service modules, generated
    from aurae_sdk.logs import adaemon_log, afollow, daemon_log, follow
    from aurae_sdk.messages import (
        compact,
        from_dict,
        from_json,
        from_yaml,
        to_dict,
        to_json,
        to_yaml,
    )
    from aurae_sdk.rpc import RetryPolicy

__version__ = "0.1.0"

_LAZY = {
    "AlreadyExists": "aurae_sdk.errors",
    "AuraeError": "aurae_sdk.errors",
    "DeadlineExceeded": "aurae_sdk.errors",
    "FailedPrecondition": "aurae_sdk.errors",
    "Internal": "aurae_sdk.errors",
    "InvalidArgument": "aurae_sdk.errors",
    "NotFound": "aurae_sdk.errors",
    "PermissionDenied": "aurae_sdk.errors",
    "Unauthenticated": "aurae_sdk.errors",
    "Unavailable": "aurae_sdk.errors",
    "Unimplemented": "aurae_sdk.errors",
    "Client": "aurae_sdk.client",
    "Fleet": "aurae_sdk.fleet",
    "AsyncClient": "aurae_sdk.client",
    "connect": "aurae_sdk.client",
    "connect_async": "aurae_sdk.client",
    "ClientConfig": "aurae_sdk.config",
    "ConfigError": "aurae_sdk.config",
    "load_config": "aurae_sdk.config",
    "RetryPolicy": "aurae_sdk.rpc",
    "list_cells": "aurae_sdk.cell_tree",
    "alist_cells": "aurae_sdk.cell_tree",
    "list_pages": "aurae_sdk.cell_tree",
    "alist_pages": "aurae_sdk.cell_tree",
    "apply": "aurae_sdk.declared",
    "cleanup": "aurae_sdk.allocations",
    "plan": "aurae_sdk.declared",
    "delete": "aurae_sdk.declared",
    "follow": "aurae_sdk.logs",
    "afollow": "aurae_sdk.logs",
    "daemon_log": "aurae_sdk.logs",
    "adaemon_log": "aurae_sdk.logs",
    "compact": "aurae_sdk.messages",
    "to_dict": "aurae_sdk.messages",
    "from_dict": "aurae_sdk.messages",
    "to_json": "aurae_sdk.messages",
    "from_json": "aurae_sdk.messages",
    "to_yaml": "aurae_sdk.messages",
    "from_yaml": "aurae_sdk.messages",
}


def __getattr__(name: str) -> Any:
    if name in PACKAGES:
        module = import_module(f"aurae_sdk.generated.{name}")
    elif name in _LAZY:
        module = getattr(import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'aurae_sdk' has no attribute {name!r}")
    globals()[name] = module
    return module


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, *PACKAGES])


__all__ = [
    "AlreadyExists",
    "AsyncClient",
    "AuraeError",
    "Client",
    "ClientConfig",
    "ConfigError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Fleet",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "RetryPolicy",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "adaemon_log",
    "afollow",
    "alist_cells",
    "alist_pages",
    "apply",
    "cleanup",
    "compact",
    "connect",
    "connect_async",
    "daemon_log",
    "delete",
    "follow",
    "from_dict",
    "from_json",
    "from_yaml",
    "list_cells",
    "list_pages",
    "load_config",
    "plan",
    "to_dict",
    "to_json",
    "to_yaml",
]
__all__ += list(PACKAGES)
