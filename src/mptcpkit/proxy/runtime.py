"""A worker's event loop: accept on its listeners, relay, check servers, log, count.

One `Runtime` per worker process. Listening and relayed sockets live in the worker's
`Poller` (an epoll set nested in the asyncio loop); asyncio runs the rest: health
checks, the once-a-second sweep, signals. `maxconn` stops accepting, so connections
wait in the kernel's backlog, and a reload or drain can stop listening without
touching established connections.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import functools
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import mptcpkit
from mptcpkit.abi.constants import MPTCP_INFO, SOL_MPTCP
from mptcpkit.aio import sock_connect
from mptcpkit.policy import Policy
from mptcpkit.proxy.balance import Balancer, ServerState
from mptcpkit.proxy.config import Backend, Config, Frontend
from mptcpkit.proxy.logging import ConnRecord, EventLog
from mptcpkit.proxy.poller import Poller
from mptcpkit.proxy.relay import Conn, ReadBuffer, reason_of
from mptcpkit.status import protocol as socket_protocol

__all__ = ["BackendRuntime", "FrontendRuntime", "Runtime"]

_MPTCP_INFO_LEN = 96
_SUBFLOWS_TOTAL = 80  # offsetof(struct mptcp_info, mptcpi_subflows_total)
SWEEP_INTERVAL = 1.0
ACCEPT_BATCH = 64  # connections accepted per wakeup before others get a turn
ACCEPT_RETRY = 1.0  # seconds to stop accepting after EMFILE/ENFILE/ENOBUFS/ENOMEM
_STREAM = int(socket.SOCK_STREAM)
_NONBLOCKING_STREAM = _STREAM | socket.SOCK_NONBLOCK


class BackendRuntime:
    """A backend's servers, their resolved addresses, and how to open a leg to one."""

    def __init__(
        self, cfg: Backend, rt: Runtime, targets: Mapping[str, tuple[int, Any]] | None = None
    ) -> None:
        self.cfg = cfg
        self.rt = rt
        self.balancer = Balancer(cfg)
        self.targets: dict[str, tuple[int, Any]] = dict(targets or {})
        for s in cfg.servers:
            if s.name not in self.targets:
                self.targets[s.name] = _resolve(s.address)
        self.needs_client_addr = cfg.balance == "source" or any(s.send_proxy for s in cfg.servers)

    def start_connect(self, state: ServerState) -> tuple[Any, int]:
        """A non-blocking connect to `state`'s server, made with its MPTCP policy.

        (socket, errno): 0 if connected already, EINPROGRESS while under way, else the
        failure (the caller closes the socket).
        """
        family, sockaddr = self.targets[state.server.name]
        policy = state.server.policy
        if family == socket.AF_UNIX or policy is Policy.OFF:
            sock: Any = _socket.socket(family, _NONBLOCKING_STREAM)
        else:
            sock = mptcpkit.socket(family, _NONBLOCKING_STREAM, mptcp=policy)
        try:
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock, err


async def connect_socket(
    family: int,
    sockaddr: Any,
    policy: Policy,
    timeout: float | None,
    loop: asyncio.AbstractEventLoop,
) -> socket.socket:
    """A non-blocking connect of a socket made with `policy`; raises OSError/TimeoutError."""
    if family == socket.AF_UNIX:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = mptcpkit.socket(family, socket.SOCK_STREAM, mptcp=policy)
    try:
        if timeout is None:
            await sock_connect(sock, sockaddr)
        else:
            async with asyncio.timeout(timeout):
                await sock_connect(sock, sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def resolve_targets(cfg: Config) -> dict[str, dict[str, tuple[int, Any]]]:
    """(family, sockaddr) of every server, by backend: names are looked up once, at start."""
    return {
        name: {s.name: _resolve(s.address) for s in b.servers} for name, b in cfg.backends.items()
    }


def _resolve(addr: Any) -> tuple[int, Any]:
    """(family, sockaddr) for a server address; names are resolved once, at start."""
    if addr.protocol == "unix":
        return socket.AF_UNIX, addr.path
    family = addr.family if addr.family in (socket.AF_INET, socket.AF_INET6) else 0
    infos = socket.getaddrinfo(addr.host, addr.port, family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    fam, _, _, _, sockaddr = infos[0]
    return fam, sockaddr


class FrontendRuntime:
    """A frontend's listening sockets, its live connections and its maxconn gate."""

    def __init__(
        self,
        cfg: Frontend,
        listeners: Sequence[socket.socket],
        backend: BackendRuntime,
        rt: Runtime,
    ) -> None:
        self.cfg = cfg
        self.rt = rt
        self.loop = rt.loop
        self.backend = backend
        self.listeners = list(listeners)
        self.conns: set[Conn] = set()
        self.closed = False
        self.paused = False

    async def start(self) -> None:
        for ls in self.listeners:
            ls.setblocking(False)
            tcp = ls.family != socket.AF_UNIX
            if tcp:  # accepted sockets inherit it (MPTCP ones too): no setsockopt per client
                ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            mptcp = tcp and socket_protocol(ls) == mptcpkit.IPPROTO_MPTCP
            # family and proto as plain ints: socket.family converts to an enum each call
            accept = functools.partial(self._accept, ls, int(ls.family), ls.proto, mptcp)
            self.rt.poller.listen(ls.fileno(), accept)

    def close_listeners(self) -> None:
        if self.closed:
            return
        self.closed = True
        for ls in self.listeners:
            self.rt.poller.unlisten(ls.fileno())
            ls.close()

    def _accept(self, ls: socket.socket, family: int, proto: int, mptcp: bool) -> None:
        """Take waiting connections, up to maxconn; each connects to a server at once."""
        conns = self.conns
        maxconn = self.cfg.maxconn
        poller = self.rt.poller
        for _ in range(ACCEPT_BATCH):
            if len(conns) >= maxconn:
                self._pause(True)
                return
            try:
                fd, addr = ls._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                self.rt.log.event(
                    f"frontend {self.cfg.name}: accept failed ({reason_of(exc)}),"
                    f" retrying in {ACCEPT_RETRY:g}s"
                )
                self._pause(True)
                self.loop.call_later(ACCEPT_RETRY, self._pause, False)
                return
            sock = _socket.socket(family, _STREAM, proto, fd)  # blocking: see relay._DONTWAIT
            conn = Conn(self, sock, addr, mptcp)
            conns.add(conn)
            # Server leg first: on loopback its connect is usually done by now, and epoll
            # then reports it before the client's first bytes, which can go straight on.
            conn.begin()
            if not conn.done:
                poller.watch(fd, conn.c)

    def _pause(self, paused: bool) -> None:
        if paused == self.paused or self.closed:
            return
        self.paused = paused
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
        if conn.server is not None:
            conn.server.active -= 1
        self.rt.record(self, conn)
        # Break the Conn <-> Leg cycles: plain refcounting frees them now, no cyclic GC
        # pass (and its pauses) per connection.
        conn.c.conn = None
        if conn.s is not None:
            conn.s.conn = None
        if self.paused and len(self.conns) < self.cfg.maxconn:
            self._pause(False)
        if self.rt.stopping and not self.rt.busy():
            self.rt.idle_event.set()


class Runtime:
    """Everything one worker runs; `serve()` returns when stopped and drained."""

    def __init__(
        self,
        cfg: Config,
        listeners: Mapping[str, Sequence[socket.socket]],
        *,
        log: EventLog,
        metrics: Any = None,
        worker: int = 0,
        targets: Mapping[str, Mapping[str, tuple[int, Any]]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.log = log
        self.metrics = metrics
        self.rbuf = ReadBuffer()
        self.poller = Poller(self.loop)
        self.observing = log.fd >= 0 or metrics is not None  # anyone reading the records
        self.worker = worker
        self.stopping = False
        self.idle_event = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.deadline: float | None = None
        self._drain: asyncio.Timeout | None = None  # the running drain deadline, if any
        self.backends = {
            name: BackendRuntime(b, self, (targets or {}).get(name))
            for name, b in cfg.backends.items()
        }
        self.frontends = [
            FrontendRuntime(f, listeners.get(f.name, ()), self.backends[f.backend], self)
            for f in cfg.frontends
        ]
        self._tasks: list[asyncio.Task[None]] = []

    def busy(self) -> bool:
        return any(fe.conns for fe in self.frontends)

    # --- running and stopping --------------------------------------------------------

    async def serve(self) -> None:
        for fe in self.frontends:
            await fe.start()
        for be in self.backends.values():
            if be.cfg.check is not None:
                self._tasks.append(self.loop.create_task(self._health(be)))
        self._tasks.append(self.loop.create_task(self._sweep()))
        await self.stop_event.wait()
        for fe in self.frontends:
            fe.close_listeners()
        if self.busy():
            try:
                async with asyncio.timeout_at(self.deadline) as self._drain:
                    await self.idle_event.wait()
            except TimeoutError:
                n = sum(len(fe.conns) for fe in self.frontends)
                self.log.event(
                    f"worker {self.worker}: stop deadline reached, closing {n} connections"
                )
                for fe in self.frontends:
                    for c in list(fe.conns):
                        c.abort("stopped (deadline)")
                await asyncio.sleep(0)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.poller.close()
        if self.metrics is not None:
            self.metrics.flush(self)
        self.log.flush()

    def stop(self, timeout: float | None) -> None:
        """Stop accepting; let connections finish, cutting them after `timeout` seconds."""
        if self.stopping:
            if timeout is not None and (
                self.deadline is None or self.deadline > self.loop.time() + timeout
            ):
                # A tighter deadline (SIGTERM during a reload's drain) moves the running timer.
                self.deadline = self.loop.time() + timeout
                if self._drain is not None:
                    self._drain.reschedule(self.deadline)
            return
        self.stopping = True
        self.deadline = None if timeout is None else self.loop.time() + timeout
        if not self.busy():
            self.idle_event.set()
        self.stop_event.set()

    # --- per connection ----------------------------------------------------------------

    def observe_leg(self, sock: Any) -> tuple[str | None, int]:
        """(state, subflows) of a leg where MPTCP was asked for; one getsockopt if MPTCP."""
        n = _subflows(sock)
        if n:
            return "MPTCP", n
        # fallback or TCP: SO_PROTOCOL tells.
        try:
            return str(mptcpkit.status(sock.fileno())), 0
        except (OSError, ValueError):
            return None, 0

    def connect_failed(self, be: BackendRuntime, state: ServerState, exc: BaseException) -> None:
        self.log.event(
            f"backend {be.cfg.name}: connect to {state.server.name} ({state.server.address}) "
            f"failed: {reason_of(exc)}"
        )
        if self.metrics is not None:
            self.metrics.connect_failed(be.cfg.name, state.server.name)

    def record(self, fe: FrontendRuntime, conn: Conn) -> None:
        if not self.observing:
            return
        c_state = conn.c_state or ("?" if conn.c_req else "TCP")
        s_state = conn.s_state or ("-" if conn.server is None else "?")
        server = conn.server.server if conn.server is not None else None
        rec = ConnRecord(
            start=conn.start,
            duration=time.time() - conn.start,
            frontend=fe.cfg.name,
            client=conn.caddr,
            backend=fe.backend.cfg.name,
            server=server.name if server is not None else None,
            server_address=str(server.address) if server is not None else None,
            client_state=c_state,
            client_subflows=conn.c_sub,
            server_state=s_state,
            server_subflows=conn.s_sub,
            bytes_in=conn.bytes_in,
            bytes_out=conn.bytes_out,
            ended=conn.how or "closed",
        )
        self.log.conn(rec)
        if self.metrics is not None:
            self.metrics.conn_done(rec)

    # --- background work -------------------------------------------------------------

    async def _sweep(self) -> None:
        """Idle timeouts, subflow sampling of MPTCP legs, metrics flush: once a second."""
        tick = 0
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            tick += 1
            for fe in self.frontends:
                t = fe.cfg.timeouts
                limits = [x for x in (t.client, t.server) if x is not None]
                limit = min(limits) if limits else None
                for conn in list(fe.conns):
                    if conn.active:
                        conn.active = False
                        conn.idle = 0.0
                        if self.observing and conn.connected_server:
                            self._sample_subflows(conn)
                        continue
                    conn.idle += SWEEP_INTERVAL
                    if conn.hdr is not None and t.client is not None and conn.idle >= t.client:
                        conn.abort("client timeout (no PROXY header)")
                    elif limit is not None and conn.idle >= limit and conn.connected_server:
                        who = "client" if limit == t.client else "server"
                        conn.end(f"{who} timeout ({limit:g}s idle)")
            if self.metrics is not None:
                self.metrics.flush(self)
            self.log.flush()

    def _sample_subflows(self, conn: Conn) -> None:
        """Most subflows seen: sampled by the sweep on active legs where MPTCP was asked
        for, not per read; and only when a log or metrics will show it."""
        if conn.c_req and conn.c.sock is not None and conn.c_state is None:
            n = _subflows(conn.c.sock)
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
            n = _subflows(s.sock)
            if n > conn.s_sub:
                conn.s_sub = n

    async def _health(self, be: BackendRuntime) -> None:
        check = be.cfg.check
        assert check is not None
        while True:
            results = await asyncio.gather(
                *(self._probe(be, s, check.timeout) for s in be.balancer.states)
            )
            for state, err in zip(be.balancer.states, results, strict=True):
                if state.observe(err is None):
                    word = "UP" if state.up else "DOWN"
                    why = "check passed" if err is None else f"check failed: {err}"
                    self.log.event(
                        f"backend {be.cfg.name}: server {state.server.name} is {word} ({why})"
                    )
                if self.metrics is not None:
                    self.metrics.server_health(be.cfg.name, state.server.name, state.up)
            await asyncio.sleep(check.interval)

    async def _probe(self, be: BackendRuntime, state: ServerState, timeout: float) -> str | None:
        family, sockaddr = be.targets[state.server.name]
        try:
            sock = await connect_socket(family, sockaddr, state.server.policy, timeout, self.loop)
        except (OSError, TimeoutError) as exc:
            return reason_of(exc)
        sock.close()
        return None


def _subflows(sock: Any) -> int:
    """All subflows of a live MPTCP socket, 0 if it is not one (fell back, plain TCP).

    One getsockopt(MPTCP_INFO) and two byte reads, not a full `mptcpkit.info()`
    decode: this runs for every MPTCP connection. Layout: REFERENCE §3 (u8 subflows at
    0 counts extra subflows; u8 subflows_total at 80, 6.8+, counts all).
    """
    try:
        raw = sock.getsockopt(SOL_MPTCP, MPTCP_INFO, _MPTCP_INFO_LEN)
    except (OSError, ValueError):
        return 0
    if len(raw) > _SUBFLOWS_TOTAL and raw[_SUBFLOWS_TOTAL]:
        return int(raw[_SUBFLOWS_TOTAL])
    return int(raw[0]) + 1 if raw else 0
