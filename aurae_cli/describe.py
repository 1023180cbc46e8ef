"""`aurae-py describe`: the API as this client knows it, without asking a server.

Everything comes from what the client embeds: RPC shapes and message fields
from the descriptors compiled into the `_pb2` modules, method and service
docs from the generated SDK classes' docstrings, and message, field and enum
docs from the `_pb2.pyi` stubs (mypy-protobuf copies the proto comments there;
the serialized descriptors drop them). A stub without comments, such as
grpcio-health-checking's, leaves those docs empty.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any, Literal

import click
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.message import Message

# Descriptors come from protobuf's C extension, whose stubs type them as a
# union with optional members; helpers take them as Any.
AnyField = Any
AnyDescriptor = Any

_SCALAR_TYPES = {
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_FIXED64: "fixed64",
    FieldDescriptor.TYPE_FIXED32: "fixed32",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_SFIXED32: "sfixed32",
    FieldDescriptor.TYPE_SFIXED64: "sfixed64",
    FieldDescriptor.TYPE_SINT32: "sint32",
    FieldDescriptor.TYPE_SINT64: "sint64",
}


@dataclass(frozen=True)
class FieldInfo:
    number: int
    name: str
    type: str  # "string", "aurae.cells.v0.Cell", "map<string, string>"
    label: str  # "", "optional", "repeated" or "oneof NAME"
    doc: str


@dataclass(frozen=True)
class MessageInfo:
    full_name: str
    name: str
    doc: str
    fields: tuple[FieldInfo, ...]
    kind: Literal["message"] = "message"


@dataclass(frozen=True)
class EnumValueInfo:
    name: str
    number: int
    doc: str


@dataclass(frozen=True)
class EnumInfo:
    full_name: str
    name: str
    doc: str
    values: tuple[EnumValueInfo, ...]
    kind: Literal["enum"] = "enum"


@dataclass(frozen=True)
class MethodInfo:
    service: str
    name: str
    request: str
    response: str
    streaming: Literal["unary", "server streaming"]
    retried: bool  # idempotent reads retry on UNAVAILABLE
    doc: str
    sdk: str  # "client.cells.allocate"
    cli: str  # "aurae-py cells allocate"
    kind: Literal["rpc"] = "rpc"

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"


@dataclass(frozen=True)
class ServiceInfo:
    full_name: str
    name: str
    attribute: str  # client.<attribute>, aurae-py <attribute>
    doc: str
    methods: tuple[MethodInfo, ...]
    kind: Literal["service"] = "service"


Described = ServiceInfo | MethodInfo | MessageInfo | EnumInfo


class UnknownName(LookupError):
    """A name that matches nothing, or more than one thing; the message says which."""


def field_type_name(field: AnyField) -> str:
    """A field's type as a .proto file writes it."""
    if _is_map(field):
        entry = field.message_type.fields_by_name
        return f"map<{field_type_name(entry['key'])}, {field_type_name(entry['value'])}>"
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return str(field.message_type.full_name)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return str(field.enum_type.full_name)
    return _SCALAR_TYPES.get(field.type, "group")


def _is_map(field: AnyField) -> bool:
    return bool(
        field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry
    )


def _field_label(field: AnyField) -> str:
    if _is_map(field):
        return ""
    if field.is_repeated:
        return "repeated"
    oneof = field.containing_oneof
    # proto3 `optional` is a oneof of its own, named after the field.
    if oneof is not None and not (len(oneof.fields) == 1 and oneof.name == "_" + field.name):
        return f"oneof {oneof.name}"
    if oneof is not None:
        return "optional"
    return ""


def _pyi_docs(module_name: str) -> dict[str, str]:
    """The proto comments mypy-protobuf copied into a module's .pyi stub,
    keyed by path in the package: "Cell", "Cell.name", "ExecutableState.EXECUTABLE_STATE_RUNNING"."""
    module_file = getattr(sys.modules[module_name], "__file__", None)
    stub = Path(module_file).with_suffix(".pyi") if module_file else None
    if stub is None or not stub.exists():
        return {}
    docs: dict[str, str] = {}
    _collect_docs(ast.parse(stub.read_text(encoding="utf-8")).body, "", docs)
    return docs


def _collect_docs(body: list[ast.stmt], prefix: str, docs: dict[str, str]) -> None:
    for index, node in enumerate(body):
        following = body[index + 1] if index + 1 < len(body) else None
        if isinstance(node, ast.ClassDef):
            if node.name.startswith("_") and node.name.endswith("EnumTypeWrapper"):
                # mypy-protobuf documents the values of enum E in _EEnumTypeWrapper.
                enum_name = node.name[1 : -len("EnumTypeWrapper")]
                _collect_docs(node.body, f"{prefix}{enum_name}.", docs)
            elif not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc:
                    docs[prefix + node.name] = doc
                _collect_docs(node.body, f"{prefix}{node.name}.", docs)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = _string_constant(following)
            if doc:
                docs[prefix + node.target.id] = doc
        elif isinstance(node, ast.FunctionDef):  # message and repeated fields are properties
            doc = ast.get_docstring(node)
            if doc and node.name != "__init__":
                docs[prefix + node.name] = doc


def _string_constant(node: ast.stmt | None) -> str:
    if (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ):
        return inspect.cleandoc(node.value.value)
    return ""


def _message_info(descriptor: Descriptor, docs: Mapping[str, str]) -> MessageInfo:
    fields = tuple(
        FieldInfo(
            number=field.number,
            name=field.name,
            type=field_type_name(field),
            label=_field_label(field),
            doc=docs.get(f"{descriptor.full_name}.{field.name}", ""),
        )
        for field in descriptor.fields
    )
    return MessageInfo(
        descriptor.full_name, descriptor.name, docs.get(descriptor.full_name, ""), fields
    )


def _enum_info(descriptor: EnumDescriptor, docs: Mapping[str, str]) -> EnumInfo:
    values = tuple(
        EnumValueInfo(
            value.name, value.number, docs.get(f"{descriptor.full_name}.{value.name}", "")
        )
        for value in descriptor.values
    )
    return EnumInfo(
        descriptor.full_name, _local_name(descriptor), docs.get(descriptor.full_name, ""), values
    )


def _local_name(descriptor: Descriptor | EnumDescriptor) -> str:
    """The name inside its package: "Cell", "HealthCheckResponse.ServingStatus"."""
    return descriptor.full_name.removeprefix(descriptor.file.package + ".")


def _nested(descriptor: AnyDescriptor) -> Iterator[Descriptor | EnumDescriptor]:
    yield descriptor
    yield from descriptor.enum_types
    for nested in descriptor.nested_types:
        if not nested.GetOptions().map_entry:
            yield from _nested(nested)


def _service_info(attribute: str, module_name: str, class_name: str) -> ServiceInfo:
    service_class = getattr(import_module(module_name), class_name)
    # Generated method names are the RPC's name in snake_case (plus "_" after
    # a keyword); matching without underscores finds them without redoing it.
    by_plain_name = {
        name.replace("_", "").lower(): name
        for name, member in vars(service_class).items()
        if callable(member) and not name.startswith("_")
    }
    methods = []
    for spec in service_class.METHODS:
        python_name = by_plain_name[spec.name.lower()]
        methods.append(
            MethodInfo(
                service=service_class.SERVICE,
                name=spec.name,
                request=spec.request_type.DESCRIPTOR.full_name,
                response=spec.response_type.DESCRIPTOR.full_name,
                streaming="server streaming" if spec.server_streaming else "unary",
                retried=spec.idempotent,
                doc=inspect.getdoc(getattr(service_class, python_name)) or "",
                sdk=f"client.{attribute}.{python_name}",
                cli=f"aurae-py {attribute} {python_name.rstrip('_').replace('_', '-')}",
            )
        )
    return ServiceInfo(
        full_name=service_class.SERVICE,
        name=service_class.SERVICE.rsplit(".", 1)[-1],
        attribute=attribute,
        doc=inspect.getdoc(service_class) or "",
        methods=tuple(methods),
    )


@dataclass(frozen=True)
class Schema:
    """Every service, RPC, message and enum the SDK exposes."""

    services: tuple[ServiceInfo, ...]
    messages: Mapping[str, MessageInfo]
    enums: Mapping[str, EnumInfo]
    sdk_modules: Mapping[str, str]  # proto package -> SDK module name ("cells")

    @classmethod
    def load(cls) -> Schema:
        from aurae_sdk.generated import PACKAGES
        from aurae_sdk.generated.services import SERVICES

        services = tuple(
            _service_info(attribute, module, sync_class)
            for attribute, (module, sync_class, _, _) in SERVICES.items()
        )
        messages: dict[str, MessageInfo] = {}
        enums: dict[str, EnumInfo] = {}
        for package_module in PACKAGES:
            module = import_module(f"aurae_sdk.generated.{package_module}")
            docs = _module_docs(module)
            for descriptor in _exported_types(module):
                if isinstance(descriptor, Descriptor):
                    messages[descriptor.full_name] = _message_info(descriptor, docs)
                else:
                    enums[descriptor.full_name] = _enum_info(descriptor, docs)
        return cls(
            services, messages, enums, {package: module for module, package in PACKAGES.items()}
        )

    def find(self, name: str) -> Described:
        """The item a user means by `name`; raises UnknownName."""
        index = self._index()
        key = name.strip().strip("/").replace("/", ".")
        matches = index.get(key.lower(), [])
        exact = [item for spelled, item in matches if spelled == key]
        found = _unique(exact) or _unique([item for _, item in matches])
        if found is not None:
            return found
        if matches:
            names = sorted({_display_name(item) for _, item in matches})
            raise UnknownName(f"{name!r} is ambiguous: it could be {', '.join(names)}")
        spellings = sorted({spelled for entries in index.values() for spelled, _ in entries})
        close = difflib.get_close_matches(key, spellings, n=4, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise UnknownName(
            f"no service, RPC, message or enum named {name!r}{hint} "
            "(`aurae-py describe` lists them)"
        )

    def _index(self) -> dict[str, list[tuple[str, Described]]]:
        index: dict[str, list[tuple[str, Described]]] = {}

        def add(spellings: Iterable[str], item: Described) -> None:
            for spelled in dict.fromkeys(spellings):
                index.setdefault(spelled.lower(), []).append((spelled, item))

        for service in self.services:
            add([service.full_name, service.name, service.attribute], service)
            for method in service.methods:
                python_name = method.sdk.rsplit(".", 1)[-1]
                add(
                    [
                        f"{service.full_name}.{method.name}",
                        f"{service.name}.{method.name}",
                        f"{service.attribute}.{python_name}",
                        f"{service.attribute}.{method.cli.rsplit(' ', 1)[-1]}",
                    ],
                    method,
                )
        named: list[MessageInfo | EnumInfo] = [*self.messages.values(), *self.enums.values()]
        for described in named:
            package = described.full_name.removesuffix("." + described.name)
            add(
                [
                    described.full_name,
                    described.name,
                    described.full_name.rsplit(".", 1)[-1],
                    f"{self.sdk_modules.get(package, package)}.{described.name}",
                ],
                described,
            )
        return index


def _unique(items: Sequence[Described]) -> Described | None:
    distinct = {id(item): item for item in items}
    return next(iter(distinct.values())) if len(distinct) == 1 else None


def _display_name(item: Described) -> str:
    return f"{item.service}.{item.name}" if isinstance(item, MethodInfo) else item.full_name


def _exported_types(module: object) -> Iterator[Descriptor | EnumDescriptor]:
    """The message and enum types a generated SDK module re-exports, with their nested types."""
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Message):
            yield from _nested(value.DESCRIPTOR)
        elif isinstance(value, EnumTypeWrapper):
            yield value.DESCRIPTOR


def _module_docs(module: object) -> dict[str, str]:
    """Docs of everything a generated SDK module re-exports, by full proto name,
    from the stubs of the _pb2 modules its messages come from."""
    docs: dict[str, str] = {}
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Message):
            package = value.DESCRIPTOR.file.package
            for path, doc in _pyi_docs(value.__module__).items():
                docs[f"{package}.{path}"] = doc
    return docs


# --------------------------------------------------------------------------
# Rendering


def as_json(item: Described | Sequence[ServiceInfo]) -> str:
    if isinstance(item, Sequence):
        return json.dumps({"services": [_json_value(service) for service in item]}, indent=2)
    return json.dumps(_json_value(item), indent=2)


def _json_value(item: Described) -> dict[str, Any]:
    data = dataclasses.asdict(item)
    if isinstance(item, MethodInfo):
        data["path"] = item.path
    if isinstance(item, ServiceInfo):
        data["methods"] = [_json_value(method) for method in item.methods]
    return data


def _indented(text: str, pad: str) -> list[str]:
    return [f"{pad}{line}".rstrip() for line in text.splitlines()]


def _first_sentence(doc: str) -> str:
    flat = " ".join(doc.split())
    head, dot, _ = flat.partition(". ")
    return head + ("." if dot else "")


def service_list_text(services: Sequence[ServiceInfo]) -> list[str]:
    lines = []
    for service in services:
        lines.append(
            f"{service.full_name}  (client.{service.attribute}, aurae-py {service.attribute})"
        )
        width = max(len(method.name) for method in service.methods)
        for method in service.methods:
            kind = "stream" if method.streaming == "server streaming" else "unary"
            lines.append(f"  {method.name:<{width}}  {kind:<6}  {_first_sentence(method.doc)}")
        lines.append("")
    lines.append("`aurae-py describe NAME` shows a service, an RPC, a message or an enum.")
    return lines


def _method_text(method: MethodInfo, pad: str) -> list[str]:
    request, response = method.request.rsplit(".", 1)[-1], method.response.rsplit(".", 1)[-1]
    returns = f"stream {response}" if method.streaming == "server streaming" else response
    lines = [f"{pad}rpc {method.name}({request}) returns ({returns})"]
    lines += _indented(method.doc, pad + "    ")
    retried = "retried on UNAVAILABLE" if method.retried else "not retried"
    lines.append(f"{pad}    {method.streaming}, {retried}; SDK {method.sdk}(...); CLI {method.cli}")
    return lines


def _fields_text(message: MessageInfo, pad: str) -> list[str]:
    if not message.fields:
        return [f"{pad}(no fields)"]
    rows = [("#", "field", "type", "label", "description")] + [
        (str(f.number), f.name, f.type, f.label, _one_line(f.doc)) for f in message.fields
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    return [
        f"{pad}{row[0]:>{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  "
        f"{row[3]:<{widths[3]}}  {row[4]}".rstrip()
        for row in rows
    ]


def _one_line(doc: str) -> str:
    return " ".join(doc.split())


def describe_text(item: Described, schema: Schema) -> list[str]:
    if isinstance(item, ServiceInfo):
        lines = [f"service {item.full_name}"]
        lines += _indented(item.doc, "  ")
        lines.append(
            f"  SDK: client.{item.attribute}, aclient.{item.attribute}; "
            f"CLI: aurae-py {item.attribute}"
        )
        for method in item.methods:
            lines.append("")
            lines += _method_text(method, "  ")
        return lines
    if isinstance(item, MethodInfo):
        lines = [f"service {item.service}"] + _method_text(item, "  ")
        for title, message_name in (("request", item.request), ("response", item.response)):
            message = schema.messages[message_name]
            lines += ["", f"  {title} {message.full_name}"] + _fields_text(message, "    ")
        return lines
    if isinstance(item, MessageInfo):
        return (
            [f"message {item.full_name}"]
            + _indented(item.doc, "  ")
            + [""]
            + _fields_text(item, "  ")
        )
    lines = [f"enum {item.full_name}"] + _indented(item.doc, "  ") + [""]
    width = max(len(value.name) for value in item.values)
    lines += [
        f"  {value.number:>3}  {value.name:<{width}}  {_one_line(value.doc)}".rstrip()
        for value in item.values
    ]
    return lines


@click.command("describe")
@click.argument("name", nargs=-1)
@click.option(
    "-o",
    "--output",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="How to print the description.",
)
def describe_command(name: tuple[str, ...], output: str) -> None:
    """Show the Aurae API from the schema built into this client.

    Without NAME, lists every service and its RPCs. NAME is a service
    (CellService, cells, aurae.cells.v0.CellService), an RPC
    (CellService.Allocate, cells allocate, /aurae.cells.v0.CellService/Allocate),
    a message (Cell, aurae.cells.v0.Cell) or an enum. No daemon is contacted.
    """
    schema = Schema.load()
    if not name:
        if output == "json":
            click.echo(as_json(schema.services))
        else:
            click.echo("\n".join(service_list_text(schema.services)))
        return
    try:
        item = schema.find(".".join(name))
    except UnknownName as error:
        raise click.UsageError(str(error)) from None
    click.echo(as_json(item) if output == "json" else "\n".join(describe_text(item, schema)))
