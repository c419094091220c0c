"""MPTCP-first sockets on loopback (IPv4 and IPv6): creation, policy, status."""

from __future__ import annotations

import errno
import os
import random
import socket
import threading
from pathlib import Path

import pytest

import mptcpkit
from mptcpkit import Policy, State


def _pair(family: int, host: str, **kw: object):  # type: ignore[no-untyped-def]
    server = mptcpkit.create_server((host, 0), family=family, **kw)  # type: ignore[arg-type]
    client = mptcpkit.create_connection(server.getsockname()[:2], timeout=5)
    accepted, _ = server.accept()
    return server, client, accepted


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_mptcp_by_default(no_fd_leak: None, family: int, host: str) -> None:
    server, client, accepted = _pair(family, host)
    with server, client, accepted:
        assert mptcpkit.status(server).state is State.MPTCP
        assert mptcpkit.status(client).state is State.MPTCP
        assert mptcpkit.status(accepted).is_mptcp
        assert isinstance(accepted, mptcpkit.Socket)
        client.sendall(b"ping")
        assert accepted.recv(4) == b"ping"
        assert mptcpkit.status(client.fileno()).state is State.MPTCP  # plain fds work too


def test_plain_tcp_client_against_mptcp_listener(no_fd_leak: None) -> None:
    with mptcpkit.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()) as client:
            accepted, _ = server.accept()
            with accepted:
                assert mptcpkit.status(server).state is State.MPTCP
                assert mptcpkit.status(accepted).state is State.TCP
                assert mptcpkit.status(client).state is State.TCP


def test_mptcp_client_against_tcp_listener_falls_back(no_fd_leak: None) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        with mptcpkit.create_connection(server.getsockname()) as client:
            accepted, _ = server.accept()
            with accepted:
                assert mptcpkit.status(client).state is State.FALLBACK
                assert str(mptcpkit.status(client)) == "fallback"
                assert client.proto == mptcpkit.IPPROTO_MPTCP  # what Python says: not the truth
                assert mptcpkit.info(client) is None
                assert mptcpkit.subflows(client) == []


def test_policy_off_and_require(no_fd_leak: None) -> None:
    with mptcpkit.socket(mptcp="off") as off, mptcpkit.socket(mptcp="require") as req:
        assert mptcpkit.status(off).state is State.TCP
        assert mptcpkit.status(req).state is State.MPTCP
        assert req.mptcp_policy is Policy.REQUIRE


def test_environment_default(monkeypatch: pytest.MonkeyPatch, no_fd_leak: None) -> None:
    monkeypatch.setenv("MPTCPKIT", "listen")
    server = mptcpkit.create_server(("127.0.0.1", 0))
    client = mptcpkit.create_connection(server.getsockname())
    accepted, _ = server.accept()
    with server, client, accepted:
        assert mptcpkit.status(server).is_mptcp
        assert mptcpkit.status(client).state is State.TCP
        explicit = mptcpkit.create_connection(server.getsockname(), mptcp="prefer")
        with explicit, server.accept()[0]:
            assert mptcpkit.status(explicit).is_mptcp


def test_non_tcp_sockets_are_left_alone(no_fd_leak: None) -> None:
    with mptcpkit.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        with pytest.raises(ValueError, match="protocol 17"):
            mptcpkit.status(udp)
    with mptcpkit.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        assert unix.family == socket.AF_UNIX


def test_connect_error_is_not_retried_over_tcp(no_fd_leak: None) -> None:
    # Go re-dials TCP after any MPTCP error; a refused port must be refused once.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        mptcpkit.create_connection(("127.0.0.1", port), timeout=2)


def test_dualstack_server_accepts_ipv4(no_fd_leak: None) -> None:
    server = mptcpkit.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    with server, mptcpkit.create_connection(("127.0.0.1", server.getsockname()[1])) as client:
        accepted, peer = server.accept()
        with accepted:
            assert peer[0] == "::ffff:127.0.0.1"
            assert mptcpkit.status(accepted).is_mptcp and mptcpkit.status(client).is_mptcp


def test_create_server_reports_the_address_on_bind_error(no_fd_leak: None) -> None:
    with mptcpkit.create_server(("127.0.0.1", 0)) as taken:
        with pytest.raises(OSError, match=r"while attempting to bind on address"):
            mptcpkit.create_server(taken.getsockname())


def test_address_binds_a_port_range_and_connects(no_fd_leak: None) -> None:
    # Three free ports in a row, below the ephemeral range so that the connections of
    # other tests do not take them; retry if one is taken anyway.
    rng = random.Random()
    for _attempt in range(50):
        base = rng.randrange(20000, 30000)
        addr = mptcpkit.parse_address(f"mptcp4@127.0.0.1:{base}-{base + 2}")
        try:
            servers = addr.create_server()
            break
        except OSError:
            continue
    else:
        pytest.fail("no three consecutive free ports found")
    try:
        assert [s.getsockname()[1] for s in servers] == [base, base + 1, base + 2]
        target = mptcpkit.parse_address(f"mptcp@127.0.0.1:{base + 1}")
        with target.create_connection(timeout=5) as client:
            accepted, _ = servers[1].accept()
            with accepted:
                assert mptcpkit.status(client).is_mptcp
        tcp = mptcpkit.parse_address(f"tcp@127.0.0.1:{base}")
        with tcp.create_connection(timeout=5) as client:
            servers[0].accept()[0].close()
            assert mptcpkit.status(client).state is State.TCP
        with pytest.raises(ValueError, match="plain TCP address"):
            tcp.create_connection(mptcp="require")
    finally:
        for s in servers:
            s.close()


def test_accepted_socket_keeps_blocking_mode(no_fd_leak: None) -> None:
    with mptcpkit.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(5)
        done = threading.Event()

        def connect() -> None:
            with mptcpkit.create_connection(server.getsockname()):
                done.wait(5)

        t = threading.Thread(target=connect)
        t.start()
        accepted, _ = server.accept()
        with accepted:
            assert accepted.gettimeout() is None
        done.set()
        t.join()


def test_create_connection_takes_what_the_stdlib_takes(no_fd_leak: None) -> None:
    # Not only IP literals: a name, and None (getaddrinfo's loopback), as socket's does.
    with mptcpkit.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        for host in ("localhost", None):
            with mptcpkit.create_connection((host, port)) as c:  # type: ignore[arg-type]
                assert c.getpeername()[1] == port
                assert mptcpkit.status(c).is_mptcp
            server.accept()[0].close()


def test_fileno_alone_is_read_from_the_descriptor(no_fd_leak: None) -> None:
    """As socket.socket(fileno=fd): family, type and proto come from the kernel."""
    with mptcpkit.create_server(("::1", 0), family=socket.AF_INET6) as server:
        with mptcpkit.socket(fileno=os.dup(server.fileno())) as again:
            assert again.family == socket.AF_INET6
            assert again.type == socket.SOCK_STREAM
            assert again.proto == mptcpkit.IPPROTO_MPTCP
            assert again.getsockname() == server.getsockname()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unix:
        with mptcpkit.socket(fileno=os.dup(unix.fileno())) as again:
            assert (again.family, again.type) == (socket.AF_UNIX, socket.SOCK_DGRAM)


def test_require_means_mptcp_on_the_wire(no_fd_leak: None) -> None:
    with socket.create_server(("127.0.0.1", 0)) as plain:  # a server without MPTCP
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(mptcpkit.MPTCPUnavailableError, match="did not agree to MPTCP"):
            mptcpkit.create_connection(plain.getsockname(), timeout=5, mptcp="require")
        assert set(os.listdir("/proc/self/fd")) == before  # the socket was closed
        plain.accept()[0].close()
        with mptcpkit.create_connection(plain.getsockname(), timeout=5) as fallback:
            assert mptcpkit.status(fallback).state is State.FALLBACK  # prefer accepts it
            plain.accept()[0].close()
    with mptcpkit.create_server(("127.0.0.1", 0)) as server:
        with mptcpkit.create_connection(server.getsockname(), mptcp="require") as sock:
            assert mptcpkit.status(sock).is_mptcp
            server.accept()[0].close()


@pytest.mark.parametrize(
    ("family", "type", "proto", "mptcp"),
    [
        (socket.AF_UNIX, socket.SOCK_STREAM, 0, "require"),
        (socket.AF_INET, socket.SOCK_DGRAM, 0, "require"),
        (socket.AF_INET, socket.SOCK_DGRAM, mptcpkit.IPPROTO_MPTCP, None),
        (socket.AF_UNIX, socket.SOCK_STREAM, mptcpkit.IPPROTO_MPTCP, None),
    ],
)
def test_require_on_what_cannot_be_mptcp_is_a_value_error(
    family: int, type: int, proto: int, mptcp: str | None, no_fd_leak: None
) -> None:
    with pytest.raises(ValueError, match="MPTCP exists only for AF_INET/AF_INET6 stream") as info:
        mptcpkit.socket(family, type, proto, mptcp=mptcp)  # type: ignore[arg-type]
    assert "built without MPTCP" not in str(info.value)


def test_create_server_unix_like_the_stdlib(tmp_path: Path, no_fd_leak: None) -> None:
    for mptcp in ("off", None):
        path = str(tmp_path / f"s-{mptcp}")
        with mptcpkit.create_server(path, family=socket.AF_UNIX, mptcp=mptcp) as server:  # type: ignore[arg-type]
            assert server.family == socket.AF_UNIX and server.getsockname() == path
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(path)
                server.accept()[0].close()
    with pytest.raises(ValueError, match="AF_UNIX"):
        mptcpkit.create_server(str(tmp_path / "r"), family=socket.AF_UNIX, mptcp="require")  # type: ignore[arg-type]


def test_dup_keeps_the_policy(no_fd_leak: None) -> None:
    with mptcpkit.socket(mptcp="require") as sock, sock.dup() as copy:
        assert isinstance(copy, mptcpkit.Socket)
        assert copy.mptcp_policy is Policy.REQUIRE
        with pytest.raises(mptcpkit.TCPOnlyOptionError, match="mptcp='require'"):
            copy.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000)


def test_md5_key_as_str_is_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match="must be bytes, not str"):
        mptcpkit.tcp_md5sig("127.0.0.1", "secret")  # type: ignore[arg-type]
    assert mptcpkit.tcp_md5sig("127.0.0.1", bytearray(b"k")) == mptcpkit.tcp_md5sig(
        "127.0.0.1", b"k"
    )


@pytest.mark.parametrize("env", ["listen", "dial"])
def test_mptcpkit_socket_follows_the_role_it_takes(
    env: str, monkeypatch: pytest.MonkeyPatch, no_fd_leak: None
) -> None:
    """MPTCPKIT=listen|dial as documented: MPTCP for that role only, also for sockets
    made by mptcpkit.socket(), whose role shows at connect() or listen()."""
    monkeypatch.setenv("MPTCPKIT", env)
    mptcp_role = State.MPTCP
    with mptcpkit.create_server(("127.0.0.1", 0), mptcp="prefer") as server:
        with mptcpkit.socket() as listener, mptcpkit.socket() as dialer:
            assert mptcpkit.status(listener).is_mptcp and mptcpkit.status(dialer).is_mptcp
            listener.bind(("127.0.0.1", 0))
            port = listener.getsockname()[1]
            listener.listen()
            dialer.settimeout(5)
            dialer.connect(server.getsockname())
            server.accept()[0].close()
            listening, dialing = mptcpkit.status(listener), mptcpkit.status(dialer)
            assert listener.getsockname()[1] == port
            if env == "listen":
                assert listening.state is mptcp_role and dialing.state is State.TCP
                assert f"MPTCPKIT={env}" in (dialing.reason or "")
            else:
                assert dialing.state is mptcp_role and listening.state is State.TCP
                assert f"MPTCPKIT={env}" in (listening.reason or "")


def test_require_socket_connect_checks_the_wire(no_fd_leak: None) -> None:
    with socket.create_server(("127.0.0.1", 0)) as plain:
        with mptcpkit.socket(mptcp="require") as sock:
            sock.settimeout(5)
            with pytest.raises(mptcpkit.MPTCPUnavailableError, match="did not agree to MPTCP"):
                sock.connect(plain.getsockname())
            plain.accept()[0].close()
        with mptcpkit.socket(mptcp="require") as sock:
            sock.settimeout(5)
            assert sock.connect_ex(plain.getsockname()) == errno.EPROTONOSUPPORT
            plain.accept()[0].close()
