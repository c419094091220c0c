"""Is this socket really using MPTCP? (Go's `TCPConn.MultipathTCP()`, for all sockets.)

Never trust `sock.proto`: it echoes the constructor's argument. On 5.16+ the kernel
answers getsockopt(SOL_MPTCP, MPTCP_INFO) only for live MPTCP sockets and fails with
EOPNOTSUPP (IPv4) or ENOPROTOOPT (IPv6) after a fallback; SO_PROTOCOL then says whether
MPTCP was asked for. Before 5.16 only SO_PROTOCOL is there.
"""

from __future__ import annotations

import enum
import errno
import socket
import weakref

from mptcpkit._libc import getsockopt_inout
from mptcpkit.abi import constants as c
from mptcpkit.abi._record import record
from mptcpkit.support import kernel_version

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Protocol


if TYPE_CHECKING:

    class HasFileno(Protocol):
        def fileno(self) -> int: ...

    SocketLike = HasFileno | int
else:  # a name for annotations only; spelt out above for type checkers
    SocketLike = object


class State(enum.Enum):
    MPTCP = "MPTCP"  # an MPTCP socket (listener, unconnected or connected and not fallen back)
    FALLBACK = "fallback"  # MPTCP was asked for, the connection fell back to TCP
    TCP = "TCP"  # a plain TCP socket


@record
class SocketStatus:
    """`state`, and `reason` when mptcpkit knows why a socket is not MPTCP."""

    state: State
    reason: str | None = None

    @property
    def is_mptcp(self) -> bool:
        return self.state is State.MPTCP

    def __str__(self) -> str:
        return self.state.value


_MPTCP = SocketStatus(State.MPTCP)
_FALLBACK = SocketStatus(State.FALLBACK)
_TCP = SocketStatus(State.TCP)

# Why mptcpkit made a socket plain TCP (creation fallback, TCP-only option), per object.
_notes: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


def record_note(sock: object, reason: str) -> None:
    _notes[sock] = reason


_HAS_SOL_MPTCP = kernel_version() >= (5, 16)
_FALLBACK_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOPROTOOPT})


def status(sock: SocketLike) -> SocketStatus:
    """MPTCP, fallback or TCP, for client, accepted and listening sockets alike."""
    if _HAS_SOL_MPTCP:
        try:
            _getsockopt_int(sock, c.SOL_MPTCP, c.MPTCP_INFO)
            return _MPTCP
        except OSError as exc:
            if exc.errno not in _FALLBACK_ERRNOS:
                raise
    protocol = _getsockopt_int(sock, c.SOL_SOCKET, c.SO_PROTOCOL)
    if protocol == c.IPPROTO_MPTCP:
        return _FALLBACK if _HAS_SOL_MPTCP else _MPTCP
    if protocol != c.IPPROTO_TCP:
        raise ValueError(f"status() needs a TCP or MPTCP socket; this one has protocol {protocol}")
    note = _notes.get(sock) if isinstance(sock, socket.socket) else None
    return SocketStatus(State.TCP, note) if note else _TCP


def protocol(sock: SocketLike) -> int:
    """SO_PROTOCOL: what the kernel made (262 for MPTCP, 6 for TCP), unlike `sock.proto`."""
    return _getsockopt_int(sock, c.SOL_SOCKET, c.SO_PROTOCOL)


def _getsockopt_int(sock: SocketLike, level: int, optname: int) -> int:
    if isinstance(sock, socket.socket):
        return sock.getsockopt(level, optname)
    return int.from_bytes(getsockopt_inout(file_descriptor(sock), level, optname, b"", 4), "little")


def file_descriptor(sock: SocketLike) -> int:
    """The descriptor of a socket, an object with fileno(), or an int; TypeError for
    anything else (as the stdlib's select() says)."""
    if isinstance(sock, int):
        return sock
    fileno = getattr(sock, "fileno", None)
    if fileno is None:
        raise TypeError(
            f"expected a socket, an object with fileno() or a file descriptor (int), "
            f"not {type(sock).__name__}"
        )
    fd = fileno()
    if not isinstance(fd, int):
        raise TypeError(f"fileno() returned {type(fd).__name__}, not int")
    return fd
