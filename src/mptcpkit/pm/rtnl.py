"""rtnetlink for pmd: the namespace's links and addresses, dumped and followed.

pmd acts on links going up or down, being renamed, and on addresses coming and going;
this module reads those from the kernel (a dump at start and after lost messages, then
the multicast groups) and keeps pmd's picture of them (`links`, `addrs`). What pmd
does about a change is the daemon's (daemon.py): `LinkWatch` calls it back.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import socket
from typing import TYPE_CHECKING, Any

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from mptcpkit.pm import netns as _netns
from mptcpkit.pm.config import Config
from mptcpkit.pm.transport import PMError

log = logging.getLogger("mptcpkit.pmd")

IFF_UP = 0x1
IFF_RUNNING = 0x40
IFA_F_TENTATIVE = 0x40
RT_SCOPE_UNIVERSE = 0


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


@dataclasses.dataclass
class Link:
    index: int
    name: str
    running: bool


class LinkWatch:
    """pmd's links and addresses, kept in step with rtnetlink; needs the daemon's
    reactions to changes."""

    config: Config
    links: dict[int, Link]
    addrs: dict[str, int]  # address -> ifindex
    rtnl: socket.socket | None
    rtnl_marshal: MarshalRtnl

    if TYPE_CHECKING:  # provided by the daemon

        def renamed(self, old: Link, new: Link) -> None: ...
        def link_up(self, link: Link) -> None: ...
        def link_down(self, link: Link) -> None: ...
        def address_added(self, address: str, index: int, why: str | None = None) -> None: ...
        def address_gone(self, address: str) -> None: ...
        def _sync_limits(self) -> None: ...

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

    def _ifname(self, index: int) -> str:
        link = self.links.get(index)
        return link.name if link else f"if{index}"

    def _usable(self, index: int) -> bool:
        link = self.links.get(index)
        return bool(link and link.running and self.config.wants(link.name))


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
