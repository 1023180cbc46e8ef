"""auraed.cri.pod_instances.ChannelCloser: channels to pod instances are closed off the CRI
call's path, and a stopping daemon waits for every close. Against a real gRPC server on a
unix socket, with a channel whose readiness was watched as a spare's is."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from auraed.cri.pod_instances import ChannelCloser


def _version(channel: grpc.Channel) -> None:
    # A plain method, not a generated stub's: grpcio 1.85 crashes registering a stub's method
    # on a closed channel, where a plain call raises ValueError as documented.
    call: Callable[..., object] = channel.unary_unary("/runtime.v1.RuntimeService/Version")
    call(b"", timeout=1)


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    address = f"unix:{tmp_path / 'cri.sock'}"
    server.add_insecure_port(address)
    server.start()
    try:
        yield address
    finally:
        server.stop(0)


def test_a_watched_channel_handed_to_the_closer_is_closed_once_drained(listening: str) -> None:
    closer = ChannelCloser()
    channel = grpc.insecure_channel(listening)
    connected = grpc.channel_ready_future(channel)
    connected.result(timeout=30)
    closer.close(channel, connected)
    closer.drain()
    assert closer.pending() == 0
    with pytest.raises(ValueError, match="closed channel"):
        _version(channel)


def test_a_readiness_watch_not_yet_done_is_cancelled_by_the_close(tmp_path: Path) -> None:
    # Nothing listens: the spare never came up. Its future ends cancelled, not pending.
    closer = ChannelCloser()
    channel = grpc.insecure_channel(f"unix:{tmp_path / 'nobody.sock'}")
    connected = grpc.channel_ready_future(channel)
    closer.close(channel, connected)
    closer.drain()
    assert connected.cancelled()
    with pytest.raises(ValueError, match="closed channel"):
        _version(channel)


def test_closes_from_many_callers_are_all_waited_for(listening: str) -> None:
    closer = ChannelCloser()
    channels = [grpc.insecure_channel(listening) for _ in range(8)]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=30)
        closer.close(channel)
    closer.drain()
    assert closer.pending() == 0
    for channel in channels:
        with pytest.raises(ValueError, match="closed channel"):
            _version(channel)
