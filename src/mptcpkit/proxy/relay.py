"""One proxied connection: two asyncio Protocols joined back to back.

Why protocols and not streams: streams cost two tasks, reader/writer objects and
futures per connection (REFERENCE §9). Here a connection is one `Conn` (the client
leg's protocol) and one `_Upstream` (the server leg's), one task for the backend
connect, and nothing per chunk beyond `transport.write()`.

- Backpressure: a leg whose write buffer passes the high-water mark pauses reading
  on the other leg, so a slow reader never makes the proxy buffer without bound.
- Half-close: EOF on one leg becomes `write_eof()` (shutdown(SHUT_WR)) on the other;
  the connection ends when both directions are done or a leg fails.
- Idle timeouts are enforced by the runtime's once-a-second sweep: a leg only sets a
  flag when it sees data, no timer is re-armed per chunk.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mptcpkit.proxy import proxyproto

if TYPE_CHECKING:
    from mptcpkit.proxy.balance import ServerState
    from mptcpkit.proxy.runtime import BackendRuntime, FrontendRuntime

__all__ = ["HIGH_WATER", "LOW_WATER", "Conn"]

# Write-buffer marks per leg: large enough for bulk throughput, small enough that
# 10k connections cannot run the proxy out of memory.
HIGH_WATER = 1 << 20
LOW_WATER = 1 << 18
READ_SIZE = 1 << 18
PENDING_LIMIT = 1 << 18  # client bytes held while the backend connect is in flight
PROXY_HEADER_LIMIT = 16 + 65535


class ReadBuffer:
    """One read buffer shared by every leg of a worker (callbacks never interleave).

    Legs read into it (`BufferedProtocol`) and write a view of it to the other leg: no
    bytes object per chunk. uvloop's `write()` keeps a reference to data it could not
    send at once (asyncio 3.12+ too), so whenever the other leg's buffer is not empty
    after a write, the buffer is handed over and a fresh one taken.
    """

    __slots__ = ("buf", "view")

    def __init__(self) -> None:
        self.buf = bytearray(READ_SIZE)
        self.view = memoryview(self.buf)

    def renew(self) -> None:
        self.buf = bytearray(READ_SIZE)
        self.view = memoryview(self.buf)


class _Upstream(asyncio.BufferedProtocol):
    """The server leg: forwards to the `Conn` that owns it."""

    __slots__ = ("c",)

    def __init__(self, conn: Conn) -> None:
        self.c = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)  # type: ignore[attr-defined]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.c.rb.view

    def buffer_updated(self, nbytes: int) -> None:
        c = self.c
        c.bytes_out += nbytes
        c.active = True
        rb = c.rb
        ct = c.ct
        ct.write(rb.view[:nbytes])  # type: ignore[union-attr]
        if ct.get_write_buffer_size():  # type: ignore[union-attr]
            rb.renew()

    def eof_received(self) -> bool:
        c = self.c
        c.s_eof = True
        c.sample()
        if c.c_eof:
            c.end("both closed")
            return True
        c.shut(c.ct)
        return True

    def pause_writing(self) -> None:
        if self.c.ct is not None:
            self.c.ct.pause_reading()

    def resume_writing(self) -> None:
        c = self.c
        if c.ct is not None and not c.c_eof and not c.ct.is_closing():
            c.ct.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        c = self.c
        c.st_lost = True
        if exc is not None and c.how is None:
            c.how = f"server error: {_reason(exc)}"
        if c.ct is not None and not c.ct.is_closing():
            c.ct.close()
        c.maybe_done()


class Conn(asyncio.BufferedProtocol):
    """A client connection and, once connected, its server leg."""

    __slots__ = (
        "active",
        "bytes_in",
        "bytes_out",
        "c_eof",
        "c_lost",
        "c_req",
        "c_state",
        "c_sub",
        "caddr",
        "ct",
        "done",
        "fe",
        "hdr",
        "how",
        "idle",
        "pending",
        "pending_size",
        "rb",
        "s_eof",
        "s_state",
        "s_sub",
        "server",
        "ssock",
        "st",
        "st_lost",
        "start",
        "task",
        "timed_out",
        "up",
    )

    def __init__(self, fe: FrontendRuntime, mptcp: bool) -> None:
        self.fe = fe
        self.rb: ReadBuffer = fe.rt.rbuf
        self.caddr: Any = None
        self.ct: asyncio.Transport | None = None
        self.st: asyncio.Transport | None = None
        self.ssock: Any = None
        self.up = _Upstream(self)
        self.server: ServerState | None = None
        self.pending: list[bytes] | None = None
        self.pending_size = 0
        self.hdr: bytearray | None = bytearray() if fe.cfg.accept_proxy else None
        self.bytes_in = 0
        self.bytes_out = 0
        self.c_eof = False
        self.s_eof = False
        self.c_lost = False
        self.c_req = mptcp  # the client leg came through an MPTCP listener
        self.timed_out = False
        self.done = False
        self.st_lost = False
        self.active = True
        self.idle = 0.0
        self.how: str | None = None
        self.start = time.time()
        self.task: asyncio.Task[None] | None = None
        # each leg: "MPTCP"/"fallback"/"TCP" (None: not sampled yet), most subflows seen
        self.c_state: str | None = None
        self.c_sub = 0
        self.s_state: str | None = None
        self.s_sub = 0

    # --- client leg --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.ct = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)  # type: ignore[attr-defined]
        self.fe.accepted(self)

    def begin(self) -> None:
        """Start the backend connect (or wait for the PROXY header first)."""
        self.ct.resume_reading()  # type: ignore[union-attr]
        if self.hdr is None:
            self.task = self.fe.loop.create_task(self.connect())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.rb.view

    def buffer_updated(self, nbytes: int) -> None:
        self.bytes_in += nbytes
        self.active = True
        rb = self.rb
        st = self.st
        if st is not None:
            st.write(rb.view[:nbytes])
            if st.get_write_buffer_size():
                rb.renew()
            return
        self.data_received(bytes(rb.view[:nbytes]))

    def data_received(self, data: bytes) -> None:
        """Client bytes before the server leg exists: PROXY header, or held."""
        st = self.st
        if st is not None:
            st.write(data)
            return
        if self.hdr is not None:
            self._proxy_header(data)
            return
        self._hold(data)

    def _hold(self, data: bytes) -> None:
        if self.pending is None:
            self.pending = []
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > PENDING_LIMIT and self.ct is not None:
            self.ct.pause_reading()

    def _proxy_header(self, data: bytes) -> None:
        hdr = self.hdr
        assert hdr is not None
        hdr += data
        try:
            parsed = proxyproto.parse(hdr)
        except proxyproto.ProxyProtocolError as exc:
            self.bytes_in = 0
            self.abort(f"bad PROXY header: {exc}")
            return
        if parsed is None:
            if len(hdr) > PROXY_HEADER_LIMIT:
                self.abort("PROXY header too long")
            return
        header, used = parsed
        self.hdr = None
        self.bytes_in -= used
        if not header.local and header.source is not None:
            self.caddr = header.source
        rest = bytes(hdr[used:])
        if rest:
            self._hold(rest)
        self.task = self.fe.loop.create_task(self.connect())

    def eof_received(self) -> bool:
        self.c_eof = True
        if self.hdr is not None:
            self.abort("client closed before its PROXY header")
            return True
        st = self.st
        if st is None:
            return True  # written after the connect completes
        self.sample()
        if self.s_eof:
            self.end("both closed")
            return True
        self.shut(st)
        return True

    def pause_writing(self) -> None:
        if self.st is not None:
            self.st.pause_reading()

    def resume_writing(self) -> None:
        st = self.st
        if st is not None and not self.s_eof and not st.is_closing():
            st.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.c_lost = True
        if exc is not None and self.how is None:
            self.how = f"client error: {_reason(exc)}"
        st = self.st
        if st is not None and not st.is_closing():
            if exc is not None:
                st.abort()
            else:
                st.close()
        elif st is None and self.task is not None and not self.task.done():
            self.how = self.how or "client left during connect"
            self.task.cancel()
        self.maybe_done()

    # --- both legs ---------------------------------------------------------------

    @staticmethod
    def shut(tr: asyncio.Transport | None) -> None:
        """write_eof, tolerating a transport that is already closed (uvloop: RuntimeError)."""
        if tr is None or tr.is_closing():
            return
        try:
            if tr.can_write_eof():
                tr.write_eof()
            else:
                tr.close()
        except (OSError, RuntimeError):
            tr.close()

    def end(self, how: str) -> None:
        if self.how is None:
            self.how = how
        for tr in (self.ct, self.st):
            if tr is not None and not tr.is_closing():
                tr.close()

    def abort(self, how: str) -> None:
        if self.how is None:
            self.how = how
        for tr in (self.ct, self.st):
            if tr is not None and not tr.is_closing():
                tr.abort()
        if self.task is not None and not self.task.done() and self.st is None:
            self.task.cancel()
        self.maybe_done()

    def sample(self) -> None:
        """Record each still-open leg's MPTCP state and subflow count (once, at the end)."""
        fe = self.fe
        if self.c_state is None and not self.c_lost and self.ct is not None:
            if self.c_req:
                self.c_state, n = fe.rt.observe_leg(self.ct.get_extra_info("socket"))
                self.c_sub = max(self.c_sub, n)
            else:
                self.c_state = "TCP"
        if self.s_state is None and self.ssock is not None and not self.st_lost:
            self.s_state, n = fe.rt.observe_leg(self.ssock)
            self.s_sub = max(self.s_sub, n)

    def maybe_done(self) -> None:
        if not self.c_lost:
            return
        if self.st is not None and not self.st_lost:
            return
        if self.task is not None and not self.task.done() and self.st is None:
            return  # the connect task finishes the connection
        self.fe.finished(self)

    # --- backend connect ---------------------------------------------------------

    async def connect(self) -> None:
        """Pick a server, connect (retrying on others), then splice the legs."""
        fe = self.fe
        be: BackendRuntime = fe.backend
        loop = fe.loop
        tried: list[ServerState] = []
        host = self.caddr[0] if isinstance(self.caddr, tuple) else None
        timeout = fe.cfg.timeouts.connect
        try:
            while True:
                state = be.balancer.pick(host, tried)
                if state is None:
                    reason = "no server available" if not tried else "every server failed"
                    self.how = self.how or reason
                    self._give_up()
                    return
                self.server = state
                state.active += 1
                self.timed_out = False
                timer = loop.call_later(timeout, self._connect_timeout)
                failure: BaseException | None = None
                try:
                    sock, transport = await be.open(state, self.up, loop)
                except asyncio.CancelledError:
                    if not self.timed_out:
                        raise
                    failure = TimeoutError()
                except OSError as err:
                    failure = err
                finally:
                    timer.cancel()
                if failure is not None:
                    exc = failure
                    state.active -= 1
                    be.rt.connect_failed(be, state, exc)
                    tried.append(state)
                    self.server = None
                    if len(tried) > be.cfg.retries:
                        self.how = self.how or f"connect failed: {_reason(exc)}"
                        self._give_up()
                        return
                    continue
                break
        except asyncio.CancelledError:
            if self.server is not None:
                self.server.active -= 1
                self.server = None
            self.c_lost = True
            self.fe.finished(self)
            return
        self.ssock = sock
        self.st = transport
        if sock is None:
            self.s_state = "TCP"
        if self.c_lost:
            transport.close()
            return
        if state.server.send_proxy:
            transport.write(
                proxyproto.build(state.server.send_proxy, self.caddr, fe.local_of(self))
            )
        pending = self.pending
        self.pending = None
        if pending:
            transport.writelines(pending)
            if self.pending_size > PENDING_LIMIT and self.ct is not None and not self.c_eof:
                self.ct.resume_reading()
        if self.c_eof:
            self.shut(transport)
        self.task = None  # done: do not keep the finished Task alive for the connection's life

    def _connect_timeout(self) -> None:
        self.timed_out = True
        if self.task is not None:
            self.task.cancel()

    def _give_up(self) -> None:
        """No server: close the client cleanly (FIN after nothing), count it as done."""
        ct = self.ct
        if ct is not None and not ct.is_closing():
            ct.close()
        self.task = None
        self.maybe_done()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


reason_of: Callable[[BaseException], str] = _reason
