"""What every generated CLI command does when it runs.

The generated modules declare the flags; this module turns the flags (and an
optional `--request` file) into a request, calls the SDK, prints the response
as text, JSON or YAML, and exits with a status that reflects the gRPC status.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

# Like grpcurl: a failed RPC exits with 64 + its gRPC status code, so scripts
# can tell NOT_FOUND (69) from INVALID_ARGUMENT (67); 1 is any other error,
# 2 a usage error (click's own).
RPC_EXIT_BASE = 64
# What a shell reports for a process ended by a signal: 128 + its number.
INTERRUPTED_EXIT = 128 + 2  # SIGINT: Ctrl-C
BROKEN_PIPE_EXIT = 128 + 13  # SIGPIPE: the reader went away (`| head`)


class EnumChoice(click.ParamType[str]):
    """An enum flag: accepts the short name ("stdout") or the full name
    ("LOG_CHANNEL_TYPE_STDOUT"), in any case; yields the full name."""

    name = "enum"

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = dict(values)

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join(self.values) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        lowered = text.lower().replace("_", "-")
        if lowered in self.values:
            return self.values[lowered]
        for full in self.values.values():
            if text.upper() == full:
                return full
        self.fail(f"{value!r} is not one of {', '.join(self.values)}", param, ctx)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
        from click.shell_completion import CompletionItem

        return [CompletionItem(v) for v in self.values if v.startswith(incomplete)]


class ByteSize(click.ParamType[int]):
    """A size in bytes, as people write it: 1048576, 512K, 256M, 1G (binary suffixes)."""

    name = "size"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        from aurae_sdk.units import parse_bytes

        try:
            return parse_bytes(value)
        except (TypeError, ValueError) as error:
            self.fail(str(error), param, ctx)


class KeyValue(click.ParamType[tuple[str, str]]):
    """A map entry flag: KEY=VALUE."""

    name = "key=value"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, str]:
        if isinstance(value, tuple):
            return value
        key, sep, item = str(value).partition("=")
        if not sep or not key:
            self.fail(f"{value!r} is not KEY=VALUE", param, ctx)
        return key, item


class Seconds(click.ParamType[float]):
    """A call's timeout: seconds, or "forever" (also "inf", "none") for no deadline."""

    name = "seconds"
    FOREVER = ("forever", "inf", "none")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip().lower()
        if text in self.FOREVER:
            return math.inf
        try:
            seconds = float(text)
        except ValueError:
            self.fail(f"{value!r} is not a number of seconds or 'forever'", param, ctx)
        if math.isnan(seconds) or seconds < 0:
            self.fail(f"{value!r} is not a number of seconds or 'forever'", param, ctx)
        return seconds


# Calls that last as long as what they wait for: no deadline unless --timeout sets one. A VM's
# boot and power-off are bounded by the daemon (--vm-boot-timeout, --vm-grace-period), and take
# far longer than a client's default deadline under TCG.
_WAITS_FOREVER = frozenset({("cells", "wait"), ("vms", "start"), ("vms", "stop"),
                            ("vms", "free")})


class OutputFormat(click.ParamType[str]):
    """-o: text, wide, json, yaml or jsonpath=EXPR (kubectl's forms)."""

    name = "format"
    FORMATS = ("text", "wide", "json", "yaml")

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[text|wide|json|yaml|jsonpath=EXPR]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if text in self.FORMATS or (text.startswith("jsonpath=") and len(text) > 9):
            return text
        self.fail(f"{text!r} is not one of {', '.join(self.FORMATS)} or jsonpath=EXPR", param, ctx)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
        from click.shell_completion import CompletionItem

        return [CompletionItem(v) for v in (*self.FORMATS, "jsonpath=") if v.startswith(incomplete)]


def rpc_options(command: F) -> F:
    """The options every RPC command has besides its fields."""
    command = click.option(
        "--timeout", type=Seconds(), default=None, metavar="SECONDS",
        help="Deadline for the call, or 'forever' (default: the global --timeout, else 30 s for "
             "unary calls; none for streams and `cells wait`).",
    )(command)
    command = click.option(
        "--timestamps", is_flag=True,
        help="Tables show times as Unix seconds instead of how long ago.",
    )(command)
    command = click.option(
        "-o", "--output", type=OutputFormat(), default="text", show_default=True,
        help="How to print responses: text (a table for lists), wide (more columns), json, "
             "yaml, or jsonpath=EXPR such as jsonpath='{.cells[*].cell.name}'.",
    )(command)
    command = click.option(
        "--request", "request_file", type=click.File("r"), default=None, metavar="FILE",
        help="Read the request from a JSON or YAML file ('-' for stdin); flags override it, "
             "and \"\" as an argument leaves the file's value.",
    )(command)
    return command


def set_path(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        target = target.setdefault(name, {})
    target[leaf] = value


def _flag_value(value: Any) -> Any:
    """A click value as the request wants it; None means "not given"."""
    if isinstance(value, tuple):
        if not value:
            return None
        if all(isinstance(v, tuple) and len(v) == 2 for v in value):
            return dict(value)  # KEY=VALUE flags
        return list(value)
    return value


def request_dict(params: Mapping[str, Any], fields: Mapping[str, str],
                 request_text: str | None) -> dict[str, Any]:
    """Merge the request file (if any) with the flags; flags win."""
    request: dict[str, Any] = {}
    if request_text is not None:
        import yaml  # JSON is YAML, so one parser reads both

        try:
            loaded = yaml.safe_load(request_text)
        except yaml.YAMLError as error:
            raise click.UsageError(f"--request is not valid JSON or YAML: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise click.UsageError("--request must hold a JSON or YAML object")
        request = loaded or {}
    for param, dotted in fields.items():
        value = _flag_value(params.get(param))
        if value is None:
            continue
        # An empty positional stands for "not given": it leaves the request
        # file's value, or at top level an optional field, unset.
        if value == "" and (request_text is not None or _is_optional_positional(dotted)):
            continue
        set_path(request, dotted, value)
    return request


def _is_optional_positional(dotted: str) -> bool:
    # e.g. `cells start "" NAME` runs at host level. Only top-level fields can
    # be optional positionals.
    return "." not in dotted


def place_positionals(params: dict[str, Any], positionals: Sequence[tuple[str, bool]],
                      *, request_given: bool) -> None:
    """Give the positional values to the right parameters, leaving optional ones out first.

    click fills arguments left to right, so `cells start app` would name a
    cell "app" and no executable. Here the values given are laid out again:
    with fewer values than positionals, optional ones (proto3 `optional`
    identifiers, listed as (name, True)) take none, from the left, so the
    value goes to NAME and the cell stays unset (host level).
    """
    values = [params[name] for name, _ in positionals if params.get(name) is not None]
    required = [name for name, optional in positionals if not optional]
    if len(values) < len(required) and not request_given:
        missing = " ".join(f"'{name.rstrip('_').upper()}'" for name in required[len(values):])
        raise click.UsageError(f"Missing argument {missing}.")
    spare = len(values) - len(required)
    given = iter(values)
    for name, optional in positionals:
        if optional and spare <= 0:
            params[name] = None
            continue
        if optional:
            spare -= 1
        params[name] = next(given, None)


def merge_pages(attribute: str, method: str, pages: Sequence[Any]) -> Any:
    """The pages of a paged list as one response, as if a single page had held it all.

    CellService.List nests cells across pages (aurae_sdk.cell_tree puts the tree back
    together); any other list's pages are laid end to end.
    """
    merged = type(pages[0])()
    if (attribute, method) == ("cells", "list"):
        from aurae_sdk.cell_tree import merge_pages as merge_cell_pages

        merged.cells.extend(merge_cell_pages(pages))
        merged.host_executables.extend(e for page in pages for e in page.host_executables)
        return merged
    for page in pages:
        merged.MergeFrom(page)
    merged.next_page_token = ""
    return merged


def follows_pages(params: Mapping[str, Any], request: Mapping[str, Any]) -> bool:
    """Whether a paged list's command lists everything: unless a page_token was given, by
    --page-token (even '': the first page alone) or in the --request file."""
    return params.get("page_token") is None and "page_token" not in request


def next_page(request: dict[str, Any], page: Any, seen: set[str]) -> dict[str, Any] | None:
    """The request for the page after `page`, or None at the end (or should a daemon hand
    out a token it gave before: a loop, not more pages)."""
    token = page.next_page_token
    if not token or token in seen:
        return None
    seen.add(token)
    return {**request, "page_token": token}


def _all_pages(call: Callable[..., Any], request: dict[str, Any], timeout: float | None) -> list[Any]:
    pages, seen = [], set[str]()
    following: dict[str, Any] | None = request
    while following is not None:
        pages.append(call(following, timeout=timeout))
        following = next_page(following, pages[-1], seen)
    return pages


def invoke(attribute: str, method: str, params: dict[str, Any], fields: Mapping[str, str],
           *, server_streaming: bool, paged: bool = False,
           positionals: Sequence[tuple[str, bool]] = ()) -> None:
    """Run one RPC from a generated command and exit with its status.

    `paged`: the method lists in pages (page_token / next_page_token); unless the request
    names a page, every page is fetched and printed as one response.
    """
    from aurae_cli.output import print_message
    from aurae_sdk.errors import AuraeError

    ctx = click.get_current_context()
    output = params.pop("output")
    timeout = params.pop("timeout")
    timestamps = params.pop("timestamps")
    request_file = params.pop("request_file")
    place_positionals(params, positionals, request_given=request_file is not None)
    request = request_dict(params, fields, request_file.read() if request_file else None)
    every_page = paged and follows_pages(params, request)
    session = ctx.find_root().obj
    if timeout is None:
        # The global --timeout, when given, bounds waits too.
        timeout = session.timeout
    if timeout is None and (attribute, method) in _WAITS_FOREVER:
        timeout = math.inf
    if session.fleet is not None:
        if server_streaming:
            raise click.UsageError("a stream runs on one node: give one --context")
        from aurae_cli.fleet import run_rpc

        finish(run_rpc(session, attribute, method, request, timeout, output,
                       paged=every_page))
    try:
        client = session.client()
        call = getattr(getattr(client, attribute), method)
        if (attribute, method) == ("vms", "start"):
            from aurae_cli import vm_boot

            if vm_boot.wanted():
                # A boot takes seconds (tens under TCG): show how far it got while it runs.
                call = lambda request, timeout: vm_boot.start_with_progress(
                    client, request, timeout)
        if server_streaming:
            _print_stream(call(request, timeout=timeout), output)
        elif (attribute, method) == ("images", "import_"):
            print_message(_import_with_progress(call, request, timeout), output,
                          streaming=False, timestamps=timestamps)
        elif every_page:
            print_message(merge_pages(attribute, method, _all_pages(call, request, timeout)),
                          output, streaming=False, timestamps=timestamps)
        else:
            print_message(call(request, timeout=timeout), output, streaming=False,
                          timestamps=timestamps)
    except AuraeError as error:
        from aurae_cli.hints import with_hint

        click.echo(with_hint(f"aurae-py: {error}", error), err=True)
        finish(RPC_EXIT_BASE + error.status)
    except (TypeError, ValueError) as error:
        raise click.UsageError(str(error)) from None
    except KeyboardInterrupt:  # while waiting for a unary response
        sys.exit(INTERRUPTED_EXIT)
    finish(0)


def _import_with_progress(call: Callable[..., Any], request: dict[str, Any],
                          timeout: float | None) -> Any:
    """Import, with a spinner and the time elapsed on a terminal: unpacking an image's
    layers takes a while, and the call says nothing until it is done."""
    from aurae_cli.progress import working

    source = str(request.get("file_name", ""))
    what = f"importing {source}"
    size = _local_size(source)
    if size is not None:
        from aurae_sdk.units import format_bytes

        what += f" ({format_bytes(size)})"
    with working(what):
        return call(request, timeout=timeout)


def _local_size(path: str) -> int | None:
    """The size of an image source, when it is on this host too (a daemon on a Unix socket)."""
    try:
        if os.path.isfile(path):
            return os.path.getsize(path)
        if os.path.isdir(path):
            return sum(os.path.getsize(os.path.join(top, name))
                       for top, _, names in os.walk(path) for name in names)
    except OSError:
        return None
    return None


def finish(status: int) -> NoReturn:
    """End a one-shot RPC command now.

    Everything it owes the user is printed; tearing down the interpreter and
    grpc's threads would only add ~15 ms to every command. The kernel closes
    the channel's socket.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _print_stream(stream: Any, output: str) -> None:
    """Print responses until the stream ends; Ctrl-C or a closed pipe end the
    call quietly, with the exit status a shell expects."""
    from aurae_cli.output import print_message

    try:
        for response in stream:
            print_message(response, output, streaming=True)
    except KeyboardInterrupt:
        stream.cancel()
        sys.exit(INTERRUPTED_EXIT)
    except BrokenPipeError:
        stream.cancel()
        # Python flushes stdout again at exit; point it at /dev/null so that
        # flush does not fail on the closed pipe too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(BROKEN_PIPE_EXIT)
