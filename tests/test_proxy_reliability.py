"""`mptcpkit proxy` keeps HAProxy's reliability promises under faults (issue 12): it
fails closed before listening, never resets a connection the kernel completed, counts
its own limits as its own, and cleans up after itself. Both data paths."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import os
import pwd
import re
import resource
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import proxy_harness
from proxy_harness import PROXY_CMD, Server, echo, free_port, recv_all, run_proxy, wait_for

# every test here runs on both data paths (the `relay` fixture, tests/conftest.py)
pytestmark = pytest.mark.usefixtures("relay")


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
            fds = len(os.listdir(f"/proc/{px.proc.pid}/fd"))
            px.signal(signal.SIGHUP)
            wait_for(lambda: "reload failed" in px.log(), what="the reload to fail")
            assert len(os.listdir(f"/proc/{px.proc.pid}/fd")) == fds
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
from mptcpkit.proxy import workerproc
real = workerproc.main
def worker_main(cfg, *args):
    if cfg.global_.workers == 3:
        raise RuntimeError("cannot start (injected)")
    return real(cfg, *args)
workerproc.main = worker_main
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
        fds = len(os.listdir(f"/proc/{px.proc.pid}/fd"))
        (tmp_path / "proxy.toml").write_text(
            _conf(0, {"s": f"tcp@127.0.0.1:{srv.port}"}, 'workers = 3\nmetrics = ""')
        )
        px.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in px.log(), what="the reload to fail")
        assert len(os.listdir(f"/proc/{px.proc.pid}/fd")) == fds  # sockets, pipes: closed
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


# --- maxconn for the whole proxy, and the fd limit it needs (item 5) --------------------


def test_maxconn_is_for_the_whole_proxy(tmp_path: Path) -> None:
    """workers = 2, maxconn = 4: four connections served at once, not eight."""
    with (
        Server(echo) as srv,
        run_proxy(
            tmp_path,
            _conf(0, {"s": f"tcp@127.0.0.1:{srv.port}"}, 'workers = 2\nmetrics = ""').replace(
                "backend = 'be'", "backend = 'be'\nmaxconn = 4"
            ),
        ) as px,
    ):
        port = px.port("fe")
        clients = []
        for _ in range(20):  # SO_REUSEPORT spreads them: each worker gets more than 2
            c = socket.create_connection(("127.0.0.1", port), timeout=20)
            c.sendall(b"x")
            clients.append(c)
        wait_for(lambda: srv.accepted >= 4, what="four served")
        time.sleep(1.0)  # would a fifth get through?
        assert srv.accepted == 4, f"maxconn = 4 let {srv.accepted} through"
        for c in clients:
            c.close()


def _limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no fd limit")


def test_fd_limit_raised_for_maxconn(tmp_path: Path) -> None:
    """ulimit -n 512, maxconn 3000: the workers may open the 6000-odd fds maxconn
    needs (as HAProxy computes ulimit-n)."""
    conf = _conf(0, {"s": "tcp@127.0.0.1:9"}).replace(
        "backend = 'be'", "backend = 'be'\nmaxconn = 3000"
    )
    path = tmp_path / "p.toml"
    path.write_text(conf)

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))

    p = subprocess.Popen(
        [*PROXY_CMD, "-c", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=low,
        text=True,
    )
    try:
        wait_for(
            lambda: Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split(),
            what="a worker",
        )
        (worker,) = (
            int(x) for x in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
        )
        soft, _ = _limits(worker)
        assert soft >= 2 * 3000, f"worker fd limit {soft} for maxconn 3000"
    finally:
        p.terminate()
        p.wait(20)


def test_fd_limit_out_of_reach_exit_2_saying_what_to_change(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "p.toml"
    path.write_text(
        _conf(port, {"s": "tcp@127.0.0.1:9"}).replace(
            "backend = 'be'", "backend = 'be'\nmaxconn = 10000000"
        )
    )
    for extra in (["--check"], []):
        r = _cli(["-c", str(path), *extra])
        assert r.returncode == 2, r
        assert f"{path}: frontend.fe.maxconn: maxconn 10000000 needs " in r.stderr, r.stderr
        assert "lower maxconn, or raise the limit (ulimit -n" in r.stderr, r.stderr
        _nothing_listens(port)


def test_out_of_fds_for_a_server_socket_is_the_proxys_error(tmp_path: Path) -> None:
    """The worker can accept a client but not open the server's socket: EMFILE is the
    proxy's failure (logged and counted as such), not the server's."""
    glob = 'workers = 1\nmetrics = "127.0.0.1:0"'
    with (
        Server(echo) as srv,
        run_proxy(tmp_path, _conf(0, {"s": f"tcp@127.0.0.1:{srv.port}"}, glob)) as px,
    ):
        port = px.port("fe")
        _echo_through(port)
        # the warm-up's fds are closed and the metrics files open once its line is out
        wait_for(lambda: px.conn_lines(), what="the warm-up connection's log line")
        (worker,) = px.workers()
        before = resource.prlimit(worker, resource.RLIMIT_NOFILE)
        used = {int(fd) for fd in os.listdir(f"/proc/{worker}/fd")}
        free = sorted(set(range(max(used) + 3)) - used)
        resource.prlimit(worker, resource.RLIMIT_NOFILE, (free[1], before[1]))  # one fd left
        try:
            c = socket.create_connection(("127.0.0.1", port), timeout=20)
            c.sendall(b"x")
            with contextlib.suppress(ConnectionResetError):
                assert c.recv(1) == b""
            c.close()
            want = "frontend fe: no socket for a server connection (EMFILE), retrying in 1s"
            wait_for(lambda: want in px.log(), what="the proxy to own the EMFILE")
        finally:
            resource.prlimit(worker, resource.RLIMIT_NOFILE, before)
        assert "connect to s" not in px.log(), px.log()
        line = wait_for(lambda: px.conn_lines(), what="the connection's log line")[-1]
        assert "ended='proxy error: EMFILE'" in line, line
        wait_for(lambda: _echoes(port), what="serving again")

        def counted() -> str | None:
            t = px.metrics()
            return t if "mptcpkit_proxy_errors_total{" in t else None

        m = wait_for(counted, what="the error counted")
        assert 'mptcpkit_proxy_errors_total{error="EMFILE",frontend="fe"} 1.0' in m, m
        assert "mptcpkit_proxy_connect_failures_total{" not in m, m


def _echoes(port: int) -> bool:
    try:
        _echo_through(port)
    except (OSError, AssertionError):
        return False
    return True


def test_default_maxconn_fits_a_low_fd_limit(tmp_path: Path) -> None:
    """Without maxconn in the file, a low `ulimit -n` lowers it (as HAProxy derives
    maxconn from ulimit-n) and says so: (512 - 66 fixed) / 2 per connection."""
    path = tmp_path / "p.toml"
    with Server(echo) as srv:
        path.write_text(_conf(0, {"s": f"tcp@127.0.0.1:{srv.port}"}))

        def low() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))

        r = subprocess.run(
            [*PROXY_CMD, "-c", str(path), "--check"],
            capture_output=True,
            text=True,
            timeout=30,
            preexec_fn=low,
        )
        assert r.returncode == 0, r
        assert "maxconn lowered from 10000 to 223 for fe to fit the fd limit of 512" in (
            r.stdout
        ), r.stdout


# --- unix socket binds (item 10) ----------------------------------------------------


def test_unix_bind_removed_on_stop_and_on_reload(tmp_path: Path) -> None:
    sock = tmp_path / "p.sock"
    gone = tmp_path / "gone.sock"
    keep = tmp_path / "not-a-socket"
    keep.write_text("data")
    with Server(echo) as srv:
        conf = _conf(0, {"s": f"tcp@127.0.0.1:{srv.port}"}).replace(
            "bind = 'mptcp@127.0.0.1:0'", f"bind = ['unix@{sock}', 'unix@{gone}']"
        )
        with run_proxy(tmp_path, conf) as px:
            assert sock.is_socket() and gone.is_socket()
            with socket.socket(socket.AF_UNIX) as c:
                c.connect(str(sock))
                c.sendall(b"hi")
                c.shutdown(socket.SHUT_WR)
                assert recv_all(c) == b"hi"
            (tmp_path / "proxy.toml").write_text(conf.replace(f", 'unix@{gone}'", ""))
            px.signal(signal.SIGHUP)
            wait_for(lambda: "reloaded" in px.log(), what="reload")
            assert not gone.exists(), "a unix bind removed by a reload left its file"
            assert sock.is_socket()
        assert not sock.exists(), "the proxy left its unix socket behind"
    # a bind on a path that is not a socket is refused, the file untouched
    bad = tmp_path / "bad.toml"
    bad.write_text(conf.replace(f"['unix@{sock}', 'unix@{gone}']", f"'unix@{keep}'"))
    r = _cli(["-c", str(bad)])
    assert r.returncode == 2 and "cannot listen on unix@" in r.stderr, r.stderr
    assert keep.read_text() == "data"


# Out of the default run since it reset 1 connection in 2,400 in a CI run (one the
# kernel completed between a worker's last accept and its close of the listener). New
# SYNs are diverted before workers stop now (docs/proxy.md), and it passed in every run
# since; test_proxy_stop_race.py is its fast sibling, which hits that race on purpose.
@pytest.mark.slow
def test_sigterm_under_load_resets_nothing(tmp_path: Path) -> None:
    """SIGTERM under load: connections the kernel completed (in a listener's queue)
    are served, not reset; later ones are refused."""
    load = Load(rate=1200, total=2400, concurrency=2)  # workers often idle: the race
    sport = load.start_server()
    with run_proxy(tmp_path, _conf(0, {"s": f"tcp@127.0.0.1:{sport}"}, _GLOB.format(n=2))) as px:
        load.run(px.port("fe"))
        wait_for(lambda: load.done >= 600, what="the load to be under way")
        px.signal(signal.SIGTERM)
        assert px.proc.wait(30) == 0
        load.wait(120)
        print(load.summary())
        assert load.ok >= 600
        assert (load.reset, load.truncated, load.other) == (0, 0, []), load.summary()
        assert load.ok + load.refused == load.total


def test_unix_bind_mode(tmp_path: Path) -> None:
    """HAProxy's `mode` bind option (the file was left as created: 0755 under root)."""
    sock = tmp_path / "p.sock"
    with Server(echo) as srv:
        conf = _conf(0, {"s": f"tcp@127.0.0.1:{srv.port}"}).replace(
            "bind = 'mptcp@127.0.0.1:0'", f"bind = 'unix@{sock} mode 600'"
        )
        with run_proxy(tmp_path, conf) as px:
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
            (tmp_path / "proxy.toml").write_text(conf.replace("mode 600", "mode 0660"))
            px.signal(signal.SIGHUP)  # the same socket, its mode changed
            wait_for(lambda: "reloaded" in px.log(), what="reload")
            assert stat.S_IMODE(sock.stat().st_mode) == 0o660


@pytest.mark.root
def test_unix_bind_user_and_group(tmp_path: Path) -> None:
    sock = tmp_path / "p.sock"
    conf = _conf(0, {"s": "tcp@127.0.0.1:9"}).replace(
        "bind = 'mptcp@127.0.0.1:0'", f"bind = 'unix@{sock} mode 660 user nobody group nogroup'"
    )
    with run_proxy(tmp_path, conf):
        st = sock.stat()
        assert (st.st_uid, st.st_gid) == (
            pwd.getpwnam("nobody").pw_uid,
            grp.getgrnam("nogroup").gr_gid,
        )
        assert stat.S_IMODE(st.st_mode) == 0o660
    bad = tmp_path / "bad.toml"
    bad.write_text(conf.replace("user nobody", "user no-such-user-h12"))
    for extra in (["--check"], []):
        r = _cli(["-c", str(bad), *extra])
        assert r.returncode == 2, r
        assert f"{bad}: frontend.fe.bind: no such user 'no-such-user-h12'" in r.stderr, r.stderr
        assert not sock.exists()
