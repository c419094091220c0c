"""Open sockets inside a named network namespace without forking.

Entering is `mptcpkit.netns.entered` (a per-thread setns, no fork). pyroute2's own
`netns=` forks a helper process and creates the namespace when it is missing; here a
missing name is an error.
"""

from __future__ import annotations

import errno
import socket

from mptcpkit.netns import NamespaceNotFound, entered
from mptcpkit.netns import enter_for_good as enter_process
from mptcpkit.support import read_sysctl as read_sysctl_here

__all__ = [
    "NamespaceNotFound",
    "create_socket",
    "enter_process",
    "entered",
    "if_indextoname",
    "if_nametoindex",
    "read_sysctl",
    "write_sysctl",
]


def create_socket(name: str | None, family: int, type: int, proto: int = 0) -> socket.socket:
    """A socket living in namespace `name` (the current one when None)."""
    with entered(name):
        return socket.socket(family, type, proto)


def if_nametoindex(name: str | None, ifname: str) -> int:
    """Interface index of `ifname` inside namespace `name`; OSError(ENODEV) if unknown."""
    with entered(name):
        try:
            return socket.if_nametoindex(ifname)
        except OSError:
            raise OSError(errno.ENODEV, f"no interface {ifname!r}") from None


def if_indextoname(name: str | None, index: int) -> str | None:
    with entered(name):
        try:
            return socket.if_indextoname(index)
        except OSError:
            return None


def read_sysctl(name: str | None, key: str) -> str | None:
    """Read a sysctl (dotted key) as seen from namespace `name`; None if absent."""
    with entered(name):
        return read_sysctl_here(key)


def write_sysctl(name: str | None, key: str, value: str | int) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    with entered(name), open(path, "w") as f:
        f.write(str(value))
