"""A frontend in a worker: its listening sockets, live connections and maxconn gate.

`FrontendRuntime` relays in Python (`relay.Conn` on the worker's `Poller`); the
compiled data path (`compiled.CompiledFrontend`) keeps this interface and moves the
per-connection work to C. The runtime only uses what both provide: start, count,
sweep, abort_all, close_listeners.
"""

from __future__ import annotations

import _socket
import errno
import functools
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import mptcpkit
from mptcpkit.policy import Policy
from mptcpkit.proxy.abuse import Limits
from mptcpkit.proxy.legstate import reason_of, subflows
from mptcpkit.proxy.relay import Conn
from mptcpkit.proxy.router import Router
from mptcpkit.proxy.timeouts import idle_rules
from mptcpkit.status import protocol as socket_protocol

if TYPE_CHECKING:
    from mptcpkit.proxy.balance import ServerState
    from mptcpkit.proxy.configmodel import Frontend
    from mptcpkit.proxy.datapath import BackendPort, WorkerPort

__all__ = ["ACCEPT_BATCH", "ACCEPT_RETRY", "FrontendRuntime"]

ACCEPT_BATCH = 64  # connections accepted per wakeup before others get a turn
ACCEPT_RETRY = 1.0  # seconds to stop accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM
LOCAL_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_STREAM = int(socket.SOCK_STREAM)
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class FrontendRuntime:
    """A frontend whose connections are relayed in Python."""

    conn_type = Conn  # converter.py relays with a subclass

    def __init__(
        self,
        cfg: Frontend,
        listeners: Sequence[socket.socket],
        backend: BackendPort,
        rt: WorkerPort,
        backends: Mapping[str, BackendPort] | None = None,
    ) -> None:
        self.cfg = cfg
        self.rt = rt
        self.loop = rt.loop
        self.backend = backend  # the default one
        # use_backend rules: each connection's backend is chosen (router.py)
        self.router: Router | None = None
        if cfg.rules:
            self.router = Router(cfg, backends if backends is not None else {cfg.backend: backend})
        self.listeners = list(listeners)
        self.conns: set[Conn] = set()
        self.closed = False
        self.paused = False
        self.bytes_in = 0  # relayed and not yet taken by the metrics (take_bytes)
        self.bytes_out = 0
        self._accepts: list[Callable[[], bool]] = []
        self.parked: deque[Conn] = deque()  # waiting for a server slot (queue.py)
        for be in self.router.backends.values() if self.router is not None else (backend,):
            if be.queue is not None:
                be.queue.frontends.append(self)
        self.limits: Limits | None = None  # maxconnrate, maxconn-per-source (abuse.py)
        if cfg.maxconnrate or cfg.maxconn_per_source:
            table = rt.sources.get(cfg.name) if cfg.maxconn_per_source else None
            self.limits = Limits(cfg.maxconnrate, cfg.maxconn_per_source, table)
        self._rate_n = 0  # accepted in this one-second window
        self._sources: dict[Conn, str] = {}  # counted by maxconn-per-source

    async def start(self) -> None:
        for ls in self.listeners:
            ls.setblocking(False)
            tcp = ls.family != socket.AF_UNIX
            if tcp:  # accepted sockets inherit it (MPTCP ones too): no setsockopt per client
                ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mptcp = tcp and socket_protocol(ls) == mptcpkit.IPPROTO_MPTCP
            self._listen(ls, mptcp)
        if self.limits is not None:
            self.loop.call_later(1.0, self._window)

    def _window(self) -> None:
        """Each second: a fresh maxconnrate window, and what the limits did, logged."""
        if self.closed or self.limits is None:
            return
        if self._rate_reset():
            self.limits.rate_held = True
        for line in self.limits.window(self.cfg.name):
            self.rt.log.event(line)
        self.loop.call_later(1.0, self._window)

    def _rate_reset(self) -> bool:
        """Start a new rate window (accept again); True if the last one was cut short."""
        self._rate_n = 0
        if self.paused and len(self.conns) < self.cfg.maxconn:
            self._pause(False)
        return False  # limits.rate_held says it already

    def _listen(self, ls: socket.socket, mptcp: bool) -> None:
        # family and proto as plain ints: socket.family converts to an enum each call
        accept = functools.partial(self._accept, ls, int(ls.family), ls.proto, mptcp, _port(ls))
        self._accepts.append(accept)
        self.rt.poller.listen(ls.fileno(), accept)

    def close_listeners(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop_listening()
        for ls in self.listeners:
            ls.close()

    def _stop_listening(self) -> None:
        """Take what the listeners queued (up to maxconn), then stop: closing a listener
        resets the connections in its queue."""
        for accept in self._accepts:
            while not accept():
                pass
        for ls in self.listeners:
            self.rt.poller.unlisten(ls.fileno())

    def count(self) -> int:
        """Live connections."""
        return len(self.conns)

    def abort_all(self, how: str) -> None:
        for c in list(self.conns):
            c.abort(how)

    def _accept(
        self, ls: socket.socket, family: int, proto: int, mptcp: bool, port: int = 0
    ) -> bool:
        """Take waiting connections, up to maxconn; each connects to a server at once.
        True once nothing more can be taken now, False if more may be waiting."""
        conns = self.conns
        maxconn = self.cfg.maxconn
        poller = self.rt.poller
        limits = self.limits
        for _ in range(ACCEPT_BATCH):
            if len(conns) >= maxconn:
                self._pause(True)
                return True
            if limits is not None and limits.rate and self._rate_n >= limits.rate:
                limits.rate_held = True  # the next window accepts again
                self._pause(True)
                return True
            try:
                fd, addr = ls._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return True
            except (InterruptedError, ConnectionAbortedError):
                continue  # that one is gone: the next may be waiting
            except OSError as exc:
                self.accept_failed(exc.errno or 0)
                return True
            sock = _socket.socket(family, _STREAM, proto, fd)  # blocking: see relay._DONTWAIT
            src = None
            if limits is not None:
                self._rate_n += 1
                if limits.per_source and isinstance(addr, tuple):
                    src = addr[0]
                    if not limits.admit(src):  # tcp-request connection reject
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                        sock.close()
                        continue
            conn = self.conn_type(self, sock, addr, mptcp)
            conn.dport = port
            conns.add(conn)
            if src is not None:
                self._sources[conn] = src
            # Server leg first: on loopback its connect is usually done by now, and epoll
            # then reports it before the client's first bytes, which can go straight on.
            conn.begin()
            if not conn.done:
                poller.watch(fd, conn.c)
        return False

    def accept_failed(self, err: int) -> None:
        """accept() failed for want of fds or memory: stop accepting for a while."""
        self._out_of(err, "accept failed")

    def server_failed(
        self,
        state: ServerState,
        exc: BaseException,
        tried: list[ServerState],
        be: BackendPort | None = None,
    ) -> str | float | None:
        """An attempt to reach `state` failed: why the client is closed, or the seconds
        to wait before the next attempt (None: at once; retry.py).

        The proxy's own lack of fds or memory (socket() failing) is not the server's
        fault: it is not counted against the server, no other server is tried (it would
        fail the same way), and accepting stops for a while as when accept() fails."""
        if isinstance(exc, OSError) and exc.errno in LOCAL_ERRORS:
            state.active -= 1
            self._out_of(exc.errno, "no socket for a server connection")
            return f"proxy error: {reason_of(exc)}"
        if be is None:
            be = self.backend if self.router is None else self.router.backend_of(state)
        return be.attempt_failed(state, exc, tried, self.cfg.timeouts.connect)

    def _out_of(self, err: int, what: str) -> None:
        why = reason_of(OSError(err, ""))
        self.rt.log.event(
            f"frontend {self.cfg.name}: {what} ({why}), retrying in {ACCEPT_RETRY:g}s"
        )
        if self.rt.metrics is not None:
            self.rt.metrics.proxy_error(self.cfg.name, why)
        if not self.paused:
            self._pause(True)
            self.loop.call_later(ACCEPT_RETRY, self._pause, False)

    def _pause(self, paused: bool) -> None:
        if paused == self.paused or self.closed:
            return
        self.paused = paused
        self._hold(paused)

    def _hold(self, paused: bool) -> None:
        """Leave new connections in the backlog, or take them again."""
        for ls in self.listeners:
            self.rt.poller.pause_listening(ls.fileno(), paused)

    def local_of(self, conn: Conn) -> Any:
        sock = conn.c.sock
        return sock.getsockname() if sock is not None else None

    def finished(self, conn: Conn) -> None:
        if conn.done:
            return
        conn.done = True
        self.conns.discard(conn)
        if self._sources:
            src = self._sources.pop(conn, None)
            if src is not None and self.limits is not None:
                self.limits.release(src)
        if conn.server is not None:
            conn.server.active -= 1
            if conn.be.queue is not None:
                conn.be.queue.slot_freed()
        if self.rt.observing:
            self.rt.record(
                self,
                conn.server,
                conn.caddr,
                conn.start,
                (conn.c_state or ("?" if conn.c_req else "TCP"), conn.c_sub),
                (conn.s_state or ("-" if conn.server is None else "?"), conn.s_sub),
                (conn.bytes_in, conn.bytes_out),
                conn.how or "closed",
                conn.connect_time,
                conn.be,
            )
        self._count_bytes(conn)
        # Break the Conn <-> Leg cycles: plain refcounting frees them now, no cyclic GC
        # pass (and its pauses) per connection.
        conn.c.conn = None
        if conn.s is not None:
            conn.s.conn = None
        if self.paused and len(self.conns) < self.cfg.maxconn:
            self._pause(False)
        self.rt.conn_ended()

    def _count_bytes(self, conn: Conn) -> None:
        self.bytes_in += conn.bytes_in - conn.counted_in
        self.bytes_out += conn.bytes_out - conn.counted_out
        conn.counted_in, conn.counted_out = conn.bytes_in, conn.bytes_out

    def take_bytes(self) -> tuple[int, int]:
        """Bytes relayed since the last call, live connections' included (each sweep)."""
        got = self.bytes_in, self.bytes_out
        self.bytes_in = self.bytes_out = 0
        return got

    def park(self, conn: Conn) -> None:
        """Every server is at its maxconn: `conn` waits for a slot (queue.py)."""
        conn.parked = time.monotonic()
        self.parked.append(conn)

    def queued(self) -> int:
        return len(self.parked)

    def unpark(self, queue: Any = None) -> bool:
        """Let the oldest connection waiting for `queue`'s backend (any, if None)
        connect; False if none waits."""
        parked = self.parked
        while parked and (parked[0].done or not parked[0].parked):
            parked.popleft()  # ended or let go already
        for i, conn in enumerate(parked):
            if conn.done or not conn.parked:
                continue
            if queue is not None and conn.be.queue is not queue:
                continue
            del parked[i]
            conn.parked = 0.0
            conn.connect()
            return True
        return False

    def sweep(self, interval: float) -> None:
        """Idle timeouts; subflow sampling of active MPTCP legs (when observed); bytes
        relayed by live connections, for the metrics."""
        t = self.cfg.timeouts
        rules = idle_rules(t)
        queue_limit = t.connect if t.queue is None else t.queue
        now = time.monotonic()
        for conn in list(self.conns):
            if conn.parked and now - conn.parked >= queue_limit:
                conn.end(f"queue timeout ({queue_limit:g}s)")
                continue
            if conn.active:
                conn.active = False
                self._count_bytes(conn)
                conn.idle = 0.0
                if self.rt.observing and conn.connected_server:
                    _sample_subflows(conn)
                continue
            conn.idle += interval
            if conn.inspecting:
                continue  # its own timer: tcp-request inspect-delay
            if conn.hdr is not None and t.client is not None and conn.idle >= t.client:
                conn.abort("client timeout (no PROXY header)")
            elif conn.connected_server:
                s = conn.s
                if conn.c.eof or (s is not None and s.eof):  # half-closed
                    limit, how = rules.fin_limit, rules.fin_how
                else:
                    limit, how = rules.open_limit, rules.open_how
                if limit is not None and conn.idle >= limit:
                    conn.end(how)


def _port(ls: socket.socket) -> int:
    """The port a listener is bound to (`dst_port` of its connections), 0 for unix."""
    if ls.family == socket.AF_UNIX:
        return 0
    return int(ls.getsockname()[1])


def _sample_subflows(conn: Conn) -> None:
    """Most subflows seen: sampled by the sweep on active legs where MPTCP was asked
    for, not per read; and only when a log or metrics will show it."""
    if conn.c_req and conn.c.sock is not None and conn.c_state is None:
        n = subflows(conn.c.sock)
        if n > conn.c_sub:
            conn.c_sub = n
    s, server = conn.s, conn.server
    if (
        s is not None
        and s.sock is not None
        and conn.s_state is None
        and server is not None
        and server.server.policy is not Policy.OFF
    ):
        n = subflows(s.sock)
        if n > conn.s_sub:
            conn.s_sub = n
