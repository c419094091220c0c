"""Who a trapped thread is, and a worker thread that can act as it.

The supervisor makes a socket in the caller's network namespace and with its
credentials. In its own namespace and with its own credentials that is a plain
socket() call; otherwise a worker thread that has entered the caller's namespace
(setns) and taken its uid, gid and groups with raw, per-thread system calls (glibc's
wrappers would change every thread of the supervisor) makes it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import os
import socket
from collections.abc import Callable

from mptcpkit import netns
from mptcpkit.run import abi, syscalls


@dataclasses.dataclass(frozen=True)
class TaskContext:
    """Who a trapped thread is: process, credentials, network namespace."""

    tgid: int
    uids: tuple[int, int, int]
    gids: tuple[int, int, int]
    groups: tuple[int, ...]
    netns: tuple[int, int]


def _field(status: bytes, name: bytes) -> list[bytes]:
    start = status.find(b"\n" + name + b":")
    if start < 0:
        return []
    start += len(name) + 2
    return status[start : status.find(b"\n", start)].split()


def read_task(tid: int) -> TaskContext:
    """Read /proc/<tid>; raises ProcessLookupError when the thread is gone."""
    try:
        fd = os.open(f"/proc/{tid}/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            status = os.read(fd, 8192)
        finally:
            os.close(fd)
        st = os.stat(f"/proc/{tid}/ns/net")
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(errno.ESRCH, f"thread {tid} is gone") from None
    uids = _field(status, b"Uid")
    gids = _field(status, b"Gid")
    return TaskContext(
        int(_field(status, b"Tgid")[0]),
        (int(uids[0]), int(uids[1]), int(uids[2])),
        (int(gids[0]), int(gids[1]), int(gids[2])),
        tuple(int(g) for g in _field(status, b"Groups")),
        (st.st_dev, st.st_ino),
    )


class ContextError(OSError):
    """The worker thread could not enter the program's namespace or credentials."""


class Context:
    """A worker thread living in one (network namespace, credentials) of the program."""

    def __init__(self, arch: abi.Arch, ns_fd: int | None, ctx: TaskContext, creds: bool) -> None:
        self.error: OSError | None = None
        self._ns_fd = ns_fd

        def enter() -> None:
            try:
                if self._ns_fd is not None:
                    netns.setns(self._ns_fd)
                if creds:
                    syscalls.set_thread_credentials(arch, ctx.uids, ctx.gids, ctx.groups)
            except OSError as exc:
                self.error = exc  # every job of this worker now fails with it

        self.pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="mptcpkit-run-ctx", initializer=enter
        )

    def _run(self, fn: Callable[[], socket.socket]) -> socket.socket:
        if self.error is not None:
            raise ContextError(self.error.errno, self.error.strerror)
        return fn()

    def call(self, fn: Callable[[], socket.socket]) -> socket.socket:
        try:
            return self.pool.submit(self._run, fn).result()
        finally:
            if self._ns_fd is not None:
                os.close(self._ns_fd)
                self._ns_fd = None

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        if self._ns_fd is not None:
            os.close(self._ns_fd)
            self._ns_fd = None
