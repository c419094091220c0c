"""A program's descriptors as /proc shows them: which numbers hold a socket, who watches it.

When the supervisor swaps an MPTCP socket for plain TCP, every descriptor of that
socket in the calling process must get the new one (a dup, Go's `File()`), and every
epoll set that watched it (Go's netpoller, libuv, asyncio) must watch the new socket
with the same events and user data, or an edge-triggered event loop would wait forever.
`/proc/<pid>/fdinfo/<epfd>` lists each watch as
`tfd: N events: HEX data: HEX pos:N ino:HEX sdev:HEX`. The replacement keeps each
descriptor's close-on-exec flag (fdinfo `flags:`), and the supervisor reaches the
thread's own descriptor table through a pidfd (PIDFD_THREAD where the kernel has it).
"""

from __future__ import annotations

import errno
import os
import re

from mptcpkit.run import syscalls

_WATCH = re.compile(
    rb"^tfd:\s*(\d+)\s+events:\s*([0-9a-f]+)\s+data:\s*([0-9a-f]+)\s+pos:\S*\s+ino:([0-9a-f]+)",
    re.MULTILINE,
)


def process_fds(pid: int, ino: int, fd: int) -> list[int]:
    """`fd` and every other descriptor of `pid` that holds socket inode `ino`."""
    found = [fd]
    link = f"socket:[{ino}]"
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in names:
        other = int(name)
        if other != fd:
            try:
                if os.readlink(f"/proc/{pid}/fd/{name}") == link:
                    found.append(other)
            except OSError:
                continue
    return found


def epoll_watches(pid: int, fds: set[int], ino: int) -> list[tuple[int, int, int]]:
    """(epoll fd, events, data) of each epoll set of `pid` watching one of `fds` (inode `ino`)."""
    found: list[tuple[int, int, int]] = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/{pid}/fdinfo/{name}", "rb") as f:
                text = f.read()
        except OSError:
            continue
        for watch in parse_epoll_fdinfo(text):
            tfd, events, data, watched_ino = watch
            if tfd in fds and watched_ino == ino:
                found.append((int(name), events, data))
    return found


def parse_epoll_fdinfo(text: bytes) -> list[tuple[int, int, int, int]]:
    """(tfd, events, data, ino) of each `tfd:` line of an epoll descriptor's fdinfo."""
    return [(int(m[1]), int(m[2], 16), int(m[3], 16), int(m[4], 16)) for m in _WATCH.finditer(text)]


def pidfd_of_thread(tid: int, tgid: int) -> int:
    """A pidfd whose descriptor table is the thread's (PIDFD_THREAD, 6.9+), else its process's."""
    try:
        return syscalls.pidfd_open(tid, syscalls.PIDFD_THREAD)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return syscalls.pidfd_open(tgid)


def fd_cloexec(pid: int, fd: int) -> int:
    """O_CLOEXEC if descriptor `fd` of `pid` is close-on-exec (from /proc fdinfo)."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"flags:"):
                    return os.O_CLOEXEC if int(line.split()[1], 8) & os.O_CLOEXEC else 0
    except OSError:
        pass
    return 0
