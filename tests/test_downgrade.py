"""TCP-only options on MPTCP sockets: downgrade in place while possible, else a clear error.

The MD5 case is Go issue 74643 end to end: a listener made by create_server and a client
made by mptcpkit.socket(), both MPTCP by default, set TCP_MD5SIG for each other.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading

import pytest

import mptcpkit
from mptcpkit import State, TCPOnlyOptionError
from mptcpkit.abi.constants import SOL_TCP, TCP_MD5SIG
from mptcpkit.options import TCP_ONLY_OPTIONS

KEY = b"bgp-session-key"

_VALUES: dict[str, object] = {"TCP_MD5SIG": mptcpkit.tcp_md5sig("127.0.0.1", KEY)}


def test_md5_end_to_end(no_fd_leak: None) -> None:
    server = mptcpkit.create_server(("127.0.0.1", 0), backlog=8)
    port = server.getsockname()[1]
    fd_before = server.fileno()
    assert mptcpkit.status(server).is_mptcp
    # The Go issue's order: listen first, then set the key.
    server.setsockopt(SOL_TCP, TCP_MD5SIG, mptcpkit.tcp_md5sig("127.0.0.1", KEY))
    assert server.fileno() == fd_before
    assert server.getsockname() == ("127.0.0.1", port)
    status = mptcpkit.status(server)
    assert status.state is State.TCP and "TCP_MD5SIG" in (status.reason or "")

    received: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            received.append(conn.recv(100))
            conn.sendall(b"pong")

    thread = threading.Thread(target=serve)
    thread.start()
    client = mptcpkit.socket()
    assert mptcpkit.status(client).is_mptcp
    mptcpkit.setsockopt(client, SOL_TCP, TCP_MD5SIG, mptcpkit.tcp_md5sig("127.0.0.1", KEY))
    assert mptcpkit.status(client).state is State.TCP
    with client:
        client.settimeout(5)
        client.connect(("127.0.0.1", port))
        client.sendall(b"ping")
        assert client.recv(4) == b"pong"
    thread.join(5)
    assert received == [b"ping"]

    # A client with the wrong key gets no answer: the server drops its unsigned SYNs.
    with mptcpkit.socket() as wrong:
        wrong.setsockopt(SOL_TCP, TCP_MD5SIG, mptcpkit.tcp_md5sig("127.0.0.1", b"wrong"))
        wrong.settimeout(1.5)
        with pytest.raises((TimeoutError, ConnectionError)):
            wrong.connect(("127.0.0.1", port))
    server.close()


def test_state_is_carried_over(no_fd_leak: None) -> None:
    sock = mptcpkit.socket(socket.AF_INET6)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 33)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 200_000)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::1", 0))
        sock.setblocking(False)
        bound = sock.getsockname()
        fd = sock.fileno()
        rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 5000)
        assert mptcpkit.status(sock).state is State.TCP
        assert sock.fileno() == fd
        assert sock.getsockname() == bound
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL) == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 5000
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 33
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == rcvbuf
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert not os.get_inheritable(fd)


def test_listener_keeps_backlog_and_serves(no_fd_leak: None) -> None:
    with mptcpkit.create_server(("127.0.0.1", 0), backlog=17) as server:
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        raw = server.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        assert raw[0] == 10 and int.from_bytes(raw[28:32], "little") == 17  # LISTEN, backlog
        with socket.create_connection(server.getsockname(), timeout=5):
            conn, _ = server.accept()
            conn.close()


def test_connected_socket_raises_with_the_way_out(no_fd_leak: None) -> None:
    with mptcpkit.create_server(("127.0.0.1", 0)) as server:
        with mptcpkit.create_connection(server.getsockname()) as client:
            accepted, _ = server.accept()
            with accepted, pytest.raises(TCPOnlyOptionError) as info:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000)
            message = str(info.value)
            assert "TCP_USER_TIMEOUT" in message and "mptcp='off'" in message
            assert info.value.errno == errno.ENOPROTOOPT
            assert mptcpkit.status(client).is_mptcp  # untouched


def test_listener_with_waiting_connections_raises(no_fd_leak: None) -> None:
    with mptcpkit.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()):
            with pytest.raises(TCPOnlyOptionError, match="1 connection"):
                server.setsockopt(SOL_TCP, TCP_MD5SIG, _VALUES["TCP_MD5SIG"])
            assert mptcpkit.status(server).is_mptcp


def test_require_policy_refuses_to_downgrade(no_fd_leak: None) -> None:
    with mptcpkit.socket(mptcp="require") as sock:
        with pytest.raises(TCPOnlyOptionError, match="mptcp='require'"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000)
        assert mptcpkit.status(sock).is_mptcp


def test_other_errors_pass_through(no_fd_leak: None) -> None:
    with mptcpkit.socket() as sock:
        with pytest.raises(OSError) as info:
            sock.setsockopt(socket.IPPROTO_TCP, 999, 1)  # no such option, on any protocol
        assert not isinstance(info.value, TCPOnlyOptionError)
        assert mptcpkit.status(sock).is_mptcp


def test_plain_stdlib_sockets_via_module_function(no_fd_leak: None) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, mptcpkit.IPPROTO_MPTCP) as sock:
        mptcpkit.setsockopt(sock, socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000)
        status = mptcpkit.status(sock)
        assert status.state is State.TCP and "TCP_USER_TIMEOUT" in (status.reason or "")


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
@pytest.mark.parametrize("option", list(TCP_ONLY_OPTIONS.values()), ids=lambda o: o.name)
def test_every_listed_option_is_rejected_by_mptcp(family: int, option: object) -> None:
    from mptcpkit.options import OptionInfo

    assert isinstance(option, OptionInfo)
    with socket.socket(family, socket.SOCK_STREAM, mptcpkit.IPPROTO_MPTCP) as sock:
        value: object = 1 if option.name != "TCP_ULP" else b"tls"
        if option.name in ("TCP_MD5SIG", "TCP_MD5SIG_EXT"):
            value = b"\0" * 216
        with pytest.raises(OSError) as info:
            sock.setsockopt(option.level, option.optname, value)  # type: ignore[call-overload]
        assert info.value.errno == option.errno


def test_tcp_md5sig_available_ignores_the_mptcp_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for env in ("on", "off"):
        monkeypatch.setenv("MPTCPKIT", env)
        assert mptcpkit.tcp_md5sig_available() is True
