"""Which idle timeout cuts a relayed connection, in HAProxy's words (pure).

HAProxy names its timeouts by side and phase; a TCP proxy has three phases:

- connecting: `timeout connect`, per server attempt (relay.py / the engine's timerfd);
  `timeout client` while a PROXY header is awaited;
- relaying, both directions open: `timeout tunnel` when set, else the client and
  server inactivity limits (`timeout client`, `timeout server`; the smaller cuts);
- half-closed (a FIN has crossed one way): `timeout client-fin` / `timeout server-fin`
  take the place of the client's / server's limit when set.

"Idle" is no byte relayed either way. The worker's sweep counts it; `tick()` says how
often it must run so a sub-second limit is kept to within an eighth of itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mptcpkit.proxy.configmodel import Timeouts

__all__ = ["IdleRules", "idle_rules", "tick"]

MAX_TICK = 1.0  # the sweep's period when no timeout is short
MIN_TICK = 0.01


@dataclass(frozen=True)
class IdleRules:
    """The idle limit (None: none) and how a connection cut by it ended, per phase."""

    open_limit: float | None
    open_how: str
    fin_limit: float | None
    fin_how: str


def _smallest(*sides: tuple[str, float | None]) -> tuple[float | None, str]:
    best: tuple[float | None, str] = (None, "")
    for word, limit in sides:
        if limit is not None and (best[0] is None or limit < best[0]):
            best = (limit, f"{word} timeout ({limit:g}s idle)")
    return best


def idle_rules(t: Timeouts) -> IdleRules:
    if t.tunnel is not None:
        client: tuple[str, float | None] = ("tunnel", t.tunnel)
        server: tuple[str, float | None] = ("tunnel", t.tunnel)
    else:
        client, server = ("client", t.client), ("server", t.server)
    open_limit, open_how = _smallest(client, server)
    fin_limit, fin_how = _smallest(
        ("client-fin", t.client_fin) if t.client_fin is not None else client,
        ("server-fin", t.server_fin) if t.server_fin is not None else server,
    )
    return IdleRules(open_limit, open_how, fin_limit, fin_how)


def tick(all_timeouts: Iterable[Timeouts]) -> float:
    """The sweep's period: a second, or an eighth of the shortest idle limit."""
    shortest = MAX_TICK * 8
    for t in all_timeouts:
        for v in (t.client, t.server, t.tunnel, t.client_fin, t.server_fin, t.queue):
            if v is not None and v > 0:
                shortest = min(shortest, v)
    return max(MIN_TICK, min(MAX_TICK, shortest / 8))
