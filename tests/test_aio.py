"""asyncio API on stock asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

import mptcpkit
import mptcpkit.aio as aio

Runner = Callable[[Coroutine[Any, Any, Any]], Any]
RUNNERS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


async def _nothing() -> None:
    pass


@pytest.fixture(scope="module", autouse=True)
def _uvloop_warmed_up() -> None:
    """uvloop opens one process-wide pipe on first use: not a leak, so open it first."""
    uvloop.run(_nothing())


@pytest.fixture(params=sorted(RUNNERS))
def run(request: pytest.FixtureRequest) -> Runner:
    return RUNNERS[request.param]  # type: ignore[return-value]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data = await reader.read()
    writer.write(data.upper())
    await writer.drain()
    writer.close()


def test_streams_round_trip(run: Runner, no_fd_leak: None) -> None:
    async def main() -> list[str]:
        server = await aio.start_server(_echo, None, 0)  # one dual-stack socket
        port = server.sockets[0].getsockname()[1]
        seen = []
        async with server:
            for host in ("127.0.0.1", "::1", "localhost"):
                reader, writer = await aio.open_connection(host, port)
                seen.append(str(mptcpkit.status(writer.get_extra_info("socket"))))
                writer.write(b"hello " + host.encode())
                writer.write_eof()
                assert await reader.read() == b"HELLO " + host.upper().encode()
                writer.close()
                await writer.wait_closed()
        return seen

    assert run(main()) == ["MPTCP", "MPTCP", "MPTCP"]


def test_protocol_level_and_policy(run: Runner, no_fd_leak: None) -> None:
    class Collect(asyncio.Protocol):
        def __init__(self) -> None:
            self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self.data = b""

        def data_received(self, data: bytes) -> None:
            self.data += data

        def eof_received(self) -> None:
            self.done.set_result(self.data)

    async def main() -> tuple[str, str, bytes]:
        protocols: list[Collect] = []

        def factory() -> Collect:
            protocols.append(Collect())
            return protocols[-1]

        server = await aio.create_server(factory, "127.0.0.1", 0, mptcp="require")
        port = server.sockets[0].getsockname()[1]
        server_state = str(mptcpkit.status(server.sockets[0]))
        transport, _ = await aio.create_connection(asyncio.Protocol, "127.0.0.1", port, mptcp="off")
        client_state = str(mptcpkit.status(transport.get_extra_info("socket")))
        transport.write(b"payload")  # type: ignore[attr-defined]
        transport.write_eof()  # type: ignore[attr-defined]
        data = await asyncio.wait_for(protocols[0].done, 5)
        transport.close()
        server.close()
        await server.wait_closed()
        return client_state, server_state, data

    client_state, server_state, data = run(main())
    assert client_state == "TCP"
    assert server_state == "MPTCP"
    assert data == b"payload"


def test_connect_refused(run: Runner, no_fd_leak: None) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def refused() -> None:
        await aio.open_connection("127.0.0.1", port)

    with pytest.raises(ConnectionRefusedError):
        run(refused())


def test_stock_sock_connect_fails_on_mptcp_and_ours_works(no_fd_leak: None) -> None:
    """Why mptcpkit.aio exists: REFERENCE §1, checked on every run."""

    async def main() -> str:
        loop = asyncio.get_running_loop()
        with mptcpkit.create_server(("127.0.0.1", 0)) as server:
            host, port = server.getsockname()
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM, mptcpkit.IPPROTO_MPTCP) as s:
                s.setblocking(False)
                with pytest.raises(socket.gaierror):
                    await loop.sock_connect(s, ("localhost", port))
            with mptcpkit.socket() as s:
                await aio.sock_connect(s, (host, port))
                server.accept()[0].close()
                return str(mptcpkit.status(s))

    assert asyncio.run(main()) == "MPTCP"


def test_several_addresses_give_one_server(run: Runner, no_fd_leak: None) -> None:
    async def main() -> int:
        server = await aio.start_server(_echo, ["127.0.0.1", "::1"], 0)
        count = len(server.sockets)
        server.close()
        await server.wait_closed()
        return count

    assert run(main()) == 2
