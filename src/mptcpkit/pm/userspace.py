"""pmd's userspace mode: per-connection subflows and announcements, by policy.

With `net.mptcp.pm_type=1` the kernel opens no subflow on its own: pmd decides, per
connection, from its policy (`fullmesh`, `per-interface`, `ndiffports`) and the
managed addresses, and re-creates subflows that died. `UserspaceMode` is the part of
`mptcpkit.pm.daemon.Daemon` that does this; the daemon feeds it events and links.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mptcpkit.pm import diag
from mptcpkit.pm.api import PathManager
from mptcpkit.pm.codec import Event
from mptcpkit.pm.config import Config
from mptcpkit.pm.transport import PMError


@dataclasses.dataclass
class Conn:
    """A connection the userspace PM drives."""

    token: int
    family: int
    local: tuple[str, int]
    remote: tuple[str, int]
    server_side: bool
    remotes: dict[str, int] = dataclasses.field(default_factory=dict)  # address -> port
    rem_ids: dict[int, str] = dataclasses.field(default_factory=dict)
    established: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    ports: dict[tuple[str, str], list[tuple[int, int]]] = dataclasses.field(default_factory=dict)
    announced: set[str] = dataclasses.field(default_factory=set)
    pending: set[tuple[str, str]] = dataclasses.field(default_factory=set)  # requested


class UserspaceMode:
    """Connections the userspace PM drives; needs the daemon's state and helpers."""

    config: Config
    pm: PathManager | None
    addrs: dict[str, int]
    conns: dict[int, Conn]
    live_tokens: set[int]
    local_ids: dict[str, int]
    timers: dict[Any, asyncio.TimerHandle]

    def open_connections(self) -> list[diag.Connection]:
        """The namespace's open MPTCP connections; none (and a warning) when the kernel
        cannot list them (no `mptcp_diag`): then only new connections are managed."""
        try:
            return diag.connections()
        except OSError as exc:
            self.decide(
                f"cannot list open connections (sock_diag: {exc.strerror}): "
                "only connections opened from now on are managed"
            )
            return []

    # Provided by the daemon and its other parts (declared only: a stub here would
    # hide their definitions, this class coming first in the daemon's bases).
    if TYPE_CHECKING:

        def decide(self, text: str) -> None: ...
        def save(self) -> None: ...
        def _usable(self, index: int) -> bool: ...
        def _ifname(self, index: int) -> str: ...
        def _schedule(self, key: tuple[Any, ...], why: str, action: Callable[[], None]) -> None: ...

    def rebuild_connections(self) -> None:
        """Userspace mode: the connections open before this pmd started, from sock_diag,
        driven from now on like those it saw being established."""
        found = self.open_connections()
        for c in found:
            conn = Conn(
                token=c.token,
                family=c.family,
                local=c.local,
                remote=c.remote,
                server_side=c.server_side,
            )
            conn.remotes[c.remote[0]] = c.remote[1]
            for sf in c.subflows:
                pair = (sf.local[0], sf.remote[0])
                conn.established.add(pair)
                conn.ports.setdefault(pair, []).append((sf.local[1], sf.remote[1]))
                conn.remotes.setdefault(sf.remote[0], sf.remote[1])
                if sf.remote_id is not None:
                    conn.rem_ids[sf.remote_id] = sf.remote[0]
                if sf.local_id:
                    self.local_ids.setdefault(sf.local[0], sf.local_id)
            self.conns[c.token] = conn
            self.live_tokens.add(c.token)
        if found:
            self.decide(
                f"found {len(found)} open connection(s): "
                + ", ".join(f"{c.token:08x} ({len(c.subflows)} subflows)" for c in found)
            )
            self.save()
        for conn in list(self.conns.values()):
            self._apply_policy(conn, why="found open at start")

    def _local_id(self, address: str) -> int:
        if address not in self.local_ids:
            used = set(self.local_ids.values())
            self.local_ids[address] = next(i for i in range(1, 256) if i not in used)
            self.save()
        return self.local_ids[address]

    def _locals(self, family: int) -> list[tuple[str, int]]:
        """(address, ifindex) of managed running interfaces, in the connection's family."""
        out = []
        for address, index in sorted(self.addrs.items()):
            if not self._usable(index):
                continue
            if (":" in address) != (family == socket.AF_INET6):
                continue
            out.append((address, index))
        return out

    def _conn_established(self, ev: Event) -> None:
        if ev.token is None or ev.saddr is None or ev.daddr is None:
            return
        conn = Conn(
            token=ev.token,
            family=ev.family or socket.AF_INET,
            local=(ev.saddr, ev.sport or 0),
            remote=(ev.daddr, ev.dport or 0),
            server_side=bool(ev.server_side),
        )
        conn.remotes[ev.daddr] = ev.dport or 0
        conn.established.add((ev.saddr, ev.daddr))
        conn.ports[(ev.saddr, ev.daddr)] = [(ev.sport or 0, ev.dport or 0)]
        self.conns[ev.token] = conn
        self.decide(
            f"token {ev.token:08x}: {'server' if conn.server_side else 'client'} connection "
            f"{ev.saddr}:{ev.sport} -> {ev.daddr}:{ev.dport} established"
        )
        self._apply_policy(conn, why="new connection")

    def desired(self, conn: Conn) -> list[tuple[str, str, int, int]]:
        """Subflows the policy wants: (local, remote, remote port, ifindex)."""
        policy = self.config.policy
        locals_ = self._locals(conn.family)
        want: list[tuple[str, str, int, int]] = []
        if policy == "fullmesh":
            for laddr, index in locals_:
                for raddr, rport in sorted(conn.remotes.items()):
                    want.append((laddr, raddr, rport, index))
        elif policy == "per-interface":
            for laddr, index in locals_:
                want.append((laddr, conn.remote[0], conn.remote[1], index))
        return want

    def _apply_policy(self, conn: Conn, why: str) -> None:
        if conn.token not in self.conns:
            return
        assert self.pm is not None
        if conn.server_side:
            if self.config.announce:
                for laddr, _index in self._locals(conn.family):
                    if laddr == conn.local[0] or laddr in conn.announced:
                        continue
                    self.pm.announce(conn.token, laddr, id=self._local_id(laddr))
                    conn.announced.add(laddr)
                    self.decide(f"token {conn.token:08x}: announced {laddr} ({why})")
            return
        if self.config.policy == "ndiffports":
            extra = self.config.ndiffports - len(
                conn.ports.get((conn.local[0], conn.remote[0]), [])
            )
            for _ in range(max(0, extra)):
                self._create(conn, conn.local[0], conn.remote[0], conn.remote[1], None, why)
            return
        for laddr, raddr, rport, index in self.desired(conn):
            if (laddr, raddr) in conn.established or (laddr, raddr) in conn.pending:
                continue
            if ("sf", conn.token, laddr, raddr) in self.timers and why != "retry":
                continue
            self._create(conn, laddr, raddr, rport, index, why)

    def close_subflows(self, on: Callable[[str], bool], where: str, why: str) -> None:
        """Destroy the subflows whose local address satisfies `on` (its link went down,
        or it went away). TCP alone may never notice: a subflow with nothing in flight
        retransmits nothing, so it times out only if data reaches it, and data queued
        once the route is gone may never leave; it would stay ESTABLISHED on a dead path
        for minutes or for good, where kernel mode (removing the endpoint) closes it at
        once. A connection's last subflow is left alone: destroying it cannot help, and
        TCP survives a short flap."""
        assert self.pm is not None
        for conn in list(self.conns.values()):
            here = [(pair, ports) for pair, ports in conn.ports.items() if ports and on(pair[0])]
            if not here:
                continue
            if not any(ports and not on(pair[0]) for pair, ports in conn.ports.items()):
                self.decide(
                    f"token {conn.token:08x}: its subflow on {where} left open ({why}): "
                    "the connection has no other"
                )
                continue
            for (laddr, raddr), ports in here:
                for lport, rport in list(ports):
                    what = f"subflow {laddr}:{lport} -> {raddr}:{rport}"
                    try:
                        self.pm.destroy_subflow(conn.token, (laddr, lport), (raddr, rport))
                    except PMError as exc:
                        self.decide(
                            f"token {conn.token:08x}: {what} not closed ({why}): {exc.strerror}"
                        )
                        continue
                    ports.remove((lport, rport))
                    self.decide(f"token {conn.token:08x}: {what} closed ({why})")
                if not ports:
                    conn.established.discard((laddr, raddr))
                conn.pending.discard((laddr, raddr))

    def _create(
        self, conn: Conn, laddr: str, raddr: str, rport: int, index: int | None, why: str
    ) -> None:
        assert self.pm is not None
        dev = (
            self._ifname(index)
            if index is not None and self.config.policy == "per-interface"
            else None
        )
        lid = self._local_id(laddr) if laddr != conn.local[0] else 0
        try:
            self.pm.create_subflow(conn.token, laddr, (raddr, rport), id=lid or None, dev=dev)
        except PMError as exc:
            self.decide(
                f"token {conn.token:08x}: subflow {laddr} -> {raddr}:{rport} "
                f"failed ({why}): {exc.strerror}"
            )
            key: tuple[Any, ...] = ("sf", conn.token, laddr, raddr)
            if conn.token in self.live_tokens and self.config.resubflow:
                self._schedule(
                    key, "subflow create failed", lambda: self._apply_policy(conn, why="retry")
                )
            return
        conn.pending.add((laddr, raddr))
        self.decide(f"token {conn.token:08x}: subflow {laddr} -> {raddr}:{rport} requested ({why})")
