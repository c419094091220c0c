"""Open sockets inside a named network namespace without forking.

`setns(2)` with CLONE_NEWNET changes only the calling thread, so the thread steps
into the namespace, creates its socket (which stays bound to that namespace for
its whole life) and steps back. pyroute2's own `netns=` forks a helper process
and creates the namespace when it is missing; here a missing name is an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceNotFound(LookupError):
    """The named network namespace does not exist (no /run/netns/NAME)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"network namespace {name!r} does not exist (no {NETNS_RUN_DIR}/{name})")
        self.name = name


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _open_netns(name: str) -> int:
    if not name or "/" in name or name in (".", ".."):
        raise NamespaceNotFound(name)
    try:
        return os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceNotFound(name) from None


def check(name: str | None) -> None:
    """Raise NamespaceNotFound unless `name` is None or an existing namespace."""
    if name is not None:
        os.close(_open_netns(name))


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the body with this thread inside namespace `name` (None: stay put)."""
    if name is None:
        yield
        return
    target = _open_netns(name)
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(target)
        raise
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def enter_process(name: str) -> None:
    """Move the calling thread for good (a daemon does this before starting threads)."""
    fd = _open_netns(name)
    try:
        _setns(fd)
    finally:
        os.close(fd)


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
    path = "/proc/sys/" + key.replace(".", "/")
    with entered(name):
        try:
            with open(path) as f:
                return f.read().strip()
        except FileNotFoundError:
            return None


def write_sysctl(name: str | None, key: str, value: str | int) -> None:
    path = "/proc/sys/" + key.replace(".", "/")
    with entered(name), open(path, "w") as f:
        f.write(str(value))
