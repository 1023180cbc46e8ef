"""The validation edge: requests become domain values in auraed/validation, the one place a
request field is blamed; the runtime and kernel below name none."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aurae_sdk.wire.generated.pb.cells import cells_pb2 as pb
from auraed.errors import InvalidArgument, NotFound, Subject
from auraed.kernel.cgroups import CgroupLimits
from auraed.validation import blaming
from auraed.validation import cells as valid

AURAED = Path(__file__).resolve().parents[2] / "auraed"
# A request field path as the services blame them: "cell.name", "executable_name", "uid".
_FIELD_ARGUMENT = re.compile(r"\bfield=\"")


CHECKED = ["runtime/workloads.py", "runtime/names.py", "runtime/executables.py",
           "runtime/metrics.py", "runtime/containers.py", "images", "kernel"]


@pytest.mark.parametrize("layer", CHECKED)
def test_the_runtime_and_kernel_name_no_request_field(layer: str) -> None:
    root = AURAED / layer
    offenders = [
        f"{path.relative_to(AURAED)}:{number}"
        for path in (sorted(root.rglob("*.py")) if root.is_dir() else [root])
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _FIELD_ARGUMENT.search(line) or "cell_name\"" in line or "\"executable." in line
    ]
    assert offenders == []


def test_the_nine_limits_round_trip_through_one_table() -> None:
    cell = pb.Cell(
        name="x",
        cpu=pb.CpuController(weight=7, max=20_000, period=100_000),
        cpuset=pb.CpusetController(cpus="0", mems="0"),
        memory=pb.MemoryController(min=1, low=2, high=3, max=4 << 20),
    )
    limits = valid.limits_from_cell(cell)
    assert limits == CgroupLimits(cpu_weight=7, cpu_max=20_000, cpu_period=100_000,
                                  cpuset_cpus="0", cpuset_mems="0", memory_min=1, memory_low=2,
                                  memory_high=3, memory_max=4 << 20)
    assert len(valid.CELL_LIMITS) == 9 == len(limits.set_fields())
    back = pb.Cell(name="x")
    valid.set_limits(back, limits)
    assert back == cell
    # Unset stays unset: presence, not zero.
    assert not pb.Cell(name="x").cpu.HasField("weight")
    assert valid.limits_from_cell(pb.Cell(name="x")) == CgroupLimits()


def test_every_limit_blames_its_own_field() -> None:
    for limit in valid.CELL_LIMITS:
        assert valid.ALLOCATE_FIELDS[limit] == f"cell.{limit}"
    with pytest.raises(InvalidArgument) as refused:
        valid.limits_from_cell(pb.Cell(cpu=pb.CpuController(period=5)))
    assert (refused.value.subject, refused.value.field) == ("cpu.period", "cell.cpu.period")


def test_a_runtime_fault_gets_the_field_of_the_rpc_it_passes_through() -> None:
    for fields, expected in ((valid.ALLOCATE_FIELDS, "cell.name"),
                             (valid.FREE_FIELDS, "cell_name"),
                             (valid.START_FIELDS, "cell_name")):
        with pytest.raises(NotFound) as missing, blaming(fields):
            raise NotFound("cell x does not exist", subject=Subject.CELL)
        assert missing.value.field == expected
    with pytest.raises(NotFound) as missing, blaming(valid.STOP_FIELDS):
        raise NotFound("no executable x", subject=Subject.EXECUTABLE)
    assert missing.value.field == "executable_name"


def test_requests_become_domain_values() -> None:
    start = valid.executable_start(pb.CellServiceStartRequest(
        cell_name="a/b", executable=pb.Executable(name="web", command="sleep 1"), uid=0, gid=0))
    assert (str(start.cell), start.name, start.command, start.uid, start.gid) == (
        "a/b", "web", "sleep 1", 0, 0)
    host = valid.executable_stop(pb.CellServiceStopRequest(
        cell_name="", executable_name="web", grace_period_ms=1500))
    assert (host.executable.cell, host.executable.name, host.grace) == (None, "web", 1.5)
    with pytest.raises(InvalidArgument) as refused:
        valid.allocation(pb.CellServiceAllocateRequest(cell=pb.Cell(name="a/../b")))
    assert (refused.value.subject, refused.value.field) == (Subject.CELL, "cell.name")


def test_image_and_container_faults_get_their_fields_at_the_edges() -> None:
    from auraed.cri.service import CREATE_CONTAINER_FIELDS
    from auraed.images.reference import normalize_reference
    from auraed.validation import images as valid_images

    with pytest.raises(InvalidArgument) as refused, blaming(valid_images.IMPORT_FIELDS):
        normalize_reference("Not A Reference")
    assert (refused.value.subject, refused.value.field) == ("image_reference", "reference")
    for fields, expected in ((valid_images.INSPECT_FIELDS, "image_name"),
                             (valid.CONTAINER_FIELDS, "executable.image"),
                             (CREATE_CONTAINER_FIELDS, "config.image.image")):
        with pytest.raises(NotFound) as missing, blaming(fields):
            raise NotFound("no image x", subject=Subject.IMAGE)
        assert missing.value.field == expected
