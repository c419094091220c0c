"""One proxied connection: two non-blocking sockets joined back to back.

A `Conn` owns the client leg and, once a server is picked, the server leg; the
worker's `Poller` delivers each socket's epoll events to its `Leg`. This is the
pure-Python data path; `_engine.c` is the same state machine compiled, and a change
to one is a change to both.

- Bytes go through one worker-wide read buffer: `recv_into()` it, `send()` a view of
  it. Only what the other side could not take at once is copied (`Leg.pending`, at
  most one read), and until it is sent nothing more is read from the source: that
  is the backpressure, and the kernel's socket buffers hold the rest. A read is sized
  to what the destination's socket can still take (`room`): a reader that stops
  leaves at most MIN_ROOM (4 KiB; 16 KiB if its traffic was small) copied per
  direction, HAProxy one 16 KiB buffer.
- Half-close: EOF on one leg becomes shutdown(SHUT_WR) on the other once its pending
  bytes are out; the connection ends when FIN has crossed both ways, or a leg fails.
- The server connect is non-blocking; a failed or timed-out connect is retried as
  the backend says (retry.py: the same server after a pause, the last retry
  elsewhere with `redispatch`).
- Idle timeouts belong to the runtime's once-a-second sweep: a leg only sets a flag
  when it sees data, no timer is re-armed per read.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import select
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from mptcpkit.policy import Policy
from mptcpkit.proxy import proxyproto
from mptcpkit.proxy.datapath import READ_SIZE, ReadBuffer
from mptcpkit.proxy.legstate import observe_leg, oserror, reason_of
from mptcpkit.proxy.poller import READABLE

if TYPE_CHECKING:
    import asyncio

    from mptcpkit.proxy.balance import ServerState
    from mptcpkit.proxy.datapath import BackendPort, FrontendPort

__all__ = ["READ_SIZE", "Conn", "Leg", "ReadBuffer"]

MIN_READ = 16384  # a read of a leg whose traffic is small (not bulk)
MIN_ROOM = 4096  # a bulk read when the destination has little or no room
_SIOCOUTQ = 0x5411  # bytes a socket holds unsent or unacknowledged (TIOCOUTQ)
_INT = struct.Struct("i")
_ZERO = bytes(4)
# Every read and write says MSG_DONTWAIT: accepted sockets can stay in blocking mode,
# which saves an ioctl(FIONBIO) per connection (CPython's accept cannot pass SOCK_NONBLOCK).
_DONTWAIT = socket.MSG_DONTWAIT
_ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_EPOLLERR = select.EPOLLERR
_FAILED = select.EPOLLERR | select.EPOLLHUP
_HANGUPS = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_IN_PROGRESS = (errno.EINPROGRESS, errno.EALREADY)
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
INSPECT_LIMIT = 65536  # bytes peeked at most for a ClientHello (router.INSPECT_LIMIT)


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

    def __init__(self, conn: Conn, sock: Any, client: bool) -> None:
        self.conn: Conn | None = conn  # None once finished: no cycle outlives the connection
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


class Conn:
    """A client connection and, once connected, its server leg."""

    __slots__ = (
        "active",
        "be",
        "bytes_in",
        "bytes_out",
        "c",
        "c_req",
        "c_state",
        "c_sub",
        "caddr",
        "connect_time",
        "counted_in",
        "counted_out",
        "daddr",
        "done",
        "dport",
        "early",
        "fe",
        "hdr",
        "how",
        "idle",
        "inspecting",
        "parked",
        "rb",
        "s",
        "s_state",
        "s_sub",
        "server",
        "start",
        "t_connect",
        "timer",
        "tried",
    )

    def __init__(self, fe: FrontendPort, sock: Any, caddr: Any, mptcp: bool) -> None:
        self.fe = fe
        self.be: BackendPort = fe.backend  # its frontend's rules may pick another (router.py)
        self.dport = 0  # the port it connected to (dst_port), set by the frontend
        self.inspecting = False  # waiting for a ClientHello (tcp-request inspect-delay)
        self.rb = fe.rt.rbuf
        self.c = Leg(self, sock, True)
        self.s: Leg | None = None
        self.caddr = caddr
        self.daddr: Any = None  # the destination a PROXY header carried, if any
        self.c_req = mptcp  # the client leg came through an MPTCP listener
        self.server: ServerState | None = None
        self.tried: list[ServerState] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.hdr: bytearray | None = bytearray() if fe.cfg.accept_proxy else None
        self.early: bytes | None = None  # client bytes that came with the PROXY header
        self.bytes_in = 0
        self.bytes_out = 0
        self.counted_in = 0  # bytes the metrics have (frontend.take_bytes)
        self.counted_out = 0
        self.t_connect = 0.0  # first connect attempt (monotonic)
        self.connect_time = -1.0  # seconds from it to established; -1: not connected
        self.done = False
        self.active = True
        self.idle = 0.0
        self.parked = 0.0  # waiting for a server slot since (monotonic; queue.py), or 0
        self.how: str | None = None
        self.start = time.time()
        # each leg: "MPTCP"/"fallback"/"TCP" (None: not sampled yet), most subflows seen
        self.c_state: str | None = None
        self.c_sub = 0
        self.s_state: str | None = None
        self.s_sub = 0

    @property
    def connected_server(self) -> bool:
        s = self.s
        return s is not None and s.sock is not None and not s.connecting

    # --- moving bytes ----------------------------------------------------------------

    def pump(self, src: Leg) -> None:
        """Read from `src` and send to the other leg until `src` is drained or it is full."""
        if src.eof:
            return
        if src.client:
            dst = self.s
            if self.hdr is not None:
                self._proxy_header()
                return
            if self.inspecting:
                self._inspect(False)
                return
        else:
            dst = self.c
        if dst is None or dst.connecting or dst.pending is not None or dst.sock is None:
            src.waiting = True
            return
        src.waiting = False
        rb = self.rb
        buf, view, size = rb.buf, rb.view, rb.size
        recv_into, send = src.sock.recv_into, dst.sock.send
        for _ in range(rb.burst):
            want = room(dst, size) if src.big else MIN_READ
            try:
                n = recv_into(buf, want, _DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                self.fail(src, exc)
                return
            if not n:
                self._eof(src, dst)
                return
            self.active = True
            src.big = n >= MIN_READ or n == want  # a full read: more waits
            if src.client:
                self.bytes_in += n
            else:
                self.bytes_out += n
            try:
                sent = send(view[:n], _DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.fail(dst, exc)
                return
            dst.credit -= sent
            if sent < n:
                dst.sndbuf = 0  # full: autotuning may have grown it since
                dst.credit = 0
                dst.pending = bytes(view[sent:n])
                src.waiting = True
                return
            if n < want and not src.hup:
                return  # a short read: drained; the next edge (data or FIN) will say more
        self._later(src)

    def _later(self, src: Leg) -> None:
        """`src` still has data: read it after other sockets had their turn."""
        src.waiting = True
        self.fe.rt.poller.soon(lambda: self._resume(src))

    def _resume(self, src: Leg) -> None:
        if src.waiting and not self.done:
            self.pump(src)

    def flush(self, dst: Leg) -> None:
        """Send what `dst` is owed; then read its source again, or pass its FIN on."""
        data = dst.pending
        assert data is not None
        try:
            sent = dst.sock.send(data, _DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(dst, exc)
            return
        dst.credit -= sent
        if sent < len(data):
            dst.pending = data[sent:]
            return
        dst.pending = None
        src = self.s if dst.client else self.c
        if src is None:
            return
        if src.eof:
            self._shut(dst)
        elif src.waiting:
            self.pump(src)

    def _eof(self, src: Leg, dst: Leg) -> None:
        src.eof = True
        src.waiting = False
        self.sample()
        if dst.pending is None:
            self._shut(dst)

    def _shut(self, leg: Leg) -> None:
        """Pass a FIN on to `leg`; the last FIN is the close of both legs."""
        other = self.s if leg.client else self.c
        if other is not None and other.shut:
            self.end("both closed")
            return
        try:
            leg.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.fail(leg, exc)
            return
        leg.shut = True

    def check_error(self, leg: Leg) -> bool:
        """EPOLLERR: fail now, even if the leg is not read for a while; False if it failed."""
        err = leg.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.fail(leg, oserror(err))
            return False
        return True

    # --- the server leg ------------------------------------------------------------------

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

    # --- the end -----------------------------------------------------------------------

    def sample(self) -> None:
        """Record each leg's MPTCP state and subflow count (once, while still open)."""
        if not self.fe.rt.observing:
            return
        if self.c_state is None and self.c.sock is not None:
            if self.c_req:
                self.c_state, n = observe_leg(self.c.sock)
                self.c_sub = max(self.c_sub, n)
            else:
                self.c_state = "TCP"
        s = self.s
        if self.s_state is None and s is not None and s.sock is not None and not s.connecting:
            if self.server is not None and self.server.server.policy is Policy.OFF:
                self.s_state = "TCP"
            else:
                self.s_state, n = observe_leg(s.sock)
                self.s_sub = max(self.s_sub, n)

    def fail(self, leg: Leg, exc: BaseException) -> None:
        """A leg broke: reset the other one too."""
        if self.how is None:
            self.how = f"{'client' if leg.client else 'server'} error: {reason_of(exc)}"
        self.abort(self.how)

    def end(self, how: str) -> None:
        """Close both legs (FIN; unsent bytes, if any, are dropped)."""
        self._close(how, abort=False)

    def abort(self, how: str) -> None:
        """Close both legs with RST."""
        self._close(how, abort=True)

    def _close(self, how: str, abort: bool) -> None:
        if self.done:
            return
        if self.how is None:
            self.how = how
        self.sample()
        poller = self.fe.rt.poller
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for leg in (self.c, self.s):
            if leg is None or leg.sock is None:
                continue
            poller.drop(leg.fd)
            if abort:
                with contextlib.suppress(OSError):
                    leg.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
            elif not leg.eof:
                self._discard_input(leg)  # unread bytes would make close() send RST
            leg.sock.close()
            leg.sock = None
            leg.pending = None
        self.fe.finished(self)

    def _discard_input(self, leg: Leg) -> None:
        buf = self.rb.buf
        for _ in range(self.rb.burst):
            try:
                if not leg.sock.recv_into(buf, 0, _DONTWAIT):
                    return
            except OSError:
                return


def room(dst: Leg, size: int) -> int:
    """How much to read for `dst`: what its socket can still take (SO_SNDBUF less what
    it holds, less an eighth for the kernel's per-packet overhead), at least MIN_ROOM,
    at most `size`. Measured only when the last measure, less what was sent since, no
    longer covers a full read (a draining destination's room only grows). The same rule
    as the engine's room()."""
    if dst.credit >= size:
        return size
    try:
        outq = _INT.unpack(fcntl.ioctl(dst.fd, _SIOCOUTQ, _ZERO))[0]
        if not dst.sndbuf:
            dst.sndbuf = dst.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    except OSError:
        return size
    free = dst.sndbuf - dst.sndbuf // 8 - outq
    dst.credit = free
    return MIN_ROOM if free < MIN_ROOM else min(free, size)
