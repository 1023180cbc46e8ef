"""Display and conversion helpers for protobuf messages.

The SDK keeps protobuf's own message classes (fast, and what every gRPC tool
expects) and adds the niceties here: a compact one-line repr, and conversion
to and from plain dicts, JSON and YAML. Dicts hold Python values — ints stay
ints, enums become their names, bytes stay bytes — unlike protobuf's JSON
mapping, which turns 64-bit integers into strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

# Field descriptors come from protobuf's C extension; its stubs type them as a
# union of two classes with optional members, so helpers take them as Any.
AnyField = Any

M = TypeVar("M", bound=Message)


def _value_to_python(field: AnyField, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return to_dict(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else value
    return value


def _is_map(field: AnyField) -> bool:
    return bool(
        field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry
    )


def _is_repeated(field: AnyField) -> bool:
    return bool(field.is_repeated)


def to_dict(message: Message) -> dict[str, Any]:
    """The fields that are set, as a dict keyed by proto field names."""
    result: dict[str, Any] = {}
    for field, value in message.ListFields():
        if _is_map(field):
            value_field = field.message_type.fields_by_name["value"]  # type: ignore[union-attr]
            result[field.name] = {k: _value_to_python(value_field, v) for k, v in value.items()}
        elif _is_repeated(field):
            result[field.name] = [_value_to_python(field, v) for v in value]
        else:
            result[field.name] = _value_to_python(field, value)
    return result


def from_dict(message_type: type[M], data: Mapping[str, Any]) -> M:
    """Build a message from a dict (nested dicts, messages and enum names allowed).

    Raises TypeError or ValueError naming the offending field path.
    """
    try:
        return message_type(**data)
    except (TypeError, ValueError) as error:
        raise _explain(message_type, data, error, "") from None


def _explain(message_type: type[Message], data: Mapping[str, Any], error: Exception, prefix: str) -> Exception:
    """Find the field that made a constructor fail; protobuf's own message
    for a wrong type ("bad argument type for built-in operation") names none."""
    descriptor: Any = message_type.DESCRIPTOR
    if not isinstance(data, Mapping):
        return TypeError(f"{prefix or message_type.__name__}: expected a dict or "
                         f"{message_type.__name__}, got {type(data).__name__}")
    for name, value in data.items():
        path = f"{prefix}{name}"
        field = descriptor.fields_by_name.get(name)
        if field is None:
            known = ", ".join(sorted(descriptor.fields_by_name))
            return ValueError(f"{path}: {descriptor.name} has no such field (fields: {known})")
        try:
            message_type(**{name: value})
        except (TypeError, ValueError) as field_error:
            nested = field.type == FieldDescriptor.TYPE_MESSAGE and not _is_repeated(field)
            if nested and isinstance(value, Mapping):
                sub_class = type(getattr(message_type(), name))
                return _explain(sub_class, value, field_error, path + ".")
            if isinstance(field_error, TypeError) and field.type != FieldDescriptor.TYPE_MESSAGE:
                wanted = _SCALAR_NAMES.get(field.type, "a valid value")
                if _is_repeated(field):
                    wanted = f"a list of {wanted}"
                return TypeError(f"{path}: expected {wanted}, got {type(value).__name__}")
            return type(field_error)(f"{path}: {field_error}")
    return error


_SCALAR_NAMES = {
    FieldDescriptor.TYPE_STRING: "str",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_DOUBLE: "float",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_ENUM: "an enum name or number",
    **{
        t: "int"
        for t in (
            FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
            FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
            FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64,
            FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_SFIXED64,
        )
    },
}


def to_json(message: Message, *, indent: int | None = 2) -> str:
    import json  # imported where used: the CLI's start-up counts every module

    return json.dumps(to_dict(message), indent=indent, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        import base64

        return base64.b64encode(value).decode()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def from_json(message_type: type[M], text: str) -> M:
    import json

    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object for {message_type.__name__}")  # noqa: TRY004 - bad content, not a bad argument
    return from_dict(message_type, data)


def to_yaml(message: Message) -> str:
    import yaml  # only the callers that want YAML pay for it

    return str(yaml.safe_dump(to_dict(message), sort_keys=False))


def from_yaml(message_type: type[M], text: str) -> M:
    import yaml

    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"expected a YAML mapping for {message_type.__name__}")  # noqa: TRY004 - bad content, not a bad argument
    return from_dict(message_type, data)


def compact(message: Message, *, width: int = 200) -> str:
    """A one-line repr: `Cell(name='web', cpu=CpuController(weight=2))`.

    Fields left at their defaults are omitted; long output is cut at `width`.
    """
    text = _compact(message)
    return text if len(text) <= width else text[: width - 3] + "..."


def _compact_value(field: AnyField, value: Any) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return _compact(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else repr(value)
    return repr(value)


def _compact(message: Message) -> str:
    parts = []
    for field, value in message.ListFields():
        if _is_map(field):
            value_field = field.message_type.fields_by_name["value"]  # type: ignore[union-attr]
            inner = ", ".join(f"{k!r}: {_compact_value(value_field, v)}" for k, v in value.items())
            parts.append(f"{field.name}={{{inner}}}")
        elif _is_repeated(field):
            inner = ", ".join(_compact_value(field, v) for v in value)
            parts.append(f"{field.name}=[{inner}]")
        else:
            parts.append(f"{field.name}={_compact_value(field, value)}")
    return f"{message.DESCRIPTOR.name}({', '.join(parts)})"
