"""TCP-only options on MPTCP sockets: downgrade in place while possible, else a clear error.

The MD5 case is Go issue 74643 end to end: a listener made by create_server and a client
made by mptcpkit.socket(), both MPTCP by default, set TCP_MD5SIG for each other.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import struct
import subprocess
import sys
import threading

import pytest

import mptcpkit
from mptcpkit import State, TCPOnlyOptionError
from mptcpkit.abi.constants import SOL_TCP, TCP_MD5SIG
from mptcpkit.abi.optnames import NAMED_OPTIONS, OPTION_NAMES, option_name
from mptcpkit.downgrade import CARRIED
from mptcpkit.options import TCP_ONLY_OPTIONS, tcp_only_options

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


# Item 3: every option MPTCP took is still there after a downgrade.
_LINGER = struct.pack("ii", 1, 5)
_CARRY_VALUES: dict[str, object] = {
    "SO_LINGER": _LINGER,  # first: SO_LINGER == TCP_CONGESTION == 13 broke every later carry
    "SO_DEBUG": 1,
    "SO_REUSEADDR": 1,
    "SO_REUSEPORT": 1,
    "SO_KEEPALIVE": 1,
    "SO_RCVBUF": 100_000,
    "SO_SNDBUF": 90_000,
    "SO_RCVLOWAT": 10,
    "SO_PRIORITY": 3,
    "SO_MARK": 7,
    "SO_BINDTODEVICE": b"lo",
    "SO_RCVTIMEO": struct.pack("ll", 3, 5000),
    "SO_SNDTIMEO": struct.pack("ll", 4, 0),
    "SO_TIMESTAMPNS_NEW": 1,
    "SO_TIMESTAMPING": 8 | 16,  # SOF_TIMESTAMPING_RX_SOFTWARE | SOFTWARE
    "SO_BUSY_POLL": 50,
    "SO_PREFER_BUSY_POLL": 1,
    "SO_BUSY_POLL_BUDGET": 16,
    "SO_INCOMING_CPU": 0,
    "IP_TOS": 0x20,
    "IP_FREEBIND": 1,
    "IP_TRANSPARENT": 1,
    "IP_BIND_ADDRESS_NO_PORT": 1,
    "IP_LOCAL_PORT_RANGE": struct.pack("I", 40000 | 50000 << 16),
    "IPV6_V6ONLY": 1,
    "IPV6_TRANSPARENT": 1,
    "TCP_NODELAY": 1,
    "TCP_CORK": 1,
    "TCP_KEEPIDLE": 77,
    "TCP_KEEPINTVL": 9,
    "TCP_KEEPCNT": 4,
    "TCP_MAXSEG": 1200,
    "TCP_DEFER_ACCEPT": 5,
    "TCP_CONGESTION": b"reno",
    "TCP_FASTOPEN": 5,
    "TCP_FASTOPEN_CONNECT": 1,
    "TCP_FASTOPEN_NO_COOKIE": 1,
    "TCP_NOTSENT_LOWAT": 12345,
    "TCP_INQ": 1,
}


def _snapshot(sock: socket.socket) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, size in CARRIED.items():
        if sock.family == socket.AF_INET and key[0] == socket.IPPROTO_IPV6:
            continue  # MPTCP answers these on IPv4 sockets, TCP does not
        try:
            seen[option_name(*key)] = sock.getsockopt(*key, size) if size else sock.getsockopt(*key)
        except OSError as exc:
            seen[option_name(*key)] = errno.errorcode[exc.errno or 0]
    return seen


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_every_carried_option_survives_a_downgrade(family: int, no_fd_leak: None) -> None:
    with mptcpkit.socket(family) as sock:
        for name, value in _CARRY_VALUES.items():
            if family == socket.AF_INET and name.startswith("IPV6_"):
                continue
            sock.setsockopt(*NAMED_OPTIONS[name], value)  # type: ignore[call-overload]
        assert mptcpkit.status(sock).is_mptcp
        before = _snapshot(sock)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000)
        assert mptcpkit.status(sock).state is State.TCP
        after = _snapshot(sock)
    changed = {k: (v, after[k]) for k, v in before.items() if after[k] != v}
    assert not changed, f"not carried over (before, after): {changed}"
    assert before["SO_LINGER"] == _LINGER and before["TCP_CONGESTION"].startswith(b"reno")  # type: ignore[union-attr]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_no_option_mptcp_keeps_is_left_behind(family: int) -> None:
    """Every option an MPTCP socket takes and reports back is one the downgrade carries."""
    same_state = {NAMED_OPTIONS["SO_BINDTOIFINDEX"]}  # SO_BINDTODEVICE's
    missed = []
    for key in OPTION_NAMES:
        if key in CARRIED or key in same_state or key in tcp_only_options():
            continue
        with socket.socket(family, socket.SOCK_STREAM, mptcpkit.IPPROTO_MPTCP) as sock:
            try:
                before = sock.getsockopt(*key)
            except OSError:
                continue
            for value in {1, before + 1, 0} - {before}:
                try:
                    sock.setsockopt(*key, value)
                except OSError:
                    continue
                if sock.getsockopt(*key) != before:
                    missed.append(option_name(*key))
                    break
    assert not missed, f"MPTCP keeps these, a downgrade drops them: {missed}"


# Item 4: an option TCP refuses too leaves the MPTCP socket as it was.
@pytest.mark.parametrize(
    ("name", "value", "err"),
    [
        ("TCP_ULP", b"tls", errno.ENOENT),  # kTLS needs a connected socket
        ("TCP_MD5SIG", b"\0" * 8, errno.EINVAL),  # too short for struct tcp_md5sig
        ("IP_MULTICAST_IF", 0, errno.EINVAL),  # not on a stream socket
    ],
)
def test_option_tcp_refuses_keeps_mptcp(
    name: str, value: object, err: int, no_fd_leak: None
) -> None:
    with mptcpkit.create_server(("127.0.0.1", 0)) as server, mptcpkit.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        bound = sock.getsockname()
        for target in (sock, server):
            with pytest.raises(OSError) as info:
                target.setsockopt(*NAMED_OPTIONS[name], value)  # type: ignore[call-overload]
            assert info.value.errno == err
            assert mptcpkit.status(target).is_mptcp
            assert target.proto == mptcpkit.IPPROTO_MPTCP
        assert sock.getsockname() == bound
        assert server.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def test_tcp_repair_without_cap_net_admin_keeps_mptcp(tmp_path: object) -> None:
    """EPERM from TCP (no CAP_NET_ADMIN), run as an unprivileged user: still MPTCP."""
    code = (
        "import errno, os, socket, mptcpkit, mptcpkit.options\n"
        "s = mptcpkit.socket()\n"
        "mptcpkit.options.tcp_only_options(), mptcpkit.status(s)\n"
        "os.setgid(65534); os.setuid(65534)  # after the imports: nobody cannot read them\n"
        "try:\n"
        "    s.setsockopt(socket.IPPROTO_TCP, 19, 1)\n"
        "except PermissionError:\n"
        "    pass\n"
        "print(mptcpkit.status(s).state.value, s.proto)\n"
    )
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to nobody")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["MPTCP", "262"]


# Item 5: after a downgrade the object says TCP, so stock asyncio takes it.
def test_downgraded_socket_reads_tcp_and_asyncio_connects(no_fd_leak: None) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server, mptcpkit.socket() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000)
        assert sock.proto == socket.IPPROTO_TCP and "proto=6" in repr(sock)
        assert sock.gettimeout() is None
        sock.setblocking(False)

        async def connect() -> None:
            await asyncio.get_running_loop().sock_connect(sock, server.getsockname())

        asyncio.run(connect())
        conn, _ = server.accept()
        conn.close()


def test_bound_socket_keeps_its_port_through_the_downgrade(no_fd_leak: None) -> None:
    """The TCP socket binds beside the MPTCP one before taking its place."""
    with mptcpkit.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        bound = sock.getsockname()
        sock.settimeout(3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 2)
        assert sock.getsockname() == bound and sock.gettimeout() == 3
        assert not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)


def _outcome(setter: object, sock: socket.socket, key: tuple[int, int]) -> object:
    try:
        setter(sock, key[0], key[1], 0)  # type: ignore[operator]
    except OSError as exc:
        return type(exc), exc.errno
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
@pytest.mark.parametrize("bound", [False, True], ids=["fresh", "bound"])
def test_options_refused_before_connect_skip_the_try_alike(
    family: int, bound: bool, no_fd_leak: None
) -> None:
    """mptcpkit sockets set an option the probe saw MPTCP refuse before connect without
    trying it on MPTCP first; the outcome (downgraded to TCP, or TCP's own error) must
    be what trying first gives, option by option."""
    from mptcpkit.options import refused_before_connect

    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    tcp_only_options()  # the live probe fills the table
    keys = sorted(refused_before_connect(family))
    assert keys, "the live probe found nothing MPTCP refuses before connect"
    for key in keys:
        outcomes = []
        for setter, make in (
            (mptcpkit.Socket.setsockopt, lambda: mptcpkit.socket(family)),  # the shortcut
            (mptcpkit.setsockopt, lambda: socket.socket(family, socket.SOCK_STREAM, 262)),
        ):
            with make() as sock:
                if bound:
                    sock.bind((host, 0))
                outcomes.append(_outcome(setter, sock, key))
        assert outcomes[0] == outcomes[1], option_name(*key)
