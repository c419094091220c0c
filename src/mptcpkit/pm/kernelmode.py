"""pmd's kernel mode: in-kernel PM endpoints kept in step with addresses and links.

An endpoint is added when an address appears on a managed, running interface and
removed when it goes or its link goes down (parked, to come back with the link);
re-adding one makes the kernel open subflows on it again, which is how pmd repairs a
subflow that died. `KernelMode` is the part of `mptcpkit.pm.daemon.Daemon` that does
this, as `UserspaceMode` (userspace.py) is for `pm_type=1`.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

from mptcpkit.pm.api import PathManager
from mptcpkit.pm.codec import Endpoint
from mptcpkit.pm.config import Config
from mptcpkit.pm.rtnl import Link
from mptcpkit.pm.transport import PMError

SUPPRESS_SECONDS = 2.0


class KernelMode:
    """Endpoints pmd adds and removes; needs the daemon's state and helpers."""

    config: Config
    pm: PathManager | None
    links: dict[int, Link]
    addrs: dict[str, int]
    owned: dict[str, Endpoint]
    parked: dict[str, Endpoint]
    foreign: set[str]
    suppress: dict[str, float]
    restore_limits: tuple[int, int] | None

    if TYPE_CHECKING:  # provided by the daemon

        def decide(self, text: str) -> None: ...
        def save(self) -> None: ...
        def _usable(self, index: int) -> bool: ...
        def _ifname(self, index: int) -> str: ...

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

    def _readd(self, address: str) -> None:
        index = self.addrs.get(address)
        if index is None or not self._usable(index) or address not in self.owned:
            return
        self._remove_endpoint(address, "re-creating subflows", park=False)
        self._add_endpoint(address, index, "re-creating subflows")

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
