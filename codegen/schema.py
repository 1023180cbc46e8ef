"""Stage 2 of the generator: a schema of small frozen dataclasses.

The schema wraps protoc's descriptors and precomputes everything a template
needs — Python, CLI and REPL names, type annotations, streaming kind, doc
comments re-attached from source info, and request fields flattened into
dotted leaf paths — so the templates stay free of logic.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from google.protobuf import descriptor_pb2

from codegen.layout import Layout

FieldDescriptor = descriptor_pb2.FieldDescriptorProto

# Names the generated SDK methods take besides the request's fields; a field
# with one of these names gets a trailing underscore, like a keyword does.
RESERVED_PARAMETERS = frozenset({"self", "request", "timeout", "metadata"})
# Options every generated CLI command has; a field flag must not take them.
RESERVED_CLI_PARAMETERS = frozenset({"request", "output", "timeout", "help"})

_SCALAR_PYTHON_TYPES: dict[int, str] = {
    FieldDescriptor.TYPE_DOUBLE: "float",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_INT64: "int",
    FieldDescriptor.TYPE_UINT64: "int",
    FieldDescriptor.TYPE_INT32: "int",
    FieldDescriptor.TYPE_FIXED64: "int",
    FieldDescriptor.TYPE_FIXED32: "int",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "str",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_UINT32: "int",
    FieldDescriptor.TYPE_SFIXED32: "int",
    FieldDescriptor.TYPE_SFIXED64: "int",
    FieldDescriptor.TYPE_SINT32: "int",
    FieldDescriptor.TYPE_SINT64: "int",
}
_PROTO_TYPE_NAMES: dict[int, str] = {
    value: name.removeprefix("TYPE_").lower()
    for name, value in FieldDescriptor.Type.items()
}

# Paths into FileDescriptorProto, as SourceCodeInfo.Location.path uses them.
_FILE_SYNTAX = 12
_FILE_MESSAGE = 4
_FILE_ENUM = 5
_FILE_SERVICE = 6
_MESSAGE_FIELD = 2
_MESSAGE_NESTED = 3
_MESSAGE_ENUM = 4
_ENUM_VALUE = 2
_SERVICE_METHOD = 2

StreamingKind = Literal["unary_unary", "unary_stream", "stream_unary", "stream_stream"]


class UnsupportedSchema(ValueError):
    """The protos use something the generator cannot render yet."""


def snake_case(name: str) -> str:
    """CamelCase to snake_case, keeping acronyms together: GetHTTPStatus -> get_http_status."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    name = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return name.lower()


def kebab_case(name: str) -> str:
    return snake_case(name).replace("_", "-")


def python_identifier(name: str) -> str:
    """A field name usable as a keyword argument: `class` becomes `class_`."""
    if keyword.iskeyword(name) or name in RESERVED_PARAMETERS:
        return name + "_"
    return name


def clean_comment(text: str) -> str:
    lines = [line.removeprefix(" ") for line in text.splitlines()]
    lines = [line.rstrip() for line in lines]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def first_sentence(doc: str) -> str:
    """The short help: the doc's first sentence, on one line."""
    paragraph = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    return match.group(1) if match else paragraph


@dataclass(frozen=True)
class EnumValue:
    name: str
    number: int
    doc: str
    # The name without the enum's conventional prefix, lower-cased, as the
    # CLI accepts it: LOG_CHANNEL_TYPE_STDOUT -> "stdout".
    cli_name: str


@dataclass(frozen=True)
class Enum:
    name: str
    full_name: str
    # Dotted path inside its module: "HealthCheckResponse.ServingStatus".
    qualname: str
    module: str
    doc: str
    values: tuple[EnumValue, ...]


@dataclass(frozen=True)
class Field:
    name: str
    number: int
    proto_type: str  # "string", "uint64", "message", "enum", ...
    type_name: str  # full name of the message or enum type, "" for scalars
    doc: str
    repeated: bool
    map_entry: str  # full name of the map entry message when this is a map, else ""
    has_presence: bool  # proto3 `optional`, or any message field
    explicit_optional: bool  # declared `optional` in the source
    oneof: str  # name of the real oneof it belongs to, "" if none
    python_name: str
    annotation: str  # what the SDK accepts for this field as a keyword argument
    python_type: str  # the scalar Python type ("str", "int", ...) or the type's qualname
    # The type as a .proto file writes it: "string", "aurae.cells.v0.Cell", "map<string, string>".
    proto_text: str

    @property
    def label(self) -> str:
        """The field's label as a .proto file writes it: "", "optional", "repeated", "oneof NAME"."""
        if self.is_map:
            return ""
        if self.repeated:
            return "repeated"
        if self.oneof:
            return f"oneof {self.oneof}"
        return "optional" if self.explicit_optional else ""

    @property
    def is_message(self) -> bool:
        return self.proto_type == "message" and not self.map_entry

    @property
    def is_enum(self) -> bool:
        return self.proto_type == "enum"

    @property
    def is_map(self) -> bool:
        return bool(self.map_entry)


@dataclass(frozen=True)
class Message:
    name: str
    full_name: str
    qualname: str
    module: str
    doc: str
    fields: tuple[Field, ...]
    is_map_entry: bool
    nested_messages: tuple[str, ...]  # full names
    nested_enums: tuple[str, ...]  # full names

    @property
    def pb_ref(self) -> str:
        """The type as generated code names it through its module alias."""
        return f"{module_alias(self.module)}.{self.qualname}"

    def ref_from(self, package: str) -> str:
        """The type as a package's SDK module names it: bare when re-exported there."""
        return _type_ref(self.full_name, self.qualname, self.module, package)


@dataclass(frozen=True)
class LeafField:
    """A scalar, enum or repeated-scalar field reached from a request through
    singular message fields; the CLI gives each one a flag or an argument."""

    path: tuple[str, ...]
    field: Field
    enum: Enum | None
    cli_name: str  # "cpu-weight"
    param_name: str  # click parameter name, a Python identifier
    positional: bool
    metavar: str  # "CELL_NAME"

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def optional(self) -> bool:
        """A positional the caller may leave out: a top-level proto3 `optional` field."""
        return self.positional and self.field.explicit_optional and len(self.path) == 1

    @property
    def usage(self) -> str:
        """The argument as usage lines show it: "CELL_NAME", or "[CELL_NAME]" when optional."""
        return f"[{self.metavar}]" if self.optional else self.metavar

    @property
    def flag(self) -> str:
        return "--" + self.cli_name


@dataclass(frozen=True)
class Method:
    name: str
    full_name: str  # "aurae.cells.v0.CellService.Allocate"
    path: str  # "/aurae.cells.v0.CellService/Allocate", the gRPC method path
    doc: str
    input: Message
    output: Message
    client_streaming: bool
    server_streaming: bool
    idempotent: bool  # declared NO_SIDE_EFFECTS or IDEMPOTENT: safe to retry
    python_name: str
    cli_name: str
    leaves: tuple[LeafField, ...]
    # Request fields the SDK method takes as keyword arguments.
    parameters: tuple[Field, ...]

    @property
    def kind(self) -> StreamingKind:
        client = "stream" if self.client_streaming else "unary"
        server = "stream" if self.server_streaming else "unary"
        return f"{client}_{server}"  # type: ignore[return-value]

    @property
    def summary(self) -> str:
        return first_sentence(self.doc)

    @property
    def positionals(self) -> tuple[LeafField, ...]:
        return tuple(leaf for leaf in self.leaves if leaf.positional)

    @property
    def options(self) -> tuple[LeafField, ...]:
        return tuple(leaf for leaf in self.leaves if not leaf.positional)

    @property
    def paged(self) -> bool:
        """A list in pages, as Google's AIP-158 shapes one: a unary call whose request has a
        string `page_token` and whose response has a string `next_page_token`."""
        def has_string(message: Message, name: str) -> bool:
            return any(f.name == name and f.proto_type == "string" and not f.repeated
                       for f in message.fields)

        return (self.kind == "unary_unary" and has_string(self.input, "page_token")
                and has_string(self.output, "next_page_token"))


@dataclass(frozen=True)
class Service:
    name: str
    full_name: str
    package: str
    doc: str
    methods: tuple[Method, ...]
    # Attribute on the SDK client and name in the REPL: "cells".
    attribute: str
    # Class names of the generated clients and daemon base.
    sync_class: str
    async_class: str
    base_class: str

    @property
    def summary(self) -> str:
        return first_sentence(self.doc)

    @property
    def constant_prefix(self) -> str:
        """Prefix of the module constants describing this service's methods."""
        return snake_case(self.name).upper()


@dataclass(frozen=True)
class ProtoFile:
    name: str  # "cells/cells.proto"
    package: str
    doc: str
    pb_module: str  # where its _pb2 module lives at run time
    pb_alias: str  # how generated code imports it: "_cells_pb2"
    external: bool  # provided by another distribution; we generate no _pb2 for it


@dataclass(frozen=True)
class Package:
    name: str  # "aurae.cells.v0"
    module_name: str  # "cells": the generated module in each layer, the CLI group
    doc: str
    files: tuple[ProtoFile, ...]
    services: tuple[Service, ...]
    messages: tuple[Message, ...]  # top-level and nested, in source order
    enums: tuple[Enum, ...]  # top-level and nested, in source order

    @property
    def pb_imports(self) -> tuple[tuple[str, str, str], ...]:
        """(package, module, alias) of every _pb2 module the package's
        generated code refers to: its own files' and its RPCs' types'."""
        modules = {f.pb_module for f in self.files}
        for service in self.services:
            for method in service.methods:
                modules.update((method.input.module, method.output.module))
        return tuple(
            (module.rpartition(".")[0], module.rpartition(".")[2], module_alias(module))
            for module in sorted(modules)
        )

    @property
    def described_messages(self) -> tuple[Message, ...]:
        """The messages `describe` knows: all but map entries, nested ones included."""
        return tuple(m for m in self.messages if not m.is_map_entry)

    @property
    def exported_names(self) -> tuple[str, ...]:
        """Top-level message and enum names the SDK module re-exports."""
        top = [m.name for m in self.messages if "." not in m.qualname and not m.is_map_entry]
        top += [e.name for e in self.enums if "." not in e.qualname]
        return tuple(top)

    @property
    def summary(self) -> str:
        return first_sentence(self.doc)


@dataclass(frozen=True)
class Api:
    packages: tuple[Package, ...]
    layout: Layout
    messages: Mapping[str, Message] = field(repr=False)
    enums: Mapping[str, Enum] = field(repr=False)

    @property
    def services(self) -> tuple[Service, ...]:
        return tuple(s for p in self.packages for s in p.services)

    def message(self, full_name: str) -> Message:
        return self.messages[full_name.lstrip(".")]

    def enum(self, full_name: str) -> Enum:
        return self.enums[full_name.lstrip(".")]


# --------------------------------------------------------------------------
# Building the schema from a FileDescriptorSet


class _Comments:
    """Leading comments of one file, keyed by descriptor path."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self._by_path = {
            tuple(location.path): clean_comment(location.leading_comments)
            for location in file.source_code_info.location
            if location.leading_comments
        }

    def __getitem__(self, path: tuple[int, ...]) -> str:
        return self._by_path.get(path, "")


def package_module_name(package: str) -> str:
    """The short name of a proto package: "aurae.cells.v0" -> "cells",
    "grpc.health.v1" -> "health". Version segments are dropped."""
    parts = [p for p in package.split(".") if not re.fullmatch(r"v\d+(alpha\d*|beta\d*)?", p)]
    if not parts:
        raise ValueError(f"cannot derive a module name from package {package!r}")
    return python_identifier(parts[-1].replace("-", "_"))


def build_api(descriptors: descriptor_pb2.FileDescriptorSet, targets: set[str], layout: Layout) -> Api:
    """Build the schema for the proto files named in `targets`.

    `descriptors` also holds their imports (well-known types), which are
    indexed for type resolution but get no generated code of their own.
    """
    files = {f.name: f for f in descriptors.file}
    proto_files = {name: _proto_file(files[name], layout) for name in files}

    # First pass: every message and enum, with fields not yet annotated
    # (annotations need to know the other types).
    raw_messages: dict[str, tuple[descriptor_pb2.DescriptorProto, ProtoFile, str, str]] = {}
    enums: dict[str, Enum] = {}
    for name, file in files.items():
        comments = _Comments(file)
        pf = proto_files[name]
        for path, qualname, proto in _walk_messages(file):
            raw_messages[f"{file.package}.{qualname}".lstrip(".")] = (proto, pf, qualname, comments[path])
        for path, qualname, enum_proto in _walk_enums(file):
            full = f"{file.package}.{qualname}".lstrip(".")
            enums[full] = _enum(enum_proto, full, qualname, pf, path, comments)

    messages: dict[str, Message] = {}
    for full_name, (proto, pf, qualname, doc) in raw_messages.items():
        messages[full_name] = _message(proto, full_name, qualname, pf, doc, raw_messages, enums, files)

    packages: dict[str, list[descriptor_pb2.FileDescriptorProto]] = {}
    for name in sorted(targets):
        packages.setdefault(files[name].package, []).append(files[name])

    built = []
    for package_name, package_files in sorted(packages.items()):
        services = []
        for file in package_files:
            comments = _Comments(file)
            for index, service in enumerate(file.service):
                services.append(
                    _service(service, file, (_FILE_SERVICE, index), comments, messages, enums)
                )
        module_name = package_module_name(package_name)
        package_messages = tuple(
            m for m in messages.values() if m.full_name.startswith(package_name + ".")
            and m.module in {proto_files[f.name].pb_module for f in package_files}
        )
        package_enums = tuple(
            e for e in enums.values() if e.full_name.startswith(package_name + ".")
            and e.module in {proto_files[f.name].pb_module for f in package_files}
        )
        built.append(
            Package(
                name=package_name,
                module_name=module_name,
                doc="\n\n".join(d for d in (_file_doc(f) for f in package_files) if d),
                files=tuple(proto_files[f.name] for f in package_files),
                services=tuple(_attribute_services(services, module_name)),
                messages=package_messages,
                enums=package_enums,
            )
        )
    _check_unique([p.module_name for p in built], "package module name")
    return Api(packages=tuple(built), layout=layout, messages=messages, enums=enums)


def _check_unique(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"two packages map to the same {what} {name!r}")
        seen.add(name)


def _file_doc(file: descriptor_pb2.FileDescriptorProto) -> str:
    return _Comments(file)[(_FILE_SYNTAX,)]


def _proto_file(file: descriptor_pb2.FileDescriptorProto, layout: Layout) -> ProtoFile:
    from codegen.protoc import python_module_of

    external = layout.external_modules.get(file.name)
    protoc_module = python_module_of(file.name)
    if external is None and file.name.startswith("google/protobuf/"):
        # Well-known types ship with the protobuf runtime under this name.
        external = protoc_module
    pb_module = external or f"{layout.pb_package}.{protoc_module}"
    return ProtoFile(
        name=file.name,
        package=file.package,
        doc=_file_doc(file),
        pb_module=pb_module,
        pb_alias=module_alias(pb_module),
        external=external is not None,
    )


def _walk_messages(
    file: descriptor_pb2.FileDescriptorProto,
) -> Iterator[tuple[tuple[int, ...], str, descriptor_pb2.DescriptorProto]]:
    def walk(
        protos: Iterable[descriptor_pb2.DescriptorProto], path: tuple[int, ...], prefix: str
    ) -> Iterator[tuple[tuple[int, ...], str, descriptor_pb2.DescriptorProto]]:
        for index, proto in enumerate(protos):
            qualname = f"{prefix}{proto.name}"
            here = (*path, index)
            yield here, qualname, proto
            yield from walk(proto.nested_type, (*here, _MESSAGE_NESTED), qualname + ".")

    yield from walk(file.message_type, (_FILE_MESSAGE,), "")


def _walk_enums(
    file: descriptor_pb2.FileDescriptorProto,
) -> Iterator[tuple[tuple[int, ...], str, descriptor_pb2.EnumDescriptorProto]]:
    for index, enum in enumerate(file.enum_type):
        yield (_FILE_ENUM, index), enum.name, enum
    for path, qualname, message in _walk_messages(file):
        for index, enum in enumerate(message.enum_type):
            yield (*path, _MESSAGE_ENUM, index), f"{qualname}.{enum.name}", enum


def _enum(
    proto: descriptor_pb2.EnumDescriptorProto,
    full_name: str,
    qualname: str,
    pf: ProtoFile,
    path: tuple[int, ...],
    comments: _Comments,
) -> Enum:
    prefix = snake_case(proto.name).upper() + "_"
    values = []
    for index, value in enumerate(proto.value):
        short = value.name.removeprefix(prefix) if value.name.startswith(prefix) else value.name
        values.append(
            EnumValue(
                name=value.name,
                number=value.number,
                doc=comments[(*path, _ENUM_VALUE, index)],
                cli_name=short.lower().replace("_", "-"),
            )
        )
    return Enum(
        name=proto.name,
        full_name=full_name,
        qualname=qualname,
        module=pf.pb_module,
        doc=comments[path],
        values=tuple(values),
    )


def _message(
    proto: descriptor_pb2.DescriptorProto,
    full_name: str,
    qualname: str,
    pf: ProtoFile,
    doc: str,
    raw_messages: Mapping[str, tuple[descriptor_pb2.DescriptorProto, ProtoFile, str, str]],
    enums: Mapping[str, Enum],
    files: Mapping[str, descriptor_pb2.FileDescriptorProto],
) -> Message:
    file = files[pf.name]
    comments = _Comments(file)
    path = next(p for p, q, _ in _walk_messages(file) if q == qualname)
    fields = []
    for index, f in enumerate(proto.field):
        fields.append(
            _field(f, proto, comments[(*path, _MESSAGE_FIELD, index)], pf, raw_messages, enums)
        )
    return Message(
        name=proto.name,
        full_name=full_name,
        qualname=qualname,
        module=pf.pb_module,
        doc=doc,
        fields=tuple(fields),
        is_map_entry=proto.options.map_entry,
        nested_messages=tuple(f"{full_name}.{n.name}" for n in proto.nested_type),
        nested_enums=tuple(f"{full_name}.{e.name}" for e in proto.enum_type),
    )


def _type_ref(full_name: str, qualname: str, module: str, owner_package: str) -> str:
    """How generated SDK code names a message or enum type: bare when it is
    re-exported from the owner's package module, else through its _pb2 alias."""
    package = full_name[: -len(qualname) - 1] if full_name != qualname else ""
    if package == owner_package and "." not in qualname:
        return qualname
    return f"{module_alias(module)}.{qualname}"


def module_alias(module: str) -> str:
    """The name generated code imports a _pb2 module under: "_cells_pb2"."""
    return "_" + module.rsplit(".", 1)[-1]


def _field(
    f: descriptor_pb2.FieldDescriptorProto,
    owner: descriptor_pb2.DescriptorProto,
    doc: str,
    pf: ProtoFile,
    raw_messages: Mapping[str, tuple[descriptor_pb2.DescriptorProto, ProtoFile, str, str]],
    enums: Mapping[str, Enum],
) -> Field:
    type_name = f.type_name.lstrip(".")
    repeated = f.label == FieldDescriptor.LABEL_REPEATED
    map_entry = ""
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        entry_proto = raw_messages[type_name][0]
        if entry_proto.options.map_entry:
            map_entry = type_name

    def element_annotation(field_type: int, element_type: str) -> tuple[str, str]:
        if field_type == FieldDescriptor.TYPE_MESSAGE:
            _, epf, eq, _ = raw_messages[element_type]
            ref = _type_ref(element_type, eq, epf.pb_module, pf.package)
            return f"{ref} | Mapping[str, Any]", ref
        if field_type == FieldDescriptor.TYPE_ENUM:
            enum = enums[element_type]
            ref = _type_ref(element_type, enum.qualname, enum.module, pf.package)
            return f"{ref}.ValueType | str", ref
        python = _SCALAR_PYTHON_TYPES[field_type]
        return python, python

    def proto_text_of(field_type: int, element_type: str) -> str:
        if field_type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_ENUM):
            return element_type
        return _PROTO_TYPE_NAMES[field_type]

    if map_entry:
        entry = raw_messages[map_entry][0]
        key, value = entry.field[0], entry.field[1]
        proto_text = (
            f"map<{proto_text_of(key.type, key.type_name.lstrip('.'))}, "
            f"{proto_text_of(value.type, value.type_name.lstrip('.'))}>"
        )
        key_ann, _ = element_annotation(key.type, key.type_name.lstrip("."))
        value_ann, _ = element_annotation(value.type, value.type_name.lstrip("."))
        annotation = f"Mapping[{key_ann}, {value_ann}]"
        python_type = "dict"
    else:
        element, python_type = element_annotation(f.type, type_name)
        annotation = f"Sequence[{element}]" if repeated else element
        proto_text = proto_text_of(f.type, type_name)

    real_oneof = ""
    if f.HasField("oneof_index") and not f.proto3_optional:
        real_oneof = owner.oneof_decl[f.oneof_index].name
    return Field(
        name=f.name,
        number=f.number,
        proto_type=_PROTO_TYPE_NAMES[f.type],
        type_name=type_name,
        doc=doc,
        repeated=repeated and not map_entry,
        map_entry=map_entry,
        has_presence=f.proto3_optional
        or (f.type == FieldDescriptor.TYPE_MESSAGE and not repeated)
        or bool(real_oneof),
        explicit_optional=f.proto3_optional,
        oneof=real_oneof,
        python_name=python_identifier(f.name),
        annotation=annotation,
        python_type=python_type,
        proto_text=proto_text,
    )


def _service(
    proto: descriptor_pb2.ServiceDescriptorProto,
    file: descriptor_pb2.FileDescriptorProto,
    path: tuple[int, ...],
    comments: _Comments,
    messages: Mapping[str, Message],
    enums: Mapping[str, Enum],
) -> Service:
    full_name = f"{file.package}.{proto.name}".lstrip(".")
    methods = []
    for index, m in enumerate(proto.method):
        if m.client_streaming:
            # The SDK, CLI and REPL templates only know single requests; say so
            # rather than render a client that would send one message.
            raise UnsupportedSchema(
                f"{file.name}: {full_name}.{m.name} streams requests from the client; "
                "aurae-codegen supports unary and server-streaming RPCs only"
            )
        request = messages[m.input_type.lstrip(".")]
        idempotency = m.options.idempotency_level
        methods.append(
            Method(
                name=m.name,
                full_name=f"{full_name}.{m.name}",
                path=f"/{full_name}/{m.name}",
                doc=comments[(*path, _SERVICE_METHOD, index)],
                input=request,
                output=messages[m.output_type.lstrip(".")],
                client_streaming=m.client_streaming,
                server_streaming=m.server_streaming,
                idempotent=idempotency
                in (
                    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
                    descriptor_pb2.MethodOptions.IDEMPOTENT,
                ),
                python_name=python_identifier(snake_case(m.name)),
                cli_name=kebab_case(m.name),
                leaves=flatten_request(request, messages, enums),
                parameters=request.fields,
            )
        )
    return Service(
        name=proto.name,
        full_name=full_name,
        package=file.package,
        doc=comments[path],
        methods=tuple(methods),
        attribute="",
        sync_class=proto.name,
        async_class=f"Async{proto.name}",
        base_class=f"{proto.name}Base",
    )


def _attribute_services(services: list[Service], module_name: str) -> Iterator[Service]:
    """Name each service's client attribute: the package's short name when it
    has one service ("cells"), else that plus the service ("cells_cell_service")."""
    from dataclasses import replace

    for service in services:
        attribute = module_name if len(services) == 1 else f"{module_name}_{snake_case(service.name)}"
        yield replace(service, attribute=attribute)


# --------------------------------------------------------------------------
# Flattening requests for the CLI

_IDENTIFIER = re.compile(r"^(name|id|\w+_name|\w+_id)$")


def flatten_request(
    request: Message, messages: Mapping[str, Message], enums: Mapping[str, Enum]
) -> tuple[LeafField, ...]:
    """Every leaf a flag can set, reached through singular message fields.

    CLI names drop the first segment of paths that go through a top-level
    message field — `cell.cpu.weight` becomes `--cpu-weight` — unless two
    leaves would then clash. Identifiers become positional arguments: request
    fields named `name`, `id`, `*_name` or `*_id`, and the `name`/`id` field
    numbered 1 of a top-level message field (the identity of the entity the
    request carries, like `cell.name` in Allocate). A top-level identifier
    declared `optional` is an optional positional: given fewer arguments than
    positionals, the CLI leaves the optional ones out first
    (`cells start app` runs at host level, `cells start web app` in cell web).
    """
    raw: list[tuple[tuple[str, ...], Field, bool]] = []

    def walk(message: Message, prefix: tuple[str, ...], seen: frozenset[str]) -> None:
        for f in message.fields:
            path = (*prefix, f.name)
            if f.is_message and not f.repeated:
                if f.type_name in seen:  # recursive types cannot be flattened
                    continue
                walk(messages[f.type_name], path, seen | {f.type_name})
                continue
            if f.is_message or (f.is_map and messages[f.map_entry].fields[1].is_message):
                continue  # repeated or mapped messages: only via --request
            identifier = f.proto_type in ("string", "int32", "int64", "uint32", "uint64")
            identifier = identifier and not f.repeated and not f.is_map
            positional = identifier and (
                (len(path) == 1 and bool(_IDENTIFIER.match(f.name)))
                or (len(path) == 2 and f.name in ("name", "id") and f.number == 1)
            )
            raw.append((path, f, positional))

    walk(request, (), frozenset({request.full_name}))

    short = ["_".join(path[1:] if len(path) > 1 else path) for path, _, _ in raw]
    clashes = {name for name in short if short.count(name) > 1}
    leaves = []
    for (path, f, positional), name in zip(raw, short, strict=True):
        if name in clashes or name in RESERVED_CLI_PARAMETERS:
            name = "_".join(path)
        leaves.append(
            LeafField(
                path=path,
                field=f,
                enum=enums[f.type_name] if f.is_enum else None,
                cli_name=name.replace("_", "-"),
                param_name=python_identifier(name),
                positional=positional,
                metavar=name.upper(),
            )
        )
    return tuple(leaves)
