"""Where generated code goes and which Python modules it imports.

The template tree under templates/ mirrors the project's output tree
(`templates/aurae_sdk/generated/%package.py.j2` renders
`aurae_sdk/generated/cells.py`). A Layout can move each generated package
elsewhere, which is how tests generate fragment protos into a scratch
directory without touching the real packages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Protos whose Python modules a well-kept distribution already ships. We still
# read the .proto (for the SDK, CLI and docs) but import that module instead of
# generating a second one: two modules defining the same protobuf symbols
# cannot both load into one process.
EXTERNAL_MODULES = {
    "grpc/health/v1/health.proto": "grpc_health.v1.health_pb2",
}


@dataclass(frozen=True)
class Layout:
    sdk_package: str = "aurae_sdk.generated"
    daemon_package: str = "auraed.generated"
    cli_package: str = "aurae_cli.generated"
    # The generated half of the wire layer, which the SDK, the CLI and the
    # daemon all import: the _pb2 and _pb2_grpc modules.
    wire_package: str = "aurae_sdk.wire.generated"
    # Where the daemon's hand-written servicer of package P lives
    # (`<daemon_services_package>.P`); the registry finds it there.
    daemon_services_package: str = "auraed.services"
    docs_path: str = "docs/stdlib.md"
    external_modules: Mapping[str, str] = field(default_factory=lambda: dict(EXTERNAL_MODULES))

    @property
    def pb_package(self) -> str:
        return f"{self.wire_package}.pb"

    def output_path(self, template_path: str) -> str:
        """Map a template's path (relative to templates/, without .j2) to the output path."""
        for default, actual in (
            (Layout.sdk_package, self.sdk_package),
            (Layout.daemon_package, self.daemon_package),
            (Layout.cli_package, self.cli_package),
        ):
            prefix = default.replace(".", "/") + "/"
            if template_path.startswith(prefix):
                return actual.replace(".", "/") + "/" + template_path[len(prefix) :]
        if template_path == Layout.docs_path:
            return self.docs_path
        return template_path

    def package_dir(self, package: str) -> str:
        return package.replace(".", "/")
