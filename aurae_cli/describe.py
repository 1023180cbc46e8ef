"""`aurae-py describe`: the API as this client knows it, without asking a server.

Everything comes from aurae_cli.generated.reference, which the generator
writes from the protos: services, RPCs, messages, fields, enums, their docs
and first sentences. Nothing is parsed or rebuilt at run time.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import click


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
    summary: str  # the doc's first sentence, as the generator cuts it
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


@dataclass(frozen=True)
class Schema:
    """Every service, RPC, message and enum the SDK exposes."""

    services: tuple[ServiceInfo, ...]
    messages: Mapping[str, MessageInfo]
    enums: Mapping[str, EnumInfo]
    sdk_modules: Mapping[str, str]  # proto package -> SDK module name ("cells")

    @classmethod
    def load(cls) -> Schema:
        from aurae_cli.generated import reference

        return cls(
            reference.SERVICES,
            {message.full_name: message for message in reference.MESSAGES},
            {enum.full_name: enum for enum in reference.ENUMS},
            reference.SDK_MODULES,
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


def service_list_text(services: Sequence[ServiceInfo]) -> list[str]:
    lines = []
    for service in services:
        lines.append(
            f"{service.full_name}  (client.{service.attribute}, aurae-py {service.attribute})"
        )
        width = max(len(method.name) for method in service.methods)
        for method in service.methods:
            kind = "stream" if method.streaming == "server streaming" else "unary"
            lines.append(f"  {method.name:<{width}}  {kind:<6}  {method.summary}")
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
    type=click.Choice(["text", "json", "yaml"]),
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

    \b
    Examples:
      aurae-py describe
      aurae-py describe cells allocate
      aurae-py describe Cell -o yaml
    """
    schema = Schema.load()
    if not name:
        if output != "text":
            click.echo(_structured(as_json(schema.services), output))
        else:
            click.echo("\n".join(service_list_text(schema.services)))
        return
    try:
        item = schema.find(".".join(name))
    except UnknownName as error:
        raise click.UsageError(str(error)) from None
    if output != "text":
        click.echo(_structured(as_json(item), output))
        return
    click.echo("\n".join(describe_text(item, schema)))


def _structured(text: str, output: str) -> str:
    """JSON as it is, or the same document as YAML."""
    if output == "json":
        return text
    import json

    import yaml

    dumped: str = yaml.safe_dump(json.loads(text), sort_keys=False)
    return dumped.rstrip("\n")
