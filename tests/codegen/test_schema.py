"""Unit tests of the schema layer, built from the real proto/ tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from codegen.generate import find_protos
from codegen.layout import Layout
from codegen.protoc import ProtocError, python_module_of, relocate, run_protoc
from codegen.schema import (
    Api,
    UnsupportedSchema,
    build_api,
    clean_comment,
    first_sentence,
    kebab_case,
    package_module_name,
    python_identifier,
    snake_case,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def api() -> Api:
    protos = find_protos(ROOT / "proto")
    output = run_protoc(ROOT / "proto", protos)
    return build_api(output.descriptors, set(protos), Layout())


def method(api: Api, full_name: str):  # type: ignore[no-untyped-def]
    for service in api.services:
        for m in service.methods:
            if m.full_name == full_name:
                return m
    raise KeyError(full_name)


def test_names() -> None:
    assert snake_case("GetAuraeDaemonLogStream") == "get_aurae_daemon_log_stream"
    assert snake_case("GetHTTPStatus") == "get_http_status"
    assert snake_case("Allocate") == "allocate"
    assert kebab_case("GetSubProcessStream") == "get-sub-process-stream"
    assert python_identifier("class") == "class_"
    assert python_identifier("timeout") == "timeout_"
    assert python_identifier("name") == "name"
    assert package_module_name("aurae.cells.v0") == "cells"
    assert package_module_name("grpc.health.v1") == "health"
    assert package_module_name("foo.bar.v1beta2") == "bar"


def test_comments() -> None:
    assert clean_comment(" First line.\n Second.\n\n") == "First line.\nSecond."
    assert first_sentence("Do a thing. Then more.\nAnd more.") == "Do a thing."
    assert first_sentence("No full stop") == "No full stop"


def test_packages_and_services(api: Api) -> None:
    assert [p.module_name for p in api.packages] == ["cells", "discovery", "images", "instances",
                                                     "observe", "vms", "health"]
    services = {s.full_name: s for s in api.services}
    assert set(services) == {
        "aurae.cells.v0.CellService",
        "aurae.discovery.v0.DiscoveryService",
        "aurae.images.v0.ImageService",
        "aurae.instances.v0.InstanceService",
        "aurae.observe.v0.ObserveService",
        "aurae.vms.v0.VmService",
        "grpc.health.v1.Health",
    }
    cells = services["aurae.cells.v0.CellService"]
    assert cells.attribute == "cells"
    assert (cells.sync_class, cells.async_class, cells.base_class) == (
        "CellService", "AsyncCellService", "CellServiceBase")
    assert [m.name for m in cells.methods][:5] == ["Allocate", "Free", "Start", "Stop", "List"]
    assert services["grpc.health.v1.Health"].attribute == "health"


def test_comments_reattached(api: Api) -> None:
    allocate = method(api, "aurae.cells.v0.CellService.Allocate")
    assert allocate.doc.startswith("Reserve a new cell")
    cell = api.message("aurae.cells.v0.Cell")
    name = next(f for f in cell.fields if f.name == "name")
    assert name.doc.startswith("Path name of the cell")
    channel = api.enum("aurae.observe.v0.LogChannelType")
    assert channel.values[1].doc == "The process's standard output."
    assert "Wire-compatible with public Aurae v0" in next(
        p for p in api.packages if p.module_name == "cells").doc


def test_streaming_kind_and_idempotency(api: Api) -> None:
    assert method(api, "aurae.observe.v0.ObserveService.GetSubProcessStream").kind == "unary_stream"
    assert method(api, "aurae.cells.v0.CellService.Allocate").kind == "unary_unary"
    assert method(api, "grpc.health.v1.Health.Watch").kind == "unary_stream"
    idempotent = {m.full_name for s in api.services for m in s.methods if m.idempotent}
    assert idempotent == {
        "aurae.cells.v0.CellService.List",
        "aurae.cells.v0.CellService.Metrics",
        "aurae.discovery.v0.DiscoveryService.Discover",
        "aurae.images.v0.ImageService.Inspect",
        "aurae.images.v0.ImageService.List",
        "aurae.instances.v0.InstanceService.List",
        "aurae.vms.v0.VmService.List",
        "grpc.health.v1.Health.Check",
    }


def test_paged_lists_are_recognised(api: Api) -> None:
    # AIP-158's shape: request page_token, response next_page_token; the CLI follows them.
    paged = {m.full_name for s in api.services for m in s.methods if m.paged}
    assert paged == {"aurae.cells.v0.CellService.List"}


def test_field_annotations_and_presence(api: Api) -> None:
    start = api.message("aurae.cells.v0.CellServiceStartRequest")
    fields = {f.name: f for f in start.fields}
    assert fields["cell_name"].explicit_optional and fields["cell_name"].has_presence
    assert fields["cell_name"].annotation == "str"
    assert fields["uid"].annotation == "int"
    assert fields["executable"].annotation == "Executable | Mapping[str, Any]"
    channel = next(f for f in api.message("aurae.observe.v0.GetSubProcessStreamRequest").fields
                   if f.name == "channel_type")
    assert channel.annotation == "LogChannelType.ValueType | str"
    status = next(f for f in api.message("grpc.health.v1.HealthCheckResponse").fields)
    assert status.annotation == "_health_pb2.HealthCheckResponse.ServingStatus.ValueType | str"
    args = next(f for f in api.message("aurae.vms.v0.VirtualMachine").fields if f.name == "kernel_args")
    assert args.repeated and args.annotation == "Sequence[str]"


def test_flattened_leaves_for_the_cli(api: Api) -> None:
    allocate = method(api, "aurae.cells.v0.CellService.Allocate")
    by_path = {leaf.dotted: leaf for leaf in allocate.leaves}
    assert by_path["cell.cpu.weight"].cli_name == "cpu-weight"
    assert by_path["cell.memory.max"].flag == "--memory-max"
    assert [leaf.dotted for leaf in allocate.positionals] == ["cell.name"]
    assert allocate.positionals[0].metavar == "NAME"

    start = method(api, "aurae.cells.v0.CellService.Start")
    assert [leaf.metavar for leaf in start.positionals] == ["CELL_NAME", "NAME"]
    assert {leaf.flag for leaf in start.options} >= {"--command", "--uid", "--gid"}

    stream = method(api, "aurae.observe.v0.ObserveService.GetSubProcessStream")
    assert [leaf.metavar for leaf in stream.positionals] == ["PROCESS_ID"]
    channel = next(leaf for leaf in stream.leaves if leaf.field.name == "channel_type")
    assert channel.enum is not None
    assert [v.cli_name for v in channel.enum.values] == ["unspecified", "stdout", "stderr"]

    # Workload.id is not field 1, so it is a flag, not a positional.
    signals = method(api, "aurae.observe.v0.ObserveService.GetPosixSignalsStream")
    assert not signals.positionals
    assert {leaf.flag for leaf in signals.leaves} == {"--workload-type", "--id"}

    # Repeated and recursive message fields are left to --request.
    vm = method(api, "aurae.vms.v0.VmService.Allocate")
    assert "machine.drive_mounts" not in {leaf.dotted for leaf in vm.leaves}
    assert by_path.keys().isdisjoint({"cell.children"})


def test_relocate_rewrites_only_our_modules() -> None:
    source = (
        "import grpc\n"
        "from cells import cells_pb2 as cells_dot_cells__pb2\n"
        "from google.protobuf import descriptor_pb2\n"
        "import cells.cells_pb2\n"
        "_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'cells.cells_pb2', _globals)\n"
        "from grpc.health.v1 import health_pb2\n"
    )
    mapping = {
        "cells.cells_pb2": "pkg.pb.cells.cells_pb2",
        "grpc.health.v1.health_pb2": "grpc_health.v1.health_pb2",
    }
    out = relocate(source, mapping)
    assert "import grpc\n" in out
    assert "from pkg.pb.cells import cells_pb2 as cells_dot_cells__pb2" in out
    assert "from google.protobuf import descriptor_pb2" in out
    assert "import pkg.pb.cells.cells_pb2" in out
    assert "'pkg.pb.cells.cells_pb2'" in out
    assert "from grpc_health.v1 import health_pb2" in out
    assert python_module_of("a/b-c.proto") == "a.b_c_pb2"


def test_client_streaming_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "upload.proto").write_text(
        'syntax = "proto3";\npackage frag.upload.v1;\nmessage Chunk { bytes data = 1; }\n'
        "service UploadService { rpc Upload(stream Chunk) returns (Chunk); }\n"
    )
    output = run_protoc(tmp_path, ["upload.proto"])
    with pytest.raises(UnsupportedSchema, match="UploadService.Upload streams requests"):
        build_api(output.descriptors, {"upload.proto"}, Layout())


def test_protoc_errors_are_reported(tmp_path: Path) -> None:
    (tmp_path / "bad.proto").write_text('syntax = "proto3";\nmessage { }\n')
    with pytest.raises(ProtocError, match="bad.proto"):
        run_protoc(tmp_path, ["bad.proto"])
