"""The validation edge: each request becomes validated domain values here, one module per service.

The runtime below raises `auraed.errors` faults about a subject (a cell, an
executable, a limit) and knows no request field. Each service's validation
module knows which field of which request every subject came from, so it is
the one place a field is blamed: while validating (`blamed`) and when a
runtime fault passes back through the service (`blaming`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from auraed.errors import RuntimeFault

# Which request field each subject came from, for one RPC.
FieldsBySubject = Mapping[str, str]


@contextmanager
def blaming(fields: FieldsBySubject) -> Iterator[None]:
    """Name the request field of a runtime fault raised inside, from its subject."""
    try:
        yield
    except RuntimeFault as fault:
        if fault.field is None and fault.subject is not None:
            fault.field = fields.get(fault.subject)
        raise


@contextmanager
def blamed(field: str) -> Iterator[None]:
    """Blame `field` for any fault raised inside (the value being validated came from it)."""
    try:
        yield
    except RuntimeFault as fault:
        if fault.field is None:
            fault.field = field
        raise
