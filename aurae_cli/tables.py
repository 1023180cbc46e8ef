"""List-like output: a table by default, `-o wide` with more columns, or json, yaml,
`jsonpath=EXPR` for programs. An empty list says so (on stderr, so stdout stays empty)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import click


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Rows as aligned columns under upper-case headers, two spaces apart."""
    cells = [[column.upper().replace("_", " ") for column in columns]]
    cells += [[_text(row.get(column, "")) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    return str(value)


def print_rows(rows: Sequence[Mapping[str, Any]], output: str, *, columns: Sequence[str],
               wide: Sequence[str] = (), empty: str, data: Any = None) -> None:
    """Print `rows` as `output` asks; json, yaml and jsonpath see `data` (default: the rows)."""
    document = list(rows) if data is None else data
    if output == "json":
        click.echo(json.dumps(document, indent=2, default=str))
        return
    if output == "yaml":
        import yaml

        click.echo(yaml.safe_dump(document, sort_keys=False), nl=False)
        return
    if output.startswith("jsonpath="):
        for value in jsonpath(output.removeprefix("jsonpath="), document):
            click.echo(value if isinstance(value, str) else json.dumps(value, default=str))
        return
    if not rows:
        click.echo(empty, err=True)
        return
    shown = [*columns, *wide] if output == "wide" else list(columns)
    click.echo(format_table(rows, shown))


def jsonpath(expression: str, document: Any) -> list[Any]:
    """The values `expression` (JSONPath, `$.cells[*].cell.name`; kubectl's `{...}` braces
    allowed) selects in `document`."""
    from jsonpath_ng.exceptions import JsonPathLexerError, JsonPathParserError
    from jsonpath_ng.ext.parser import parse

    text = expression.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    if not text.startswith("$"):
        text = "$" + ("" if text.startswith((".", "[")) else ".") + text
    try:
        compiled = parse(text)
    except (JsonPathLexerError, JsonPathParserError) as error:
        raise click.UsageError(f"-o jsonpath: {expression!r} is not a JSONPath: {error}") from None
    return [match.value for match in compiled.find(document)]


def human_age(unix_seconds: float, now: float | None = None) -> str:
    """How long ago, as people say it: 45s, 12m, 3h, 2d."""
    if not unix_seconds:
        return ""
    delta = max(0.0, (time.time() if now is None else now) - unix_seconds)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if delta >= size:
            return f"{int(delta // size)}{unit}"
    return f"{int(delta)}s"


def joined(values: Iterable[str]) -> str:
    return ",".join(values) or "-"
