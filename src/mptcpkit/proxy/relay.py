"""One proxied connection: two non-blocking sockets joined back to back.

A `Conn` owns the client leg and, once a server is picked, the server leg; the
worker's `Poller` delivers each socket's epoll events to its `Leg`. This is the
pure-Python data path; `_engine.c` is the same state machine compiled, and a change
to one is a change to both.

Its parts: a leg and the read-sizing rule are leg.py, the server leg until it is
established (PROXY header in, routing, connect, retries) is serverleg.py; this module
moves the bytes and ends the connection.

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
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from mptcpkit.policy import Policy
from mptcpkit.proxy.datapath import READ_SIZE, ReadBuffer
from mptcpkit.proxy.leg import MIN_READ, Leg, room
from mptcpkit.proxy.legstate import observe_leg, oserror, reason_of
from mptcpkit.proxy.serverleg import ServerSide

if TYPE_CHECKING:
    import asyncio

    from mptcpkit.proxy.balance import ServerState
    from mptcpkit.proxy.datapath import BackendPort, FrontendPort

__all__ = ["READ_SIZE", "Conn", "Leg", "ReadBuffer"]

# Every read and write says MSG_DONTWAIT: accepted sockets can stay in blocking mode,
# which saves an ioctl(FIONBIO) per connection (CPython's accept cannot pass SOCK_NONBLOCK).
_DONTWAIT = socket.MSG_DONTWAIT
_ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class Conn(ServerSide):
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
