"""SDK pieces that need no daemon: building requests, converting messages,
their compact form, the log helpers' arguments, and what `import aurae_sdk` costs."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
import yaml

import aurae_sdk
from aurae_sdk import cells, logs, observe, vms
from aurae_sdk.messages import compact, from_dict, from_json, from_yaml, to_dict, to_json, to_yaml
from aurae_sdk.rpc import build_request

ALLOCATE = next(spec for spec in cells.CellService.METHODS if spec.name == "Allocate")


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (cells.CellServiceAllocateRequest(cell=cells.Cell(name="web")), {}),
        ({"cell": {"name": "web"}}, {}),
        (None, {"cell": {"name": "web"}}),
        (None, {"cell": cells.Cell(name="web")}),
    ],
    ids=["message", "dict", "keywords", "keyword-message"],
)
def test_every_request_form_builds_the_same_message(
    request_: object, fields: dict[str, object]
) -> None:
    built = build_request(ALLOCATE, request_, fields)
    assert built == cells.CellServiceAllocateRequest(cell=cells.Cell(name="web"))


def test_keywords_left_as_none_are_not_given() -> None:
    assert build_request(ALLOCATE, {"cell": {"name": "web"}}, {"cell": None}).cell.name == "web"


def test_a_request_and_keywords_together_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="either a request or keyword arguments"):
        build_request(ALLOCATE, {"cell": {"name": "a"}}, {"cell": {"name": "b"}})


def test_a_request_of_the_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="expected CellServiceAllocateRequest or a dict"):
        build_request(ALLOCATE, cells.Cell(name="web"), {})


def test_a_bad_field_is_named_with_its_path() -> None:
    with pytest.raises(TypeError, match=r"cell\.cpu\.weight: expected int, got str"):
        build_request(ALLOCATE, None, {"cell": {"name": "a", "cpu": {"weight": "lots"}}})
    with pytest.raises(ValueError, match=r"cell\.colour: Cell has no such field"):
        build_request(ALLOCATE, None, {"cell": {"colour": "red"}})


def test_client_methods_check_their_arguments_before_calling() -> None:
    # The channel is never used: the TypeError comes first.
    channel = grpc.insecure_channel("unix:/nonexistent/aurae.sock")
    with aurae_sdk.Client(channel=channel) as client, pytest.raises(TypeError):
        client.cells.allocate({"cell": {"name": "a"}}, cell={"name": "b"})


SAMPLE = cells.ExecutableStatus(
    name="web",
    cell_name="a/b",
    pid=7,
    host_pid=70007,
    command="sleep 1",
    state=cells.EXECUTABLE_STATE_EXITED,
    exit_code=0,
    started_at=1.5,
)
NESTED = vms.VirtualMachine(
    id="vm-1",
    mem_size_mb=512,
    kernel_args=["console=ttyS0", "quiet"],
    root_drive=vms.RootDrive(image_path="/img/root.ext4", read_only=True),
    drive_mounts=[vms.DriveMount(image_path="/img/data", vm_path="/data", fs_type="ext4")],
)


def test_to_dict_holds_python_values_and_enum_names() -> None:
    assert to_dict(SAMPLE) == {
        "name": "web",
        "cell_name": "a/b",
        "pid": 7,
        "host_pid": 70007,
        "command": "sleep 1",
        "state": "EXECUTABLE_STATE_EXITED",
        "exit_code": 0,
        "started_at": 1.5,
    }
    # A 64-bit integer stays an int, where protobuf's JSON mapping makes a string.
    assert to_dict(cells.MemoryController(max=1 << 40)) == {"max": 1 << 40}


@pytest.mark.parametrize(
    "message", [SAMPLE, NESTED, cells.Cell()], ids=["enum+optional", "nested+repeated", "empty"]
)
def test_dict_json_and_yaml_round_trip(message: object) -> None:
    message_type = type(message)
    assert from_dict(message_type, to_dict(message)) == message  # type: ignore[arg-type]
    assert from_json(message_type, to_json(message)) == message  # type: ignore[arg-type]
    assert from_yaml(message_type, to_yaml(message)) == message  # type: ignore[arg-type]
    assert json.loads(to_json(message)) == to_dict(message)  # type: ignore[arg-type]
    assert yaml.safe_load(to_yaml(message)) == to_dict(message)  # type: ignore[arg-type]


def test_an_optional_field_set_to_zero_survives_the_round_trip() -> None:
    assert to_dict(SAMPLE)["exit_code"] == 0
    assert from_dict(cells.ExecutableStatus, to_dict(SAMPLE)).HasField("exit_code")


def test_compact_is_one_line_of_set_fields() -> None:
    assert compact(cells.Cell(name="web", cpu=cells.CpuController(weight=2))) == (
        "Cell(name='web', cpu=CpuController(weight=2))"
    )
    assert compact(NESTED, width=1000) == (
        "VirtualMachine(id='vm-1', mem_size_mb=512, kernel_args=['console=ttyS0', 'quiet'], "
        "root_drive=RootDrive(image_path='/img/root.ext4', read_only=True), "
        "drive_mounts=[DriveMount(image_path='/img/data', vm_path='/data', fs_type='ext4')])"
    )
    assert compact(SAMPLE).startswith("ExecutableStatus(name='web'")
    assert "state=EXECUTABLE_STATE_EXITED" in compact(SAMPLE)


def test_compact_cuts_long_output_at_the_width() -> None:
    assert len(compact(NESTED, width=1000)) > 200
    assert len(compact(NESTED)) == 200  # the default width
    text = compact(NESTED, width=40)
    assert len(text) == 40
    assert text.endswith("...")


@pytest.mark.parametrize(
    ("channel", "batch", "error"),
    [
        ("both-ways", 10, "channel must be one of both, stdout, stderr"),
        ("stdout", -1, "batch must be 0 or more"),
    ],
)
def test_log_helpers_check_their_arguments_before_calling(
    channel: str, batch: int, error: str
) -> None:
    channel_ = grpc.insecure_channel("unix:/nonexistent/aurae.sock")
    with aurae_sdk.Client(channel=channel_) as client, pytest.raises(ValueError, match=error):
        logs.follow(client, 1, channel, batch=batch)  # type: ignore[arg-type]


def test_log_channel_names_match_the_protos() -> None:
    assert observe.LogChannelType.Name(observe.LOG_CHANNEL_TYPE_STDERR) == "LOG_CHANNEL_TYPE_STDERR"


def test_importing_the_sdk_loads_no_heavy_or_ui_modules() -> None:
    probe = (
        "import sys, aurae_sdk\n"
        "print(sorted(m for m in ('ptpython', 'prompt_toolkit', 'click', 'yaml', 'grpc', "
        "'google.rpc', 'cryptography') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]"
