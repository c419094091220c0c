"""Thin ctypes wrappers for the system calls Python's os module lacks.

seccomp(2), prctl(2), pidfd_getfd(2), epoll_ctl(2) with raw user data, and the raw, per-thread
credential calls (glibc's setresuid() changes every thread of the process; the raw
system call changes only the calling thread, which is what a per-target worker
thread needs). Every failure raises OSError with the errno and the call's name.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Iterable, Sequence

from mptcpkit.run import abi

try:  # prctl() and seccomp() for `mptcpkit run` itself, without ctypes' libc handle
    from mptcpkit.run import _fastpath as _native  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - built without a C compiler
    _native = None

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    import ctypes

# ctypes is imported by the calls that need it, not here: `mptcpkit run` needs only
# prctl() and seccomp() before exec, which _fastpath answers (ctypes costs ~1 ms).
_libc_handle: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    import ctypes

    global _libc_handle
    if _libc_handle is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        libc.prctl.restype = ctypes.c_int
        libc.epoll_ctl.restype = ctypes.c_int
        _libc_handle = libc
    return _libc_handle


def prctl(option: int, arg2: int, what: str = "prctl") -> int:
    if _native is not None:
        try:
            result: int = _native.prctl(option, arg2)
        except OSError as exc:
            raise OSError(exc.errno, f"{what}: {exc.strerror}") from None
        return result
    import ctypes

    return _check(_lib().prctl(option, ctypes.c_ulong(arg2), 0, 0, 0), what)


PIDFD_THREAD = os.O_EXCL


def _check(ret: int, what: str) -> int:
    import ctypes

    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def syscall(nr: int, *args: object, what: str = "syscall") -> int:
    import ctypes

    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return _check(_lib().syscall(ctypes.c_long(nr), *cargs), what)


def install_filter(prog: bytes, arch: abi.Arch) -> tuple[int, bool]:
    """Install a user-notification filter on the calling thread.

    Returns the listener fd and whether trapped calls wait killable once received
    (SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV, 5.19+). Sets PR_SET_NO_NEW_PRIVS first,
    as unprivileged callers must (setuid programs then start without extra privileges).
    """
    prctl(abi.PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")
    for killable in (True, False):
        flags = abi.SECCOMP_FILTER_FLAG_NEW_LISTENER
        if killable:
            flags |= abi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
        try:
            fd = _seccomp_filter(arch, flags, prog)
        except OSError as exc:
            if not killable or exc.errno != errno.EINVAL:
                raise
            continue  # before 5.19: a signal may interrupt a call until it is answered
        return fd, killable
    raise AssertionError("unreachable")


PR_SET_NAME = 15


def set_name(name: bytes) -> None:
    """The calling thread's name (comm), as ps and pkill see it."""
    _lib().prctl(PR_SET_NAME, name, 0, 0, 0)


def _seccomp_filter(arch: abi.Arch, flags: int, prog: bytes) -> int:
    what = "seccomp(SECCOMP_SET_MODE_FILTER)"
    if _native is not None:
        try:
            fd: int = _native.seccomp_filter(arch.seccomp, flags, prog)
        except OSError as exc:
            raise OSError(exc.errno, f"{what}: {exc.strerror}") from None
        return fd
    import ctypes

    class SockFprog(ctypes.Structure):
        _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    return syscall(arch.seccomp, abi.SECCOMP_SET_MODE_FILTER, flags, ctypes.byref(fprog), what=what)


def notif_sizes(arch: abi.Arch) -> tuple[int, int, int]:
    """The kernel's (seccomp_notif, seccomp_notif_resp, seccomp_data) sizes."""
    import ctypes

    buf = ctypes.create_string_buffer(abi.NOTIF_SIZES.size)
    syscall(arch.seccomp, abi.SECCOMP_GET_NOTIF_SIZES, 0, buf, what="seccomp(GET_NOTIF_SIZES)")
    return abi.decode_notif_sizes(buf.raw)


def ioctl(fd: int, request: int, payload: bytes, size: int | None = None) -> tuple[int, bytes]:
    """ioctl with an in/out buffer; returns (return value, buffer after the call)."""
    buf = bytearray(payload.ljust(size or len(payload), b"\0"))
    while True:
        try:
            ret = fcntl.ioctl(fd, request, buf, True)
        except InterruptedError:
            continue
        return ret, bytes(buf)


def pidfd_open(pid: int, flags: int = 0) -> int:
    return syscall(abi.SYS_PIDFD_OPEN, pid, flags, what=f"pidfd_open({pid})")


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """A copy (with FD_CLOEXEC) of another process's descriptor; needs ptrace access."""
    return syscall(abi.SYS_PIDFD_GETFD, pidfd, targetfd, 0, what="pidfd_getfd")


def set_thread_credentials(
    arch: abi.Arch, uids: Sequence[int], gids: Sequence[int], groups: Iterable[int]
) -> None:
    """setgroups, setresgid, setresuid for the calling thread only (raw system calls)."""
    import ctypes

    glist = list(groups)
    garr = (ctypes.c_uint * max(1, len(glist)))(*glist)
    syscall(arch.setgroups, len(glist), garr, what="setgroups")
    syscall(arch.setresgid, *gids[:3], what="setresgid")
    syscall(arch.setresuid, *uids[:3], what="setresuid")


EPOLL_CTL_ADD = 1
# struct epoll_event is packed on x86-64 (12 bytes), naturally aligned elsewhere (16).
_EPOLL_EVENT = struct.Struct("=IQ" if os.uname().machine == "x86_64" else "=I4xQ")


def epoll_ctl(epfd: int, op: int, fd: int, events: int, data: int) -> None:
    """epoll_ctl with the caller's own 64-bit user data (Python's epoll sets data = fd)."""
    import ctypes

    buf = ctypes.create_string_buffer(_EPOLL_EVENT.pack(events & 0xFFFFFFFF, data), 16)
    _check(_lib().epoll_ctl(epfd, op, fd, buf), "epoll_ctl")
