"""Enter a named network namespace from one thread, without forking.

`setns(2)` with CLONE_NEWNET changes only the calling thread: a thread steps into a
namespace, makes its sockets there (they stay in that namespace for their whole life)
and steps back. Python 3.11 has no `os.setns`, so this goes through libc. Named
namespaces are those of `ip netns` (files in /run/netns).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


class NamespaceNotFound(FileNotFoundError, LookupError):
    """The named network namespace does not exist (no /run/netns/NAME).

    An OSError (ENOENT), so `except OSError` around namespace work catches it; still a
    LookupError, as it always was."""

    def __init__(self, name: str) -> None:
        super().__init__(
            errno.ENOENT,
            f"network namespace {name!r} does not exist (no {NETNS_RUN_DIR}/{name})",
        )
        self.name = name

    def __str__(self) -> str:
        return str(self.strerror)


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at `fd`."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def open_netns(name: str) -> int:
    """A close-on-exec descriptor of namespace `name`; NamespaceNotFound if missing."""
    if not name or "/" in name or name in (".", ".."):
        raise NamespaceNotFound(name)
    try:
        return os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NamespaceNotFound(name) from None


@contextlib.contextmanager
def entered(name: str | None) -> Iterator[None]:
    """Run the block with this thread inside namespace `name` (None: stay where it is);
    the thread's own namespace comes back afterwards, however the block ends."""
    if name is None:
        yield
        return
    target = open_netns(name)
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        os.close(target)
        raise
    try:
        setns(target)
        try:
            yield
        finally:
            setns(home)
    finally:
        os.close(target)
        os.close(home)


def enter_for_good(name: str) -> None:
    """Move the calling thread into `name` for good (a daemon, before it starts threads)."""
    fd = open_netns(name)
    try:
        setns(fd)
    finally:
        os.close(fd)
