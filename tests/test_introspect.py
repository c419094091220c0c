"""info() and subflows() on live loopback connections; both kernel paths agree."""

from __future__ import annotations

import socket

import pytest

import mptcpkit
from mptcpkit import introspect


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_single_subflow_on_loopback(no_fd_leak: None, family: int, host: str) -> None:
    server = mptcpkit.create_server((host, 0), family=family)
    client = mptcpkit.create_connection(server.getsockname()[:2])
    accepted, _ = server.accept()
    with server, client, accepted:
        client.sendall(b"x" * 100_000)
        got = 0
        while got < 100_000:
            got += len(accepted.recv(65536))
        info = mptcpkit.info(client)
        assert info is not None
        assert info.subflow_count == 1
        assert info.bytes_sent == 100_000
        (flow,) = mptcpkit.subflows(client)
        assert flow.local[:2] == client.getsockname()[:2]
        assert flow.remote[:2] == client.getpeername()[:2]
        assert flow.state == "ESTABLISHED"
        assert flow.bytes_sent == 100_000
        assert flow.id is not None
        (peer_flow,) = mptcpkit.subflows(accepted)
        assert peer_flow.bytes_received == 100_000
        # MPTCP_FULL_INFO (one call) and TCPINFO + SUBFLOW_ADDRS (two calls) agree.
        (split,) = introspect._subflows_split(client.fileno())
        assert (split.local, split.remote, split.bytes_sent) == (
            flow.local,
            flow.remote,
            flow.bytes_sent,
        )
        assert split.id is None


def test_listener_and_unconnected(no_fd_leak: None) -> None:
    with mptcpkit.create_server(("127.0.0.1", 0)) as server, mptcpkit.socket() as fresh:
        assert mptcpkit.subflows(fresh) == []
        info = mptcpkit.info(fresh)
        assert info is not None and info.subflows_max >= 0
        assert isinstance(mptcpkit.subflows(server), list)


def test_plain_tcp_has_no_mptcp_info(no_fd_leak: None) -> None:
    with socket.socket() as tcp:
        assert mptcpkit.info(tcp) is None
        assert mptcpkit.subflows(tcp) == []
        assert mptcpkit.info(tcp.fileno()) is None


def test_closed_socket_raises() -> None:
    sock = mptcpkit.socket()
    fd = sock.detach()
    import os

    os.close(fd)
    with pytest.raises(OSError):
        mptcpkit.subflows(fd)
    with pytest.raises(OSError):
        mptcpkit.status(fd)


def test_subflows_of_a_v4_mapped_connection_match_getsockname(no_fd_leak: None) -> None:
    server = mptcpkit.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    with server, mptcpkit.socket(socket.AF_INET6) as client:
        client.connect(("::ffff:127.0.0.1", server.getsockname()[1]))
        accepted, _ = server.accept()
        with accepted:
            (flow,) = mptcpkit.subflows(client)
            assert flow.local == client.getsockname()[:2]
            assert flow.remote == client.getpeername()[:2] == ("::ffff:127.0.0.1", flow.remote[1])


@pytest.mark.parametrize("bad", [None, "3", 1.5, object()])
def test_not_a_socket_is_a_type_error(bad: object) -> None:
    for call in (mptcpkit.status, mptcpkit.info, mptcpkit.subflows):
        with pytest.raises(TypeError, match="fileno"):
            call(bad)  # type: ignore[arg-type]


def test_descriptor_beyond_a_c_int_is_refused_not_cut(no_fd_leak: None) -> None:
    with mptcpkit.socket() as sock:
        wrapped = sock.fileno() + 2**32  # ctypes would have cut this to sock.fileno()
        for call in (mptcpkit.status, mptcpkit.info, mptcpkit.subflows):
            with pytest.raises(OverflowError):
                call(wrapped)
