"""What pmd changed and must put back: its state file, adoption, and the undo.

pmd writes down what it owns (endpoints, parked addresses) and the original values
of what it changed (sysctls, limits) before changing them (`mptcpkit.pm.state`), so
that a pmd started after a crash adopts them, and a clean stop with `cleanup = true`
puts everything back. `Ownership` is that part of `mptcpkit.pm.daemon.Daemon`.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from mptcpkit.pm import netns as _netns
from mptcpkit.pm import state as _state
from mptcpkit.pm.api import PathManager
from mptcpkit.pm.codec import Endpoint
from mptcpkit.pm.transport import PMError


class Ownership:
    """The state file and what it records; needs the daemon's state."""

    pm: PathManager | None
    owned: dict[str, Endpoint]
    parked: dict[str, Endpoint]
    local_ids: dict[str, int]
    restore_sysctls: dict[str, str]
    restore_limits: tuple[int, int] | None
    state_path: str
    previous: _state.State | None
    claimed: bool

    if TYPE_CHECKING:  # provided by the daemon

        def decide(self, text: str) -> None: ...

    def _set_sysctl(self, key: str, value: str) -> None:
        old = _netns.read_sysctl(None, key)
        if old is None or old == value:
            return
        self.restore_sysctls.setdefault(key, old)
        self.save()  # the original value is on disk before the change
        _netns.write_sysctl(None, key, value)
        self.decide(f"sysctl {key}={value} (was {old})")

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

    def undo(self) -> None:
        """Put back what pmd changed: its endpoints, the limits, the sysctls; then the
        state file goes (nothing left to adopt)."""
        assert self.pm is not None
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
