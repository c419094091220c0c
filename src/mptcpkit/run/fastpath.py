"""The seccomp supervisor's compiled socket() path: `_fastpath` (C) forces, Python decides.

Most trapped calls are plain socket() calls from a thread in the supervisor's own
network namespace with its credentials. `_fastpath.c` answers those without the
interpreter, exactly as `Supervisor._on_socket` would (MPTCP socket made, installed as
the call's result, checked with SECCOMP_IOCTL_NOTIF_ID_VALID), and keeps answering
while more are pending. Everything else is handed back untouched: other calls, other
namespaces or credentials, 32-bit callers, MPTCP refused, a socket that cannot be
installed; the Python supervisor then decides, counts and warns as before. It also
lets an execve()/execveat() go ahead when the file is not setuid, setgid or
file-capability (Supervisor._on_exec's common case: a stat and a getxattr). The C is
`_force.h`, shared with the `_supervise` executable (run/supervise.py), which runs the
same steps as the background supervisor itself, without an interpreter.

Where the kernel has pidfs ioctls (6.13+), the caller's uids, gids and network
namespace come from its pidfd (PIDFD_GET_INFO, PIDFD_GET_NET_NAMESPACE): a few cheap
calls instead of formatting /proc/<tid>/status (the pidfds of the last 16 callers are
kept: a pidfd names one task, never a later one reusing its id). Supplementary groups
are not compared there (Python compares them): a socket records its creator's
fsuid/fsgid and network namespace, never its groups.

It also asks the kernel (6.6+) for synchronous wake-ups on the listener
(SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP): the trapped thread and the supervisor then hand
over on one CPU, as a call and its return would, instead of waking each other on
another.

Optional: without a C compiler the package builds without it and the supervisor is
pure Python. `MPTCPKIT_RUN_FASTPATH=0` turns it off, `=proc` makes it read /proc
(tests run all three).
"""

from __future__ import annotations

import os
from typing import Any

from mptcpkit.run import abi

try:
    from mptcpkit.run import _fastpath  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - built without a C compiler
    _fastpath = None

ENV = "MPTCPKIT_RUN_FASTPATH"

IDLE, SLOW, ERROR = 0, 1, 2


class FastPath:
    def __init__(self, server: Any) -> None:
        self._server = server

    def serve(self) -> tuple[int, bytes | int | None, list[tuple[int, int]]]:
        """Receive and answer what it can, until a call it cannot answer or none is
        pending (call it when the listener polls readable). Returns (IDLE, None,
        forced), (SLOW, the notification for Python, forced) or (ERROR, the receive's
        errno, forced); `forced` lists the sockets forced, as (st_dev, st_ino)."""
        result: tuple[int, bytes | int | None, list[tuple[int, int]]] = self._server.serve()
        return result

    def context_source(self) -> str:
        """'pidfd' or 'proc': where callers' credentials and namespace are read."""
        source: str = self._server.context_source()
        return source


def available() -> bool:
    return _fastpath is not None and os.environ.get(ENV, "1") != "0"


def open_fastpath(
    listener: int,
    arch: abi.Arch,
    *,
    recv_size: int,
    netns: tuple[int, int],
    uids: tuple[int, int, int],
    gids: tuple[int, int, int],
    groups: tuple[int, ...],
    killable: bool,
) -> FastPath | None:
    """A compiled server for `listener`, or None (not built, turned off, or more
    supplementary groups than it compares)."""
    if not available():
        return None
    try:
        server = _fastpath.Server(
            listener,
            recv_size,
            arch.audit_arch,
            arch.socket,
            netns,
            uids,
            gids,
            groups,
            killable,
            (
                abi.SECCOMP_IOCTL_NOTIF_RECV,
                abi.SECCOMP_IOCTL_NOTIF_SEND,
                abi.SECCOMP_IOCTL_NOTIF_ADDFD,
                abi.SECCOMP_IOCTL_NOTIF_ID_VALID,
            ),
            abi.SECCOMP_ADDFD_FLAG_SEND,
            os.environ.get(ENV) != "proc",
            True,
            arch.execve,
            arch.execveat,
            arch.setns,
            arch.unshare,
        )
    except (ValueError, OverflowError):
        return None
    return FastPath(server)
