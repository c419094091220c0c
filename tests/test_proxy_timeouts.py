"""HAProxy's timeouts by name: tunnel, client-fin, server-fin, sub-second values; both
data paths (the C engine and the Python relay), real proxy processes on loopback."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mptcpkit.proxy.config import parse_text
from mptcpkit.proxy.configmodel import Timeouts
from mptcpkit.proxy.timeouts import idle_rules, tick
from proxy_harness import PROXY_CMD, ProxyProc, Server, connect, recv_all, run_proxy, wait_for


def _conf(port: int, timeout: str) -> str:
    return (
        '[global]\nworkers = 1\nmetrics = ""\n'
        f'[frontend.fe]\nbind = "mptcp@127.0.0.1:0"\nbackend = "be"\ntimeout = {{ {timeout} }}\n'
        f'[backend.be]\nserver.s = "tcp@127.0.0.1:{port}"\n'
    )


@contextlib.contextmanager
def _proxied(
    tmp_path: Path, handler: Callable[[socket.socket], None], timeout: str
) -> Iterator[ProxyProc]:
    with Server(handler) as srv, run_proxy(tmp_path, _conf(srv.port, timeout)) as px:
        yield px


def _ended(px: ProxyProc) -> str:
    line: str = wait_for(lambda: px.conn_lines(), what="the connection's log line")[0]
    return line


def _echo(c: socket.socket) -> None:
    while d := c.recv(4096):
        c.sendall(d)


def _hold_after_eof(done: threading.Event) -> Callable[[socket.socket], None]:
    def handler(c: socket.socket) -> None:
        """Read the client's bytes to its FIN; send nothing, keep the server leg open."""
        recv_all(c)
        done.wait(30)

    return handler


def _fin_first(c: socket.socket) -> None:
    """Greet, half-close at once, then wait for the proxy to close the leg."""
    c.sendall(b"hi")
    c.shutdown(socket.SHUT_WR)
    recv_all(c)


def test_tunnel_replaces_client_and_server_sub_second(tmp_path: Path, relay: str) -> None:
    with _proxied(tmp_path, _echo, 'client = "30s", server = "30s", tunnel = "300ms"') as px:
        s = connect(px.port("fe"), mptcp=True)
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        assert recv_all(s) == b""  # the proxy cut the idle tunnel, not the 30 s limits
        s.close()
        assert "ended='tunnel timeout (0.3s idle)'" in _ended(px)


def test_client_fin_cuts_a_half_closed_client(tmp_path: Path, relay: str) -> None:
    done = threading.Event()
    with _proxied(
        tmp_path, _hold_after_eof(done), 'client = "30s", server = "30s", client-fin = "200ms"'
    ) as px:
        try:
            s = connect(px.port("fe"), mptcp=True)
            s.sendall(b"request")
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b""  # cut while the server still holds its leg open
            s.close()
            assert "ended='client-fin timeout (0.2s idle)'" in _ended(px)
        finally:
            done.set()


def test_server_fin_cuts_a_half_closed_server(tmp_path: Path, relay: str) -> None:
    with _proxied(
        tmp_path, _fin_first, 'client = "30s", tunnel = "30s", server-fin = "250ms"'
    ) as px:
        s = connect(px.port("fe"), mptcp=True)
        assert recv_all(s) == b"hi"  # the server's FIN came through; we stay open
        assert "ended='server-fin timeout (0.25s idle)'" in _ended(px)
        s.close()


def test_fin_timeouts_leave_open_connections_to_the_tunnel(tmp_path: Path, relay: str) -> None:
    with _proxied(
        tmp_path, _echo, 'tunnel = "400ms", client-fin = "100ms", server-fin = "100ms"'
    ) as px:
        s = connect(px.port("fe"), mptcp=True)
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        assert recv_all(s) == b""
        s.close()
        assert "ended='tunnel timeout (0.4s idle)'" in _ended(px)


def test_rules_by_phase() -> None:
    r = idle_rules(Timeouts(client=5, server=3))
    assert (r.open_limit, r.open_how) == (3, "server timeout (3s idle)")
    assert (r.fin_limit, r.fin_how) == (3, "server timeout (3s idle)")
    r = idle_rules(Timeouts(client=5, server=3, tunnel=60, client_fin=1))
    assert (r.open_limit, r.open_how) == (60, "tunnel timeout (60s idle)")
    assert (r.fin_limit, r.fin_how) == (1, "client-fin timeout (1s idle)")
    r = idle_rules(Timeouts(client=None, server=None))
    assert r.open_limit is None and r.fin_limit is None
    assert tick([Timeouts()]) == 1.0
    assert tick([Timeouts(), Timeouts(server_fin=0.4)]) == pytest.approx(0.05)


def test_timeouts_parsed_with_haproxy_names() -> None:
    cfg = parse_text(_conf(1, 'tunnel = "1h", client-fin = "250ms", server-fin = 2'))
    t = cfg.frontends[0].timeouts
    assert (t.tunnel, t.client_fin, t.server_fin) == (3600, 0.25, 2)


@pytest.mark.parametrize(
    ("timeout", "key"),
    [
        ('tunnel = "soon"', "frontend.fe.timeout.tunnel"),
        ('client-fin = "-1s"', "frontend.fe.timeout.client-fin"),
        ('server_fin = "1s"', "frontend.fe.timeout.server_fin"),
    ],
)
def test_bad_timeout_exits_2_naming_the_key(tmp_path: Path, timeout: str, key: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(_conf(1, timeout))
    r = subprocess.run(
        [*PROXY_CMD, "-c", str(path), "--check"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2, r
    assert f"{path}: {key}: " in r.stderr, r.stderr
