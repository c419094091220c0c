"""HAProxy's `source`: the local address of server legs, per backend or per server;
both data paths, real proxy processes and real servers on loopback (127.0.0.0/8 is
all local, so 127.0.0.2 and 127.0.0.3 can be bound without touching the host)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from proxy_harness import PROXY_CMD, Server, connect, echo, recv_all, run_proxy, wait_for


def _conf(backend: str) -> str:
    return (
        '[global]\nworkers = 1\nmetrics = ""\n'
        '[frontend.fe]\nbind = "mptcp@127.0.0.1:0"\nbackend = "be"\n'
        f"[backend.be]\n{backend}\n"
    )


class Peers:
    """An echo handler that notes each client's address (the proxy's source)."""

    def __init__(self) -> None:
        self.hosts: list[str] = []

    def __call__(self, c: socket.socket) -> None:
        self.hosts.append(c.getpeername()[0])
        echo(c)


def _through(port: int) -> None:
    s = connect(port, mptcp=True)
    s.sendall(b"hello")
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == b"hello"
    s.close()


@pytest.mark.parametrize("proto", ["tcp", "mptcp"])
def test_server_legs_leave_from_the_source(tmp_path: Path, relay: str, proto: str) -> None:
    mptcp = proto == "mptcp"
    pa, pb = Peers(), Peers()
    with (
        Server(pa, mptcp=mptcp) as a,
        Server(pb, mptcp=mptcp) as b,
        run_proxy(
            tmp_path,
            _conf(
                'source = "127.0.0.3"\n'
                f'server.a = {{ address = "{a.address}", source = "127.0.0.2" }}\n'
                f'server.b = "{b.address}"\n'
            ),
        ) as px,
    ):
        _through(px.port("fe"))
        _through(px.port("fe"))
        assert pa.hosts == ["127.0.0.2"]  # the server's own source
        assert pb.hosts == ["127.0.0.3"]  # the backend's, for a server without one


def test_a_source_that_cannot_be_bound_fails_the_connect(tmp_path: Path, relay: str) -> None:
    with (
        Server(echo) as srv,
        run_proxy(
            tmp_path,
            _conf(f'retries = 0\nserver.s = {{ address = "{srv.address}", source = "192.0.2.1" }}'),
        ) as px,
    ):
        s = connect(px.port("fe"), mptcp=True)
        assert recv_all(s) == b""
        s.close()
        line = wait_for(lambda: px.conn_lines(), what="the connection's log line")[0]
        assert "connect failed: EADDRNOTAVAIL" in line, line
        assert srv.accepted == 0


@pytest.mark.parametrize(
    ("backend", "key", "reason"),
    [
        (
            'server.s = { address = "tcp@127.0.0.1:1", source = "localhost" }',
            "backend.be.server.s.source",
            "expected an IP address",
        ),
        (
            'server.s = { address = "tcp@[::1]:1", source = "127.0.0.2" }',
            "backend.be.server.s.source",
            "is IPv4",
        ),
        ('source = "::1"\nserver.s = "tcp@127.0.0.1:1"', "backend.be.source", "is IPv6"),
        ('source = "::1"\nserver.s = "unix@/tmp/x.sock"', "backend.be.source", "unix socket"),
    ],
)
def test_bad_source_exits_2_naming_the_key(
    tmp_path: Path, backend: str, key: str, reason: str
) -> None:
    path = tmp_path / "p.toml"
    path.write_text(_conf(backend))
    r = subprocess.run(
        [*PROXY_CMD, "-c", str(path), "--check"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2, r
    assert f"{path}: {key}: " in r.stderr and reason in r.stderr, r.stderr
