"""Errors the runtime raises, each tied to the gRPC status it means.

The runtime raises these about a `subject` — the domain thing at fault (a
cell, an executable, a limit such as "memory.max") — and never names an API
field: the services' validation modules (auraed/validation) know which
request field each subject came from and set `field` at the edge.
`auraed.interceptors.FaultTranslation` is the one place they become gRPC
statuses. Kernel-facing modules raise their own errors, which the runtime
translates.

| Error               | gRPC status          | When                                                   |
|---------------------|----------------------|--------------------------------------------------------|
| InvalidArgument     | INVALID_ARGUMENT     | the request is malformed, whatever the node's state    |
| NotFound            | NOT_FOUND            | a named cell or executable does not exist              |
| AlreadyExists       | ALREADY_EXISTS       | a cell or running executable of that name exists       |
| FailedPrecondition  | FAILED_PRECONDITION  | valid request, but the node cannot do it in its state  |
| ResourceExhausted   | RESOURCE_EXHAUSTED   | a daemon limit (e.g. open streams) is reached          |
| Unavailable         | UNAVAILABLE          | the daemon is shutting down                            |
| DeadlineExceeded    | DEADLINE_EXCEEDED    | the node did not reach a state in time (a VM's boot)   |
| Unimplemented       | UNIMPLEMENTED        | a valid request for something this daemon cannot do    |
| (anything else)     | INTERNAL             | a bug: logged with its traceback                       |
"""

from __future__ import annotations

from enum import StrEnum


class Subject(StrEnum):
    """What a runtime error is about, in the runtime's own words. A cgroup
    limit is its own subject, by its v2 name ("cpu.weight")."""

    CELL = "cell"
    EXECUTABLE = "executable"
    COMMAND = "command"
    USER = "user"
    GROUP = "group"
    PROCESS = "process"
    RESTART_POLICY = "restart_policy"
    # Images and containers.
    IMAGE = "image"
    IMAGE_SOURCE = "image_source"  # the file or directory an image is imported from
    IMAGE_REFERENCE = "image_reference"  # a name given to an image (a tag)
    WORKING_DIR = "working_dir"
    MOUNT = "mount"


class RuntimeFault(Exception):
    """Base of the errors a caller can act on. `subject` is what the runtime
    blames; `field` is the dotted request field to blame, set at the service
    edge."""

    status = "UNKNOWN"

    def __init__(self, message: str, *, subject: str | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.subject = subject
        self.field = field


class InvalidArgument(RuntimeFault):
    status = "INVALID_ARGUMENT"


class NotFound(RuntimeFault):
    status = "NOT_FOUND"


class AlreadyExists(RuntimeFault):
    status = "ALREADY_EXISTS"


class FailedPrecondition(RuntimeFault):
    status = "FAILED_PRECONDITION"


class ResourceExhausted(RuntimeFault):
    status = "RESOURCE_EXHAUSTED"


class Unavailable(RuntimeFault):
    status = "UNAVAILABLE"


class Unimplemented(RuntimeFault):
    status = "UNIMPLEMENTED"


class DeadlineExceeded(RuntimeFault):
    status = "DEADLINE_EXCEEDED"
