"""One side of a proxied connection (`Leg`) and how much to read for it (`room`).

A leg is a socket and the bytes still owed to it; its epoll events go to the
connection that owns it (relay.py's `Conn`, named here by what a leg calls on it).
`room` is the read-sizing rule the engine (_engine.c) applies too.
"""

from __future__ import annotations

import fcntl
import select
import socket
import struct
from typing import Any, Protocol

from mptcpkit.abi.constants import SIOCOUTQ
from mptcpkit.proxy.poller import READABLE

__all__ = ["MIN_READ", "MIN_ROOM", "Leg", "LegOwner", "room"]

MIN_READ = 16384  # a read of a leg whose traffic is small (not bulk)
MIN_ROOM = 4096  # a bulk read when the destination has little or no room
_INT = struct.Struct("i")
_ZERO = bytes(4)
_EPOLLERR = select.EPOLLERR
_HANGUPS = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


class LegOwner(Protocol):
    """What a leg calls on its connection (relay.py's `Conn`)."""

    def connected(self, s: Leg, events: int) -> None: ...

    def flush(self, dst: Leg) -> None: ...

    def check_error(self, leg: Leg) -> bool: ...

    def pump(self, src: Leg) -> None: ...


class Leg:
    """One side of a connection: its socket, and bytes still owed to it.

    The socket is a bare `_socket.socket` where possible: the relay needs none of the
    Python-level wrapper's makefile/io machinery, and skips its per-call overhead.
    """

    __slots__ = (
        "big",
        "born",
        "client",
        "conn",
        "connecting",
        "credit",
        "eof",
        "fd",
        "hup",
        "pending",
        "shut",
        "sndbuf",
        "sock",
        "waiting",
    )

    def __init__(self, conn: LegOwner, sock: Any, client: bool) -> None:
        self.conn: LegOwner | None = conn  # None once finished: no cycle outlives the connection
        self.client = client
        self.sock: Any = sock
        self.fd = sock.fileno() if sock is not None else -1
        self.born = 0
        self.connecting = False
        self.pending: bytes | None = None  # read from the other leg, not yet sent here
        self.waiting = False  # readable but not read: the other leg had no room
        self.eof = False  # this leg sent FIN (read returned 0)
        self.hup = False  # epoll saw its FIN (or an error): read on until it shows
        self.shut = False  # FIN sent to this leg
        self.big = False  # its last read was full or >= MIN_READ: bulk, reads sized by room()
        self.sndbuf = 0  # SO_SNDBUF as last read (0: read it again)
        self.credit = 0  # room() as last measured, less what was sent here since

    def on_event(self, events: int) -> None:
        conn = self.conn
        if conn is None:
            return
        if events & _HANGUPS:
            self.hup = True  # also on a connect's first event: a server may say hello and go
        if self.connecting:
            conn.connected(self, events)
            return
        if self.pending is not None:
            conn.flush(self)
        if events & READABLE and self.sock is not None:
            if events & _EPOLLERR and not conn.check_error(self):
                return
            conn.pump(self)


def room(dst: Leg, size: int) -> int:
    """How much to read for `dst`: what its socket can still take (SO_SNDBUF less what
    it holds, less an eighth for the kernel's per-packet overhead), at least MIN_ROOM,
    at most `size`. Measured only when the last measure, less what was sent since, no
    longer covers a full read (a draining destination's room only grows). The same rule
    as the engine's room()."""
    if dst.credit >= size:
        return size
    try:
        outq = _INT.unpack(fcntl.ioctl(dst.fd, SIOCOUTQ, _ZERO))[0]
        if not dst.sndbuf:
            dst.sndbuf = dst.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    except OSError:
        return size
    free = dst.sndbuf - dst.sndbuf // 8 - outq
    dst.credit = free
    return MIN_ROOM if free < MIN_ROOM else min(free, size)
