"""The server leg of a proxied connection: choosing a backend, connecting, retrying.

A connection (relay.py's `Conn`) first reads the client's PROXY header if its frontend
accepts one, waits for a ClientHello if its rules route on SNI (router.py), then picks
a server and connects without blocking; a failed or timed-out connect is retried as
the backend says (retry.py). `ServerSide` is that part of `Conn`, apart from moving
bytes; the engine (_engine.c) does the same in C.
"""

from __future__ import annotations

import errno
import select
import socket
import time
from typing import TYPE_CHECKING, Any

from mptcpkit.proxy import proxyproto
from mptcpkit.proxy.datapath import ReadBuffer
from mptcpkit.proxy.leg import Leg
from mptcpkit.proxy.legstate import oserror
from mptcpkit.proxy.poller import READABLE

if TYPE_CHECKING:
    import asyncio

    from mptcpkit.proxy.balance import ServerState
    from mptcpkit.proxy.datapath import BackendPort, FrontendPort

__all__ = ["INSPECT_LIMIT", "ServerSide"]

_DONTWAIT = socket.MSG_DONTWAIT
_FAILED = select.EPOLLERR | select.EPOLLHUP
_IN_PROGRESS = (errno.EINPROGRESS, errno.EALREADY)
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
INSPECT_LIMIT = 65536  # bytes peeked at most for a ClientHello (router.INSPECT_LIMIT)


class ServerSide:
    """The server leg's life until it is established; needs the connection's state."""

    if not TYPE_CHECKING:  # Conn's slots hold the state (mypy would check these
        __slots__ = ()  # methods against an empty set: it is only declared below)

    fe: FrontendPort
    be: BackendPort
    rb: ReadBuffer
    c: Leg
    s: Leg | None
    caddr: Any
    daddr: Any
    dport: int
    inspecting: bool
    server: ServerState | None
    tried: list[ServerState] | None
    timer: asyncio.TimerHandle | None
    hdr: bytearray | None
    early: bytes | None
    bytes_in: int
    t_connect: float
    connect_time: float
    done: bool

    if TYPE_CHECKING:  # provided by the connection (relay.py)

        def pump(self, src: Leg) -> None: ...
        def flush(self, dst: Leg) -> None: ...
        def check_error(self, leg: Leg) -> bool: ...
        def fail(self, leg: Leg, exc: BaseException) -> None: ...
        def end(self, how: str) -> None: ...
        def abort(self, how: str) -> None: ...

    def begin(self) -> None:
        """Connect to a server, unless a PROXY header must come first."""
        if self.hdr is None:
            self.route()

    def route(self) -> None:
        """Choose the backend (use_backend rules, router.py), then connect."""
        router = self.fe.router
        if router is None:
            self.connect()
        elif router.inspect is None:
            self.be = router.route(self.caddr, self._dst_port(), None, True) or self.be
            self.connect()
        else:  # wait for the ClientHello: read as it comes (pump), or when the delay ends
            self.inspecting = True
            self.timer = self.fe.loop.call_later(router.inspect, self._inspect, True)
            if self.early:  # it may have come whole with the PROXY header
                self._inspect(False)

    def _dst_port(self) -> int:
        d = self.daddr
        return int(d[1]) if isinstance(d, tuple) and len(d) > 1 else self.dport

    def _inspect(self, final: bool) -> None:
        """Peek at what the client sent (it stays in the socket, relayed as usual):
        route once the ClientHello is whole, is no ClientHello, or `final` (the
        inspect-delay passed)."""
        if self.done or not self.inspecting:
            return
        router = self.fe.router
        assert router is not None
        rb = self.rb
        try:
            n = self.c.sock.recv_into(rb.buf, INSPECT_LIMIT, _PEEK)
            final = final or n == 0 or self.c.hup  # the client sent FIN: nothing more comes
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.fail(self.c, exc)
            return
        data = (self.early or b"") + bytes(rb.view[:n])
        be = router.route(self.caddr, self._dst_port(), data, final)
        if be is None:
            return  # more may come: the next bytes (or FIN) are a new event
        self.inspecting = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.be = be
        self.c.waiting = True  # read what was peeked once connected
        self.connect()

    def connect(self) -> None:
        """Pick a server and start a non-blocking connect; on failure try the next one."""
        fe = self.fe
        be = self.be
        if not self.t_connect:
            self.t_connect = time.monotonic()
        while True:
            state = be.next_server(self.caddr, self.tried)
            if state is None:  # every server at its maxconn: wait (queue.py)
                fe.park(self)
                return
            if isinstance(state, str):
                self.end(state)  # FIN
                return
            self.server = state
            try:
                sock, err = self.start_connect(state)
            except OSError as exc:
                sock, err = None, exc.errno or errno.EIO
            if err == 0 or err in _IN_PROGRESS:
                break
            if sock is not None:
                sock.close()
            if not self._connect_failed(oserror(err)):
                return
        assert sock is not None  # err is 0 or EINPROGRESS: start_connect returned
        s = self.s
        if s is None:
            s = self.s = Leg(self, sock, False)
        else:  # a new attempt after a failed one
            s.sock, s.fd, s.hup = sock, sock.fileno(), False
        fe.rt.poller.watch(s.fd, s)
        if err:
            s.connecting = True
            self.timer = fe.loop.call_later(fe.cfg.timeouts.connect, self._connect_timeout)
        else:
            self._established(s, READABLE)

    def connected(self, s: Leg, events: int) -> None:
        """The connect finished, one way or the other (no error event: it worked)."""
        err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) if events & _FAILED else 0
        if err:
            self._drop_server_socket()
            if self._connect_failed(oserror(err)):
                self.connect()
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        s.connecting = False
        self._established(s, events)

    def _established(self, s: Leg, events: int) -> None:
        self.tried = None
        self.connect_time = time.monotonic() - self.t_connect
        head = self.greeting()
        if self.early:
            head += self.early
            self.early = None
        if head:
            s.pending = head
            self.flush(s)
        if self.done:
            return
        if self.c.waiting:
            self.pump(self.c)
        if not self.done and events & READABLE:
            self.pump(s)

    def start_connect(self, state: ServerState) -> tuple[Any, int]:
        """Open the server leg (converter.py connects to the client's destination)."""
        return self.be.start_connect(state)

    def greeting(self) -> bytes:
        """What the server hears first: a PROXY header, if the server wants one."""
        send_proxy = self.server.server.send_proxy if self.server is not None else 0
        if not send_proxy:
            return b""
        local = self.daddr if self.daddr is not None else self.fe.local_of(self)
        return proxyproto.build(send_proxy, self.caddr, local)

    def _connect_timeout(self) -> None:
        self.timer = None
        if self.done or self.s is None or not self.s.connecting:
            return
        self._drop_server_socket()
        if self._connect_failed(TimeoutError()):
            self.connect()

    def _drop_server_socket(self) -> None:
        s = self.s
        if s is not None and s.sock is not None:
            self.fe.rt.poller.drop(s.fd)
            s.sock.close()
            s.sock, s.fd, s.connecting = None, -1, False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _connect_failed(self, exc: BaseException) -> bool:
        """Count a failed attempt; True if another server may be tried."""
        state = self.server
        assert state is not None
        self.server = None
        if self.tried is None:
            self.tried = []
        why = self.fe.server_failed(state, exc, self.tried, self.be)
        if isinstance(why, str):
            self.end(why)
            return False
        if why is not None:  # HAProxy's turn-around time before the same server again
            self.timer = self.fe.loop.call_later(why, self._retry)
            return False
        return True

    def _retry(self) -> None:
        self.timer = None
        if not self.done:
            self.connect()

    def _proxy_header(self) -> None:
        """Read the client's PROXY header; then connect, with what came after it held."""
        hdr = self.hdr
        assert hdr is not None
        rb = self.rb
        while True:
            try:
                n = self.c.sock.recv_into(rb.buf, 0, _DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                self.fail(self.c, exc)
                return
            if not n:
                self.abort("client closed before its PROXY header")
                return
            hdr += rb.view[:n]
            parsed = proxyproto.read_proxy_header(hdr)
            if isinstance(parsed, str):
                self.abort(parsed)
                return
            if parsed is not None:
                break
        source, destination, used = parsed
        self.hdr = None
        if source is not None:
            self.caddr = source
            self.daddr = destination
        rest = bytes(hdr[used:])
        self.bytes_in += len(rest)
        self.early = rest or None
        self.c.waiting = True  # more may follow the header: read it once connected
        self.route()
