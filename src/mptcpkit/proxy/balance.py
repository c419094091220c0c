"""Choosing a server: roundrobin, leastconn, source; and the rise/fall health state.

Pure bookkeeping, no I/O: the relay asks `pick()`, reports `started()/finished()`,
and the health checker feeds `ServerState.observe()`.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Collection, Sequence

from mptcpkit.proxy.configmodel import Backend, HealthCheck, Server
from mptcpkit.proxy.slowstart import came_up, effective_weight

__all__ = ["Balancer", "ServerState"]


class ServerState:
    """One server's live state: up/down (rise/fall), active connections, WRR credit;
    `admin` ("ready", "drain", "maint") and `weight` as the runtime API set them."""

    __slots__ = (
        "active",
        "admin",
        "check",
        "credit",
        "fails",
        "limit",
        "oks",
        "ramp_until",
        "resolved",
        "server",
        "total",
        "up",
        "weight",
    )

    def __init__(self, server: Server, check: HealthCheck | None = None) -> None:
        self.server = server
        self.check = check
        self.up = True  # like HAProxy: servers start up, checks may take them down
        self.active = 0
        self.limit = 0  # this worker's part of the server's maxconn; 0: none (queue.py)
        self.total = 0  # connections sent to it
        self.admin = "ready"
        self.weight = server.weight
        self.credit = 0
        self.oks = 0
        self.fails = 0
        self.ramp_until = 0.0  # slowstart: its weight ramps up until then (slowstart.py)
        self.resolved = True  # False: init-addr "none" and its name has not resolved yet

    def observe(self, ok: bool) -> bool:
        """Feed one health-check result; True when the server changed state."""
        rise = self.check.rise if self.check else 1
        fall = self.check.fall if self.check else 1
        if ok:
            self.fails = 0
            self.oks += 1
            if not self.up and self.oks >= rise:
                self.up = True
                came_up(self)
                return True
        else:
            self.oks = 0
            self.fails += 1
            if self.up and self.fails >= fall:
                self.up = False
                return True
        return False


class Balancer:
    """The servers of one backend and the algorithm that picks among them."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.states = [ServerState(s, backend.check) for s in backend.servers]
        self._algo = backend.balance
        self._slow = any(s.slowstart for s in backend.servers)

    def pick(
        self, client_host: str | None = None, exclude: Collection[ServerState] = ()
    ) -> ServerState | None:
        """The next server, or None when every usable server is down or excluded."""
        states = self.states
        if len(states) == 1 and not exclude:  # one server: nothing to choose
            only = states[0]
            if only.limit and only.active >= only.limit:
                return None
            ok = only.up and only.resolved and only.weight > 0 and only.admin == "ready"
            return only if ok else None
        for backup in (False, True):
            usable = [
                s
                for s in self.states
                if s.up
                and s.resolved
                and s.server.backup == backup
                and s.weight > 0
                and s.admin == "ready"
                and s not in exclude
            ]
            if usable:  # backups only when no primary is usable; full ones: wait (queue)
                cands = [s for s in usable if not (s.limit and s.active >= s.limit)]
                return self._choose(cands, client_host) if cands else None
        return None

    def _choose(self, cands: Sequence[ServerState], client_host: str | None) -> ServerState:
        if len(cands) == 1:
            return cands[0]
        if self._slow:  # a server coming back ramps up (slowstart.py)
            now = time.monotonic()
            weights = [effective_weight(s, now) for s in cands]
        else:
            weights = [s.weight for s in cands]
        if self._algo == "leastconn":
            i = min(range(len(cands)), key=lambda i: (cands[i].active / weights[i], -weights[i]))
            return cands[i]
        if self._algo == "source" and client_host is not None:
            point = zlib.crc32(client_host.encode()) % sum(weights)
            for s, w in zip(cands, weights, strict=True):
                point -= w
                if point < 0:
                    return s
        # Smooth weighted round robin (nginx): spreads heavy servers between light ones.
        total = 0
        best = cands[0]
        for s, w in zip(cands, weights, strict=True):
            s.credit += w
            total += w
            if s.credit > best.credit:
                best = s
        best.credit -= total
        return best
