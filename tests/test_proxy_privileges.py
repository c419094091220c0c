"""No HTTP reaches a root process: /metrics is served by a child of the master that
dropped to `global.user`/`group`; the master (root, to bind on reload) keeps no copy of
the metrics socket. Real proxy processes on loopback."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

from proxy_harness import Server, connect, echo, recv_all, run_proxy, wait_for


def _uids(pid: int) -> set[str]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return set(next(x for x in status if x.startswith("Uid:")).split()[1:])


def _listening_inode(port: int) -> str:
    """The inode of the TCP socket listening on 127.0.0.1:`port`."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == f"0100007F:{port:04X}" and f[3] == "0A":  # LISTEN
            return f[9]
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def _holds(pid: int, inode: str) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    return any(os.readlink(fds / fd) == f"socket:[{inode}]" for fd in os.listdir(fds))


@pytest.mark.root
def test_metrics_served_by_an_unprivileged_process(tmp_path: Path) -> None:
    config = (
        '[global]\nworkers = 1\nmetrics = "127.0.0.1:0"\nuser = "nobody"\ngroup = "nogroup"\n'
        '[frontend.fe]\nbind = "mptcp@127.0.0.1:0"\nbackend = "be"\n'
        '[backend.be]\nserver.s = "tcp@127.0.0.1:{port}"\n'
    )
    with Server(echo) as srv, run_proxy(tmp_path, config.format(port=srv.port)) as px:
        m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics \(pid (\d+)\)", px.log())
        assert m, px.log()
        port, server = int(m.group(1)), int(m.group(2))
        assert server != px.proc.pid and server not in px.workers()
        wait_for(lambda: _uids(server) == {"65534"}, what="the metrics server to be nobody")
        assert _uids(px.proc.pid) == {"0"}  # the master keeps root to bind on reload
        inode = _listening_inode(port)
        assert _holds(server, inode)
        assert not _holds(px.proc.pid, inode), "the root master still holds the metrics socket"
        for pid in px.workers():
            assert not _holds(pid, inode)
        # and it serves the workers' counters
        s = connect(px.port("fe"), mptcp=True)
        s.sendall(b"ping")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"ping"
        s.close()
        wait_for(lambda: "mptcpkit_proxy_connections_total{" in px.metrics(), what="the counters")
        # what scrapers also ask for works after the drop (no import left to do as nobody)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            c.sendall(
                b"GET /metrics HTTP/1.0\r\nAccept: application/openmetrics-text\r\n"
                b"Accept-Encoding: gzip\r\n\r\n"
            )
            head = recv_all(c).split(b"\r\n\r\n")[0].decode()
        assert head.startswith("HTTP/1.0 200") and "Content-Encoding: gzip" in head, head
    assert not Path(f"/proc/{server}").exists()  # stopped and reaped with the proxy
