"""The runtime API (issue 15, item 1): HAProxy's stats socket for `mptcpkit proxy`.

A real proxy (two workers) and real peers; `mptcpkit proxy ctl` as the operator's
client. Every test runs on both data paths (the C engine and the Python relay).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from proxy_harness import PROXY_CMD, Server, connect, echo, recv_all, run_proxy, wait_for
from test_proxy_e2e import _conf

# every test here runs on both data paths (the `relay` fixture, tests/conftest.py)
pytestmark = pytest.mark.usefixtures("relay")


def ctl(sock: Path, *words: str, json_out: bool = True) -> tuple[int, Any]:
    argv = [*PROXY_CMD, "ctl", str(sock), *words] + (["--json"] if json_out else [])
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return p.returncode, (json.loads(p.stdout) if json_out and p.stdout else p.stdout)


def _servers(sock: Path) -> dict[str, dict[str, Any]]:
    code, rows = ctl(sock, "show", "servers")
    assert code == 0, rows
    return {r["server"]: r for r in rows}


def test_show_set_and_sessions(tmp_path: Path, relay: str) -> None:
    sock = tmp_path / "ctl.sock"
    with Server(echo) as a, Server(echo) as b:
        conf = _conf(
            "mptcp@127.0.0.1:0",
            {"a": f'"{a.address}"', "b": f'"{b.address}"'},
            glob=f'workers = 2\nmetrics = ""\nstats-socket = "unix@{sock} mode 600"',
        )
        with run_proxy(tmp_path, conf) as p:
            assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
            port = p.port("fe")
            clients = [connect(port, mptcp=True) for _ in range(4)]
            for i, c in enumerate(clients):
                c.sendall(b"x" * (100 + i))
                assert recv_all(c, 100 + i) == b"x" * (100 + i)
            srv = _servers(sock)
            assert {n: (r["state"], r["admin"], r["weight"]) for n, r in srv.items()} == {
                "a": ("UP", "ready", 1),
                "b": ("UP", "ready", 1),
            }
            assert sum(r["cur"] for r in srv.values()) == 4
            assert sum(r["total"] for r in srv.values()) == 4

            # show sessions: one row per live connection, from both workers.
            code, rows = ctl(sock, "show", "sessions")
            assert code == 0 and len(rows) == 4
            mine = {c.getsockname()[1] for c in clients}
            assert {int(r["client"].rsplit(":", 1)[1]) for r in rows} == mine
            for r in rows:
                assert r["client_state"] == "MPTCP" and r["client_subflows"] >= 1
                assert r["server_state"] == "TCP" and r["server"] in ("a", "b")
                assert r["bytes_in"] == r["bytes_out"] >= 100
                assert r["age"] >= 0
            code, text = ctl(sock, "show", "sessions", json_out=False)
            assert code == 0 and text.splitlines()[0].split()[:2] == ["frontend", "client"]

            # drain: a takes no new connection, and it holds for workers started later.
            code, out = ctl(sock, "set", "server", "be/a", "state", "drain")
            assert (code, out) == (0, {"ok": True})
            before = _servers(sock)["a"]["total"]
            more = [connect(port, mptcp=True) for _ in range(6)]
            for c in more:
                c.sendall(b"y")
                assert recv_all(c, 1) == b"y"
            srv = _servers(sock)
            assert srv["a"]["admin"] == "drain" and srv["a"]["total"] == before
            assert srv["b"]["cur"] + srv["a"]["cur"] == 10
            code, text = ctl(sock, "show", "servers", json_out=False)
            assert code == 0 and "drain" in text and text.startswith("backend")

            # maint and weight, and the errors an operator can make.
            assert ctl(sock, "set", "server", "be/a", "state", "maint")[0] == 0
            assert _servers(sock)["a"]["state"] == "MAINT"
            assert ctl(sock, "set", "server", "be/b", "weight", "7")[0] == 0
            assert _servers(sock)["b"]["weight"] == 7
            code, out = ctl(sock, "set", "server", "be/zz", "state", "ready")
            assert code == 1 and "no such server" in out["error"]
            code, out = ctl(sock, "set", "server", "be/a", "state", "up")
            assert code == 1 and "ready, drain or maint" in out["error"]
            code, out = ctl(sock, "frobnicate", json_out=False)
            assert code == 1 and out.startswith("error: unknown command")
            for c in clients + more:
                c.close()
            wait_for(lambda: sum(r["cur"] for r in _servers(sock).values()) == 0, what="idle")
        assert not sock.exists()  # removed when the proxy stops


def test_reload_answers(tmp_path: Path, relay: str) -> None:
    sock = tmp_path / "ctl.sock"
    with Server(echo) as a:
        glob = f'workers = 1\nmetrics = ""\nstats-socket = "unix@{sock}"'
        conf = _conf("tcp@127.0.0.1:0", {"a": f'"{a.address}"'}, glob=glob)
        with run_proxy(tmp_path, conf) as p:
            first = p.workers()
            cfg = tmp_path / "proxy.toml"
            cfg.write_text(conf.replace('backend = "be"', 'backend = "nope"'))
            code, out = ctl(sock, "reload")
            assert code == 1 and "nope" in out["error"], out
            assert p.workers() == first  # the running workers never knew
            cfg.write_text(conf)
            code, out = ctl(sock, "reload", json_out=False)
            assert (code, out) == (0, "ok\n")
            wait_for(lambda: p.workers() and p.workers() != first, what="new workers")
            c = connect(p.port("fe"), mptcp=False)
            c.sendall(b"z")
            assert recv_all(c, 1) == b"z"
            c.close()


def test_ctl_errors(tmp_path: Path) -> None:
    code, _ = ctl(tmp_path / "missing.sock", "show", "servers", json_out=False)
    assert code == 1
    bad = _conf("tcp@127.0.0.1:0", {"a": '"tcp@127.0.0.1:1"'}, glob='stats-socket = "tcp@:1"')
    (tmp_path / "bad.toml").write_text(bad)
    p = subprocess.run(
        [*PROXY_CMD, "--check", "-c", str(tmp_path / "bad.toml")], capture_output=True, text=True
    )
    assert p.returncode == 2 and "stats-socket" in p.stderr
    with socket.socket(socket.AF_UNIX) as s:  # a path that is not ours is not taken over
        s.bind(str(tmp_path / "taken.sock"))
        s.listen()
        glob = f'metrics = ""\nstats-socket = "unix@{tmp_path / "taken.sock"}"'
        conf = _conf("tcp@127.0.0.1:0", {"a": '"tcp@127.0.0.1:1"'}, glob=glob)
        (tmp_path / "t.toml").write_text(conf)
        p = subprocess.run(
            [*PROXY_CMD, "-c", str(tmp_path / "t.toml")], capture_output=True, text=True, timeout=30
        )
        assert p.returncode == 2 and "stats-socket" in p.stderr, p.stderr


def test_set_server_ready_lets_its_queue_go(tmp_path: Path, relay: str) -> None:
    """A connection waiting for a server slot (every usable server at its maxconn) goes
    to a server set `ready` at once, not when some other connection ends."""
    sock = tmp_path / "ctl.sock"
    with Server(echo) as a, Server(echo) as b:
        conf = _conf(
            "mptcp@127.0.0.1:0",
            {
                "a": f'{{ address = "{a.address}", maxconn = 1 }}',
                "b": f'{{ address = "{b.address}", maxconn = 1 }}',
            },
            glob=f'workers = 1\nmetrics = ""\nstats-socket = "unix@{sock}"',
            extra_fe='timeout = { queue = "60s" }',
        )
        with run_proxy(tmp_path, conf) as p:
            assert ctl(sock, "set", "server", "be/b", "state", "drain")[0] == 0
            first = connect(p.port("fe"), mptcp=True)
            first.sendall(b"1")
            assert first.recv(1) == b"1" and a.accepted == 1
            waiting = connect(p.port("fe"), mptcp=True)
            waiting.sendall(b"2")

            def parked() -> bool:
                code, rows = ctl(sock, "show", "sessions")
                return code == 0 and [r["server"] for r in rows].count(None) == 1

            wait_for(parked, what="the second connection to wait for a slot")
            assert ctl(sock, "set", "server", "be/b", "state", "ready")[0] == 0
            waiting.settimeout(20)
            assert waiting.recv(1) == b"2"  # served by b while the first still holds a
            assert b.accepted == 1
            first.close()
            waiting.close()
