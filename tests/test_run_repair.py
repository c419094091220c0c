"""TCP-only options on every MPTCP socket of the program (issue 13, items 1 and 2).

Go 1.24+ makes its listeners MPTCP itself, and then TCP_MD5SIG fails (Go issue 74643,
GoBGP inside Cilium). `mptcpkit run` rescues the option on any MPTCP socket that can
still change, whoever made it, and `--only repair` does only that, forcing nothing.
The option table is the kernel-probed one (IPV6_TCLASS, TCP_SYNCNT, ...). Options
set too late (accepted or connected MPTCP sockets) are counted and warned about.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

import mptcpkit
from mptcpkit.run import preload

RUN = [sys.executable, "-m", "mptcpkit", "run"]
ISSUE_PROGRAM = os.path.join(os.path.dirname(__file__), "data", "go_issue_74643.go")


def stats_of(stderr: bytes) -> dict[str, object]:
    data: dict[str, object] = json.loads(stderr.decode().strip().splitlines()[-1])
    return data


@pytest.fixture(scope="module")
def go_prog(go_build) -> str:  # type: ignore[no-untyped-def]
    """The issue's program, as a module whose go.mod says `go 1.24` (MPTCP listeners)."""
    if not mptcpkit.tcp_md5sig_available():
        pytest.skip("kernel without TCP_MD5SIG")
    return str(go_build(ISSUE_PROGRAM, "1.24"))


def test_go_toolchain_is_recent(go_build) -> None:  # type: ignore[no-untyped-def]
    from conftest import go_toolchain

    found = go_toolchain()
    assert found is not None
    with open(os.path.join(found[1], "VERSION")) as f:
        major, minor = f.readline().removeprefix("go").split(".")[:2]
    assert (int(major), int(minor)) >= (1, 24)


def test_go_issue_74643(go_prog: str) -> None:
    """Bare, the program prints "not available"; under mptcpkit run, with or without
    forcing, the listener it made MPTCP itself becomes plain TCP and MD5 works."""
    bare = subprocess.run([go_prog, "check"], capture_output=True, text=True, timeout=60)
    assert bare.stdout == "TCP_MD5SIG is not available\n"  # the issue, reproduced
    for opts in ([], ["--only", "repair"]):
        proc = subprocess.run(
            [*RUN, "--stats=json", *opts, "--", go_prog, "check"],
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == b"TCP_MD5SIG is available\n"
        stats = stats_of(proc.stderr)
        assert stats["repaired"] == 1
        assert stats["reasons"] == {"swapped to TCP for TCP_MD5SIG": 1}
        assert stats["warnings"] == []


def test_md5_signed_exchange_between_two_go_programs(go_prog: str) -> None:
    """A GoBGP-style pair: the server sets the key on its listener after net.Listen
    (the socket already sits in Go's netpoller), the client in its Dialer's Control on
    an MPTCP dialer. Both become plain TCP; MD5 is really in force."""
    server = subprocess.Popen(
        [*RUN, "--only", "repair", "--", go_prog, "serve", "bgp-secret"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        port, proto = server.stdout.readline().split()
        assert proto == b"6"  # the MPTCP listener Go made is now plain TCP
        unsigned = socket.socket()
        unsigned.settimeout(1.5)
        with unsigned, pytest.raises(OSError):
            unsigned.connect(("127.0.0.1", int(port)))  # no key: the SYN is dropped
        client = subprocess.run(
            [*RUN, "--stats=json", "--", go_prog, "dial", port.decode(), "bgp-secret"],
            capture_output=True,
            timeout=60,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.split() == [b"KEEPALIVE", b"6"]
        out, err = server.communicate(timeout=60)
        assert server.returncode == 0, err
        assert out.split() == [b"OPEN", b"6"]
        assert b"warning" not in err
    finally:
        server.kill()
        server.wait()
        for pipe in (server.stdout, server.stderr):
            if pipe is not None:
                pipe.close()


@pytest.mark.skipif(preload.find_library() is None, reason="libmptcpwrap not installed")
def test_preload_on_a_go_program_says_so(go_prog: str) -> None:
    proc = subprocess.run(
        [*RUN, "--strategy", "preload", "--", go_prog, "check"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert "is a Go 1.2" in proc.stderr and "GODEBUG=multipathtcp=1" in proc.stderr
    assert "--strategy seccomp" in proc.stderr
    from mptcpkit.run import binary

    assert binary.go_version(go_prog) is not None and binary.go_version(go_prog) >= (1, 24)
    assert binary.go_version(sys.executable) is None


def test_repair_forces_nothing() -> None:
    code = """
    import socket
    p = lambda s: s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
    plain = socket.socket()
    own = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
    own.bind(("127.0.0.1", 0))
    own.listen()
    own.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000)
    print(p(plain), p(own))
    """
    proc = subprocess.run(
        [
            *RUN,
            "--stats=json",
            "--only",
            "repair",
            "--",
            sys.executable,
            "-c",
            textwrap.dedent(code),
        ],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [b"6", b"6"]
    stats = stats_of(proc.stderr)
    assert (stats["forced"], stats["repaired"]) == (0, 1)


def test_options_on_connected_mptcp_sockets_are_counted_and_warned_once() -> None:
    """PostgreSQL's tcp_user_timeout on accepted connections: too late to swap."""
    code = """
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    clients = [socket.create_connection(srv.getsockname()) for _ in range(2)]
    accepted = [srv.accept()[0] for _ in range(2)]
    failed = 0
    for s in [*accepted, clients[0]]:
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 1000)
        except OSError:
            failed += 1
    try:
        clients[1].setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    except OSError:
        failed += 1
    print(failed)
    """
    proc = subprocess.run(
        [*RUN, "--stats=json", "--", sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [b"4"]  # the program sees MPTCP's own error, as before
    stats = stats_of(proc.stderr)
    assert stats["lost_options"] == {"TCP_USER_TIMEOUT": 3, "TCP_QUICKACK": 1}
    lines = proc.stderr.decode().splitlines()
    warnings = [line for line in lines if line.startswith("mptcpkit run: warning:")]
    assert len(warnings) == 2  # once per option
    assert "TCP_USER_TIMEOUT" in warnings[0] and "lost" in warnings[0]


@pytest.mark.skipif(not os.path.exists("/usr/bin/socat"), reason="socat not installed")
def test_ipv6_tclass_from_the_probed_table_is_swapped() -> None:
    """socat sets IPV6_TCLASS and IPV6_UNICAST_HOPS right after socket(): under forcing
    they failed with EOPNOTSUPP (not in the old static table); now the socket becomes
    plain TCP first and both options hold."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM, 262) as srv:
        srv.bind(("::1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        target = f"TCP6:[::1]:{port},ipv6-tclass=16,ipv6-unicast-hops=9"
        client = subprocess.Popen(
            [*RUN, "--stats=json", "--", "socat", "-", target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        srv.settimeout(60)
        conn, _ = srv.accept()
        with conn:
            assert not mptcpkit.status(conn).is_mptcp
            conn.sendall(b"qos")
        out, err = client.communicate(b"", timeout=60)
    assert client.returncode == 0, err
    assert out == b"qos"
    stats = stats_of(err)
    assert stats["reasons"] == {"swapped to TCP for IPV6_TCLASS": 1}
    code = """
    import socket
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, 16)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 9)
    print(s.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL),
          s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS),
          s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS))
    for level, opt in ((socket.IPPROTO_TCP, socket.TCP_SYNCNT), (socket.IPPROTO_IP, 8),
                       (socket.SOL_SOCKET, 42)):  # IP_PKTINFO, SO_PEEK_OFF
        t = socket.socket()
        t.setsockopt(level, opt, 3)
        print(t.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL), t.getsockopt(level, opt))
    """
    proc = subprocess.run(
        [*RUN, "--", sys.executable, "-c", textwrap.dedent(code)], capture_output=True, timeout=60
    )
    assert proc.stdout.split() == [b"6", b"16", b"9", b"6", b"3", b"6", b"1", b"6", b"3"], (
        proc.stderr
    )


def test_epoll_watches_read_back_from_fdinfo() -> None:
    """The supervisor re-creates a program's epoll watches from /proc fdinfo: events
    (edge-triggered flag included) and the 64-bit user data must come back exactly."""
    import select

    from mptcpkit.run import procfd, syscalls

    with socket.socket() as s, select.epoll() as ep:
        data = 0xC0FFEE_0000_1234
        events = select.EPOLLIN | select.EPOLLOUT | select.EPOLLET
        syscalls.epoll_ctl(ep.fileno(), syscalls.EPOLL_CTL_ADD, s.fileno(), events, data)
        ino = os.fstat(s.fileno()).st_ino
        watches = procfd.epoll_watches(os.getpid(), {s.fileno()}, ino)
        always = select.EPOLLERR | select.EPOLLHUP  # the kernel adds these to every watch
        assert watches == [(ep.fileno(), events | always, data)]
        assert procfd.process_fds(os.getpid(), ino, s.fileno()) == [s.fileno()]
        dup = os.dup(s.fileno())
        try:
            assert sorted(procfd.process_fds(os.getpid(), ino, s.fileno())) == sorted(
                [s.fileno(), dup]
            )
        finally:
            os.close(dup)
