"""--metrics-address: Unix sockets and loopback TCP are accepted, anything public only with
--metrics-allow-remote."""

from __future__ import annotations

import pytest

from auraed.prometheus import MetricsAddress, MetricsAddressError, parse_metrics_address


@pytest.mark.parametrize(("text", "expected"), [
    ("/run/aurae/metrics.sock", MetricsAddress("unix", path="/run/aurae/metrics.sock")),
    ("unix:/run/m.sock", MetricsAddress("unix", path="/run/m.sock")),
    ("127.0.0.1:9464", MetricsAddress("tcp", host="127.0.0.1", port=9464)),
    ("127.8.9.10:9464", MetricsAddress("tcp", host="127.8.9.10", port=9464)),
    ("[::1]:9464", MetricsAddress("tcp", host="::1", port=9464)),
    ("localhost:9464", MetricsAddress("tcp", host="localhost", port=9464)),
])
def test_local_addresses_are_accepted(text: str, expected: MetricsAddress) -> None:
    assert parse_metrics_address(text) == expected


@pytest.mark.parametrize("text", ["0.0.0.0:9464", "10.1.2.3:9464", "[::]:9464",
                                  "[2001:db8::1]:9464", "example.invalid:9464"])
def test_public_addresses_need_the_explicit_flag(text: str) -> None:
    with pytest.raises(MetricsAddressError, match="--metrics-allow-remote"):
        parse_metrics_address(text)
    if not text.startswith("example"):
        assert parse_metrics_address(text, allow_remote=True).kind == "tcp"


@pytest.mark.parametrize("text", ["", "127.0.0.1:http", "127.0.0.1:70000", "http://127.0.0.1:1"])
def test_malformed_addresses_are_refused(text: str) -> None:
    with pytest.raises(MetricsAddressError):
        parse_metrics_address(text)


def test_addresses_print_as_written() -> None:
    assert str(parse_metrics_address("[::1]:9464")) == "[::1]:9464"
    assert str(parse_metrics_address("127.0.0.1:9464")) == "127.0.0.1:9464"
