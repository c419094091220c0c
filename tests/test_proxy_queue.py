"""A server's `maxconn` and the queue in front of it (`timeout queue`); both data paths,
real proxy processes on loopback."""

from __future__ import annotations

import socket
import subprocess
import threading
from pathlib import Path

import pytest

from mptcpkit.proxy.balance import Balancer
from mptcpkit.proxy.config import parse_text
from mptcpkit.proxy.queue import full, share
from proxy_harness import PROXY_CMD, Server, connect, recv_all, run_proxy, wait_for


def _conf(server: str, timeout: str = "", workers: int = 1) -> str:
    return (
        f'[global]\nworkers = {workers}\nmetrics = ""\n'
        f'[frontend.fe]\nbind = "mptcp@127.0.0.1:0"\nbackend = "be"\ntimeout = {{ {timeout} }}\n'
        f"[backend.be]\nserver.s = {server}\n"
    )


class Counting:
    """An echo server handler that records the most connections it had at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0

    def __call__(self, c: socket.socket) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            while d := c.recv(4096):
                c.sendall(d)
        finally:
            with self.lock:
                self.now -= 1


def test_server_maxconn_queues_the_rest_in_order(tmp_path: Path, relay: str) -> None:
    h = Counting()
    with (
        Server(h) as srv,
        run_proxy(
            tmp_path, _conf(f'{{ address = "tcp@127.0.0.1:{srv.port}", maxconn = 1 }}')
        ) as px,
    ):
        clients = [connect(px.port("fe"), mptcp=True) for _ in range(4)]
        for i, s in enumerate(clients):
            s.sendall(b"%d" % i)
        for i, s in enumerate(clients):
            assert s.recv(1) == b"%d" % i  # served once the one before it left
            s.close()
        assert h.most == 1 and srv.accepted == 4
        lines = wait_for(lambda: len(px.conn_lines()) == 4 and px.conn_lines())
        assert all("ended='both closed'" in x or "client error" in x for x in lines), lines


def test_queue_timeout_ends_a_waiting_connection(tmp_path: Path, relay: str) -> None:
    h = Counting()
    with (
        Server(h) as srv,
        run_proxy(
            tmp_path,
            _conf(f'{{ address = "tcp@127.0.0.1:{srv.port}", maxconn = 1 }}', 'queue = "300ms"'),
        ) as px,
    ):
        first = connect(px.port("fe"), mptcp=True)
        first.sendall(b"a")
        assert first.recv(1) == b"a"
        waiting = connect(px.port("fe"), mptcp=True)
        waiting.sendall(b"b")
        assert recv_all(waiting) == b""  # never reached the server
        waiting.close()
        line = wait_for(lambda: px.conn_lines(), what="the waiting one's log line")[0]
        assert "ended='queue timeout (0.3s)'" in line and " -> be/- " in line, line
        first.sendall(b"c")
        assert first.recv(1) == b"c"
        first.close()
        assert srv.accepted == 1


def test_share_and_full() -> None:
    assert [share(5, 2, w) for w in (0, 1)] == [3, 2]
    assert share(0, 4, 3) == 0
    cfg = parse_text(_conf('{ address = "tcp@127.0.0.1:1", maxconn = 2 }'))
    b = Balancer(cfg.backends["be"])
    (s,) = b.states
    s.limit = 2
    assert b.pick() is s
    s.active = 2
    assert b.pick() is None and full(b.states)
    s.up = False
    assert not full(b.states)


@pytest.mark.parametrize(
    ("server", "workers", "key"),
    [
        ('{ address = "tcp@127.0.0.1:1", maxconn = -1 }', 1, "backend.be.server.s.maxconn"),
        ('{ address = "tcp@127.0.0.1:1", maxconn = 1 }', 2, "backend.be.server.s.maxconn"),
        ('"tcp@127.0.0.1:1"', 1, "frontend.fe.timeout.queue"),
    ],
)
def test_bad_maxconn_exits_2_naming_the_key(
    tmp_path: Path, server: str, workers: int, key: str
) -> None:
    path = tmp_path / "p.toml"
    timeout = 'queue = "later"' if "queue" in key else ""
    path.write_text(_conf(server, timeout, workers))
    r = subprocess.run(
        [*PROXY_CMD, "-c", str(path), "--check"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2, r
    assert f"{path}: {key}: " in r.stderr, r.stderr
