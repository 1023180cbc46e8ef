"""`aurae-py` / `aurae-py repl`: ptpython with a connected client.

The session runs on one asyncio event loop from start to exit, so `await
aclient...` works at the prompt and `aclient` stays bound to its loop. It
starts with the names scripts get (see aurae_cli.scripts), and adds:

- completion of message fields where jedi sees none: constructor keywords
  (`cells.Cell(na` -> `name=`) and request dict keys
  (`client.cells.allocate(cell={"cp` -> `"cpu": `);
- messages printed as readable Python, wrapped when long;
- a stream given as a result prints live, as `show()` does, and Ctrl-C stops
  any running input, sync or async, cancelling the stream it reads.

This module imports ptpython; only the REPL command imports this module.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import click
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, merge_completers
from prompt_toolkit.document import Document
from ptpython.repl import PythonRepl, ReplExit
from ptpython.repl import exit as ExitCommand

from aurae_cli.generated.namespace import SERVICE_MODULES
from aurae_cli.scripts import preloaded_names, show
from aurae_sdk.messages import compact
from aurae_sdk.rpc import AsyncServiceClient, AsyncStream, MethodSpec, ServiceClient, Stream
from aurae_sdk.script import ScriptClients

AnyDescriptor = Any  # protobuf's C descriptors; see aurae_sdk.messages

PRELOADED_HELP = (
    f"client, aclient (await its calls), {', '.join(SERVICE_MODULES)}, "
    "aurae_sdk, logs, show(stream), tb() (the last error's traceback)"
)


def run_repl(config: str | None, socket: str | None, *, context: str | None = None,
             timeout: float | None = None) -> None:
    asyncio.run(_session(ScriptClients(config, socket, context=context, timeout=timeout)))


async def _session(clients: ScriptClients) -> None:
    namespace: dict[str, Any] = {
        "__name__": "__main__",
        "__builtins__": builtins,
        **preloaded_names(clients),
        "tb": last_traceback,
    }
    print(banner(clients), flush=True)
    repl = AuraeRepl(
        get_globals=lambda: namespace,
        get_locals=lambda: namespace,
        history_filename=_history_file(),
    )
    repl.confirm_exit = False  # Ctrl-D leaves, as in python
    repl.title = "aurae-py"
    repl.completer = merge_completers([MessageFieldCompleter(lambda: namespace), repl.completer])
    try:
        await repl.run_async()
    finally:
        clients.close()
        await clients.aclose()


def banner(clients: ScriptClients) -> str:
    """Where the session is connected, and what it starts with."""
    from aurae_sdk import __version__
    from aurae_sdk.config import ConfigError
    from aurae_sdk.errors import AuraeError

    lines = [f"aurae-py {__version__} REPL, Python {sys.version.split()[0]}, asyncio"]
    try:
        config = clients.config()
        where = f"{config.target.display} (config {config.source})"
        # Both open now, in this loop: completion runs in another thread,
        # where an AsyncClient could not be made.
        client = clients.client.resolve()
        clients.aclient.resolve()
        found = client.discovery.discover(timeout=3)
        lines.append(f"Connected to auraed {found.version} at {where}")
    except ConfigError as error:
        lines.append(f"Not connected: {error}")
    except AuraeError as error:
        lines.append(f"auraed at {where} does not answer: {error}")
    lines.append(f"Preloaded: {PRELOADED_HELP}")
    lines.append(
        "Try client.cells.list(), await aclient.discovery.discover(), "
        "client.observe.get_aurae_daemon_log_stream(). Ctrl-C stops, Ctrl-D exits."
    )
    return "\n".join(lines)


def _history_file() -> str | None:
    path = os.environ.get("AURAE_PY_HISTORY")
    if path is None:
        state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
        path = os.path.join(state, "aurae-py", "history")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None  # e.g. a read-only home: no history rather than no REPL
    return path


def _interrupt_running_input(signum: int, frame: FrameType | None) -> None:
    # ptpython cancels the evaluating task on SIGINT through the event loop,
    # which only works for code that awaits. Sync code (a blocking call, a
    # `for` over a Stream) runs inside that task's step, and only an
    # exception raised where it stands stops it.
    if asyncio.current_task() is not None:
        raise KeyboardInterrupt


class AuraeRepl(PythonRepl):
    """ptpython's REPL with stream display, Ctrl-C for sync code and message output."""

    async def eval_async(self, line: str) -> object:
        previous = signal.signal(signal.SIGINT, _interrupt_running_input)
        try:
            result = await super().eval_async(line)
            if isinstance(result, ExitCommand):  # `exit` typed without parentheses
                raise SystemExit
            if isinstance(result, Stream):
                show(result)
                return None
            if isinstance(result, AsyncStream):
                await show(result)
                return None
            return result
        except ReplExit:
            raise SystemExit from None  # what ptpython's asyncio loop ends on
        except (KeyboardInterrupt, asyncio.CancelledError):
            self._handle_keyboard_interrupt(KeyboardInterrupt())
            return None
        finally:
            signal.signal(signal.SIGINT, previous)

    def _handle_exception(self, e: BaseException) -> None:
        # An API or config error is the node answering, not a bug: one line, as scripts print
        # it; the traceback stays one call away (tb(), or traceback.print_last()).
        from aurae_sdk.config import ConfigError
        from aurae_sdk.errors import AuraeError

        if not isinstance(e, (AuraeError, ConfigError)):
            super()._handle_exception(e)
            return
        sys.last_type, sys.last_value, sys.last_traceback = type(e), e, e.__traceback__
        print(f"aurae-py: {e}  (tb() shows the traceback)", flush=True)

    def _show_result(self, result: object) -> None:
        columns = self.app.output.get_size().columns - 8  # room for the Out prompt
        super()._show_result(displayed(result, max(columns, 40)))


def last_traceback() -> None:
    """Print the full traceback of the last error the REPL reported."""
    import traceback

    error = getattr(sys, "last_value", None)
    if error is None:
        print("No error yet.")
        return
    traceback.print_exception(type(error), error, error.__traceback__, file=sys.stdout)


class _Displayed:
    """A result whose repr is the REPL's text for it."""

    def __init__(self, text: str) -> None:
        self._text = text

    def __repr__(self) -> str:
        return self._text


def displayed(result: object, width: int) -> object:
    """What the REPL prints for a result: messages (and lists of them) pretty."""
    if isinstance(result, Message):
        return _Displayed(pretty(result, width))
    if (
        isinstance(result, Sequence)
        and not isinstance(result, (str, bytes))
        and result
        and all(isinstance(item, Message) for item in result)
    ):
        return _Displayed(
            _wrapped("[", "]", [pretty(item, width - 4, 4) for item in result], width, 0)
        )
    return result


def pretty(message: Message, width: int = 88, indent: int = 0) -> str:
    """A message as Python-looking text: compact on one line when it fits in
    `width`, else one field per line, nested the same way."""
    flat = compact(message, width=sys.maxsize)
    if indent + len(flat) <= width:
        return flat
    inner = indent + 4
    lines = [f"{message.DESCRIPTOR.name}("]
    for field, value in message.ListFields():
        lines.append(f"{' ' * inner}{field.name}={_value_text(field, value, width, inner)},")
    lines.append(" " * indent + ")")
    return "\n".join(lines)


def _value_text(field: AnyDescriptor, value: Any, width: int, indent: int) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        items = [
            f"{key!r}: {_single_text(value_field, item, width, indent + 4)}"
            for key, item in value.items()
        ]
        return _wrapped("{", "}", items, width, indent)
    if field.is_repeated:
        return _wrapped(
            "[",
            "]",
            [_single_text(field, item, width, indent + 4) for item in value],
            width,
            indent,
        )
    return _single_text(field, value, width, indent)


def _single_text(field: AnyDescriptor, value: Any, width: int, indent: int) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return pretty(value, width, indent)
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else repr(value)
    return repr(value)


def _wrapped(opening: str, closing: str, items: list[str], width: int, indent: int) -> str:
    flat = opening + ", ".join(items) + closing
    if "\n" not in flat and indent + len(flat) <= width:
        return flat
    pad = " " * (indent + 4)
    return "\n".join([opening, *(f"{pad}{item}," for item in items), " " * indent + closing])


# --------------------------------------------------------------------------
# Completion of message fields

_CALLEE = re.compile(r"([A-Za-z_]\w*(?:\s*\.\s*[A-Za-z_]\w*)*)\s*$")
_KEYWORD_KEY = re.compile(r"(\w+)\s*=\s*$")
_DICT_KEY = re.compile(r"""["'](\w+)["']\s*:\s*$""")


@dataclass(frozen=True)
class _Bracket:
    char: str  # "(", "[" or "{"
    before: str  # the text in front of it


@dataclass(frozen=True)
class _Cursor:
    """Where the cursor stands: the brackets it is inside, and the word it is typing."""

    brackets: tuple[_Bracket, ...]
    word: str
    quote: str | None  # the quote of an unterminated string the word is in


def _scan(text: str) -> _Cursor | None:
    brackets: list[_Bracket] = []
    quote: str | None = None
    string_start = 0
    escaped = False
    for index, char in enumerate(text):
        if quote is not None:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
        elif char in "\"'":
            quote, string_start = char, index
        elif char in "([{":
            brackets.append(_Bracket(char, text[:index]))
        elif char in ")]}" and brackets:
            brackets.pop()
    if quote is not None:
        word = text[string_start + 1 :]
        if not re.fullmatch(r"\w*", word):
            return None
        before = text[:string_start]
    else:
        match = re.search(r"\w*$", text)
        word = match.group() if match else ""
        before = text[: len(text) - len(word)]
    # Only where a field name may stand: right after the bracket or a comma.
    if not brackets or not re.search(r"[(\[{,]\s*$", before):
        return None
    return _Cursor(tuple(brackets), word, quote)


class MessageFieldCompleter(Completer):
    """Message fields as constructor keywords and as request dict keys.

    jedi completes methods' keyword arguments from their signatures, but
    protobuf classes have none, and no completer knows the keys of the dicts
    the SDK accepts for messages. This one reads both from the descriptors of
    the call the cursor is in.
    """

    def __init__(self, namespace: Callable[[], dict[str, Any]]) -> None:
        self._namespace = namespace

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterator[Completion]:
        cursor = _scan(document.text_before_cursor)
        if cursor is None:
            return
        found = _fields_at(cursor, self._namespace())
        if found is None:
            return
        descriptor, as_keywords = found
        types = _field_types(descriptor.full_name)
        typed = len(cursor.word)
        for field in descriptor.fields:
            if not field.name.startswith(cursor.word):
                continue
            if as_keywords:
                text = f"{field.name}="
            elif cursor.quote is not None:
                text = f"{field.name}{cursor.quote}: "
            else:
                text = f'"{field.name}": '
            yield Completion(
                text, start_position=-typed, display=field.name, display_meta=types.get(field.name, "")
            )


@functools.cache
def _field_types(message: str) -> dict[str, str]:
    """Field name -> type as the proto writes it, from the generated reference."""
    from aurae_cli.generated.reference import MESSAGES

    for described in MESSAGES:
        if described.full_name == message:
            return {field.name: field.type for field in described.fields}
    return {}


def _fields_at(cursor: _Cursor, namespace: dict[str, Any]) -> tuple[AnyDescriptor, bool] | None:
    """The message whose fields fit at the cursor, and whether they are
    keywords (directly in a constructor call) rather than dict keys."""
    calls = [index for index, bracket in enumerate(cursor.brackets) if bracket.char == "("]
    if not calls:
        return None
    call = calls[-1]
    callee = _CALLEE.search(cursor.brackets[call].before)
    target = _lookup(callee.group(1), namespace) if callee else None
    descriptor = _request_descriptor(target)
    if descriptor is None:
        return None
    inner = cursor.brackets[call + 1 :]
    if not inner:
        # Keyword arguments of a service method come from its signature (jedi).
        is_constructor = isinstance(target, type)
        return (descriptor, True) if is_constructor and cursor.quote is None else None
    element_of: AnyDescriptor = None  # inside a "[" of a repeated message field
    for previous, bracket in zip((cursor.brackets[call], *inner), inner):
        key = (_KEYWORD_KEY if previous.char == "(" else _DICT_KEY).search(bracket.before)
        if key is None:
            if not (bracket.char == "{" and previous.char == "[" and element_of is not None):
                return None
            descriptor, element_of = element_of, None
            continue
        field = descriptor.fields_by_name.get(key.group(1)) if descriptor is not None else None
        if field is None or field.type != FieldDescriptor.TYPE_MESSAGE:
            return None
        if field.message_type.GetOptions().map_entry:
            return None
        if bracket.char == "[" and field.is_repeated:
            descriptor, element_of = None, field.message_type
        elif bracket.char == "{" and not field.is_repeated:
            descriptor = field.message_type
        else:
            return None
    if descriptor is None or inner[-1].char != "{":
        return None
    return descriptor, False


def _lookup(dotted: str, namespace: dict[str, Any]) -> object:
    """The object a dotted name denotes, by attribute access only (no calls)."""
    first, *rest = [part.strip() for part in dotted.split(".")]
    try:
        found = namespace[first] if first in namespace else getattr(builtins, first)
        for part in rest:
            found = getattr(found, part)
    except Exception:  # noqa: BLE001 - a completer must never break the prompt
        return None
    return found


def _request_descriptor(target: object) -> AnyDescriptor:
    """The message a call fills: a message class's own, or a service method's request."""
    if isinstance(target, type) and issubclass(target, Message):
        return target.DESCRIPTOR
    owner = getattr(target, "__self__", None)
    if isinstance(owner, (ServiceClient, AsyncServiceClient)):
        name = getattr(target, "__name__", "").replace("_", "").lower()
        methods: tuple[MethodSpec[Any, Any], ...] = getattr(owner, "METHODS", ())
        for spec in methods:
            if spec.name.lower() == name:
                return spec.request_type.DESCRIPTOR
    return None


@click.command("repl")
@click.pass_context
def repl_command(ctx: click.Context) -> None:
    """Open the interactive Python REPL with a connected client.

    It starts with `client`, `aclient` (await its calls at the prompt), the
    service modules `cells`, `discovery`, `observe`, `vms` and `health`,
    `aurae_sdk`, `logs` and `show`. A stream given as a result prints live
    until it ends or Ctrl-C. `aurae-py` without a command does the same.
    An API error prints one line; tb() shows its full traceback.

    \b
    Examples:
      aurae-py repl
      aurae-py --context edge-1 repl
    """
    session = ctx.find_root().obj
    run_repl(session.config, session.socket, context=session.context, timeout=session.timeout)
