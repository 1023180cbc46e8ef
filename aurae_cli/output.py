"""How the CLI prints responses: text for people, JSON and YAML for programs.

Streams print each response as it arrives: JSON as one object per line
(JSON Lines), YAML as one document each. In text mode, log lines print as
plain lines so `aurae-py observe get-sub-process-stream PID` reads like the
process's own output.
"""

from __future__ import annotations

import sys
from typing import Any

import click
from google.protobuf.message import Message

from aurae_sdk.messages import to_dict, to_json, to_yaml


def log_lines(message: Message) -> list[str] | None:
    """The text of a LogItem, or of the LogItems a response carries (`item` /
    `items`); None for any other message."""
    descriptor = message.DESCRIPTOR
    if descriptor.name == "LogItem":
        return [message.line]  # type: ignore[attr-defined]
    if "item" not in descriptor.fields_by_name:
        return None
    item_type = descriptor.fields_by_name["item"].message_type
    if item_type is None or item_type.name != "LogItem":
        return None
    items = list(getattr(message, "items", ()))
    if message.HasField("item"):
        items.insert(0, message.item)  # type: ignore[attr-defined]
    return [item.line for item in items]


def _scalar(value: Any) -> str:
    # Text output speaks proto, not Python: true/false, like the JSON and YAML forms.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _text(value: Any, indent: int = 0) -> list[str]:
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:")
                lines.extend(_text(item, indent + 1))
            else:
                lines.append(f"{pad}{key}: {_scalar(item) if item != {} and item != [] else '-'}")
    elif isinstance(value, list):
        for item in value:
            inner = _text(item, indent + 1)
            if inner:
                lines.append(f"{pad}- {inner[0].strip()}")
                lines.extend(inner[1:])
    else:
        lines.append(f"{pad}{_scalar(value)}")
    return lines


def print_message(message: Message, output: str, *, streaming: bool,
                  timestamps: bool = False) -> None:
    """Print one response: `output` is text (tables for list-like responses), wide, json, yaml
    or jsonpath=EXPR."""
    if output.startswith("jsonpath="):
        from aurae_cli.tables import print_rows

        print_rows([], output, columns=(), empty="", data=to_dict(message))
        return
    if output in ("text", "wide") and not streaming:
        from aurae_cli.tables import print_rows
        from aurae_cli.views import list_view

        view = list_view(message, timestamps=timestamps)
        if view is not None:
            print_rows(view.rows, output, columns=view.columns, wide=view.wide, empty=view.empty)
            return
    if output == "json":
        click.echo(to_json(message, indent=None if streaming else 2))
    elif output == "yaml":
        if streaming:
            click.echo("---")
        click.echo(to_yaml(message), nl=False)
    else:
        lines = log_lines(message)
        if lines is None:
            lines = _text(to_dict(message))
            if streaming and lines:
                lines.append("")
        for line in lines:
            click.echo(line)
    if streaming:
        sys.stdout.flush()
