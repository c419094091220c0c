"""`mptcpkit pmd`: a path-manager daemon, for clients, servers and routers.

Kernel mode keeps in-kernel PM endpoints in step with addresses and links:
endpoint added when an address appears on a managed, running interface, removed
when it disappears or its link goes down, added again when the link comes back —
adding an endpoint makes the kernel open subflows on it for every live
connection, which is how a subflow that died gets re-created (the kernel alone
never retries). Userspace mode (`net.mptcp.pm_type=1`) creates subflows itself
per connection by policy and re-creates dead ones with backoff.

Everything the daemon decides is logged; `mptcpkit pmd status` reads its state
from a unix socket. SIGTERM stops it; with `cleanup = true` it removes what it
added and restores what it changed. What it owns and the original values it will
restore live in a state file (`mptcpkit.pm.state`), so a pmd started after a crash
adopts them, and it re-reads open connections from the kernel (`mptcpkit.pm.diag`).

`Daemon` is assembled from its parts: rtnl.py follows links and addresses,
kernelmode.py and userspace.py are the two modes, ownership.py is what must be put
back, statussock.py answers `pmd status`; this module reacts to changes and events.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
)
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from mptcpkit.pm import netns as _netns
from mptcpkit.pm import state as _state
from mptcpkit.pm import statussock
from mptcpkit.pm.api import PathManager, UserspacePMUnavailable
from mptcpkit.pm.codec import Endpoint, Event, EventType
from mptcpkit.pm.config import Config, backoff
from mptcpkit.pm.config import check as config_check
from mptcpkit.pm.events import EventStream
from mptcpkit.pm.kernelmode import KernelMode
from mptcpkit.pm.ownership import Ownership
from mptcpkit.pm.rtnl import Link, LinkWatch
from mptcpkit.pm.transport import PMError
from mptcpkit.pm.userspace import Conn, UserspaceMode

log = logging.getLogger("mptcpkit.pmd")


class AlreadyRunning(OSError):
    """Another live pmd manages this namespace (its state file names its pid)."""


class Daemon(UserspaceMode, KernelMode, Ownership, LinkWatch):
    """One pmd: watches links, addresses and mptcp_pm events, keeps its state file."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.links: dict[int, Link] = {}
        self.addrs: dict[str, int] = {}  # address -> ifindex
        self.owned: dict[str, Endpoint] = {}  # endpoints pmd added (kernel mode)
        self.parked: dict[str, Endpoint] = {}  # removed because the link went down
        self.foreign: set[str] = set()  # addresses with endpoints pmd did not add
        self.suppress: dict[str, float] = {}  # address -> ignore SUB_CLOSED until
        self.live_tokens: set[int] = set()
        self.conns: dict[int, Conn] = {}
        self.local_ids: dict[str, int] = {}
        self.attempts: dict[Any, int] = {}
        self.timers: dict[Any, asyncio.TimerHandle] = {}
        self.decisions: list[str] = []
        self.restore_sysctls: dict[str, str] = {}
        self.restore_limits: tuple[int, int] | None = None
        self.state_path = config.state_path()
        self.previous: _state.State | None = None  # left by a pmd that died
        self.claimed = False  # the state file is ours to write and remove
        self.started = time.time()
        self.pm: PathManager | None = None
        self.events: EventStream | None = None
        self.rtnl: socket.socket | None = None
        self.rtnl_marshal = MarshalRtnl()
        self.status_server: asyncio.AbstractServer | None = None
        self.stopping = asyncio.Event()

    # ------------------------------------------------------------ logging

    def decide(self, text: str) -> None:
        log.info("%s", text)
        self.decisions.append(f"{time.strftime('%H:%M:%S')} {text}")
        del self.decisions[:-50]

    # ------------------------------------------------------------ start / stop

    def preflight(self) -> None:
        """Everything that can fail for a usage reason, before anything is changed."""
        cfg = self.config
        self.pm = PathManager()
        self.pm.endpoints()  # needs CAP_NET_ADMIN: EPERM or a missing family surface here
        if cfg.mode == "userspace":
            self.pm.check_userspace()
        if (
            cfg.load_balancer
            and _netns.read_sysctl(None, "net.mptcp.allow_join_initial_addr_port") is None
        ):
            raise UserspacePMUnavailable(
                errno.EOPNOTSUPP,
                "load_balancer needs net.mptcp.allow_join_initial_addr_port (Linux 5.16+)",
            )
        if os.geteuid() != 0:
            raise PMError(errno.EPERM, "pmd changes sysctls and endpoints: run it as root")
        self.previous = _state.load(self.state_path)
        if self.previous is not None and _state.pid_is_pmd(self.previous.pid):
            raise AlreadyRunning(
                errno.EBUSY,
                f"pmd pid {self.previous.pid} already manages this namespace "
                f"(state file {self.state_path})",
            )

    async def start(self) -> None:
        cfg = self.config
        try:
            self.preflight()
            self.status_server = await statussock.listen(
                self.config.status_path(), self.state
            )  # first: a bad path must fail before any change
            self.adopt()
            if cfg.mode == "userspace":
                self._set_sysctl("net.mptcp.pm_type", "1")
            if cfg.load_balancer:
                self._set_sysctl("net.mptcp.allow_join_initial_addr_port", "0")
            self.events = EventStream(None)
            self.rtnl = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK, 0
            )
            self.rtnl.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self.rtnl.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            self._initial_dump()
            self.reconcile()
            addresses = {a: self._ifname(i) for a, i in self.addrs.items()}
            for warning in config_check(cfg, addresses):
                log.warning("warning: %s", warning)
            if cfg.mode == "userspace":
                self.rebuild_connections()
            else:  # subflows of connections open before this pmd are repaired too
                self.live_tokens.update(c.token for c in self.open_connections())
            loop = asyncio.get_running_loop()
            loop.add_reader(self.rtnl.fileno(), self._on_rtnl)
            loop.add_reader(self.events.fileno(), self._on_events)
            managed = sorted(link.name for link in self.links.values() if cfg.wants(link.name))
            self.decide(
                f"started: mode={cfg.mode} netns={cfg.netns or '-'} "
                f"managing {', '.join(managed) or 'no interfaces'}"
            )
        except BaseException:
            self.cleanup(undo=True)  # never half-started, whatever `cleanup` says
            raise

    def state(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "pid": os.getpid(),
            "mode": cfg.mode,
            "netns": cfg.netns,
            "uptime": round(time.time() - self.started, 1),
            "interfaces": {
                link.name: {"running": link.running, "managed": cfg.wants(link.name)}
                for link in sorted(self.links.values(), key=lambda link: link.index)
            },
            "endpoints": [ep.to_json() for ep in sorted(self.owned.values())],
            "parked": sorted(self.parked),
            "connections": [
                {
                    "token": f"{c.token:08x}",
                    "local": list(c.local),
                    "remote": list(c.remote),
                    "server_side": c.server_side,
                    "subflows": sorted(f"{a}->{b}" for a, b in c.established),
                }
                for c in self.conns.values()
            ],
            "pending_retries": len(self.timers),
            "state_file": self.state_path,
            "decisions": self.decisions[-20:],
        }

    def cleanup(self, undo: bool | None = None) -> None:
        """Stop watching; undo what pmd did if configured to (or `undo`). Safe twice."""
        undo = self.config.cleanup if undo is None else undo
        loop = None
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
        for handle in self.timers.values():
            handle.cancel()
        self.timers.clear()
        if self.rtnl is not None:
            if loop is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(self.rtnl.fileno())
            self.rtnl.close()
            self.rtnl = None
        if self.events is not None:
            if loop is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(self.events.fileno())
            self.events.close()
            self.events = None
        if self.status_server is not None:
            self.status_server.close()
            self.status_server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.status_path())
        if undo and self.pm is not None:
            self.undo()
        elif self.claimed:
            self.save()  # cleanup = false: the next pmd adopts what is left
        self.claimed = False
        if self.pm is not None:
            self.pm.close()
            self.pm = None

    # ------------------------------------------------------------ links and addresses

    def address_gone(self, address: str) -> None:
        if self.parked.pop(address, None) is not None:
            self.save()
        self._cancel(("ep", address))
        if self.config.mode == "kernel":
            self._remove_endpoint(address, f"address {address} disappeared", park=False)
        else:
            self.close_subflows(lambda a: a == address, address, f"address {address} disappeared")

    def renamed(self, old: Link, new: Link) -> None:
        """An interface got a new name; it is the same interface (same ifindex), so its
        endpoints follow it, unless the configuration does not manage the new name."""
        was, now = self.config.wants(old.name), self.config.wants(new.name)
        self.decide(
            f"link {old.name} renamed {new.name}"
            + ("" if was == now else (" (now managed)" if now else " (no longer managed)"))
        )
        for table in (self.owned, self.parked):
            for address, ep in list(table.items()):
                if ep.ifindex == new.index:
                    table[address] = dataclasses.replace(ep, ifname=new.name)
        if was and not now:
            for address, ep in list(self.owned.items()):
                if ep.ifindex == new.index:
                    self._remove_endpoint(address, f"{new.name} not managed", park=False)
            for address in [a for a, ep in self.parked.items() if ep.ifindex == new.index]:
                del self.parked[address]
            for key in [k for k in self.timers if self._key_ifindex(k) == new.index]:
                self._cancel(key)
            self.save()
        elif now and not was and old.running == new.running and new.running:
            self.link_up(new)  # what the link would have got had it always been managed

    def link_down(self, link: Link) -> None:
        self.decide(f"link {link.name} down")
        if self.config.mode == "kernel":
            for address, ep in list(self.owned.items()):
                if ep.ifindex == link.index:
                    self._remove_endpoint(address, f"link {link.name} down", park=True)
        else:
            self.close_subflows(
                lambda a: self.addrs.get(a) == link.index, link.name, f"link {link.name} down"
            )
        for key in [k for k in self.timers if self._key_ifindex(k) == link.index]:
            self._cancel(key)

    def link_up(self, link: Link) -> None:
        self.decide(f"link {link.name} up")
        for key in [k for k in self.attempts if self._key_ifindex(k) == link.index]:
            del self.attempts[key]  # a path that changed deserves fresh attempts
        if self.config.mode == "kernel":
            for address, index in list(self.addrs.items()):
                if index == link.index:
                    self.address_added(address, index, f"link {link.name} up")
        else:
            for conn in list(self.conns.values()):
                self._apply_policy(conn, why=f"link {link.name} up")

    def _key_ifindex(self, key: Any) -> int | None:
        if key[0] == "ep":
            return self.addrs.get(key[1])
        if key[0] == "sf":
            return self.addrs.get(key[2])
        return None

    # ------------------------------------------------------------ pm events

    def _on_events(self) -> None:
        assert self.events is not None
        while True:
            event = self.events.poll(0)
            if event is None:
                return
            try:
                self.on_event(event)
            except PMError as exc:
                self.decide(f"failed: {exc}")

    def on_event(self, ev: Event) -> None:
        log.debug("event %s", ev)
        t = ev.type
        if t is EventType.CREATED and ev.token is not None:
            self.live_tokens.add(ev.token)
        elif t is EventType.CLOSED and ev.token is not None:
            self.live_tokens.discard(ev.token)
            self.conns.pop(ev.token, None)
            for key in [k for k in self.timers if k[0] == "sf" and k[1] == ev.token]:
                self._cancel(key)
        elif t is EventType.SUB_ESTABLISHED:
            self._sub_established(ev)
        elif t is EventType.SUB_CLOSED:
            self._sub_closed(ev)
        if self.config.mode != "userspace" or ev.token is None:
            return
        if t is EventType.ESTABLISHED:
            self._conn_established(ev)
        elif t is EventType.ANNOUNCED and ev.token in self.conns and ev.daddr:
            conn = self.conns[ev.token]
            conn.remotes[ev.daddr] = ev.dport or conn.remote[1]
            if ev.rem_id is not None:
                conn.rem_ids[ev.rem_id] = ev.daddr
            self._apply_policy(conn, why=f"peer announced {ev.daddr}")
        elif t is EventType.REMOVED and ev.token in self.conns and ev.rem_id is not None:
            conn = self.conns[ev.token]
            address = conn.rem_ids.pop(ev.rem_id, None)
            if address:
                conn.remotes.pop(address, None)
                self.decide(f"token {ev.token:08x}: peer removed {address}")

    def _sub_established(self, ev: Event) -> None:
        if ev.saddr is None or ev.daddr is None:
            return
        self.attempts.pop(("ep", ev.saddr), None)
        self._cancel(("ep", ev.saddr))
        conn = self.conns.get(ev.token or -1)
        if conn is not None:
            pair = (ev.saddr, ev.daddr)
            conn.pending.discard(pair)
            conn.established.add(pair)
            conn.ports.setdefault(pair, []).append((ev.sport or 0, ev.dport or 0))
            self.attempts.pop(("sf", conn.token, ev.saddr, ev.daddr), None)

    def _sub_closed(self, ev: Event) -> None:
        if ev.saddr is None or ev.daddr is None or ev.token not in self.live_tokens:
            return
        conn = self.conns.get(ev.token)
        if conn is not None:
            pair = (ev.saddr, ev.daddr)
            conn.pending.discard(pair)
            ports = conn.ports.get(pair, [])
            with contextlib.suppress(ValueError):
                ports.remove((ev.sport or 0, ev.dport or 0))
            if not ports:
                conn.established.discard(pair)
        if not self.config.resubflow or time.monotonic() < self.suppress.get(ev.saddr, 0):
            return
        what = f"subflow {ev.saddr} -> {ev.daddr} of {ev.token:08x}"
        if not ev.error:
            # Closed on purpose (by us, the peer or an RM_ADDR): nothing to repair.
            log.debug("%s closed without error, not re-creating", what)
            return
        why = f"{what} died ({os.strerror(ev.error)})"
        if conn is not None:
            key: tuple[Any, ...] = ("sf", conn.token, ev.saddr, ev.daddr)
            self._schedule(key, why, lambda: self._apply_policy(conn, why="retry"))
        elif self.config.mode == "kernel" and ev.saddr in self.owned:
            address = ev.saddr
            self._schedule(("ep", address), why, lambda: self._readd(address))

    def _schedule(self, key: tuple[Any, ...], why: str, action: Callable[[], None]) -> None:
        index = self._key_ifindex(key)
        if index is not None and not self._usable(index):
            self.decide(f"{why}: path down, waiting for it to come back")
            return
        if key in self.timers:
            return
        attempt = self.attempts.get(key, 0)
        if attempt >= self.config.max_attempts:
            self.decide(f"{why}: giving up after {attempt} attempts")
            return
        delay = backoff(attempt, self.config.backoff_initial, self.config.backoff_max)
        self.attempts[key] = attempt + 1
        self.decide(f"{why}: retry {attempt + 1} in {delay:g}s")

        def fire() -> None:
            self.timers.pop(key, None)
            try:
                action()
            except PMError as exc:
                self.decide(f"retry failed: {exc}")

        self.timers[key] = asyncio.get_running_loop().call_later(delay, fire)

    def _cancel(self, key: Any) -> None:
        handle = self.timers.pop(key, None)
        if handle is not None:
            handle.cancel()


async def serve(config: Config, ready: Callable[[], None] | None = None) -> None:
    """Run until SIGTERM/SIGINT; `ready` is called once the daemon is watching.

    The signal handlers come first: a SIGTERM that arrives while pmd is starting stops
    it, cleanly, once started (instead of killing it half-way)."""
    daemon = Daemon(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stopping.set)
    try:
        await daemon.start()
        if ready is not None:
            ready()
        await daemon.stopping.wait()
        daemon.decide("stopping")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        daemon.cleanup()


def run(config: Config, ready: Callable[[], None] | None = None) -> None:
    """Enter the configured namespace (the whole process), then serve."""
    if config.netns:
        _netns.enter_process(config.netns)
    asyncio.run(serve(config, ready))
