"""A worker's event loop: accept on its listeners, relay, check servers, log, count.

One `Runtime` per worker process. Listening and relayed sockets live in the worker's
compiled engine (`compiled.py`) or, without it, in its `Poller`: either is an epoll
set nested in the asyncio loop. asyncio runs the rest: health checks, the
once-a-second sweep, signals. `maxconn` stops accepting, so connections wait in the
kernel's backlog, and a reload or drain can stop listening without touching
established connections.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import mptcpkit
from mptcpkit import handover
from mptcpkit.abi.sockaddr import encode_address
from mptcpkit.aio import sock_connect
from mptcpkit.policy import Policy
from mptcpkit.proxy import compiled, health, resolvers, retry
from mptcpkit.proxy.balance import Balancer, ServerState
from mptcpkit.proxy.compiledconvert import CompiledConverter, wire_flags
from mptcpkit.proxy.configmodel import Backend, Config
from mptcpkit.proxy.convertdecide import needed as converter_needed
from mptcpkit.proxy.converter import ConvertFrontend
from mptcpkit.proxy.datapath import (
    READ_SIZE,
    BackendPort,
    FrontendPort,
    ReadBuffer,
    Wire,
    burst,
)
from mptcpkit.proxy.frontend import FrontendRuntime
from mptcpkit.proxy.legstate import reason_of
from mptcpkit.proxy.logging import ConnRecord, EventLog
from mptcpkit.proxy.poller import Poller
from mptcpkit.proxy.queue import ServerQueue, full, share
from mptcpkit.proxy.slowstart import came_up
from mptcpkit.proxy.source import bind_source
from mptcpkit.proxy.timeouts import tick

__all__ = ["BackendRuntime", "Runtime"]

SWEEP_INTERVAL = 1.0
# A connection's log line is written at most this long after it ends (lines that end
# meanwhile go in the same write): prompt as HAProxy's, one write per batch under load.
LOG_DELAY = 0.02
SETTLE_LIMIT = 0.5  # how long a stopping worker waits for handshakes in flight
_STREAM = int(socket.SOCK_STREAM)
_NONBLOCKING_STREAM = _STREAM | socket.SOCK_NONBLOCK


class BackendRuntime:
    """A backend's servers, their resolved addresses, and how to open a leg to one."""

    def __init__(self, cfg: Backend, rt: Runtime, targets: Mapping[str, tuple[int, Any]]) -> None:
        self.cfg = cfg
        self.rt = rt
        self.balancer = Balancer(cfg)
        self.states = self.balancer.states
        self.queue: ServerQueue | None = None  # servers with a maxconn (queue.py)
        if any(s.maxconn for s in cfg.servers):
            for state in self.balancer.states:
                state.limit = share(state.server.maxconn, rt.cfg.global_.workers, rt.worker)
            self.queue = ServerQueue(self.balancer.states, rt.loop)
        self.targets = dict(targets)  # resolved by the master (prepare.py)
        self.needs_client_addr = cfg.balance == "source" or any(s.send_proxy for s in cfg.servers)
        # What the compiled engine needs to open a leg to each server, made once.
        self.wire = (
            {state: self._wire(state) for state in self.balancer.states}
            if rt.engine is not None
            else {}
        )

    def _wire(self, state: ServerState) -> Wire:
        """(state, family, sockaddr, proto, may fall back to TCP, send-proxy, observe MPTCP,
        the source sockaddr to bind or None)."""
        family, sockaddr = self.targets[state.server.name]
        policy = state.server.policy
        mptcp = family != socket.AF_UNIX and policy is not Policy.OFF
        proto = mptcpkit.IPPROTO_MPTCP if mptcp else 0
        fallback = policy is Policy.PREFER
        server = state.server
        src = server.source
        wire: Wire = (
            state,
            family,
            b"" if server.original_destination else encode_address(family, sockaddr),
            proto,
            fallback,
            server.send_proxy or (2 if server.send_convert else 0),
            mptcp,
            None if src is None else encode_address(family, (src, 0)),
        )
        flags = wire_flags(server)
        return (*wire, flags) if flags else wire

    def readdress(self, state: ServerState, where: tuple[int, Any]) -> None:
        """Connect to `state`'s server at `where` from now on (resolvers.py)."""
        self.targets[state.server.name] = where
        if self.rt.engine is not None:
            self.wire[state] = self._wire(state)
        if not state.resolved:
            state.resolved = True
            came_up(state)

    def next_server(self, caddr: Any, tried: list[ServerState] | None) -> ServerState | str | None:
        """The server to connect to next (counted as active), why there is none, or
        None: wait, every usable server is at its maxconn."""
        host = caddr[0] if isinstance(caddr, tuple) else None
        if tried and retry.same_server(
            tried, self.cfg.retries, self.cfg.redispatch, len(self.balancer.states)
        ):
            state: ServerState | None = tried[-1]
        else:
            # a new server, or another one than the last (redispatch); else the same
            last = tried[-1:] if tried else ()
            state = self.balancer.pick(host, last) or self.balancer.pick(host, ())
        if state is None:
            if self.queue is not None and full(self.balancer.states):
                return None
            return "every server failed" if tried else "no server available"
        state.active += 1
        state.total += 1
        return state

    def attempt_failed(
        self,
        state: ServerState,
        exc: BaseException,
        tried: list[ServerState],
        connect_timeout: float = retry.PAUSE_MAX,
    ) -> str | float | None:
        """Count a failed connect: why no retry, or the seconds to wait before retrying
        the same server (None: retry at once)."""
        state.active -= 1
        self.rt.connect_failed(self, state, exc)
        tried.append(state)
        if len(tried) > self.cfg.retries:
            return f"connect failed: {reason_of(exc)}"
        n = len(self.balancer.states)
        if retry.same_server(tried, self.cfg.retries, self.cfg.redispatch, n):
            wait = retry.pause(isinstance(exc, TimeoutError), connect_timeout)
            return wait if wait > 0 else None
        return None

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
            src = state.server.source
            err = bind_source(sock, src) if src is not None else 0
            if not err:
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
        targets: Mapping[str, Mapping[str, tuple[int, Any]]],
        sources: Mapping[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.sources: dict[str, Any] = dict(sources or {})  # maxconn-per-source (abuse.py)
        for table in self.sources.values():
            table.worker = worker  # this worker's connections, counted apart
        self.loop = asyncio.get_running_loop()
        self.log = log
        self.metrics = metrics
        self.observing = log.fd >= 0 or metrics is not None  # anyone reading the records
        self.rbuf = ReadBuffer(burst=burst())
        self.poller = Poller(self.loop)
        self.engine = compiled.open_engine(self.loop, READ_SIZE, self.observing, self.rbuf.burst)
        self.worker = worker
        self.stopping = False
        self.idle_event = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.deadline: float | None = None
        self._drain: asyncio.Timeout | None = None  # the running drain deadline, if any
        self.backends = {
            name: BackendRuntime(b, self, targets[name]) for name, b in cfg.backends.items()
        }
        kind = FrontendRuntime if self.engine is None else compiled.CompiledFrontend
        conv = ConvertFrontend if self.engine is None else CompiledConverter
        self.frontends = [
            (conv if converter_needed(f, cfg.backends[f.backend]) else kind)(
                f, listeners.get(f.name, ()), self.backends[f.backend], self, self.backends
            )
            for f in cfg.frontends
        ]
        self._tasks: list[asyncio.Task[None]] = []
        self._log_due = False  # a flush of the connection log is scheduled
        self.board: health.Board | None = None  # the master's health state, if any
        self.addrs: resolvers.AddressBoard | None = None  # re-resolved server addresses

    def busy(self) -> bool:
        return any(fe.count() for fe in self.frontends)

    # --- running and stopping --------------------------------------------------------

    async def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Serve until stopped and drained; `ready()` once every listener is served."""
        for fe in self.frontends:
            await fe.start()
        if self.board is not None:  # the master's checker decides (health.py)
            self._tasks.append(self.loop.create_task(health.follow(self, self.board)))
        else:
            for be in self.backends.values():
                if be.cfg.check is not None:
                    self._tasks.append(self.loop.create_task(self._health(be)))
        if self.addrs is not None and self.addrs.index:
            self._tasks.append(self.loop.create_task(resolvers.follow(self, self.addrs)))
        self._tasks.append(self.loop.create_task(self._sweep()))
        if ready is not None:
            ready()
        await self.stop_event.wait()
        if self.busy():
            try:
                async with asyncio.timeout_at(self.deadline) as self._drain:
                    while self.busy():  # listeners are closed: nothing new comes in
                        self.idle_event.clear()
                        await self.idle_event.wait()
            except TimeoutError:
                n = sum(fe.count() for fe in self.frontends)
                self.log.event(f"stop deadline reached, closing {n} connections")
                for fe in self.frontends:
                    fe.abort_all("stopped (deadline)")
                await asyncio.sleep(0)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.poller.close()
        if self.engine is not None:
            compiled.close_engine(self.loop, self.engine)
        if self.metrics is not None:
            self.metrics.flush(self)
        self.log.flush()

    def stop(self, timeout: float | None, settle: bool = False) -> None:
        """Stop accepting; let connections finish, cutting them after `timeout` seconds.

        `settle`: new SYNs no longer reach the listeners (the master diverted them,
        `ListenerPool.divert`), so keep accepting until the handshakes already in flight
        to them have completed (at most SETTLE_LIMIT s, or `timeout`), then take what is
        queued and close them: a listener closed earlier would reset those."""
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
        limit = SETTLE_LIMIT if timeout is None else min(SETTLE_LIMIT, timeout)
        if settle and limit > 0 and self._ports():
            self._tasks.append(self.loop.create_task(self._settle(limit)))
            return
        # Stop accepting now, not a loop turn later: a connection accepted after the
        # idle check would be reset when the worker exits.
        self._close_listeners()

    def _close_listeners(self) -> None:
        for fe in self.frontends:
            fe.close_listeners()
        self.stop_event.set()

    def _ports(self) -> set[int]:
        return {
            ls.getsockname()[1]
            for fe in self.frontends
            for ls in fe.listeners
            if ls.family != socket.AF_UNIX
        }

    async def _settle(self, limit: float) -> None:
        """Accept on until no handshake is in flight to our ports (looked for in each
        listener's own network namespace: a bind's `namespace`), then close."""
        end = self.loop.time() + limit
        groups: list[tuple[int | None, set[int]]] = []
        try:
            groups = handover.ports_by_namespace(
                [ls for fe in self.frontends for ls in fe.listeners if ls.family != socket.AF_UNIX]
            )
            while self._in_flight(groups) and self.loop.time() < end:
                await asyncio.sleep(0.002)
        except OSError:  # sock_diag cannot tell: close as without settling
            pass
        finally:
            for ns, _ in groups:
                if ns is not None:
                    os.close(ns)
            self._close_listeners()

    @staticmethod
    def _in_flight(groups: list[tuple[int | None, set[int]]]) -> bool:
        """Whether a handshake is in flight to one of `groups`' ports; a namespace this
        worker may not enter (it dropped root) is left out, the rest still count."""
        for ns, ports in list(groups):
            try:
                if handover.handshakes_in_flight(ports, ns):
                    return True
            except OSError:
                if ns is None:
                    raise  # sock_diag cannot tell here: stop settling
                groups.remove((ns, ports))
                os.close(ns)
        return False

    # --- per connection ----------------------------------------------------------------

    def connect_failed(self, be: BackendRuntime, state: ServerState, exc: BaseException) -> None:
        self.log.event(
            f"backend {be.cfg.name}: connect to {state.server.name} ({state.server.address}) "
            f"failed: {reason_of(exc)}"
        )
        if self.metrics is not None:
            self.metrics.connect_failed(be.cfg.name, state.server.name)
        if self.board is not None:  # passive checks (observe layer4)
            self.board.connect_failed(be.cfg.name, state.server.name)

    def record(
        self,
        fe: FrontendPort,
        state: ServerState | None,
        client: Any,
        start: float,
        c_leg: tuple[str, int],
        s_leg: tuple[str, int],
        nbytes: tuple[int, int],
        ended: str,
        connect_time: float = -1.0,
        backend: BackendPort | None = None,
    ) -> None:
        """Log and count a finished connection (only called when someone reads them);
        `backend`: the one its frontend's rules picked, if not the default."""
        server = state.server if state is not None else None
        rec = ConnRecord(
            start=start,
            duration=time.time() - start,
            frontend=fe.cfg.name,
            client=client,
            backend=(fe.backend if backend is None else backend).cfg.name,
            server=server.name if server is not None else None,
            server_address=str(server.address) if server is not None else None,
            client_state=c_leg[0],
            client_subflows=c_leg[1],
            server_state=s_leg[0],
            server_subflows=s_leg[1],
            bytes_in=nbytes[0],
            bytes_out=nbytes[1],
            ended=ended,
            connect_time=connect_time if connect_time >= 0 else None,
        )
        self.log.conn(rec)
        if not self._log_due:
            self._log_due = True
            self.loop.call_later(LOG_DELAY, self._flush_log)
        if self.metrics is not None:
            self.metrics.conn_done(rec)

    def _flush_log(self) -> None:
        self._log_due = False
        self.log.flush()

    def conn_ended(self) -> None:
        if self.stopping and not self.busy():
            self.idle_event.set()

    # --- background work -------------------------------------------------------------

    async def _sweep(self) -> None:
        """Idle timeouts and subflow sampling of MPTCP legs every tick (a second, or
        less for sub-second timeouts: timeouts.tick); metrics flush once a second."""
        period = tick(fe.cfg.timeouts for fe in self.frontends)
        last = flushed = time.monotonic()
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for fe in self.frontends:
                fe.sweep(now - last)
            last = now
            if now - flushed < SWEEP_INTERVAL - period / 2:
                continue
            flushed = now
            if self.metrics is not None:
                self.metrics.flush(self)
            self.log.flush()

    async def _health(self, be: BackendRuntime) -> None:
        check = be.cfg.check
        assert check is not None
        while True:
            states = [s for s in be.balancer.states if s.admin != "maint"]  # maint: no checks
            results = await asyncio.gather(*(self._probe(be, s, check.timeout) for s in states))
            for state, err in zip(states, results, strict=True):
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
