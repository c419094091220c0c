"""The data path's interface: what a relay (C or Python) needs from the worker above it.

The proxy is a ladder (CONTRIBUTING.md): config -> balancing/health -> data path ->
worker runtime -> master -> CLI, each importing only downward. The data path
(relay.py, frontend.py, compiled.py and `_engine`, converter.py) is below the worker
runtime, so it names the runtime only through the protocols here; `runtime.Runtime`
and `runtime.BackendRuntime` satisfy them (mypy checks it where they are passed down).
The worker-wide read buffer lives here too: the runtime makes it, the legs share it.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any, Protocol

from mptcpkit.proxy.configmodel import ConfigError

if TYPE_CHECKING:
    from mptcpkit.proxy.balance import ServerState
    from mptcpkit.proxy.configmodel import Backend, Frontend
    from mptcpkit.proxy.logging import EventLog
    from mptcpkit.proxy.poller import Poller
    from mptcpkit.proxy.queue import ServerQueue

__all__ = [
    "BURST",
    "BURST_ENV",
    "READ_SIZE",
    "BackendPort",
    "FrontendPort",
    "ReadBuffer",
    "Wire",
    "WorkerPort",
    "burst",
]

# What the engine needs to open a leg to a server (`BackendRuntime._wire`): state,
# family, sockaddr (b"": where the client was going), proto, may fall back to TCP,
# send-proxy (a greeting from fe.header()), observe MPTCP, source; a converter's server
# adds flags (compiledconvert.WIRE_*).
Wire = (
    tuple["ServerState", int, bytes, int, bool, int, bool, "bytes | None"]
    | tuple["ServerState", int, bytes, int, bool, int, bool, "bytes | None", int]
)

READ_SIZE = 1 << 20  # bulk: 1 MiB reads measured ~15% faster than 256 KiB
BURST = 16  # reads per leg per event before other sockets get their turn
# The burst for both data paths; tests set 1 so that every bulk read yields its turn
# and the leg must be resumed (the conformance suite's "burst resume").
BURST_ENV = "MPTCPKIT_PROXY_BURST"


def burst() -> int:
    """Reads per leg per event: BURST, or MPTCPKIT_PROXY_BURST (1 to 1024)."""
    text = os.environ.get(BURST_ENV, "")
    if not text:
        return BURST
    if not text.isdigit() or not 1 <= int(text) <= 1024:
        raise ConfigError(BURST_ENV, "", f"{text!r} is not a whole number from 1 to 1024")
    return int(text)


class ReadBuffer:
    """The one read buffer of a worker (callbacks never interleave, so legs share it)
    and how many reads a leg takes from it per turn."""

    __slots__ = ("buf", "burst", "size", "view")

    def __init__(self, size: int = READ_SIZE, burst: int = BURST) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.size = size
        self.burst = burst


class BackendPort(Protocol):
    """A backend as the data path uses it: pick a server, open a leg, count a failure."""

    cfg: Backend
    needs_client_addr: bool
    targets: dict[str, tuple[int, Any]]  # server name -> (family, sockaddr)
    wire: dict[ServerState, Wire]
    queue: ServerQueue | None  # servers with a maxconn: connections wait for a slot
    states: list[ServerState]  # its servers (the balancer's)

    def next_server(
        self, caddr: Any, tried: list[ServerState] | None
    ) -> ServerState | str | None: ...

    def attempt_failed(
        self,
        state: ServerState,
        exc: BaseException,
        tried: list[ServerState],
        connect_timeout: float = ...,
    ) -> str | float | None: ...

    def start_connect(self, state: ServerState) -> tuple[Any, int]: ...


class FrontendPort(Protocol):
    """A frontend as a connection (`relay.Conn`) and the worker see it."""

    cfg: Frontend
    rt: WorkerPort
    loop: asyncio.AbstractEventLoop
    backend: BackendPort  # the default backend (the only one without use_backend rules)
    router: Any  # use_backend rules (router.Router, above this module), or None

    def finished(self, conn: Any) -> None: ...

    def park(self, conn: Any) -> None: ...

    def local_of(self, conn: Any) -> Any: ...

    def server_failed(
        self,
        state: ServerState,
        exc: BaseException,
        tried: list[ServerState],
        be: BackendPort | None = None,
    ) -> str | float | None: ...


class WorkerPort(Protocol):
    """The worker runtime as the data path sees it: its loop, poller, engine, read
    buffer, log and metrics, and where finished connections are reported."""

    loop: asyncio.AbstractEventLoop
    poller: Poller
    engine: Any
    rbuf: ReadBuffer
    log: EventLog
    metrics: Any
    observing: bool
    stopping: bool
    sources: dict[str, Any]  # frontend -> its abuse.SourceTable (maxconn-per-source)

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
    ) -> None: ...

    def conn_ended(self) -> None: ...
