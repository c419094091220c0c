"""Retries as HAProxy makes them (issue 15, item 3): `retries` tries the same server
again after a refusal, with a pause (at most 1 s), and `redispatch` sends the last
retry to another server. Real proxy, real servers; both data paths."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from proxy_harness import Server, connect, echo, free_port, recv_all, run_proxy, wait_for
from test_proxy_e2e import _conf

# every test here runs on both data paths (the `relay` fixture, tests/conftest.py)
pytestmark = pytest.mark.usefixtures("relay")


def _ping(port: int, out: list[bytes]) -> None:
    with connect(port, mptcp=True) as c:
        c.sendall(b"ping")
        out.append(recv_all(c, 4))


def test_server_restart_does_not_close_clients(tmp_path: Path, relay: str) -> None:
    """A single-server backend (retries = 3) while its server restarts: clients that
    arrive meanwhile are served once it is back (they were closed: 6,239 of them)."""
    port = free_port()
    srv = Server(echo, port=port)
    conf = _conf("mptcp@127.0.0.1:0", {"a": f'"tcp@127.0.0.1:{port}"'}, extra_be="retries = 3")
    with run_proxy(tmp_path, conf) as px:
        fe = px.port("fe")
        got: list[bytes] = []
        _ping(fe, got)
        srv.close()  # the restart begins: connects are refused
        threads = [threading.Thread(target=_ping, args=(fe, got)) for _ in range(20)]
        for t in threads:
            t.start()
        wait_for(lambda: px.log().count("ECONNREFUSED") >= 20, what="refused connects")
        srv = Server(echo, port=port)  # back, well within the retries
        try:
            for t in threads:
                t.join(30)
            assert got == [b"ping"] * 21
            assert "every server failed" not in px.log() and "connect failed" not in px.log()
        finally:
            srv.close()


def test_redispatch_moves_the_last_retry(tmp_path: Path, relay: str) -> None:
    dead = free_port()
    with Server(echo) as b:
        servers = {"a": f'"tcp@127.0.0.1:{dead}"', "b": f'"{b.address}"'}
        # roundrobin starts with a: refused twice (same server, after a pause), then b.
        with run_proxy(tmp_path, _conf("mptcp@127.0.0.1:0", servers, extra_be="retries = 2")) as px:
            got: list[bytes] = []
            _ping(px.port("fe"), got)
            assert got == [b"ping"] and b.accepted == 1
            refused = f"connect to a (tcp@127.0.0.1:{dead}) failed"
            wait_for(lambda: px.log().count(refused) >= 2, what="two refusals logged")
            assert px.log().count(refused) == 2
        # Without redispatch every retry goes to a, though b is up.
        conf = _conf("mptcp@127.0.0.1:0", servers, extra_be="retries = 1\nredispatch = false")
        with run_proxy(tmp_path, conf) as px:
            with connect(px.port("fe"), mptcp=True) as c:
                c.sendall(b"ping")
                assert recv_all(c) == b""  # closed cleanly (FIN)
            line = wait_for(lambda: px.conn_lines(), what="log line")[0]
            assert "-> be/-" in line and "connect failed: ECONNREFUSED" in line, line
            wait_for(lambda: px.log().count("connect to a (") >= 2, what="two refusals logged")
            assert px.log().count("connect to a (") == 2 and b.accepted == 1
