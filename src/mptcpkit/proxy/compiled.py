"""The compiled data path: `_engine` (C) relays, Python decides.

`_engine.c` runs accept -> connect -> relay -> close for every connection of a
worker, with the rules of relay.py. What is not about moving bytes stays here, so
there is one place for it: the balancer picks servers, a failed connect is counted
and logged by the backend, PROXY headers are built and parsed by proxyproto, a leg's
MPTCP state comes from `mptcpkit.status`, and records go to the log and metrics.

The engine is a C extension built when the package is installed. Without it, or with
`MPTCPKIT_PROXY_ENGINE=python`, workers relay in pure Python (relay.py): same
behaviour, about a fifth fewer connections per second.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mptcpkit.proxy import proxyproto
from mptcpkit.proxy.configmodel import ConfigError
from mptcpkit.proxy.datapath import BURST, burst
from mptcpkit.proxy.frontend import FrontendRuntime
from mptcpkit.proxy.legstate import leg_state
from mptcpkit.proxy.proxyproto import read_proxy_header
from mptcpkit.proxy.timeouts import idle_rules

if TYPE_CHECKING:
    from mptcpkit.proxy.balance import ServerState
    from mptcpkit.proxy.configmodel import Frontend
    from mptcpkit.proxy.datapath import BackendPort, WorkerPort

try:
    from mptcpkit.proxy import _engine  # type: ignore[attr-defined]
except ImportError:  # not built: no compiler when installed, or a source checkout
    _engine = None

__all__ = ["ENGINE_ENV", "CompiledFrontend", "close_engine", "data_path", "open_engine"]

ENGINE_ENV = "MPTCPKIT_PROXY_ENGINE"  # auto (default); python; c: the engine or an error


def data_path() -> str:
    """How workers relay here: "compiled" (the engine) or "python"."""
    choice = os.environ.get(ENGINE_ENV, "auto")
    if choice not in ("auto", "c", "python"):
        raise ConfigError(ENGINE_ENV, "", f"{choice!r} is not auto, c or python")
    if choice == "c" and _engine is None:
        raise ConfigError(
            ENGINE_ENV,
            "",
            "c, but mptcpkit.proxy._engine is not built"
            " (reinstall with a C compiler and the Python headers)",
        )
    burst()  # MPTCPKIT_PROXY_BURST: checked before listening too
    return "compiled" if choice != "python" and _engine is not None else "python"


def open_engine(
    loop: asyncio.AbstractEventLoop, read_size: int, observing: bool, burst: int = BURST
) -> Any:
    """A worker's engine, polled from `loop`; None when workers relay in Python."""
    if _engine is None or data_path() == "python":
        return None
    engine = _engine.Engine(read_size, observing, loop.call_soon, burst)
    loop.add_reader(engine.fileno(), engine.poll)
    return engine


def close_engine(loop: asyncio.AbstractEventLoop, engine: Any) -> None:
    """Take the engine out of the loop, then reset what is left and close it."""
    loop.remove_reader(engine.fileno())
    engine.close()


def _limit(seconds: float | None) -> float:
    return -1.0 if seconds is None else seconds


class CompiledFrontend(FrontendRuntime):
    """A frontend whose connections live in the worker's engine.

    The engine calls the methods below; each is one decision, made the way the
    Python relay makes it.
    """

    def __init__(
        self,
        cfg: Frontend,
        listeners: Sequence[socket.socket],
        backend: BackendPort,
        rt: WorkerPort,
        backends: Mapping[str, BackendPort] | None = None,
    ) -> None:
        super().__init__(cfg, listeners, backend, rt, backends)
        self.engine = rt.engine
        router = self.router
        t = cfg.timeouts
        rules = idle_rules(t)
        queue_limit = t.connect if t.queue is None else t.queue
        self.id: int = self.engine.frontend(
            self,
            maxconn=cfg.maxconn,
            accept_proxy=cfg.accept_proxy,
            needs_caddr=backend.needs_client_addr
            or (router is not None and router.needs_client_addr),
            connect_timeout=t.connect,
            client_timeout=_limit(t.client),
            idle_limit=_limit(rules.open_limit),
            idle_how=rules.open_how,
            fin_limit=_limit(rules.fin_limit),
            fin_how=rules.fin_how,
            queue_timeout=queue_limit,
            queue_how=f"queue timeout ({queue_limit:g}s)",
            rate_limit=cfg.maxconnrate,
            per_source=bool(cfg.maxconn_per_source),
            route=router is not None,
            inspect_delay=_limit(router.inspect if router is not None else None),
            **self.engine_options(),
        )

    def engine_options(self) -> dict[str, Any]:
        """More of the engine's frontend options (compiledconvert.py: a converter's)."""
        return {}

    # --- what the runtime uses --------------------------------------------------------

    def _listen(self, ls: socket.socket, mptcp: bool) -> None:
        if self.router is None and not self.cfg.intercept:
            self.engine.listen(self.id, ls.fileno(), mptcp)
        else:  # dst_port of its connections; an intercepted one's is never it
            port = ls.getsockname()[1] if ls.family != socket.AF_UNIX else 0
            self.engine.listen(self.id, ls.fileno(), mptcp, port)

    def _stop_listening(self) -> None:
        self.engine.close_frontend(self.id)

    def count(self) -> int:
        return int(self.engine.count(self.id))

    def abort_all(self, how: str) -> None:
        self.engine.abort_all(self.id, how)

    def sweep(self, interval: float) -> None:
        self.engine.sweep(self.id, interval)

    def take_bytes(self) -> tuple[int, int]:
        return self.engine.take_bytes(self.id)  # type: ignore[no-any-return]

    def park(self, conn: Any) -> None:
        raise AssertionError("the engine parks its own connections")

    def queued(self) -> int:
        return int(self.engine.parked(self.id))

    def unpark(self, queue: Any = None) -> bool:
        """Let the oldest connection waiting for `queue`'s backend (any, if None) go."""
        if queue is None or self.router is None:
            return bool(self.engine.unpark(self.id))
        for be in self.router.backends.values():
            if be.queue is queue:
                return bool(self.engine.unpark(self.id, be))
        return False

    def _rate_reset(self) -> bool:
        return bool(self.engine.rate_window(self.id))

    def admit(self, key: bytes) -> bool:
        """maxconn-per-source: may a connection from this address (its bytes) stay?"""
        return self.limits is None or self.limits.admit(key)

    def release(self, key: bytes) -> None:
        if self.limits is not None:
            self.limits.release(key)

    def _hold(self, paused: bool) -> None:
        self.engine.pause(self.id, paused)

    # --- what the engine asks ---------------------------------------------------------

    def pick(self, caddr: Any, tried: list[ServerState] | None, be: Any = None) -> Any:
        """The next server's wire tuple (see `BackendRuntime._wire`), or why there is
        none; `be`: the backend the frontend's rules chose (route), else the default."""
        backend = self.backend if be is None else be
        state = backend.next_server(caddr, tried)
        if state is None or isinstance(state, str):
            return state  # None: wait for a server slot (queue.py)
        return backend.wire[state]

    def route(self, caddr: Any, dport: int, data: bytes | None, final: bool) -> Any:
        """use_backend: the backend for a connection, or None to wait for more of its
        ClientHello (router.py)."""
        assert self.router is not None
        return self.router.route(caddr, dport, data, final)

    def failed(self, state: ServerState, err: int, tried: list[ServerState]) -> str | float | None:
        """A connect failed (err 0: it timed out): why the client is closed, or seconds
        to wait before the next attempt (None: at once)."""
        exc: BaseException = TimeoutError() if err == 0 else OSError(err, os.strerror(err))
        return self.server_failed(state, exc, tried)

    def header(self, state: ServerState, caddr: Any, local: Any) -> bytes:
        return proxyproto.build(state.server.send_proxy, caddr, local)

    def parse(self, hdr: bytearray) -> tuple[Any, Any, int] | str | None:
        return read_proxy_header(hdr)

    def leg_state(self, fd: int) -> str | None:
        return leg_state(fd)

    def done(self, state: ServerState | None, rec: tuple[Any, ...] | None) -> None:
        """A connection ended; `rec` (client, start, client state, client subflows, server
        state, server subflows, bytes in, bytes out, how, connect time or -1) when someone
        reads records."""
        if state is not None:
            state.active -= 1
            be = self.backend if self.router is None else self.router.backend_of(state)
            if be.queue is not None:
                be.queue.slot_freed()
        if rec is not None:
            client, start, c_state, c_sub, s_state, s_sub, b_in, b_out, how, tc, chosen = rec
            self.rt.record(
                self,
                state,
                client,
                start,
                (c_state, c_sub),
                (s_state, s_sub),
                (b_in, b_out),
                how,
                tc,
                chosen,
            )
        if self.rt.stopping:
            self.rt.conn_ended()
