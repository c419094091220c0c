"""HAProxy's `slowstart`: a server that comes back UP gets its weight back gradually.

For `slowstart` seconds after a DOWN -> UP transition its effective weight grows from 1
(of its weight) to all of it, in proportion to the time since, so that a server whose
caches are cold, or that just restarted, is not handed its full share of new
connections at once. Servers that are up when the proxy starts are not ramped (as in
HAProxy). Pure: the balancer asks, with the time.
"""

from __future__ import annotations

import math
import time
from typing import Protocol

from mptcpkit.proxy.configmodel import Server


class ServerState(Protocol):
    """What the ramp reads and writes of `balance.ServerState`."""

    server: Server
    weight: int
    ramp_until: float


__all__ = ["came_up", "effective_weight"]


def came_up(state: ServerState) -> None:
    """`state` just went from DOWN to UP: start its ramp, if it has a slowstart."""
    if state.server.slowstart:
        state.ramp_until = time.monotonic() + state.server.slowstart


def effective_weight(state: ServerState, now: float) -> int:
    """Its weight now: the configured (or runtime-set) one, less while ramping."""
    if not state.ramp_until:
        return state.weight
    left = state.ramp_until - now
    if left <= 0:
        state.ramp_until = 0.0
        return state.weight
    ramp = state.server.slowstart
    return max(1, math.ceil(state.weight * (ramp - left) / ramp))
