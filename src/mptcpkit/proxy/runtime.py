"""A worker's event loop: accept on its listeners, relay, check servers, log, count.

One `Runtime` per worker process. Accepting is done by hand (`add_reader` on the
listening socket) rather than through `loop.create_server()`, so that `maxconn` can
really stop accepting (connections then wait in the kernel's backlog) and a reload
or drain can stop listening without touching established connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Any

import mptcpkit
from mptcpkit.policy import Policy
from mptcpkit.proxy.balance import Balancer, ServerState
from mptcpkit.proxy.config import Backend, Config, Frontend
from mptcpkit.proxy.logging import ConnRecord, EventLog
from mptcpkit.proxy.relay import Conn, reason_of

__all__ = ["BackendRuntime", "FrontendRuntime", "Runtime"]

ACCEPT_BATCH = 64
SWEEP_INTERVAL = 1.0
_RETRYABLE_ACCEPT = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _on_writable(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class BackendRuntime:
    """A backend's servers, their resolved addresses, and how to open a leg to one."""

    def __init__(self, cfg: Backend, rt: Runtime) -> None:
        self.cfg = cfg
        self.rt = rt
        self.balancer = Balancer(cfg)
        self.targets: dict[str, tuple[int, Any]] = {}
        for s in cfg.servers:
            self.targets[s.name] = _resolve(s.address)

    async def open(
        self,
        state: ServerState,
        protocol: asyncio.Protocol,
        timeout: float,
        loop: asyncio.AbstractEventLoop,
    ) -> tuple[Any, asyncio.Transport]:
        """Connect to `state`'s server with its MPTCP policy; (socket, transport)."""
        family, sockaddr = self.targets[state.server.name]
        policy = state.server.policy
        if policy is Policy.OFF and self.rt.uvloop and family != socket.AF_UNIX:
            # uvloop connects natively (libuv), no Python-level connect dance.
            async with asyncio.timeout(timeout):
                tr, _ = await loop.create_connection(
                    lambda: protocol, sockaddr[0], sockaddr[1], family=family
                )
            return None, tr
        sock = await connect_socket(family, sockaddr, policy, timeout, loop)
        try:
            if not self.rt.uvloop and family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tr, _ = await loop.create_connection(lambda: protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        return sock, tr


async def connect_socket(
    family: int, sockaddr: Any, policy: Policy, timeout: float, loop: asyncio.AbstractEventLoop
) -> socket.socket:
    """A non-blocking connect of a socket made with `policy`; raises OSError/TimeoutError."""
    if family == socket.AF_UNIX:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = mptcpkit.socket(family, socket.SOCK_STREAM, mptcp=policy)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(sockaddr)
        if err in (errno.EINPROGRESS, errno.EAGAIN) and family != socket.AF_UNIX:
            fut: asyncio.Future[None] = loop.create_future()
            fd = sock.fileno()
            loop.add_writer(fd, _on_writable, fut)
            try:
                async with asyncio.timeout(timeout):
                    await fut
            finally:
                loop.remove_writer(fd)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


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
        self.paused = False
        self.closed = False
        self.mptcp_listener: dict[int, bool] = {}
        for ls in self.listeners:
            ls.setblocking(False)
            if ls.family == socket.AF_UNIX:
                self.mptcp_listener[ls.fileno()] = False
                continue
            proto = ls.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
            self.mptcp_listener[ls.fileno()] = proto == mptcpkit.IPPROTO_MPTCP

    def start(self) -> None:
        for ls in self.listeners:
            self.loop.add_reader(ls.fileno(), self.on_accept, ls)

    def pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            for ls in self.listeners:
                self.loop.remove_reader(ls.fileno())

    def resume(self) -> None:
        if self.paused and not self.closed:
            self.paused = False
            self.start()

    def close_listeners(self) -> None:
        if self.closed:
            return
        if not self.paused:
            for ls in self.listeners:
                self.loop.remove_reader(ls.fileno())
        self.closed = True
        for ls in self.listeners:
            ls.close()

    def on_accept(self, ls: socket.socket) -> None:
        conns = self.conns
        maxconn = self.cfg.maxconn
        mptcp = self.mptcp_listener.get(ls.fileno(), False)
        for _ in range(ACCEPT_BATCH):
            if len(conns) >= maxconn:
                self.pause()
                return
            try:
                fd, caddr = ls._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _RETRYABLE_ACCEPT:
                    self.rt.log.event(
                        f"frontend {self.cfg.name}: accept failed ({exc}), pausing 100ms"
                    )
                    self.pause()
                    self.loop.call_later(0.1, self.resume)
                    return
                raise
            # A plain socket object: mptcpkit.Socket's Python-level accept() costs more.
            csock = socket.socket(ls.family, ls.type, ls.proto, fd)
            if mptcp and not self.rt.uvloop:
                with contextlib.suppress(OSError):
                    csock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(self, csock, caddr)
            conn.c_req = mptcp
            conns.add(conn)
            conn.task = self.loop.create_task(self.run(conn))

    async def run(self, conn: Conn) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: conn, conn.csock)
        except (OSError, asyncio.CancelledError) as exc:
            conn.csock.close()
            conn.c_lost = True
            conn.how = conn.how or f"client error: {reason_of(exc)}"
            conn.task = None
            self.finished(conn)
            return
        if conn.hdr is not None:
            conn.task = None
            conn.maybe_done()
            return
        await conn.connect()

    def local_of(self, conn: Conn) -> Any:
        try:
            return conn.csock.getsockname()
        except OSError:
            return None

    def finished(self, conn: Conn) -> None:
        if conn.done:
            return
        conn.done = True
        self.conns.discard(conn)
        if conn.server is not None:
            conn.server.active -= 1
        self.rt.record(self, conn)
        if self.paused and len(self.conns) < self.cfg.maxconn:
            self.resume()
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
    ) -> None:
        self.cfg = cfg
        self.loop = asyncio.get_running_loop()
        self.uvloop = type(self.loop).__module__.startswith("uvloop")
        self.log = log
        self.metrics = metrics
        self.worker = worker
        self.stopping = False
        self.idle_event = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.deadline: float | None = None
        self.backends = {name: BackendRuntime(b, self) for name, b in cfg.backends.items()}
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
            fe.start()
        for be in self.backends.values():
            if be.cfg.check is not None:
                self._tasks.append(self.loop.create_task(self._health(be)))
        self._tasks.append(self.loop.create_task(self._sweep()))
        await self.stop_event.wait()
        for fe in self.frontends:
            fe.close_listeners()
        if self.busy():
            try:
                async with asyncio.timeout_at(self.deadline):
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
        if self.metrics is not None:
            self.metrics.flush(self)
        self.log.flush()

    def stop(self, timeout: float | None) -> None:
        """Stop accepting; let connections finish, cutting them after `timeout` seconds."""
        if self.stopping:
            if timeout is not None and (
                self.deadline is None or self.deadline > self.loop.time() + timeout
            ):
                self.deadline = self.loop.time() + timeout
                self.stop_event.set()
            return
        self.stopping = True
        self.deadline = None if timeout is None else self.loop.time() + timeout
        if not self.busy():
            self.idle_event.set()
        self.stop_event.set()

    # --- per connection ----------------------------------------------------------------

    def observe_leg(self, sock: Any, info: list[Any], requested: bool) -> None:
        """Fill [state, subflows] for a leg; syscalls only when MPTCP was asked for."""
        if not requested or sock is None:
            if info[0] is None:
                info[0] = "TCP"
            return
        try:
            st = mptcpkit.status(sock)
        except (OSError, ValueError, TypeError):
            return
        info[0] = str(st)
        if st.is_mptcp:
            n = _subflows(sock)
            if n > info[1]:
                info[1] = n

    def connect_failed(self, be: BackendRuntime, state: ServerState, exc: BaseException) -> None:
        self.log.event(
            f"backend {be.cfg.name}: connect to {state.server.name} ({state.server.address}) "
            f"failed: {reason_of(exc)}"
        )
        if self.metrics is not None:
            self.metrics.connect_failed(be.cfg.name, state.server.name)

    def record(self, fe: FrontendRuntime, conn: Conn) -> None:
        c_state = conn.c_info[0] or ("?" if conn.c_req else "TCP")
        s_state = conn.s_info[0] or ("-" if conn.server is None and conn.st is None else "?")
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
            client_subflows=max(conn.c_info[1], 0),
            server_state=s_state,
            server_subflows=max(conn.s_info[1], 0),
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
                        if conn.st is not None:
                            self._sample_subflows(conn)
                        continue
                    conn.idle += SWEEP_INTERVAL
                    if conn.hdr is not None and t.client is not None and conn.idle >= t.client:
                        conn.abort("client timeout (no PROXY header)")
                    elif limit is not None and conn.idle >= limit and conn.st is not None:
                        who = "client" if limit == t.client else "server"
                        conn.end(f"{who} timeout ({limit:g}s idle)")
            if self.metrics is not None:
                self.metrics.flush(self)
            self.log.flush()

    def _sample_subflows(self, conn: Conn) -> None:
        for sock, info, lost in (
            (conn.csock, conn.c_info, conn.c_lost),
            (conn.ssock, conn.s_info, conn.st_lost),
        ):
            if sock is None or lost or info[0] in ("TCP", "fallback"):
                continue
            if sock is conn.csock and not conn.c_req:
                continue  # client leg of a TCP listener
            n = _subflows(sock)
            if n > info[1]:
                info[1] = n

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
    try:
        info = mptcpkit.info(sock)
    except (OSError, ValueError, TypeError):
        return 0
    if info is None:
        return 0
    return info.subflow_count
