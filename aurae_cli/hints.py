"""What to try next when a call fails: one hint, appended to the CLI's one-line errors.

Connection and TLS failures (the daemon is down, the socket is wrong, a certificate does not
match) all look alike from the client; `aurae-py doctor` tells them apart.
"""

from __future__ import annotations

from aurae_sdk.errors import AuraeError

DOCTOR_HINT = "hint: run `aurae-py doctor` to check the config, certificates and daemon"
# UNAVAILABLE: nothing answered, or the TLS handshake failed; UNAUTHENTICATED: our identity was
# refused; DEADLINE_EXCEEDED on connect looks the same as a daemon that never answers.
_CONNECTION_STATUSES = frozenset({"UNAVAILABLE", "UNAUTHENTICATED"})


def with_hint(message: str, error: BaseException) -> str:
    """`message`, followed by a hint line when `error` is a connection or TLS failure."""
    if isinstance(error, AuraeError) and error.code in _CONNECTION_STATUSES:
        return f"{message}\n{DOCTOR_HINT}"
    return message
