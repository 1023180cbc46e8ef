"""client.instance(): the metadata that addresses a spawned instance, composed per level."""

from __future__ import annotations

import grpc
import pytest

import aurae_sdk
from aurae_sdk.client import INSTANCE_KEY, instance_path


def test_paths_compose_and_keep_other_metadata() -> None:
    first = instance_path((("x-trace", "1"),), "build-1")
    assert first == (("x-trace", "1"), (INSTANCE_KEY, "build-1"))
    assert instance_path(first, "inner") == (("x-trace", "1"), (INSTANCE_KEY, "build-1/inner"))


@pytest.mark.parametrize("name", ["", "/", "a//b", "a/", "/a"])
def test_empty_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="instance name"):
        instance_path((), name)


def test_views_share_the_channel_and_do_not_close_it() -> None:
    channel = grpc.insecure_channel("unix:/nonexistent/aurae.sock")
    client = aurae_sdk.Client(channel=channel)
    inner = client.instance("a").instance("b")
    assert inner.channel is channel and inner.instance_name == "a/b"
    assert client.instance_name is None and "instance a/b" in repr(inner)
    inner.close()
    assert not client._transport.closed  # the parent still works
    client.close()
