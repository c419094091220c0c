"""A server's `maxconn` and the queue in front of it (HAProxy's `maxconn` on a server,
`timeout queue`).

Each worker takes its part of a server's maxconn (`ServerState.limit`, the parts add up
to it). When every usable server is at its limit the balancer picks none and the
connection waits, parked, its client leg open: in the frontend's FIFO (relay.py) or the
engine's (`_engine.c`). Each connection that ends frees a slot; once the loop is free,
the oldest waiting connections are let go to connect, as many as there is room. The
sweep ends those that waited longer than `timeout queue` (default: `timeout connect`).
Pure bookkeeping and scheduling: the data paths do the parking.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Sequence
from typing import Protocol

from mptcpkit.proxy.balance import ServerState

__all__ = ["ServerQueue", "full", "share"]


class Parking(Protocol):
    """What a frontend offers the queue: how many wait, and let the oldest go."""

    def queued(self) -> int: ...

    def unpark(self, queue: ServerQueue | None = None) -> bool: ...


def share(maxconn: int, workers: int, worker: int) -> int:
    """Worker `worker`'s part of a server's maxconn (0: no limit)."""
    if not maxconn:
        return 0
    return maxconn // workers + (1 if worker < maxconn % workers else 0)


def _usable(s: ServerState, exclude: Collection[ServerState]) -> bool:
    return s.up and s.weight > 0 and s.admin == "ready" and s not in exclude


def full(states: Sequence[ServerState], exclude: Collection[ServerState] = ()) -> bool:
    """Some server is usable but at its limit: a connection the balancer found no server
    for should wait rather than fail."""
    return any(_usable(s, exclude) and s.limit and s.active >= s.limit for s in states)


def room(states: Sequence[ServerState]) -> bool:
    return any(_usable(s, ()) and (not s.limit or s.active < s.limit) for s in states)


class ServerQueue:
    """The waiting connections of one backend's frontends, let go as slots free."""

    def __init__(self, states: Sequence[ServerState], loop: asyncio.AbstractEventLoop) -> None:
        self.states = states
        self.loop = loop
        self.frontends: list[Parking] = []
        self._scheduled = False

    def slot_freed(self) -> None:
        """A connection to one of the servers ended: let waiting ones go, soon (not from
        inside the data path's close)."""
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        for fe in self.frontends:
            for _ in range(fe.queued()):
                # this backend's waiters only: a frontend with use_backend rules parks
                # connections for several backends in one FIFO
                if not room(self.states) or not fe.unpark(self):
                    break
