"""In-process forcing for Python programs: `with forced():` and `python -m mptcpkit.run`."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

import mptcpkit
from mptcpkit.run.inprocess import forced

SO_PROTOCOL = socket.SO_PROTOCOL


def proto(s: socket.socket) -> int:
    return s.getsockopt(socket.SOL_SOCKET, SO_PROTOCOL)


def test_forced_block_makes_tcp_sockets_mptcp_and_only_those() -> None:
    with forced() as stats:
        s = socket.socket()
        s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, 6)
        u = socket.socket(type=socket.SOCK_DGRAM)
        assert (proto(s), proto(s6), proto(u)) == (262, 262, 17)
        assert (s.proto, s6.proto) == (0, 6)  # what the program asked for, as asyncio expects
        assert not s6.getblocking()
    after = socket.socket()
    assert proto(after) == 6 and after.proto == 0
    for x in (s, s6, u, after):
        x.close()
    assert (stats.forced, stats.fell_back) == (2, 0)
    assert "proto" not in vars(socket.socket)  # the patch is gone


def test_asyncio_client_and_server_under_forced() -> None:
    accepted: list[mptcpkit.SocketStatus] = []

    async def main() -> bytes:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            accepted.append(mptcpkit.status(w.get_extra_info("socket")))
            w.write(await r.read(4))
            await w.drain()
            w.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        data = await reader.read(4)
        writer.close()
        server.close()
        await server.wait_closed()
        return data

    with forced():
        assert asyncio.run(main()) == b"ping"
    assert [s.is_mptcp for s in accepted] == [True]


def test_tcp_only_option_downgrades_a_forced_socket() -> None:
    with forced() as stats:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        bound = s.getsockname()
        s.setsockopt(socket.IPPROTO_TCP, 18, 500)  # TCP_USER_TIMEOUT
        assert proto(s) == 6 and s.getsockname() == bound and s.proto == 0
        assert s.getsockopt(socket.IPPROTO_TCP, 18) == 500
        s.close()
    assert stats.swapped == 1


def test_patch_is_process_wide_and_nests() -> None:
    seen: list[int] = []

    def other_thread() -> None:
        with socket.socket() as t:
            seen.append(proto(t))

    with forced(), forced():
        th = threading.Thread(target=other_thread)
        th.start()
        th.join()
    assert seen == [262]
    with socket.socket() as plain:
        assert proto(plain) == 6


@pytest.mark.root
@pytest.mark.lab(paths=1, prefix="mptk-run-")
def test_fallback_and_require_where_mptcp_is_disabled(two_paths) -> None:  # type: ignore[no-untyped-def]
    client = two_paths.host("client")
    client.sysctl("net.mptcp.enabled", 0)
    with client.enter():
        with forced() as stats, socket.socket() as s:
            assert proto(s) == 6
        assert stats.fell_back == 1
        with forced("require"), pytest.raises(mptcpkit.MPTCPUnavailableError):
            socket.socket()


def test_python_m_mptcpkit_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    server = mptcpkit.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    statuses: list[mptcpkit.SocketStatus] = []

    def accept() -> None:
        conn, _ = server.accept()
        with conn:
            statuses.append(mptcpkit.status(conn))
            conn.sendall(conn.recv(16))

    th = threading.Thread(target=accept)
    th.start()
    app = tmp_path / "app.py"
    app.write_text(
        textwrap.dedent(f"""
        import socket, sys
        with socket.create_connection(("127.0.0.1", {port})) as c:
            c.sendall(sys.argv[1].encode())
            print(c.recv(16).decode(), c.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL))
        sys.exit(5)
        """)
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mptcpkit.run", "--stats", str(app), "hello"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    th.join(30)
    server.close()
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout.split() == ["hello", "262"]
    assert "1 socket forced to MPTCP" in proc.stderr
    assert [s.is_mptcp for s in statuses] == [True]
    usage = subprocess.run([sys.executable, "-m", "mptcpkit.run"], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr
