"""Retries as HAProxy makes them: `retries` and `option redispatch`. Pure, no I/O.

After a failed connect the same server is tried again, `retries` times; after a
refusal (not a timeout: that one has waited already) the retry waits HAProxy's
turn-around time, min(`timeout connect`, 1 s), so a server that is restarting is not
hammered and has the time to come back. With `redispatch` the last retry goes to
another server instead (the same one if there is no other).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["PAUSE_MAX", "pause", "same_server"]

PAUSE_MAX = 1.0  # seconds: HAProxy's turn-around timer is at most one second


class _State(Protocol):
    up: bool
    admin: str
    weight: int
    active: int
    limit: int


def same_server(tried: Sequence[_State], retries: int, redispatch: bool, servers: int) -> bool:
    """Whether the next attempt, after `tried` failed, goes to the last server again."""
    last = tried[-1]
    if not (last.up and last.admin == "ready" and last.weight > 0):
        return False  # taken out meanwhile (health check, runtime API): another one
    if last.limit and last.active >= last.limit:
        return False  # its maxconn was reached meanwhile: another one, or the queue
    final = len(tried) == retries  # the next attempt is the last retry
    return not (final and redispatch and servers > 1)


def pause(timed_out: bool, connect_timeout: float) -> float:
    """Seconds to wait before retrying the same server."""
    return 0.0 if timed_out else min(connect_timeout, PAUSE_MAX)
