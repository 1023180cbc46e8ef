"""Restart decisions without processes: systemd's Restart= rules, doubling capped delays, the
start limit, and a long run resetting the backoff."""

from __future__ import annotations

import signal

from auraed.kernel.processes import ExitStatus
from auraed.runtime.restarts import RestartMode, RestartPolicy, RestartState

FAILED = ExitStatus(1, None)
CLEAN = ExitStatus(0, None)


def test_which_ends_restart() -> None:
    on_failure = RestartPolicy(RestartMode.ON_FAILURE)
    assert on_failure.wants_restart(FAILED)
    assert on_failure.wants_restart(ExitStatus(None, signal.SIGKILL))
    assert on_failure.wants_restart(ExitStatus(None, signal.SIGSEGV))
    assert not on_failure.wants_restart(CLEAN)
    for clean in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        assert not on_failure.wants_restart(ExitStatus(None, clean))
    always = RestartPolicy(RestartMode.ALWAYS)
    assert always.wants_restart(CLEAN) and always.wants_restart(ExitStatus(None, signal.SIGTERM))
    assert not RestartPolicy().wants_restart(FAILED)


def test_delays_double_up_to_the_cap_then_the_start_limit_gives_up() -> None:
    state = RestartState(RestartPolicy(RestartMode.ON_FAILURE, first_delay=0.1, max_delay=0.5,
                                       burst=5, interval=10))
    now = 100.0
    state.record_start(now)
    delays = []
    while (delay := state.plan(FAILED, ran_for=0.01, now=now)) is not None:
        delays.append(delay)
        now += delay
        state.record_start(now)
    assert delays == [0.1, 0.2, 0.4, 0.5]  # five starts in all, the first included
    assert state.gave_up
    assert state.plan(FAILED, ran_for=0.01, now=now + 60) is None  # for good


def test_starts_outside_the_interval_do_not_count() -> None:
    state = RestartState(RestartPolicy(RestartMode.ALWAYS, first_delay=1, max_delay=1, burst=2,
                                       interval=3))
    now = 0.0
    state.record_start(now)
    for _ in range(10):  # one start every 2 s, never 2 within 3 s... except back to back
        delay = state.plan(CLEAN, ran_for=1, now=now + 1)
        assert delay == 1
        now += 2
        state.record_start(now)
    assert not state.gave_up


def test_a_long_run_resets_the_backoff_and_no_limit_means_none() -> None:
    state = RestartState(RestartPolicy(RestartMode.ALWAYS, first_delay=0.1, max_delay=10,
                                       burst=0, interval=5))
    assert [state.plan(CLEAN, ran_for=0) for _ in range(4)] == [0.1, 0.2, 0.4, 0.8]
    assert state.plan(CLEAN, ran_for=5) == 0.1
    for _ in range(100):
        state.record_start()
        assert state.plan(CLEAN, ran_for=0) is not None
    assert not state.gave_up


def test_an_ended_policy_never_restarts() -> None:
    state = RestartState(RestartPolicy(RestartMode.ALWAYS))
    state.ended = True
    assert state.plan(CLEAN, ran_for=0) is None and not state.gave_up
