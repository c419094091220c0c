"""One health state: servers are checked once, by the master's checker process.

The master makes a `Board` (one shared byte per checked server, an anonymous
MAP_SHARED mapping) before it forks; `run_checker` (a child of the master, like
the workers) probes every checked server with HAProxy's rules and writes the board;
workers only read it (`follow`), so every worker agrees and each UP/DOWN transition
is logged once.

- `rise`/`fall`, `inter` (interval), `fastinter` while a server is changing state,
  `downinter` while it is down;
- tcp-check style `send` / `expect` (a string the first line must contain) or
  `expect-regex` (searched in the first line);
- `port` / `addr`: check another port or address than the traffic goes to;
- `send-proxy` (HAProxy's `check-send-proxy`): a PROXY v1 header first.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any

import mptcpkit
from mptcpkit.aio import sock_connect
from mptcpkit.proxy.configmodel import Config, HealthCheck, Server
from mptcpkit.proxy.legstate import reason_of
from mptcpkit.proxy.resolvers import AddressBoard
from mptcpkit.proxy.slowstart import came_up

__all__ = ["Board", "follow", "run_checker"]

FOLLOW_INTERVAL = 0.1  # seconds between a worker's looks at the board
FIRST_LINE = 4096  # bytes of an answer read for `expect`


class Board:
    """The shared health state: byte i is 1 while server i is up; byte n + i counts
    (mod 256) the connects to it that failed in traffic (passive checks); byte 2n + i
    is 1 while the runtime API holds it in `maint` (not checked, as in HAProxy)."""

    def __init__(self, cfg: Config) -> None:
        self.index: dict[tuple[str, str], int] = {}
        for name, be in cfg.backends.items():
            if be.check is not None:
                for s in be.servers:
                    self.index[(name, s.name)] = len(self.index)
        self.n = len(self.index)
        self.mem = mmap.mmap(-1, max(3 * self.n, 1), flags=mmap.MAP_SHARED)
        self.mem.write(b"\x01" * self.n)  # servers start up, as HAProxy's
        self.observed = {k for k, _ in self.index.items() if _observes(cfg, k[0])}

    def up(self, i: int) -> bool:
        return self.mem[i] == 1

    def set(self, i: int, up: bool) -> None:
        self.mem[i] = 1 if up else 0

    def connect_failed(self, backend: str, server: str) -> None:
        """A worker: a connect to this server failed (`observe = "layer4"`)."""
        if (backend, server) in self.observed:
            j = self.n + self.index[(backend, server)]
            self.mem[j] = (self.mem[j] + 1) % 256

    def set_maint(self, backend: str, server: str, on: bool) -> None:
        """The master: `set server ... state maint` (or out of it)."""
        i = self.index.get((backend, server))
        if i is not None:
            self.mem[2 * self.n + i] = 1 if on else 0

    def maint(self, i: int) -> bool:
        return self.mem[2 * self.n + i] == 1

    def failures(self, i: int) -> int:
        return self.mem[self.n + i]

    def close(self) -> None:
        self.mem.close()


def _observes(cfg: Config, backend: str) -> bool:
    check = cfg.backends[backend].check
    return check is not None and check.observe == "layer4"


async def follow(rt: Any, board: Board) -> None:
    """A worker: keep its servers' `up` as the checker says."""
    pairs = [
        (board.index[(name, st.server.name)], name, st)
        for name, be in rt.backends.items()
        for st in be.balancer.states
        if (name, st.server.name) in board.index
    ]
    while True:
        for i, name, st in pairs:
            up = board.up(i)
            if up != st.up:
                st.up = up
                if up:
                    came_up(st)  # slowstart ramps from now
            if rt.metrics is not None:
                rt.metrics.server_health(name, st.server.name, up)
        await asyncio.sleep(FOLLOW_INTERVAL)


class _Server:
    """One checked server's rise/fall state in the checker."""

    def __init__(self, check: HealthCheck) -> None:
        self.check = check
        self.up = True
        self.oks = 0
        self.fails = 0

    def observe(self, ok: bool) -> bool:
        """Feed one result; True when the server changed state."""
        if ok:
            self.fails = 0
            self.oks += 1
            if not self.up and self.oks >= self.check.rise:
                self.up = True
                return True
        else:
            self.oks = 0
            self.fails += 1
            if self.up and self.fails >= self.check.fall:
                self.up = False
                return True
        return False

    def interval(self) -> float:
        """HAProxy's inter, fastinter while changing state, downinter while down."""
        c = self.check
        if (self.up and self.fails) or (not self.up and self.oks):
            return c.fastinter or c.interval
        if not self.up:
            return c.downinter or c.interval
        return c.interval


def target(check: HealthCheck, family: int, sockaddr: Any) -> Any:
    """Where a check connects: the server's address, or `addr`/`port` instead."""
    if family == socket.AF_UNIX:
        return sockaddr
    host, port = sockaddr[0], sockaddr[1]
    if check.addr is not None:
        host = check.addr
    if check.port:
        port = check.port
    return (host, port, *sockaddr[2:]) if family == socket.AF_INET6 else (host, port)


async def probe(check: HealthCheck, server: Server, family: int, sockaddr: Any) -> str | None:
    """One check: None if it passed, else why not."""
    loop = asyncio.get_running_loop()
    addr = target(check, family, sockaddr)
    if family == socket.AF_UNIX:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = mptcpkit.socket(family, socket.SOCK_STREAM, mptcp=server.policy)
    try:
        async with asyncio.timeout(check.timeout):
            await sock_connect(sock, addr)
    except (OSError, TimeoutError) as exc:
        sock.close()
        return reason_of(exc)
    try:
        async with asyncio.timeout(check.timeout):
            out = b""
            if check.send_proxy:
                out += _proxy_v1(sock)
            out += check.send
            if out:
                await loop.sock_sendall(sock, out)
            if check.expect is None and check.expect_regex is None:
                return None
            line = b""
            while b"\n" not in line and len(line) < FIRST_LINE:
                data = await loop.sock_recv(sock, FIRST_LINE)
                if not data:
                    break
                line += data
            first = line.split(b"\n", 1)[0].rstrip(b"\r").decode(errors="replace")
            if check.expect is not None and check.expect not in first:
                return f"expected {check.expect!r}, got {first[:60]!r}"
            if check.expect_regex is not None and not re.search(check.expect_regex, first):
                return f"expected /{check.expect_regex}/, got {first[:60]!r}"
            return None
    except (OSError, TimeoutError) as exc:
        return reason_of(exc)
    finally:
        sock.close()


def _proxy_v1(sock: socket.socket) -> bytes:
    from mptcpkit.proxy.proxyproto import build_v1

    with contextlib.suppress(OSError):
        return build_v1(sock.getsockname(), sock.getpeername())
    return b"PROXY UNKNOWN\r\n"


async def _check_one(
    name: str,
    server: Server,
    state: _Server,
    where: Callable[[], tuple[int, Any] | None],
    board: Board,
    log: Any,
) -> None:
    i = board.index[(name, server.name)]
    while True:
        at = where()
        if at is None or board.maint(i):  # init-addr none, not resolved yet: workers
            # keep it DOWN; or in maintenance: not checked until it is out (HAProxy)
            await asyncio.sleep(state.interval())
            continue
        err = await probe(state.check, server, *at)
        if state.observe(err is None):
            board.set(i, state.up)
            word = "UP" if state.up else "DOWN"
            why = "check passed" if err is None else f"check failed: {err}"
            log.event(f"backend {name}: server {server.name} is {word} ({why})", now=True)
        await asyncio.sleep(state.interval())


async def _observe(name: str, server: Server, state: _Server, board: Board, log: Any) -> None:
    """HAProxy's `observe layer4`: connects that fail in traffic count as failed checks."""
    i = board.index[(name, server.name)]
    seen = board.failures(i)
    while True:
        await asyncio.sleep(FOLLOW_INTERVAL)
        now = board.failures(i)
        for _ in range((now - seen) % 256):
            if state.observe(False):
                board.set(i, state.up)
                log.event(
                    f"backend {name}: server {server.name} is DOWN "
                    "(observe layer4: connects failed in traffic)",
                    now=True,
                )
        seen = now


def run_checker(
    cfg: Config,
    board: Board,
    targets: Mapping[str, Mapping[str, tuple[int, Any]]],
    log: Any,
    addrs: AddressBoard | None = None,
) -> None:
    """The checker process's life: check every checked server until killed; a server
    on the address board (resolvers.py) is checked where its name resolves now."""

    def where_of(name: str, s: Server) -> Callable[[], tuple[int, Any] | None]:
        fixed = targets[name][s.name]
        i = addrs.index.get((name, s.name)) if addrs is not None else None
        if addrs is None or i is None:
            return lambda: fixed
        board_, slot = addrs, i

        def now() -> tuple[int, Any] | None:
            if board_.seq(slot) == 0:  # not published yet: the start address
                return fixed
            return board_.read(slot, s.address.port or 0)

        return now

    async def main() -> None:
        tasks = []
        for name, be in cfg.backends.items():
            if be.check is None:
                continue
            for s in be.servers:
                st = _Server(be.check)
                where = where_of(name, s)
                tasks.append(asyncio.create_task(_check_one(name, s, st, where, board, log)))
                if be.check.observe == "layer4":
                    tasks.append(asyncio.create_task(_observe(name, s, st, board, log)))
        await asyncio.gather(*tasks)

    asyncio.run(main())
