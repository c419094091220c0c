"""libc's getsockopt through ctypes, for options that need input bytes or >1024 bytes.

Python's socket.getsockopt starts from a zeroed buffer and caps it at 1024 bytes, but
MPTCP_TCPINFO, MPTCP_SUBFLOW_ADDRS and MPTCP_FULL_INFO read a request header from the
buffer first (REFERENCE §3).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    import ctypes
    from typing import Any


# Loaded on first use: importing ctypes costs every `import mptcpkit` several ms.
_getsockopt: Any = None


def _libc_getsockopt() -> Any:
    global _getsockopt
    if _getsockopt is None:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).getsockopt
        function.argtypes = (
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_uint32),
        )
        function.restype = ctypes.c_int
        _getsockopt = function
    return _getsockopt


_INT_MAX = 2**31 - 1


def check_fd(fd: int) -> int:
    """`fd` as a C int; OverflowError like the stdlib's, where ctypes would cut it."""
    if not -_INT_MAX - 1 <= fd <= _INT_MAX:
        raise OverflowError(f"file descriptor {fd} does not fit in a C int")
    return fd


def getsockopt_inout(fd: int, level: int, optname: int, request: bytes, size: int) -> bytes:
    """Call getsockopt with `request` at the start of a `size`-byte buffer.

    Returns the bytes the kernel reported as written; raises OSError with its errno.
    """
    check_fd(fd)
    import ctypes

    buf = ctypes.create_string_buffer(request, max(size, len(request)))
    length = ctypes.c_uint32(len(buf))
    if _libc_getsockopt()(fd, level, optname, buf, ctypes.byref(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return buf.raw[: length.value]


def getsockopt_into(fd: int, level: int, optname: int, buf: ctypes.Array[ctypes.c_char]) -> int:
    """Call getsockopt on a caller-owned buffer (which may hold pointers to other
    caller-owned buffers); returns the length the kernel reported."""
    check_fd(fd)
    import ctypes

    length = ctypes.c_uint32(ctypes.sizeof(buf))
    if _libc_getsockopt()(fd, level, optname, buf, ctypes.byref(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return length.value
