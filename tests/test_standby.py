"""The claim of a spare daemon (auraed.runtime.standby), over real Unix sockets: a spare that
listens learns its place before its processes move and may start processes only once the host
says they have; one that listens late gets both at once; a host that lets go ends the claim;
a refused claim is the host's error."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from auraed.runtime.standby import Claim, ClaimError, await_claim, offer_claim


class _Spare:
    """await_claim, then settled(), on a thread; what happened and when."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.claim: Claim | None = None
        self.claimed = threading.Event()
        self.settled_at: float | None = None
        self.error: ClaimError | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> _Spare:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.path.exists():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        return self

    def _run(self) -> None:
        try:
            self.claim = await_claim(self.path, threading.Event())
            self.claimed.set()
            self.claim.settled()
            self.settled_at = time.monotonic()
        except ClaimError as error:
            self.error = error
            self.claimed.set()

    def join(self) -> None:
        self.thread.join(10)
        assert not self.thread.is_alive()


def test_a_listening_spare_learns_its_place_before_the_move_and_settles_after_it(
        tmp_path: Path) -> None:
    path = tmp_path / "standby.sock"
    spare = _Spare(path).start()
    with offer_claim(path, Claim("aurae/kubepods/pod1/instance-x/auraed"), 10) as offer:
        offer.send()
        assert spare.claimed.wait(10)  # told while the host still "moves"
        assert spare.claim is not None
        assert spare.claim.cgroup_root == "aurae/kubepods/pod1/instance-x/auraed"
        assert spare.claim.hostname is None
        time.sleep(0.2)
        assert spare.settled_at is None  # no process may start before the move ends
        moved_at = time.monotonic()
    spare.join()
    assert spare.error is None
    assert spare.settled_at is not None and spare.settled_at >= moved_at
    assert not path.exists()  # the spare's socket goes with its claim


def test_a_spare_that_listens_late_gets_its_claim_and_the_move_at_once(tmp_path: Path) -> None:
    path = tmp_path / "standby.sock"
    spare = _Spare(path)
    with offer_claim(path, Claim("aurae/instance-y/auraed"), 10) as offer:
        offer.send()  # nobody listens yet: the claim waits for the offer's end
        assert not offer.sent
        # Not spare.start(): it waits for the socket to appear, and a claim this quick may
        # take it and remove it before that wait looks.
        threading.Timer(0.1, spare.thread.start).start()
    spare.join()
    assert spare.error is None and spare.claim is not None
    assert spare.claim.cgroup_root == "aurae/instance-y/auraed"
    assert spare.settled_at is not None


def test_a_host_that_lets_go_before_the_move_ends_the_spares_start(tmp_path: Path) -> None:
    path = tmp_path / "standby.sock"
    spare = _Spare(path).start()
    with pytest.raises(RuntimeError), \
            offer_claim(path, Claim("aurae/instance-z/auraed"), 10) as offer:
        offer.send()
        assert spare.claimed.wait(10)
        raise RuntimeError("the move failed")
    spare.join()
    assert spare.settled_at is None
    assert spare.error is not None and "before it moved it" in str(spare.error)


def test_a_spare_socket_that_can_be_found_can_be_connected_to(tmp_path: Path) -> None:
    # The host takes a refused connect for a spare that does not listen yet; so the socket's
    # path must appear only once it listens (it used to appear at bind, a moment before).
    for attempt in range(10):
        path = tmp_path / f"standby-{attempt}.sock"
        spare = _Spare(path)
        spare.thread.start()
        while not path.exists():
            time.sleep(0)  # no more than a GIL handoff: connect the instant it appears
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
            host.connect(str(path))
        spare.join()
        assert spare.error is not None and "let go" in str(spare.error)
        assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # nor the name it was bound under


def test_a_claim_the_spare_refuses_is_the_hosts_error(tmp_path: Path) -> None:
    path = tmp_path / "standby.sock"
    spare = _Spare(path).start()
    with pytest.raises(ClaimError, match="does not parse"), \
            offer_claim(path, Claim(""), 10) as offer:
        offer.send()
    spare.join()
    assert spare.error is not None and spare.claim is None


def test_a_spare_that_never_listens_is_an_error_once_it_ended(tmp_path: Path) -> None:
    with pytest.raises(ClaimError, match="ended before it listened"), \
            offer_claim(tmp_path / "standby.sock", Claim("aurae/x/auraed"), 10,
                        alive=lambda: False):
        pass
