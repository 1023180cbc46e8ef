"""Each fragment .proto under fragments/ holds one edge case; generate it with
the real templates into a scratch package, import it, and use it for real —
the SDK client calls a server built on the generated daemon base."""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType

import click
import grpc
import pytest

from codegen.generate import generate, write
from codegen.layout import Layout

ROOT = Path(__file__).resolve().parents[2]
FRAGMENTS = Path(__file__).parent / "fragments"


class Generated:
    def __init__(self, base: str, module_name: str) -> None:
        self.sdk: ModuleType = importlib.import_module(f"{base}.sdk.{module_name}")
        self.daemon: ModuleType = importlib.import_module(f"{base}.daemon.{module_name}")
        self.cli: ModuleType = importlib.import_module(f"{base}.cli.{module_name}")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("fragments")
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


_generated: dict[str, Generated] = {}


def fragment(scratch: Path, proto: str) -> Generated:
    """Generate one fragment (once per test session: its descriptors go into
    protobuf's global pool, which refuses a second copy)."""
    if proto in _generated:
        return _generated[proto]
    base = "frag_" + Path(proto).stem.replace("-", "_")
    layout = Layout(
        sdk_package=f"{base}.sdk",
        daemon_package=f"{base}.daemon",
        cli_package=f"{base}.cli",
        wire_package=f"{base}.wire",
        daemon_services_package=f"{base}.services",
        docs_path=f"{base}/stdlib.md",
    )
    generation = generate(FRAGMENTS, ROOT / "templates", layout, files=[proto])
    (scratch / base).mkdir(exist_ok=True)
    (scratch / base / "__init__.py").write_text("")
    write(generation, scratch)
    (package,) = generation.api.packages
    _generated[proto] = Generated(base, package.module_name)
    return _generated[proto]


def serve(*servicers: object) -> tuple[grpc.Server, grpc.Channel]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    for servicer in servicers:
        servicer.register(server)  # type: ignore[attr-defined]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, grpc.insecure_channel(f"127.0.0.1:{port}")


def client_for(gen: Generated, channel: grpc.Channel, cls_name: str) -> object:
    from aurae_sdk.rpc import Transport

    return getattr(gen.sdk, cls_name)(Transport(channel))


def test_grpc_package_does_not_shadow_grpcio(scratch: Path) -> None:
    gen = fragment(scratch, "grpc/fragment/v1/probe.proto")
    # grpcio is still the `grpc` everyone imports.
    assert grpc.__file__ is not None and "site-packages" in grpc.__file__
    assert hasattr(grpc, "server")
    pb = importlib.import_module("frag_probe.wire.pb.grpc.fragment.v1.probe_pb2")
    assert pb.ProbeRequest.DESCRIPTOR.full_name == "grpc.fragment.v1.ProbeRequest"

    class Probe(gen.daemon.ProbeServiceBase):  # type: ignore[name-defined,misc]
        def probe(self, request, context):  # type: ignore[no-untyped-def]
            return gen.sdk.ProbeResponse(text=request.text.upper())

    server, channel = serve(Probe())
    try:
        client = client_for(gen, channel, "ProbeService")
        assert client.probe(text="ping").text == "PING"  # type: ignore[attr-defined]
    finally:
        server.stop(None)


def test_hyphenated_file_name(scratch: Path) -> None:
    gen = fragment(scratch, "hyphen-name.proto")
    assert importlib.import_module("frag_hyphen_name.wire.pb.hyphen_name_pb2")
    assert gen.sdk.GreetRequest(name="x").name == "x"
    assert [c for c in gen.cli.group.commands] == ["greet"]


def test_python_keywords_become_keyword_safe_parameters(scratch: Path) -> None:
    gen = fragment(scratch, "keywords.proto")
    parameters = inspect.signature(gen.sdk.KeywordService.clash).parameters
    for name in ("class_", "from_", "lambda_", "timeout_", "request_", "metadata_"):
        assert name in parameters, name
    # The SDK's own parameters keep their meaning.
    assert parameters["timeout"].kind is inspect.Parameter.KEYWORD_ONLY

    seen = {}

    class Clash(gen.daemon.KeywordServiceBase):  # type: ignore[name-defined,misc]
        def clash(self, request, context):  # type: ignore[no-untyped-def]
            seen.update(
                cls=getattr(request, "class"), frm=getattr(request, "from"),
                lam=getattr(request, "lambda"), timeout=request.timeout,
                request=request.request, metadata=request.metadata,
            )
            return gen.sdk.ClashResponse(**{"import": "ok"})

    server, channel = serve(Clash())
    try:
        client = client_for(gen, channel, "KeywordService")
        response = client.clash(  # type: ignore[attr-defined]
            class_="c", from_=3, lambda_=True, timeout_=1.5, request_="r", metadata_="m",
            timeout=5,
        )
        assert getattr(response, "import") == "ok"
    finally:
        server.stop(None)
    assert seen == {"cls": "c", "frm": 3, "lam": True, "timeout": 1.5, "request": "r",
                    "metadata": "m"}

    # The CLI flag for a field named like a built-in option gets its full path.
    options = {p.name for p in gen.cli.group.commands["clash"].params}
    assert {"class_", "output", "request_file", "timeout"} <= options
    flags = {opt for p in gen.cli.group.commands["clash"].params for opt in p.opts}
    assert "--class" in flags and "--output" in flags


def test_proto3_optional_keeps_presence(scratch: Path) -> None:
    gen = fragment(scratch, "optional.proto")

    class Presence(gen.daemon.OptionalServiceBase):  # type: ignore[name-defined,misc]
        def presence(self, request, context):  # type: ignore[no-untyped-def]
            present = [n for n in ("count", "label", "enabled") if request.HasField(n)]
            return gen.sdk.PresenceResponse(present=present)

    server, channel = serve(Presence())
    try:
        client = client_for(gen, channel, "OptionalService")
        # Zero values are present when given explicitly; unset ones are not.
        assert list(client.presence(count=0, enabled=False).present) == ["count", "enabled"]  # type: ignore[attr-defined]
        assert list(client.presence().present) == []  # type: ignore[attr-defined]
    finally:
        server.stop(None)


def test_enums_by_name_in_sdk_and_cli(scratch: Path) -> None:
    gen = fragment(scratch, "enums.proto")
    request = gen.sdk.PaintRequest(colour="COLOUR_DEEP_BLUE", finish="GLOSS")
    assert request.colour == gen.sdk.Colour.Value("COLOUR_DEEP_BLUE")
    command = gen.cli.group.commands["paint"]
    colour = next(p for p in command.params if p.name == "colour")
    assert colour.type.convert("deep-blue", colour, None) == "COLOUR_DEEP_BLUE"
    assert colour.type.convert("COLOUR_RED", colour, None) == "COLOUR_RED"
    finish = next(p for p in command.params if p.name == "finish")
    assert finish.type.convert("gloss", finish, None) == "GLOSS"
    with pytest.raises(click.BadParameter):
        colour.type.convert("green", colour, None)


def test_repeated_fields(scratch: Path) -> None:
    gen = fragment(scratch, "repeated.proto")

    class Sum(gen.daemon.ListServiceBase):  # type: ignore[name-defined,misc]
        def sum(self, request, context):  # type: ignore[no-untyped-def]
            return gen.sdk.SumResponse(total=sum(request.numbers), tag_count=len(request.tags))

    server, channel = serve(Sum())
    try:
        client = client_for(gen, channel, "ListService")
        response = client.sum(numbers=[1, 2, 2**40], tags=[{"key": "a"}, gen.sdk.Tag(key="b")])  # type: ignore[attr-defined]
        assert (response.total, response.tag_count) == (3 + 2**40, 2)
    finally:
        server.stop(None)
    command = gen.cli.group.commands["sum"]
    numbers = next(p for p in command.params if p.name == "numbers")
    assert numbers.multiple
    # Repeated messages are not flags; they come through --request.
    assert not any(p.name == "tags" for p in command.params)


def test_maps(scratch: Path) -> None:
    gen = fragment(scratch, "maps.proto")

    class Label(gen.daemon.MapServiceBase):  # type: ignore[name-defined,misc]
        def label(self, request, context):  # type: ignore[no-untyped-def]
            assert request.limits["cpu"].value == 7
            return gen.sdk.LabelResponse(count=len(request.labels) + len(request.limits))

    server, channel = serve(Label())
    try:
        client = client_for(gen, channel, "MapService")
        response = client.label(labels={"a": "1", "b": "2"}, limits={"cpu": {"value": 7}})  # type: ignore[attr-defined]
        assert response.count == 3
    finally:
        server.stop(None)
    labels = next(p for p in gen.cli.group.commands["label"].params if p.name == "labels")
    assert labels.type.convert("k=v", labels, None) == ("k", "v")


def test_oneof(scratch: Path) -> None:
    gen = fragment(scratch, "oneofs.proto")

    class Aim(gen.daemon.TargetServiceBase):  # type: ignore[name-defined,misc]
        def aim(self, request, context):  # type: ignore[no-untyped-def]
            return gen.sdk.AimResponse(chosen=request.WhichOneof("target") or "")

    server, channel = serve(Aim())
    try:
        client = client_for(gen, channel, "TargetService")
        assert client.aim(port=0).chosen == "port"  # type: ignore[attr-defined]
        assert client.aim(host="h").chosen == "host"  # type: ignore[attr-defined]
    finally:
        server.stop(None)


def test_server_streaming(scratch: Path) -> None:
    gen = fragment(scratch, "streaming.proto")

    class Ticks(gen.daemon.TickServiceBase):  # type: ignore[name-defined,misc]
        def ticks(self, request, context):  # type: ignore[no-untyped-def]
            for seq in range(request.count):
                yield gen.sdk.Tick(seq=seq)

    server, channel = serve(Ticks())
    try:
        client = client_for(gen, channel, "TickService")
        with client.ticks(count=5) as stream:  # type: ignore[attr-defined]
            assert [t.seq for t in stream] == [0, 1, 2, 3, 4]
    finally:
        server.stop(None)
    assert gen.sdk._TICK_SERVICE_TICKS.server_streaming


def test_unimplemented_by_default(scratch: Path) -> None:
    gen = fragment(scratch, "streaming.proto")
    from aurae_sdk.errors import Unimplemented

    server, channel = serve(gen.daemon.TickServiceBase())
    try:
        client = client_for(gen, channel, "TickService")
        with pytest.raises(Unimplemented, match="TickService.Ticks is not implemented"):
            list(client.ticks(count=1))  # type: ignore[attr-defined]
    finally:
        server.stop(None)


GADGET_SERVICER = '''
from frag_gadgets.daemon.gadgets import GadgetServiceBase
from frag_gadgets.wire.pb.gadgets import gadgets_pb2 as pb


class GadgetService(GadgetServiceBase):
    def make(self, request, context):
        return pb.GadgetServiceMakeResponse(
            serial=100 * len(request.name) + request.HasField("shelf_name")
        )

    def count(self, request, context):
        for number in range(1, request.count + 1):
            yield pb.GadgetServiceCountResponse(number=number)
'''


def test_a_new_service_is_a_proto_plus_a_servicer(scratch: Path) -> None:
    """Everything a service needs comes from its proto, and the daemon finds
    its servicer by convention: nothing else is edited by hand."""
    import asyncio

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from aurae_sdk.rpc import Transport
    from auraed.server import assemble_servicers
    from auraed.services.health import HealthService

    gen = fragment(scratch, "gadgets/gadgets.proto")
    # The one hand-written part: the servicer, where the registry looks for it.
    (scratch / "frag_gadgets" / "services").mkdir()
    (scratch / "frag_gadgets" / "services" / "__init__.py").write_text("")
    (scratch / "frag_gadgets" / "services" / "gadgets.py").write_text(GADGET_SERVICER)

    # SDK: a sync and an async client, attached to the clients by name.
    assert {"GadgetService", "AsyncGadgetService"} <= set(vars(gen.sdk))
    sdk_services = importlib.import_module("frag_gadgets.sdk.services")
    assert sdk_services.SERVICES["gadgets"][1:] == (
        "GadgetService", "AsyncGadgetService", "aurae.gadgets.v0.GadgetService"
    )
    assert isinstance(vars(sdk_services.SyncServices)["gadgets"], functools.cached_property)
    assert isinstance(vars(sdk_services.AsyncServices)["gadgets"], functools.cached_property)
    exports = importlib.import_module("frag_gadgets.sdk.exports")
    assert exports.__all__ == ["gadgets"] and exports.gadgets is gen.sdk

    # CLI group, REPL name, reference for describe, docs section.
    cli_groups = importlib.import_module("frag_gadgets.cli").GROUPS
    assert cli_groups["gadgets"] == ("frag_gadgets.cli.gadgets", "GadgetService makes gadgets.")
    assert list(gen.cli.group.commands) == ["make", "count"]
    make_usage = [p.make_metavar(None) for p in gen.cli.group.commands["make"].params[:2]]
    assert make_usage == ["NAME", "[SHELF_NAME]"]
    namespace = importlib.import_module("frag_gadgets.cli.namespace")
    assert namespace.SERVICE_MODULES == {"gadgets": "frag_gadgets.sdk.gadgets"}
    reference = importlib.import_module("frag_gadgets.cli.reference")
    (described,) = reference.SERVICES
    assert [m.summary for m in described.methods] == [
        "Make a gadget with the given name.", "Count up to `count`, one message each."
    ]
    assert [m.cli for m in described.methods] == ["aurae-py gadgets make", "aurae-py gadgets count"]
    docs = (scratch / "frag_gadgets" / "stdlib.md").read_text()
    assert "## aurae.gadgets.v0" in docs and "### GadgetService" in docs
    assert "`aurae-py gadgets make NAME [SHELF_NAME]`" in docs

    # Daemon: a base, and a registry entry pointing at the servicer's module.
    registry = importlib.import_module("frag_gadgets.daemon.registry")
    (entry,) = registry.SERVICES
    assert (entry.name, entry.base, entry.module) == (
        "aurae.gadgets.v0.GadgetService", gen.daemon.GadgetServiceBase,
        "frag_gadgets.services.gadgets",
    )
    assert registry.SERVICE_NAMES == ("aurae.gadgets.v0.GadgetService",)

    # The server's own wiring finds the servicer and serves it, with health.
    (servicer,) = assemble_servicers([], registry.SERVICES)
    assert type(servicer).__module__ == "frag_gadgets.services.gadgets"
    health = HealthService(registry.SERVICE_NAMES)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    for registered in (servicer, health):
        registered.register(server)
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    channel = grpc.insecure_channel(target)
    health.serving()
    try:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="aurae.gadgets.v0.GadgetService")
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        client = client_for(gen, channel, "GadgetService")
        assert client.make(name="cog").serial == 300  # type: ignore[attr-defined]
        assert client.make(name="cog", shelf_name="top").serial == 301  # type: ignore[attr-defined]

        async def count_async() -> list[int]:
            async with grpc.aio.insecure_channel(target) as aio_channel:
                aclient = gen.sdk.AsyncGadgetService(Transport(aio_channel))
                return [r.number async for r in aclient.count(count=3)]

        assert asyncio.run(count_async()) == [1, 2, 3]
    finally:
        server.stop(None)
