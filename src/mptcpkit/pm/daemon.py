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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_LINK,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from mptcpkit.pm import netns as _netns
from mptcpkit.pm import state as _state
from mptcpkit.pm.api import PathManager, UserspacePMUnavailable
from mptcpkit.pm.codec import Endpoint, Event, EventType
from mptcpkit.pm.config import Config, backoff
from mptcpkit.pm.config import check as config_check
from mptcpkit.pm.events import EventStream
from mptcpkit.pm.transport import PMError
from mptcpkit.pm.userspace import Conn, UserspaceMode

log = logging.getLogger("mptcpkit.pmd")

IFF_UP = 0x1
IFF_RUNNING = 0x40
IFA_F_TENTATIVE = 0x40
RT_SCOPE_UNIVERSE = 0
SUPPRESS_SECONDS = 2.0


def rtnl_dump(msg: Any, mtype: int) -> list[Any]:
    """One rtnetlink dump (links or addresses) on a short-lived blocking socket."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0) as sock:
        sock.bind((0, 0))
        msg["header"]["type"] = mtype
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
        msg["header"]["sequence_number"] = 1
        msg.encode()
        sock.send(msg.data)
        marshal = MarshalRtnl()
        out: list[Any] = []
        while True:
            for reply in marshal.parse(sock.recv(1 << 16)):
                if reply["header"]["type"] in (NLMSG_DONE, NLMSG_ERROR):
                    return out
                out.append(reply)


class StatusSocketError(OSError):
    """The status socket cannot be created (path not writable, a directory...)."""


class AlreadyRunning(OSError):
    """Another live pmd manages this namespace (its state file names its pid)."""


@dataclasses.dataclass
class Link:
    index: int
    name: str
    running: bool


class Daemon(UserspaceMode):
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

    def _set_sysctl(self, key: str, value: str) -> None:
        old = _netns.read_sysctl(None, key)
        if old is None or old == value:
            return
        self.restore_sysctls.setdefault(key, old)
        self.save()  # the original value is on disk before the change
        _netns.write_sysctl(None, key, value)
        self.decide(f"sysctl {key}={value} (was {old})")

    # ------------------------------------------------------------ state file

    def save(self) -> None:
        if not self.claimed:
            return
        _state.save(
            self.state_path,
            _state.State(
                pid=os.getpid(),
                owned=dict(self.owned),
                parked=dict(self.parked),
                sysctls=dict(self.restore_sysctls),
                limits=self.restore_limits,
                local_ids=dict(self.local_ids),
            ),
        )

    def adopt(self) -> None:
        """Take over what a pmd that died owned: its endpoints still in the kernel (same
        id and address), its parked addresses, the original values it would restore."""
        prev = self.previous
        self.claimed = True
        if prev is None:
            self.save()
            return
        assert self.pm is not None
        kernel = {ep.address: ep for ep in self.pm.endpoints()}
        for address, ep in prev.owned.items():
            current = kernel.get(address)
            if current is not None and current.id == ep.id:
                self.owned[address] = current
        for address, ep in prev.parked.items():
            if address not in kernel:
                self.parked[address] = ep
        self.restore_sysctls = dict(prev.sysctls)
        self.restore_limits = prev.limits
        self.local_ids = dict(prev.local_ids)
        self.save()
        originals = ", ".join(f"{k}={v}" for k, v in sorted(prev.sysctls.items()))
        self.decide(
            f"adopted what pmd pid {prev.pid} left: endpoints "
            f"{' '.join(sorted(self.owned)) or '-'}, parked {' '.join(sorted(self.parked)) or '-'}"
            + (f", original {originals}" if originals else "")
        )

    def reconcile(self) -> None:
        """After adopting: endpoints whose address went or whose link went down while no
        pmd was watching are removed (parked if the link is only down)."""
        for address in list(self.owned):
            index = self.addrs.get(address)
            if index is None:
                self._remove_endpoint(address, f"address {address} disappeared", park=False)
            elif not self._usable(index):
                link = self.links.get(index)
                managed = link is not None and self.config.wants(link.name)
                why = f"link {self._ifname(index)} " + ("down" if managed else "not managed")
                self._remove_endpoint(address, why, park=managed)
        for address in [a for a in self.parked if a not in self.addrs]:
            del self.parked[address]
        self.save()

    async def start(self) -> None:
        cfg = self.config
        try:
            self.preflight()
            await self._start_status()  # first: a bad path must fail before any change
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

    def _initial_dump(self) -> None:
        for msg in rtnl_dump(ifinfmsg(), RTM_GETLINK):
            self._link_msg(msg, initial=True)
        for msg in rtnl_dump(ifaddrmsg(), RTM_GETADDR):
            self._addr_msg(msg)
        if self.config.mode == "kernel":
            self._sync_limits()

    def _resync(self) -> None:
        """After lost rtnetlink messages: re-read links (acting on changes) and addresses."""
        for msg in rtnl_dump(ifinfmsg(), RTM_GETLINK):
            self._link_msg(msg)
        current = {}
        for msg in rtnl_dump(ifaddrmsg(), RTM_GETADDR):
            address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if address:
                current[address] = msg
        for address in [a for a in self.addrs if a not in current]:
            self.addrs.pop(address, None)
            self.address_gone(address)
        for msg in current.values():
            self._addr_msg(msg)

    async def _start_status(self) -> None:
        path = self.config.status_path()
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.status_server = await asyncio.start_unix_server(self._serve_status, path)
        except OSError as exc:
            raise StatusSocketError(exc.errno, f"status socket {path}: {exc.strerror}") from None

    async def _serve_status(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            writer.write(json.dumps(self.state()).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

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
            for address, ep in list(self.owned.items()):
                with contextlib.suppress(PMError):
                    self.pm.delete_endpoint(ep.id)
                    self.decide(f"cleanup: removed endpoint {address} id {ep.id}")
            self.owned.clear()
            if self.restore_limits is not None:
                sub, acc = self.restore_limits
                with contextlib.suppress(PMError):
                    self.pm.set_limits(subflows=sub, add_addr_accepted=acc)
                    self.decide(f"cleanup: limits back to subflows {sub} add_addr_accepted {acc}")
            for key, old in self.restore_sysctls.items():
                with contextlib.suppress(OSError):
                    _netns.write_sysctl(None, key, old)
                    self.decide(f"cleanup: sysctl {key}={old}")
            self.restore_sysctls.clear()
            if self.claimed:
                _state.remove(self.state_path)  # all put back: nothing left to adopt
        elif self.claimed:
            self.save()  # cleanup = false: the next pmd adopts what is left
        self.claimed = False
        if self.pm is not None:
            self.pm.close()
            self.pm = None

    # ------------------------------------------------------------ rtnetlink

    def _on_rtnl(self) -> None:
        assert self.rtnl is not None
        while True:
            try:
                data = self.rtnl.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    log.warning("rtnetlink queue overflowed; re-reading links and addresses")
                    self._resync()
                    continue
                raise
            for msg in self.rtnl_marshal.parse(data):
                mtype = msg["header"]["type"]
                try:
                    if mtype in (RTM_NEWLINK, RTM_DELLINK):
                        self._link_msg(msg)
                    elif mtype in (RTM_NEWADDR, RTM_DELADDR):
                        self._addr_msg(msg)
                except PMError as exc:
                    log.error("%s", exc)

    def _link_msg(self, msg: Any, initial: bool = False) -> None:
        index = msg["index"]
        name = msg.get_attr("IFLA_IFNAME") or f"if{index}"
        if msg["header"]["type"] == RTM_DELLINK:
            self.links.pop(index, None)
            return
        running = bool(msg["flags"] & IFF_UP) and bool(msg["flags"] & IFF_RUNNING)
        old = self.links.get(index)
        self.links[index] = Link(index, name, running)
        if not initial and old is not None and old.name != name:
            self.renamed(old, self.links[index])
        if initial or old is None or old.running == running or not self.config.wants(name):
            return
        if running:
            self.link_up(self.links[index])
        else:
            self.link_down(self.links[index])

    def _addr_msg(self, msg: Any) -> None:
        address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if not address or msg["scope"] != RT_SCOPE_UNIVERSE:
            return
        flags = msg.get_attr("IFA_FLAGS") or msg["flags"]
        index = msg["index"]
        if msg["header"]["type"] == RTM_DELADDR:
            self.addrs.pop(address, None)
            self.address_gone(address)
            return
        if flags & IFA_F_TENTATIVE:
            return
        self.addrs[address] = index
        self.address_added(address, index)

    # ------------------------------------------------------------ kernel mode

    def _ifname(self, index: int) -> str:
        link = self.links.get(index)
        return link.name if link else f"if{index}"

    def _usable(self, index: int) -> bool:
        link = self.links.get(index)
        return bool(link and link.running and self.config.wants(link.name))

    def address_added(self, address: str, index: int, why: str | None = None) -> None:
        if self.config.mode != "kernel" or not self._usable(index):
            return
        if not self.config.manages_address(address):
            return
        if address in self.owned:
            return
        assert self.pm is not None
        if address not in self.parked and any(ep.address == address for ep in self.pm.endpoints()):
            if address not in self.foreign:
                self.foreign.add(address)
                self.decide(
                    f"address {address} on {self._ifname(index)}: "
                    "an endpoint exists already (not ours), leaving it"
                )
            return
        why = why or f"address {address} appeared on {self._ifname(index)}"
        self._add_endpoint(address, index, why)

    def _add_endpoint(self, address: str, index: int, why: str) -> None:
        assert self.pm is not None
        name = self._ifname(index)
        flags = self.config.flags_for(name)
        ep = self.pm.add_endpoint(address, flags=flags, dev=name)
        self.owned[address] = ep
        self.parked.pop(address, None)
        self.save()
        self.decide(f"{why}: added endpoint {ep}")
        self._sync_limits()

    def _remove_endpoint(self, address: str, why: str, park: bool) -> None:
        assert self.pm is not None
        ep = self.owned.pop(address, None)
        if ep is None:
            return
        self.suppress[address] = time.monotonic() + SUPPRESS_SECONDS
        with contextlib.suppress(PMError):
            self.pm.delete_endpoint(ep.id)
        if park:
            self.parked[address] = ep
        self.save()
        self.decide(f"{why}: removed endpoint {ep}")

    def address_gone(self, address: str) -> None:
        if self.parked.pop(address, None) is not None:
            self.save()
        self._cancel(("ep", address))
        if self.config.mode == "kernel":
            self._remove_endpoint(address, f"address {address} disappeared", park=False)

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

    def _sync_limits(self) -> None:
        """Raise limits to what the managed endpoints need ("auto"), or to the config."""
        assert self.pm is not None
        cfg = self.config
        current = self.pm.limits()
        n = len(self.owned) + len(self.parked)
        subflows = cfg.subflows if cfg.subflows is not None else max(current.subflows, min(8, n))
        accepted = (
            cfg.add_addr_accepted
            if cfg.add_addr_accepted is not None
            else max(current.add_addr_accepted, min(8, n))
        )
        if (subflows, accepted) != (current.subflows, current.add_addr_accepted):
            if self.restore_limits is None:
                self.restore_limits = (current.subflows, current.add_addr_accepted)
                self.save()
            self.pm.set_limits(subflows=subflows, add_addr_accepted=accepted)
            self.decide(f"limits: subflows {subflows} add_addr_accepted {accepted}")

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

    def _readd(self, address: str) -> None:
        index = self.addrs.get(address)
        if index is None or not self._usable(index) or address not in self.owned:
            return
        self._remove_endpoint(address, "re-creating subflows", park=False)
        self._add_endpoint(address, index, "re-creating subflows")


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


def namespace_addresses(netns: str | None) -> dict[str, str]:
    """Global-scope addresses of a namespace (the current one when None) -> interface."""
    with _netns.entered(netns):
        names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in rtnl_dump(ifinfmsg(), RTM_GETLINK)}
        out = {}
        for m in rtnl_dump(ifaddrmsg(), RTM_GETADDR):
            address = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
            if address and m["scope"] == RT_SCOPE_UNIVERSE:
                out[address] = names.get(m["index"]) or f"if{m['index']}"
        return out


def status(path: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running pmd for its state through its unix socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    state: dict[str, Any] = json.loads(b"".join(chunks))
    return state
