"""A call's peer identity is read from grpcio's auth context once, however many of the
daemon's wrappers (authorization, admission, audit, forwarding) ask for it, and never
carried over to the next call on the same thread."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aurae_cli.pki import client_crt_path, init_pki
from auraed.interceptors import _forget_caller, caller_of


class _Call:
    """What the wrappers use of a grpc.ServicerContext: its auth context, counted."""

    def __init__(self, pem: bytes) -> None:
        self.pem = pem
        self.looks = 0

    def auth_context(self) -> dict[str, Any]:
        self.looks += 1
        return {"x509_pem_cert": [self.pem]}


def test_the_identity_is_parsed_once_per_call_and_not_lent_to_the_next(tmp_path: Path) -> None:
    pki = init_pki(tmp_path / "pki", clients=("admin", "ci"), socket=str(tmp_path / "s.sock"))
    admin = _Call(client_crt_path(pki.directory, "admin").read_bytes())
    ci = _Call(client_crt_path(pki.directory, "ci").read_bytes())

    first = caller_of(admin)  # type: ignore[arg-type]
    assert str(first).endswith("/admin")
    assert caller_of(admin) is first  # type: ignore[arg-type]
    assert admin.looks == 1
    # Another call on the same thread: its own identity, not the last one's.
    assert str(caller_of(ci)).endswith("/ci")  # type: ignore[arg-type]
    assert ci.looks == 1
    _forget_caller()  # the call is over
    assert str(caller_of(ci)).endswith("/ci")  # type: ignore[arg-type]
    assert ci.looks == 2
