"""Budgets of long-lived calls: no peer can hold the threads every other call needs.

The daemon serves on one pool of threads (grpcio's sync server), and a call holds its thread
until it ends. Most calls end in milliseconds; a stream (Observe, Health/Watch, reflection) or a
call that waits on a workload (CellService Wait, Stop with a grace period) lasts as long as the
caller likes. Those are *long-lived* calls, and each must be admitted against

- the caller's own budget (`per_peer`), keyed by its identity (auraed.identity), and
- the budget all non-operators share (`total`);
- operators (the principals the daemon is told of) draw on a reserve of their own instead
  (`operators`), so nothing other peers hold can keep an operator out.

The thread pool is sized as total + operators + short-call workers, so however many long-lived
calls are admitted, short calls (List, Check, Allocate, ...) always find threads. A call beyond
its budget is refused at once (RESOURCE_EXHAUSTED) and its thread freed. No gRPC imports.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """How many long-lived calls may run at once."""

    per_peer: int = 16
    total: int = 128  # of all non-operators together
    operators: int = 128  # of all operators together, apart from the rest

    def __post_init__(self) -> None:
        if min(self.per_peer, self.total, self.operators) < 1:
            raise ValueError("every long-lived call budget must be at least 1")


class OverBudget(Exception):
    """A long-lived call the budget has no room for; the message says whose budget is full."""


class Ticket:
    """One admitted long-lived call; release() it when the call ends (more than once is fine)."""

    def __init__(self, calls: LongLivedCalls, peer: str, operator: bool) -> None:
        self._calls = calls
        self._peer = peer
        self._operator = operator
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._calls._release(self._peer, self._operator)


class LongLivedCalls:
    """The long-lived calls running now, per peer and in total."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self._lock = threading.Lock()
        self._per_peer: dict[str, int] = {}
        self._others = 0
        self._operators = 0

    def admit(self, peer: str, *, operator: bool) -> Ticket:
        """A ticket for one more long-lived call of peer, or OverBudget."""
        budget = self.budget
        with self._lock:
            if operator:
                if self._operators >= budget.operators:
                    raise OverBudget(f"operators hold {self._operators} long-lived calls, "
                                     "their whole reserve")
                self._operators += 1
            else:
                held = self._per_peer.get(peer, 0)
                if held >= budget.per_peer:
                    raise OverBudget(f"{peer} holds {held} long-lived calls (streams, Wait, "
                                     f"Stop), its budget; end one before starting another")
                if self._others >= budget.total:
                    raise OverBudget(f"clients hold {self._others} long-lived calls, the "
                                     "daemon's budget for them; try again later")
                self._others += 1
                self._per_peer[peer] = held + 1
        return Ticket(self, peer, operator)

    def held(self, peer: str | None = None) -> int:
        """Long-lived calls running now: of one non-operator peer, or of everyone."""
        with self._lock:
            if peer is None:
                return self._others + self._operators
            return self._per_peer.get(peer, 0)

    def _release(self, peer: str, operator: bool) -> None:
        with self._lock:
            if operator:
                self._operators -= 1
                return
            self._others -= 1
            left = self._per_peer[peer] - 1
            if left:
                self._per_peer[peer] = left
            else:
                del self._per_peer[peer]


__all__ = ["Budget", "LongLivedCalls", "OverBudget", "Ticket"]
