"""`mptcpkit proxy` keeps HAProxy's reliability promises under faults (issue 12): it
fails closed before listening, never resets a connection the kernel completed, counts
its own limits as its own, and cleans up after itself. Both data paths."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import proxy_harness
from mptcpkit.proxy import compiled
from mptcpkit.proxy.config import ConfigError
from proxy_harness import PROXY_CMD, Server, echo, free_port, recv_all, run_proxy, wait_for


@pytest.fixture(autouse=True, params=["c", "python"], ids=["compiled", "python"])
def relay(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(compiled.ENGINE_ENV, request.param)
    try:
        return compiled.data_path()
    except ConfigError as exc:
        pytest.skip(f"{exc} (build it: python3 setup.py build_ext --inplace)")


def _cli(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PROXY_CMD, *args], capture_output=True, text=True, timeout=timeout)


def _nothing_listens(port: int) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))


# --- overlapping binds (item 2) ------------------------------------------------------


@pytest.mark.parametrize("other", ["tcp@127.0.0.1:{p2}", "tcp@:{p2}"])
def test_overlapping_binds_exit_2_naming_both(tmp_path: Path, other: str) -> None:
    """A port range in one frontend and one of its ports (or the wildcard on it) in
    another would split traffic between two backends through SO_REUSEPORT."""
    base = free_port()
    second = other.format(p2=base + 2)
    path = tmp_path / "p.toml"
    path.write_text(
        f"[frontend.a]\nbind='tcp@127.0.0.1:{base}-{base + 3}'\nbackend='b'\n"
        f"[frontend.c]\nbind='{second}'\nbackend='b'\n"
        "[backend.b]\nserver.s='tcp@127.0.0.1:1'\n"
    )
    for extra in ([], ["--check"]):
        r = _cli(["-c", str(path), *extra])
        assert r.returncode == 2, r
        want = f"{path}: frontend.c.bind: {second} overlaps tcp@127.0.0.1:{base}-{base + 3}"
        want += " (frontend.a.bind)"
        assert want in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
    _nothing_listens(base)


# --- fail closed: resolved, opened and checked before listening (item 1) ----------------

BAD_NAME = "no-such-host.invalid"  # .invalid never resolves (RFC 6761)


def _conf(port: int, servers: dict[str, str], glob: str = 'workers = 1\nmetrics = ""') -> str:
    srv = "\n".join(f'server.{k} = "{v}"' for k, v in servers.items())
    return (
        f"[global]\n{glob}\n[frontend.fe]\nbind = 'mptcp@127.0.0.1:{port}'\nbackend = 'be'\n"
        f"[backend.be]\n{srv}\n"
    )


def _echo_through(port: int, data: bytes = b"ping") -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == data


@pytest.mark.parametrize(
    ("glob", "server", "key", "reason"),
    [
        (
            "",
            f"tcp@{BAD_NAME}:80",
            "backend.be.server.bad",
            f"cannot resolve '{BAD_NAME}' (tcp@{BAD_NAME}:80): ",
        ),
        (
            "log = '/nonexistent/x.log'",
            "tcp@127.0.0.1:9",
            "global.log",
            "cannot open '/nonexistent/x.log': No such file or directory",
        ),
    ],
    ids=["unresolvable-server", "unopenable-log"],
)
def test_start_and_check_fail_closed(
    tmp_path: Path, glob: str, server: str, key: str, reason: str
) -> None:
    """One bad server name (next to a good one) or an unopenable log: exit 2 naming the
    key and the error, listening on nothing; `--check` says the same."""
    port = free_port()
    path = tmp_path / "p.toml"
    path.write_text(
        _conf(
            port, {"good": "tcp@127.0.0.1:9", "bad": server}, f'workers = 2\nmetrics = ""\n{glob}'
        )
    )
    for extra in (["--check"], []):
        r = _cli(["-c", str(path), *extra])
        assert r.returncode == 2, r
        assert f"{path}: {key}: {reason}" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr  # one line, no traceback
        _nothing_listens(port)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"servers": {"s": "{echo}", "bad": f"tcp@{BAD_NAME}:80"}},
            f"backend.be.server.bad: cannot resolve '{BAD_NAME}'",
        ),
        (
            {"glob": 'workers = 1\nmetrics = ""\nlog = "/nonexistent/x.log"'},
            "global.log: cannot open '/nonexistent/x.log'",
        ),
    ],
    ids=["unresolvable-server", "unopenable-log"],
)
def test_reload_into_a_broken_config_keeps_the_running_one(
    tmp_path: Path, change: dict[str, Any], reason: str
) -> None:
    with Server(echo) as srv:
        echo_addr = f"tcp@127.0.0.1:{srv.port}"
        with run_proxy(tmp_path, _conf(0, {"s": echo_addr})) as px:
            port = px.port("fe")
            _echo_through(port)
            workers = px.workers()
            servers = {k: v.format(echo=echo_addr) for k, v in change.get("servers", {}).items()}
            glob = change.get("glob", 'workers = 1\nmetrics = ""')
            (tmp_path / "proxy.toml").write_text(_conf(0, servers or {"s": echo_addr}, glob))
            px.signal(signal.SIGHUP)
            wait_for(lambda: "reload failed" in px.log(), what="the reload to fail")
            line = next(x for x in px.log().splitlines() if "reload failed" in x)
            assert reason in line, line
            assert line.endswith(", keeping the running configuration"), line
            assert "reloaded" not in px.log()
            assert px.workers() == workers  # the old workers were never told to stop
            for _ in range(4):
                _echo_through(port)
            assert srv.accepted == 5


# Workers of a 3-worker config fail as they start (an injected fault: with names, the
# log and users checked by the master, no config makes a real worker fail any more).
_FAILING_WORKERS = """
import sys
from mptcpkit.proxy import master
real = master._worker_main
def worker_main(cfg, *args):
    if cfg.global_.workers == 3:
        raise RuntimeError("cannot start (injected)")
    return real(cfg, *args)
master._worker_main = worker_main
from mptcpkit.cli import main
sys.exit(main(["proxy", *sys.argv[1:]]))
"""


def test_workers_that_cannot_start_stop_the_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Never "ready" while holding a port nobody serves: the master stops listening
    and exits 1 saying why."""
    monkeypatch.setattr(proxy_harness, "PROXY_CMD", [sys.executable, "-c", _FAILING_WORKERS])
    port = free_port()
    with run_proxy(
        tmp_path, _conf(port, {"s": "tcp@127.0.0.1:9"}, 'workers = 3\nmetrics = ""'), ready=False
    ) as px:
        assert px.proc.wait(30) == 1, px.log()
        want = r"worker \d could not start: RuntimeError: cannot start \(injected\); stopping"
        assert re.search(want, px.log()), px.log()
        assert "ready" not in px.log()
        _nothing_listens(port)


def test_reload_whose_workers_cannot_start_keeps_the_running_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy_harness, "PROXY_CMD", [sys.executable, "-c", _FAILING_WORKERS])
    with (
        Server(echo) as srv,
        run_proxy(tmp_path, _conf(0, {"s": f"tcp@127.0.0.1:{srv.port}"})) as px,
    ):
        port = px.port("fe")
        workers = px.workers()
        (tmp_path / "proxy.toml").write_text(
            _conf(0, {"s": f"tcp@127.0.0.1:{srv.port}"}, 'workers = 3\nmetrics = ""')
        )
        px.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in px.log(), what="the reload to fail")
        want = (
            r"reload failed: worker \d could not start: RuntimeError: cannot start \(injected\),"
            " keeping the running configuration"
        )
        assert re.search(want, px.log()), px.log()
        wait_for(lambda: px.workers() == workers, what="only the running worker left")
        for _ in range(3):
            _echo_through(port)
