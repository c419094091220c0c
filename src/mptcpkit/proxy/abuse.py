"""Abuse limits of a frontend, in HAProxy's terms (pure bookkeeping, per worker).

- `maxconnrate`: new connections per second (HAProxy's `maxconnrate` / `rate-limit
  sessions`), shared out between the workers as `maxconn` is. Over it, a worker stops
  accepting until its next one-second window: clients wait in the kernel's backlog.
- `maxconn-per-source`: connections at once from one client address (HAProxy's
  `tcp-request connection reject if { src_conn_cur ge N }` with an `ip` stick table).
  Counted by each worker, over the addresses it accepted from (the kernel spreads one
  client's connections over the workers); one over it is reset at once, before any
  server is contacted.

The data paths ask `admit()` on accept and `release()` when a connection ends; the
frontend's one-second timer calls `window()`, which says what to log.
"""

from __future__ import annotations

from collections.abc import Hashable

__all__ = ["Limits", "share"]


def share(total: int, workers: int, worker: int) -> int:
    """Worker `worker`'s part of a per-proxy figure (0: no limit); the parts add up."""
    if not total:
        return 0
    return total // workers + (1 if worker < total % workers else 0)


class Limits:
    """One frontend's limits in one worker."""

    __slots__ = ("per_source", "rate", "rate_held", "rejected", "sources")

    def __init__(self, rate: int, per_source: int) -> None:
        self.rate = rate  # this worker's connections per second, 0: no limit
        self.per_source = per_source  # 0: no limit
        self.sources: dict[Hashable, int] = {}
        self.rejected = 0  # since the last window()
        self.rate_held = False  # the rate stopped accepting in this window

    def admit(self, key: Hashable) -> bool:
        """A connection from `key` (its address) was accepted: may it stay?"""
        n = self.sources.get(key, 0)
        if n >= self.per_source:
            self.rejected += 1
            return False
        self.sources[key] = n + 1
        return True

    def release(self, key: Hashable) -> None:
        n = self.sources.get(key, 0) - 1
        if n > 0:
            self.sources[key] = n
        else:
            self.sources.pop(key, None)

    def window(self, name: str) -> list[str]:
        """A second has passed: the events worth a log line, and a fresh window."""
        events = []
        if self.rate_held:
            events.append(
                f"frontend {name}: maxconnrate reached ({self.rate}/s in this worker),"
                " new connections waited in the backlog"
            )
        if self.rejected:
            events.append(
                f"frontend {name}: {self.rejected} connection(s) rejected over"
                f" maxconn-per-source ({self.per_source})"
            )
        self.rate_held = False
        self.rejected = 0
        return events
