"""asyncio over MPTCP, on stock asyncio and on uvloop.

Stock asyncio's `loop.sock_connect()` cannot connect an MPTCP socket: it resolves the
address with the socket's proto (262) and getaddrinfo refuses (REFERENCE §1). So the
sockets here are made and connected by mptcpkit, then handed to the loop with `sock=`,
which both loops accept.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from mptcpkit.errors import MPTCPUnavailableError
from mptcpkit.policy import PolicyLike, resolve
from mptcpkit.sockets import Socket, open_stream, resolve_stream
from mptcpkit.sockets import create_server as _create_listener

_STREAM_LIMIT = 2**16
ClientConnected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def sock_connect(sock: socket.socket, address: Any) -> None:
    """Connect a socket (MPTCP or not) without blocking the loop; `address` is resolved.

    `connect_ex` rather than `connect`: no exception is raised and caught on the usual
    EINPROGRESS, which measurably shortens every connect.
    """
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    err = sock.connect_ex(address)
    # EAGAIN on a unix socket means a full backlog, not a connect in progress.
    if err == errno.EINPROGRESS or (err == errno.EAGAIN and sock.family != socket.AF_UNIX):
        ready: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, _wake, ready)
        try:
            await ready
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"Connect call failed {address}: {os.strerror(err)}")


async def _resolve(
    host: str | None, port: int | str | None, family: int, flags: int = 0
) -> list[tuple[int, tuple[Any, ...]]]:
    if host and isinstance(port, int) and not flags:
        return resolve_stream(host, port, family)  # IP literals: no lookup, no thread
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM, flags=flags)
    return [(info[0], info[4]) for info in infos]


def _interleave(
    infos: list[tuple[int, tuple[Any, ...]]], first_family_count: int
) -> list[tuple[int, tuple[Any, ...]]]:
    """RFC 8305 §4: alternate families, `first_family_count` of the first one to start."""
    by_family: dict[int, list[tuple[int, tuple[Any, ...]]]] = {}
    for info in infos:
        by_family.setdefault(info[0], []).append(info)
    queues = list(by_family.values())
    ordered = queues[0][: first_family_count - 1]
    del queues[0][: first_family_count - 1]
    while any(queues):
        for queue in queues:
            if queue:
                ordered.append(queue.pop(0))
    return ordered


def _collect(task: asyncio.Task[Socket]) -> Socket | BaseException:
    if task.cancelled():
        return asyncio.CancelledError()
    exc = task.exception()
    return task.result() if exc is None else exc


async def _staggered(
    infos: list[tuple[int, tuple[Any, ...]]],
    attempt: Callable[[int, tuple[Any, ...]], Coroutine[Any, Any, Socket]],
    delay: float,
) -> tuple[Socket | None, list[OSError]]:
    """RFC 8305 §5: start the next attempt after `delay`, or at once when one fails; the
    first connected socket wins, the others are cancelled (and closed)."""
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[Socket]] = set()
    errors: list[OSError] = []
    winner: Socket | None = None
    todo = list(infos)
    try:
        while winner is None and (todo or running):
            if todo:
                af, sockaddr = todo.pop(0)
                running.add(loop.create_task(attempt(af, sockaddr)))
            done, _ = await asyncio.wait(
                running, timeout=delay if todo else None, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                running.discard(task)
                outcome = _collect(task)
                if isinstance(outcome, Socket):
                    if winner is None:
                        winner = outcome
                    else:
                        outcome.close()
                elif isinstance(outcome, OSError) and not isinstance(
                    outcome, MPTCPUnavailableError
                ):
                    errors.append(outcome)
                else:
                    raise outcome
    except BaseException:
        if winner is not None:
            winner.close()
        raise
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
        for task in running:
            late = _collect(task)
            if isinstance(late, Socket):
                late.close()
    return winner, errors


async def connect_socket(
    host: str,
    port: int,
    *,
    mptcp: PolicyLike = None,
    family: int = 0,
    local_addr: tuple[str, int] | None = None,
    happy_eyeballs_delay: float | None = None,
    interleave: int | None = None,
) -> Socket:
    """A connected, non-blocking socket to (host, port), by policy ("dial" role).

    `happy_eyeballs_delay` and `interleave` as in `loop.create_connection()`: with a
    delay, attempts to the resolved addresses are staggered (RFC 8305), so one address
    that does not answer costs `delay` seconds, not a TCP connect timeout.
    """
    policy = resolve(mptcp, "dial")
    infos = await _resolve(host, port, family)
    if interleave is None and happy_eyeballs_delay is not None:
        interleave = 1
    if interleave:
        infos = _interleave(infos, interleave)

    async def attempt(af: int, sockaddr: tuple[Any, ...]) -> Socket:
        sock = open_stream(af, socket.SOCK_STREAM, policy)
        try:
            if local_addr is not None:
                sock.bind(local_addr)
            await sock_connect(sock, sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock

    errors: list[OSError] = []
    if happy_eyeballs_delay is not None and len(infos) > 1:
        winner, errors = await _staggered(infos, attempt, happy_eyeballs_delay)
        if winner is not None:
            return winner
    else:
        for af, sockaddr in infos:
            try:
                return await attempt(af, sockaddr)
            except MPTCPUnavailableError:
                raise
            except OSError as exc:
                errors.append(exc)
    if not errors:
        raise OSError(f"getaddrinfo returned no addresses for {host!r}")
    if len(errors) == 1:
        raise errors[0]
    raise OSError(f"Multiple exceptions: {', '.join(str(e) for e in errors)}")


async def create_connection(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str,
    port: int,
    *,
    mptcp: PolicyLike = None,
    family: int = 0,
    local_addr: tuple[str, int] | None = None,
    happy_eyeballs_delay: float | None = None,
    interleave: int | None = None,
    **kwargs: Any,
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """`loop.create_connection()` over MPTCP by policy, Happy Eyeballs included."""
    loop = asyncio.get_running_loop()
    sock = await connect_socket(
        host,
        port,
        mptcp=mptcp,
        family=family,
        local_addr=local_addr,
        happy_eyeballs_delay=happy_eyeballs_delay,
        interleave=interleave,
    )
    if kwargs.get("ssl") and "server_hostname" not in kwargs:
        kwargs["server_hostname"] = host
    try:
        return await loop.create_connection(protocol_factory, sock=sock, **kwargs)
    except BaseException:
        sock.close()
        raise


async def open_connection(
    host: str, port: int, *, limit: int = _STREAM_LIMIT, mptcp: PolicyLike = None, **kwargs: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """`asyncio.open_connection()` over MPTCP by policy."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await create_connection(lambda: protocol, host, port, mptcp=mptcp, **kwargs)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]
    return reader, writer


class Servers:
    """Several listening servers (one per address) behind `asyncio.Server`'s methods."""

    def __init__(self, servers: Sequence[asyncio.Server]) -> None:
        self._servers = list(servers)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(s for server in self._servers for s in server.sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._servers[0].get_loop()

    def is_serving(self) -> bool:
        return all(server.is_serving() for server in self._servers)

    def close(self) -> None:
        for server in self._servers:
            server.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*(server.wait_closed() for server in self._servers))

    async def start_serving(self) -> None:
        await asyncio.gather(*(server.start_serving() for server in self._servers))

    async def serve_forever(self) -> None:
        await asyncio.gather(*(server.serve_forever() for server in self._servers))

    async def __aenter__(self) -> Servers:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()


async def _listeners(
    host: str | Sequence[str] | None,
    port: int | None,
    *,
    family: int,
    backlog: int,
    reuse_port: bool,
    mptcp: PolicyLike,
) -> list[Socket]:
    port = port or 0
    targets: list[tuple[int, tuple[Any, ...]]]
    if host is None or host == "":
        if family in (0, socket.AF_INET6) and socket.has_dualstack_ipv6():
            targets = [(socket.AF_INET6, ("::", port))]
        else:
            targets = [
                (family or socket.AF_INET, ("0.0.0.0" if family != socket.AF_INET6 else "::", port))
            ]
    else:
        hosts = [host] if isinstance(host, str) else list(host)
        targets = []
        for name in hosts:
            for found in await _resolve(name, port, family, socket.AI_PASSIVE):
                if found not in targets:
                    targets.append(found)
    made: list[Socket] = []
    try:
        for af, sockaddr in targets:
            made.append(
                _create_listener(
                    sockaddr,
                    family=af,
                    backlog=backlog,
                    reuse_port=reuse_port,
                    mptcp=mptcp,
                    dualstack_ipv6=af == socket.AF_INET6 and host in (None, ""),
                )
            )
    except BaseException:
        for sock in made:
            sock.close()
        raise
    return made


async def create_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str | Sequence[str] | None = None,
    port: int | None = None,
    *,
    mptcp: PolicyLike = None,
    family: int = 0,
    backlog: int = 100,
    reuse_port: bool = False,
    sock: socket.socket | None = None,
    **kwargs: Any,
) -> asyncio.Server | Servers:
    """`loop.create_server()` over MPTCP by policy ("listen" role).

    With no host, one dual-stack IPv6 socket serves IPv4 and IPv6. Several addresses
    give a `Servers` that behaves like `asyncio.Server`.
    """
    loop = asyncio.get_running_loop()
    if sock is not None:
        return await loop.create_server(protocol_factory, sock=sock, backlog=backlog, **kwargs)
    listeners = await _listeners(
        host, port, family=family, backlog=backlog, reuse_port=reuse_port, mptcp=mptcp
    )
    servers: list[asyncio.Server] = []
    try:
        for listener in listeners:
            servers.append(
                await loop.create_server(protocol_factory, sock=listener, backlog=backlog, **kwargs)
            )
    except BaseException:
        for server in servers:
            server.close()
        for listener in listeners[len(servers) :]:
            listener.close()
        raise
    return servers[0] if len(servers) == 1 else Servers(servers)


async def start_server(
    client_connected_cb: ClientConnected,
    host: str | Sequence[str] | None = None,
    port: int | None = None,
    *,
    limit: int = _STREAM_LIMIT,
    mptcp: PolicyLike = None,
    **kwargs: Any,
) -> asyncio.Server | Servers:
    """`asyncio.start_server()` over MPTCP by policy."""
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.StreamReaderProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await create_server(factory, host, port, mptcp=mptcp, **kwargs)
