"""`mptcpkit proxy` keeps HAProxy's reliability promises under faults (issue 12): it
fails closed before listening, never resets a connection the kernel completed, counts
its own limits as its own, and cleans up after itself. Both data paths."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
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


# --- reloads under load lose nothing (item 4) -------------------------------------------


class Load:
    """Paced connections through the proxy to an asyncio echo server, in one thread:
    each sends a payload, half-closes, and must read back exactly what it sent."""

    def __init__(self, rate: float, total: int, concurrency: int = 64) -> None:
        self.rate, self.total, self.concurrency = rate, total, concurrency
        self.ok = self.refused = self.reset = self.truncated = 0
        self.other: list[str] = []
        self.elapsed = 0.0
        self.server_port = 0
        self._proxy_port = 0
        self._ready = threading.Event()
        self._go = threading.Event()
        self._t = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start_server(self) -> int:
        self._t.start()
        assert self._ready.wait(20)
        return self.server_port

    def run(self, proxy_port: int) -> None:
        self._proxy_port = proxy_port
        self._go.set()

    def wait(self, timeout: float) -> None:
        self._t.join(timeout)
        assert not self._t.is_alive(), "load did not finish"

    @property
    def done(self) -> int:
        return self.ok + self.refused + self.reset + self.truncated + len(self.other)

    async def _main(self) -> None:
        async def echo_handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
                w.write_eof()
                await w.drain()
            except OSError:
                pass
            finally:
                w.close()

        server = await asyncio.start_server(echo_handler, "127.0.0.1", 0, backlog=4096)
        self.server_port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await asyncio.get_running_loop().run_in_executor(None, self._go.wait)
        sem = asyncio.Semaphore(self.concurrency)
        tasks = []
        t0 = time.monotonic()
        for i in range(self.total):
            delay = t0 + i / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await sem.acquire()
            tasks.append(asyncio.create_task(self._one(i, sem)))
        await asyncio.gather(*tasks)
        self.elapsed = time.monotonic() - t0
        server.close()

    async def _one(self, i: int, sem: asyncio.Semaphore) -> None:
        data = hashlib.sha256(str(i).encode()).digest() * (16 + i % 64)
        try:
            r, w = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self._proxy_port), 30
            )
            try:
                w.write(data)
                await w.drain()
                w.write_eof()
                got = await asyncio.wait_for(r.read(-1), 30)
            finally:
                w.close()
            if hashlib.sha256(got).digest() == hashlib.sha256(data).digest():
                self.ok += 1
            else:
                self.truncated += 1
        except ConnectionRefusedError:
            self.refused += 1
        except ConnectionResetError:
            self.reset += 1
        except (OSError, TimeoutError) as exc:
            self.other.append(repr(exc))
        finally:
            sem.release()

    def summary(self) -> str:
        rate = self.done / self.elapsed if self.elapsed else 0.0
        return (
            f"{self.done} connections in {self.elapsed:.1f}s ({rate:.0f}/s): ok {self.ok},"
            f" refused {self.refused}, reset {self.reset}, truncated {self.truncated},"
            f" other {self.other[:3]}"
        )


def _reloads_under_load(tmp_path: Path, reloads: int, total: int) -> None:
    """`reloads` SIGHUPs, the worker count going 2 -> 1 -> 3 -> 2 ..., while paced
    connections (1200/s) go through: none refused, reset or cut short."""
    load = Load(rate=1200, total=total)
    sport = load.start_server()
    counts = [1, 3, 2]
    with run_proxy(tmp_path, _conf(0, {"s": f"tcp@127.0.0.1:{sport}"}, _GLOB.format(n=2))) as px:
        load.run(px.port("fe"))
        done = 0
        while done < reloads and load.done < total:
            n = counts[done % len(counts)]
            (tmp_path / "proxy.toml").write_text(
                _conf(0, {"s": f"tcp@127.0.0.1:{sport}"}, _GLOB.format(n=n))
            )
            px.signal(signal.SIGHUP)
            done += 1
            wait_for(lambda d=done: px.log().count("reloaded") >= d, what=f"reload {done}")
            time.sleep(0.05)
        load.wait(120)
        print(f"{done} reloads; {load.summary()}")
        assert done >= reloads, f"the load ended after {done} reloads; {load.summary()}"
        assert (load.refused, load.reset, load.truncated, load.other) == (0, 0, 0, []), (
            load.summary()
        )
        assert load.ok == total
        assert "reload failed" not in px.log()


_GLOB = 'workers = {n}\nmetrics = ""\nlog = "none"'


def test_reloads_under_load_lose_nothing(tmp_path: Path) -> None:
    _reloads_under_load(tmp_path, reloads=4, total=2500)


@pytest.mark.slow
def test_many_reloads_under_load_lose_nothing(tmp_path: Path) -> None:
    _reloads_under_load(tmp_path, reloads=24, total=30000)


def test_hard_stop_after_cuts_old_workers(tmp_path: Path) -> None:
    """HAProxy's hard-stop-after: an old worker still draining after it is cut."""
    glob = 'workers = 1\nmetrics = ""\nhard-stop-after = "1s"'
    with (
        Server(echo) as srv,
        run_proxy(tmp_path, _conf(0, {"s": f"tcp@127.0.0.1:{srv.port}"}, glob)) as px,
    ):
        held = socket.create_connection(("127.0.0.1", px.port("fe")), timeout=20)
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        (old,) = px.workers()
        px.signal(signal.SIGHUP)
        wait_for(lambda: f"old worker {old}: hard-stop-after reached" in px.log(), what="the cut")
        wait_for(lambda: f"old worker {old} finished" in px.log(), what="the old worker to exit")
        with contextlib.suppress(ConnectionResetError):
            assert held.recv(1) == b""
        held.close()
        _echo_through(px.port("fe"))  # the new worker serves
