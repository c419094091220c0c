"""`mptcpkit proxy` end to end: real proxy processes, real MPTCP/TCP peers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import resource
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mptcpkit.aio
from mptcpkit.proxy import compiled, proxyproto
from proxy_harness import (
    PROXY_CMD,
    ProxyProc,
    Server,
    connect,
    echo,
    free_port,
    hash_reply,
    payload,
    recv_all,
    rss_kib,
    run_proxy,
    wait_for,
)

# every test here runs on both data paths (the `relay` fixture, tests/conftest.py)
pytestmark = pytest.mark.usefixtures("relay")


def _conf(
    bind: str,
    servers: dict[str, str],
    *,
    extra_fe: str = "",
    extra_be: str = "",
    glob: str = 'workers = 1\nmetrics = "127.0.0.1:0"',
) -> str:
    srv = "\n".join(f"server.{k} = {v}" for k, v in servers.items())
    return (
        f'[global]\n{glob}\n[frontend.fe]\nbind = "{bind}"\nbackend = "be"\n{extra_fe}\n'
        f"[backend.be]\n{srv}\n{extra_be}\n"
    )


@contextlib.contextmanager
def _echo_behind_proxy(tmp_path: Path, **conf: str) -> Iterator[tuple[Server, Any]]:
    """An echo server with the proxy in front of it (MPTCP frontend, one TCP server)."""
    with (
        Server(echo) as srv,
        run_proxy(
            tmp_path,
            _conf("mptcp@127.0.0.1:0", {"s": f'"tcp@127.0.0.1:{srv.port}"'}, **conf),  # type: ignore[arg-type]
        ) as px,
    ):
        yield srv, px


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


def _roundtrip(port: int, *, mptcp: bool, size: int = 5 << 20) -> socket.socket:
    """Send `size` bytes, half-close, check the server's hash of them and its payload."""
    data = payload(size, b"cli")
    s = connect(port, mptcp=mptcp)
    t = threading.Thread(target=s.sendall, args=(data,))
    t.start()
    # read concurrently: the server answers only after our FIN, but big sends need a reader
    t.join()
    s.shutdown(socket.SHUT_WR)
    reply = recv_all(s)
    assert reply[:32] == hashlib.sha256(data).digest(), "server got different bytes"
    assert hashlib.sha256(reply[32:]).digest() == hashlib.sha256(payload(3 << 20, b"srv")).digest()
    return s


def _echoed(port: int, data: bytes = b"a") -> socket.socket:
    """An MPTCP client through the proxy whose first bytes came back: a live connection."""
    s = connect(port, mptcp=True)
    s.sendall(data)
    assert s.recv(len(data)) == data
    return s


def _echo_through(port: int, data: bytes = b"ping") -> None:
    """One MPTCP client through the proxy to an echo server: send, FIN, read it all back."""
    s = connect(port, mptcp=True)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == data
    s.close()


@pytest.mark.parametrize(
    ("client_mptcp", "server_mptcp", "bind", "target"),
    [
        (True, False, "mptcp@127.0.0.1:0", "tcp"),
        (False, True, "tcp@127.0.0.1:0", "mptcp"),
    ],
)
def test_relay_hash_both_directions(
    tmp_path: Path, client_mptcp: bool, server_mptcp: bool, bind: str, target: str
) -> None:
    with (
        Server(hash_reply, mptcp=server_mptcp) as srv,
        run_proxy(tmp_path, _conf(bind, {"s1": f'"{target}@127.0.0.1:{srv.port}"'})) as px,
    ):
        s = _roundtrip(px.port("fe"), mptcp=client_mptcp)
        s.close()
        line = wait_for(lambda: px.conn_lines(), what="the connection's log line")[0]
        want_c = "MPTCP" if client_mptcp else "TCP"
        want_s = "MPTCP" if server_mptcp else "TCP"
        assert f"client={want_c}" in line and f"server={want_s}" in line, line
        assert "in=5242880 out=3145760" in line and "ended='both closed'" in line, line
        assert " -> be/s1 " in line

        def flushed() -> str | None:
            t = px.metrics()
            return t if f'leg="server",state="{want_s}"' in t else None

        m = wait_for(flushed, what="metrics flush")
        assert f'mptcpkit_proxy_legs_total{{frontend="fe",leg="client",state="{want_c}"}} 1.0' in m
        assert _metric(m, 'mptcpkit_proxy_bytes_total{direction="in",frontend="fe"}') == 5242880
        assert not srv.errors


@pytest.mark.parametrize("server_mptcp", [False, True])
def test_relay_on_stock_asyncio(tmp_path: Path, server_mptcp: bool) -> None:
    """The same relay without uvloop (MPTCPKIT_PROXY_LOOP=asyncio)."""
    target = "mptcp" if server_mptcp else "tcp"
    with (
        Server(hash_reply, mptcp=server_mptcp) as srv,
        run_proxy(
            tmp_path,
            _conf("mptcp@127.0.0.1:0", {"s1": f'"{target}@127.0.0.1:{srv.port}"'}),
            env={"MPTCPKIT_PROXY_LOOP": "asyncio"},
        ) as px,
    ):
        _roundtrip(px.port("fe"), mptcp=True).close()
        line = wait_for(lambda: px.conn_lines(), what="log line")[0]
        want = "MPTCP" if server_mptcp else "TCP"
        assert "client=MPTCP" in line and f"server={want}" in line, line


def test_fallback_reported(tmp_path: Path) -> None:
    """A TCP client on an MPTCP frontend, an mptcp@ server that only speaks TCP."""
    with (
        Server(hash_reply) as srv,
        run_proxy(
            tmp_path, _conf("mptcp@127.0.0.1:0", {"s1": f'"mptcp@127.0.0.1:{srv.port}"'})
        ) as px,
    ):
        _roundtrip(px.port("fe"), mptcp=False, size=1000).close()
        line = wait_for(lambda: px.conn_lines(), what="log line")[0]
        assert "client=TCP" in line and "server=fallback" in line, line


def test_ipv6_mptcp_server(tmp_path: Path) -> None:
    with (
        Server(hash_reply, mptcp=True, family=socket.AF_INET6) as srv,
        run_proxy(tmp_path, _conf("mptcp@127.0.0.1:0", {"s1": f'"mptcp@[::1]:{srv.port}"'})) as px,
    ):
        _roundtrip(px.port("fe"), mptcp=True, size=1000).close()
        line = wait_for(lambda: px.conn_lines(), what="log line")[0]
        assert "client=MPTCP" in line and "server=MPTCP" in line, line
        assert "in=1000 " in line and "ended='both closed'" in line, line


def test_half_close_server_first(tmp_path: Path) -> None:
    """The server sends and shuts down first; the client keeps sending afterwards."""
    got: list[bytes] = []

    def handler(c: socket.socket) -> None:
        c.sendall(b"hello from server")
        c.shutdown(socket.SHUT_WR)
        got.append(recv_all(c))

    with (
        Server(handler) as srv,
        run_proxy(
            tmp_path, _conf("mptcp@127.0.0.1:0", {"s1": f'"tcp@127.0.0.1:{srv.port}"'})
        ) as px,
    ):
        s = connect(px.port("fe"), mptcp=True)
        assert recv_all(s) == b"hello from server"  # EOF carried to the client
        late = payload(1 << 20, b"late")
        s.sendall(late)  # the client->server direction still works
        s.shutdown(socket.SHUT_WR)
        wait_for(lambda: got, what="server to read to EOF")
        assert got[0] == late
        s.close()
        line = wait_for(lambda: px.conn_lines(), what="log line")[0]
        assert "ended='both closed'" in line


def test_dead_server_retry_then_clean_close(tmp_path: Path) -> None:
    dead = free_port()
    with (
        Server(echo) as srv,
        run_proxy(
            tmp_path,
            _conf(
                "mptcp@127.0.0.1:0",
                {"a": f'"tcp@127.0.0.1:{dead}"', "b": f'"tcp@127.0.0.1:{srv.port}"'},
                extra_be="retries = 1",  # the one retry goes to the other server (redispatch)
            ),
        ) as px,
    ):
        for _ in range(4):  # roundrobin: half of these try the dead one first
            _echo_through(px.port("fe"))
        assert srv.accepted == 4
        wait_for(
            lambda: f"connect to a (tcp@127.0.0.1:{dead}) failed: ECONNREFUSED" in px.log(),
            what="the failed connect in the log",
        )
    dead2 = free_port()
    with run_proxy(
        tmp_path,
        _conf(
            "mptcp@127.0.0.1:0",
            {"a": f'"tcp@127.0.0.1:{dead}"', "b": f'"tcp@127.0.0.1:{dead2}"'},
            extra_be="retries = 1",
        ),
    ) as px:
        s = connect(px.port("fe"), mptcp=True)
        s.sendall(b"anyone?")
        assert recv_all(s) == b""  # a FIN, not a reset
        s.close()
        line = wait_for(lambda: px.conn_lines(), what="log line")[0]
        assert "-> be/-" in line and "connect failed: ECONNREFUSED" in line, line


def test_connect_timeout_moves_on(tmp_path: Path) -> None:
    # A listener whose accept queue is full drops SYNs: connects to it hang, and only
    # `timeout.connect` ends them.
    with contextlib.ExitStack() as stack:
        hole = stack.enter_context(socket.socket())
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)
        for _ in range(2):
            filler = stack.enter_context(socket.socket())
            filler.settimeout(0.2)
            with contextlib.suppress(OSError):
                filler.connect(hole.getsockname())
        port = hole.getsockname()[1]
        srv = stack.enter_context(Server(echo))
        px = stack.enter_context(
            run_proxy(
                tmp_path,
                _conf(
                    "mptcp@127.0.0.1:0",
                    {"a": f'"tcp@127.0.0.1:{port}"', "b": f'"tcp@127.0.0.1:{srv.port}"'},
                    extra_fe='timeout = { connect = "300ms" }',
                ),
            )
        )
        for _ in range(2):  # roundrobin: one of these tries the silent server first
            _echo_through(px.port("fe"))
        assert srv.accepted == 2
        wait_for(
            lambda: f"connect to a (tcp@127.0.0.1:{port}) failed: timeout" in px.log(),
            what="the timed-out connect in the log",
        )


def test_health_checks_down_and_up(tmp_path: Path) -> None:
    served: list[str] = []

    def tagged(tag: str):  # type: ignore[no-untyped-def]
        def handler(c: socket.socket) -> None:
            d = recv_all(c)
            if d:  # health checks connect and close without data
                served.append(tag)
                c.sendall(d)

        return handler

    srv = Server(tagged("a"))
    port = srv.port
    other = Server(tagged("b"))
    conf = _conf(
        "mptcp@127.0.0.1:0",
        {"a": f'"tcp@127.0.0.1:{port}"', "b": f'"tcp@127.0.0.1:{other.port}"'},
        extra_be='check = { interval = "200ms", rise = 2, fall = 2, timeout = "1s" }',
    )
    try:
        with run_proxy(tmp_path, conf) as px:
            srv.close()
            wait_for(
                lambda: "server a is DOWN (check failed: ECONNREFUSED)" in px.log(), what="DOWN"
            )
            wait_for(
                lambda: 'mptcpkit_proxy_server_up{backend="be",server="a"} 0.0' in px.metrics(),
                what="metrics to show a down",
            )
            for _ in range(3):  # all go to b, without a failed connect
                _echo_through(px.port("fe"), b"x")
            assert served == ["b", "b", "b"]
            assert "connect to a" not in px.log()
            srv = Server(tagged("a"), port=port)
            wait_for(lambda: "server a is UP (check passed)" in px.log(), what="UP")
    finally:
        srv.close()
        other.close()


def test_maxconn_holds(tmp_path: Path) -> None:
    with _echo_behind_proxy(tmp_path, extra_fe="maxconn = 2") as (srv, px):
        port = px.port("fe")
        a, b = connect(port, mptcp=True), connect(port, mptcp=True)
        for s in (a, b):
            s.sendall(b"1")
            assert s.recv(1) == b"1"
        c = connect(port, mptcp=True)  # lands in the backlog
        c.sendall(b"3")
        time.sleep(1.0)
        assert srv.accepted == 2, "maxconn=2 let a third connection through"
        a.close()
        c.settimeout(20)
        assert c.recv(1) == b"3"
        assert srv.accepted == 3
        for s in (b, c):
            s.close()


def test_slow_reader_bounded_memory(tmp_path: Path) -> None:
    sent = [0]
    limit = 512 << 20

    def flood(c: socket.socket) -> None:
        block = b"x" * (1 << 20)
        c.settimeout(30)
        try:
            while sent[0] < limit:
                sent[0] += c.send(block)
        except OSError:
            pass

    with (
        Server(flood) as srv,
        run_proxy(tmp_path, _conf("mptcp@127.0.0.1:0", {"s": f'"tcp@127.0.0.1:{srv.port}"'})) as px,
    ):
        (worker,) = px.workers()
        before = rss_kib(worker)
        s = connect(px.port("fe"), mptcp=True)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        time.sleep(3.0)  # the client reads nothing
        stalled = sent[0]
        grown = rss_kib(worker) - before
        assert stalled < 64 << 20, f"the server could push {stalled} bytes into a stalled client"
        assert grown < 32 << 10, f"proxy worker RSS grew by {grown} KiB"
        # and it still delivers once the client reads
        s.settimeout(30)
        got = 0
        while got < 4 << 20:
            got += len(s.recv(1 << 20))
        s.close()


def test_thousand_concurrent(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 5000
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))

    async def main(proxy_port: int) -> int:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(await r.read())
            await w.drain()
            w.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
        sport = server.sockets[0].getsockname()[1]
        port_box.append(sport)
        await ready.wait()

        async def one(i: int) -> bool:
            r, w = await mptcpkit.aio.open_connection("127.0.0.1", proxy_box[0], mptcp="require")
            msg = f"conn {i} ".encode() * 100
            w.write(msg)
            await asyncio.sleep(0.5)  # all 1000 are open at the same time
            w.write_eof()
            ok = await r.read() == msg
            w.close()
            return ok

        oks = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(1000))), 120)
        server.close()
        return sum(oks)

    port_box: list[int] = []
    proxy_box: list[int] = []
    ready = asyncio.Event()
    loop = asyncio.new_event_loop()
    result: list[int] = []
    errors: list[BaseException] = []

    def runner() -> None:
        try:
            result.append(loop.run_until_complete(main(0)))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=runner)
    t.start()
    wait_for(lambda: port_box, what="test server")
    with run_proxy(
        tmp_path,
        _conf(
            "mptcp@127.0.0.1:0",
            {"s": f'"tcp@127.0.0.1:{port_box[0]}"'},
            glob='workers = 2\nmetrics = ""',
        ),
    ) as px:
        proxy_box.append(px.port("fe"))
        loop.call_soon_threadsafe(ready.set)
        t.join(150)
        assert not errors, repr(errors)
        assert result == [1000]
        wait_for(lambda: len(px.conn_lines()) >= 1000, what="1000 log lines")
    loop.close()


def _free_port_range(n: int) -> int:
    """The first of `n` consecutive ports free on 127.0.0.1 (below the ephemeral range)."""
    for base in range(20000 + os.getpid() % 97 * 100, 32000, 137):
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError(f"no {n} consecutive free ports")


def test_port_range_bind(tmp_path: Path) -> None:
    """A frontend bound to a port range (100 listeners) serves on each of its ports."""
    base = _free_port_range(100)
    with (
        Server(echo) as srv,
        run_proxy(
            tmp_path,
            _conf(f"mptcp@127.0.0.1:{base}-{base + 99}", {"s": f'"tcp@127.0.0.1:{srv.port}"'}),
        ) as px,
    ):
        assert len(px.ports("fe")) == 100, px.log()
        for port in (base, base + 57, base + 99):
            _echo_through(port)


def test_out_of_fds_pauses_accepting_then_recovers(tmp_path: Path) -> None:
    """A worker that runs out of file descriptors says so, stops accepting for a while,
    and serves again once connections close."""
    with _echo_behind_proxy(tmp_path, glob='workers = 1\nmetrics = ""') as (_, px):
        port = px.port("fe")
        _echo_through(port)
        (worker,) = px.workers()
        top = max(int(fd) for fd in os.listdir(f"/proc/{worker}/fd"))
        resource.prlimit(worker, resource.RLIMIT_NOFILE, (top + 5, top + 5))
        held = []
        try:
            for _ in range(40):
                c = connect(port, mptcp=True)
                c.sendall(b"x")
                held.append(c)
                if "(EMFILE), retrying in 1s" in px.log():
                    break
                time.sleep(0.05)
            # accept() or the server socket ran out: the proxy's fault, not the server's
            assert "(EMFILE), retrying in 1s" in px.log(), px.log()
            assert "failed: EMFILE" not in px.log(), px.log()
        finally:
            for c in held:
                c.close()
        wait_for(lambda: _echoes(port), timeout=20, what="the worker to accept again")


def _echoes(port: int) -> bool:
    try:
        _echo_through(port)
    except (OSError, AssertionError):
        return False
    return True


def test_proxy_v2_header_and_accept_proxy(tmp_path: Path) -> None:
    headers: list[proxyproto.ProxyHeader] = []

    def handler(c: socket.socket) -> None:
        buf = b""
        while (r := proxyproto.parse(buf)) is None:
            buf += c.recv(4096)
        headers.append(r[0])
        rest = buf[r[1] :] + recv_all(c)
        c.sendall(rest)
        c.shutdown(socket.SHUT_WR)

    with (
        Server(handler) as srv,
        run_proxy(
            tmp_path,
            _conf(
                "mptcp@127.0.0.1:0",
                {"s": f'{{ address = "tcp@127.0.0.1:{srv.port}", send-proxy = "v2" }}'},
            ),
        ) as px,
    ):
        s = connect(px.port("fe"), mptcp=True)
        s.sendall(b"body")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"body"
        (h,) = headers
        assert h.version == 2 and h.source == s.getsockname()
        assert h.destination == ("127.0.0.1", px.port("fe"))
        s.close()
    headers.clear()
    with (
        Server(handler) as srv,
        run_proxy(
            tmp_path,
            _conf(
                "tcp@127.0.0.1:0",
                {"s": f'{{ address = "tcp@127.0.0.1:{srv.port}", send-proxy = "v2" }}'},
                extra_fe="accept-proxy = true",
            ),
        ) as px,
    ):
        s = connect(px.port("fe"), mptcp=False)
        s.sendall(proxyproto.build_v1(("203.0.113.9", 4242), ("198.51.100.1", 443)) + b"data")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"data"
        assert headers[0].source == ("203.0.113.9", 4242)
        s.close()
        line = wait_for(lambda: px.conn_lines(), what="log")[0]
        assert "203.0.113.9:4242 -> be/s" in line and "in=4" in line, line


def test_sighup_reload_keeps_connection(tmp_path: Path) -> None:
    with (
        Server(echo) as one,
        Server(echo) as two,
        run_proxy(tmp_path, _conf("mptcp@127.0.0.1:0", {"s": f'"tcp@127.0.0.1:{one.port}"'})) as px,
    ):
        port = px.port("fe")
        s = _echoed(port, b"before")
        old_workers = px.workers()
        (tmp_path / "proxy.toml").write_text(
            _conf("mptcp@127.0.0.1:0", {"s": f'"tcp@127.0.0.1:{two.port}"'})
        )
        px.signal(signal.SIGHUP)
        wait_for(lambda: "reloaded" in px.log(), what="reload")
        assert px.port("fe") == port  # the same listening socket went to the new worker
        s.sendall(b"after")
        assert s.recv(5) == b"after"  # the old connection lives on, on the old server
        n = _echoed(port, b"new")
        assert (one.accepted, two.accepted) == (1, 1)
        n.close()
        assert set(old_workers) & set(px.workers())  # the old worker is still draining
        s.close()
        wait_for(
            lambda: "old worker" in px.log() and "finished" in px.log(), what="old worker exit"
        )
        # a broken config is refused and the proxy keeps running
        (tmp_path / "proxy.toml").write_text("[frontend.x]\nbind='mptcp@:1'\nbackend='nope'\n")
        px.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in px.log(), what="reload failure")
        assert "frontend.x.backend: no backend named 'nope'" in px.log()
        n = _echoed(port, b"still")
        n.close()


_STOP_SOON = 'workers = 1\nmetrics = ""\nstop-timeout = "1500ms"'


def test_sigterm_drains_then_cuts(tmp_path: Path) -> None:
    with _echo_behind_proxy(tmp_path, glob=_STOP_SOON) as (_, px):
        port = px.port("fe")
        s = _echoed(port)
        px.signal(signal.SIGTERM)
        wait_for(lambda: "stopping" in px.log(), what="stopping")
        s.sendall(b"b")  # still served while draining
        assert s.recv(1) == b"b"
        with pytest.raises(OSError):
            connect(port, mptcp=True).recv(1)  # not accepting anymore
        px.proc.wait(20)
        assert px.proc.returncode == 0
        assert "worker 0: stop deadline reached" in px.log()
        assert "worker 0: worker 0:" not in px.log()  # the prefix once


def test_sigterm_cuts_a_reload_drain_at_the_stop_deadline(tmp_path: Path) -> None:
    """A worker draining after a reload has no deadline; SIGTERM must give it one."""
    with _echo_behind_proxy(tmp_path, glob=_STOP_SOON) as (_, px):
        port = px.port("fe")
        s = _echoed(port)
        px.signal(signal.SIGHUP)  # the old worker now drains `s` without a deadline
        wait_for(lambda: "reloaded" in px.log(), what="reload")
        px.signal(signal.SIGTERM)
        px.proc.wait(20)
        assert px.proc.returncode == 0
        assert "stop deadline reached, closing 1 connections" in px.log(), px.log()
        s.close()


# --- configuration errors through the CLI ------------------------------------------------


def _cli(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PROXY_CMD, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("body", "key", "reason"),
    [
        (
            "[frontend.f]\nbind='mptcp@127.0.0.1:0'\nbackend='b'\nmaxconns=1\n[backend.b]\nserver.a='h:1'",
            "frontend.f.maxconns",
            "unknown key (did you mean 'maxconn'?)",
        ),
        (
            "[frontend.f]\nbind='mptcp@127.0.0.1:99999'\nbackend='b'\n[backend.b]\nserver.a='h:1'",
            "frontend.f.bind",
            "bad address",
        ),
        (
            "[frontend.f]\nbind='mptcp@127.0.0.1:0'\nbackend='nope'\n[backend.b]\nserver.a='h:1'",
            "frontend.f.backend",
            "no backend named 'nope'",
        ),
    ],
)
def test_config_errors_exit_2(tmp_path: Path, body: str, key: str, reason: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body)
    for extra in ([], ["--check"]):
        r = _cli(["-c", str(path), *extra])
        assert r.returncode == 2, r
        assert f"{path}: {key}: {reason}" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1  # one line, no traceback


def test_port_in_use_exit_2_listens_on_nothing(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    bport = busy.getsockname()[1]
    free = free_port()
    path = tmp_path / "p.toml"
    path.write_text(
        f"[frontend.f]\nbind=['mptcp@127.0.0.1:{free}', 'mptcp@127.0.0.1:{bport}']\n"
        "backend='b'\n[backend.b]\nserver.a='tcp@127.0.0.1:1'\n"
    )
    try:
        r = _cli(["-c", str(path)])
        assert r.returncode == 2, r
        assert f"{path}: frontend.f.bind[1]: cannot listen on mptcp@127.0.0.1:{bport}" in r.stderr
        assert "in use" in r.stderr
        with socket.socket() as probe:  # the first bind was released, not left listening
            probe.bind(("127.0.0.1", free))
    finally:
        busy.close()


def test_check_ok_and_quick_form_errors(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(
        "[frontend.f]\nbind='mptcp@:8443'\nbackend='b'\n[backend.b]\nserver.a='tcp@10.0.0.5:443'\n"
    )
    r = _cli(["-c", str(path), "--check"])
    assert r.returncode == 0 and "OK: 1 frontends, 1 backends, 1 servers" in r.stdout, r
    r = _cli(["--listen", "mptcp@:8443", "--to", "tcp@10.0.0.5"])
    assert r.returncode == 2 and "command line: --to: bad address" in r.stderr, r.stderr
    r = _cli([])
    assert r.returncode == 2 and "nothing to do" in r.stderr


def test_ready_line_names_the_relay(tmp_path: Path, relay: str) -> None:
    with _echo_behind_proxy(tmp_path) as (_, px):
        _echo_through(px.port("fe"))
        assert f"({relay} relay)" in px.log(), px.log()


def test_unknown_relay_choice_exits_2_listening_on_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(compiled.ENGINE_ENV, "rust")
    port = free_port()
    r = _cli(["--listen", f"mptcp@127.0.0.1:{port}", "--to", "tcp@127.0.0.1:9"])
    assert r.returncode == 2, r
    assert "MPTCPKIT_PROXY_ENGINE: 'rust' is not auto, c or python" in r.stderr, r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing was bound there


def test_idle_timeout_closes(tmp_path: Path) -> None:
    with _echo_behind_proxy(tmp_path, extra_fe='timeout = { client = "1s", server = "30s" }') as (
        _,
        px,
    ):
        s = _echoed(px.port("fe"), b"x")
        assert recv_all(s) == b""  # closed by the proxy after ~1-2s of silence
        s.close()
        line = wait_for(lambda: px.conn_lines(), what="log line")[0]
        assert "ended='client timeout (1s idle)'" in line, line


@pytest.mark.root
def test_drops_privileges_after_bind(tmp_path: Path) -> None:
    with _echo_behind_proxy(
        tmp_path, glob='workers = 2\nmetrics = ""\nuser = "nobody"\ngroup = "nogroup"'
    ) as (_, px):

        def uids(pid: int) -> set[str]:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            return set(next(x for x in status if x.startswith("Uid:")).split()[1:])

        for pid in px.workers():
            wait_for(lambda pid=pid: uids(pid) == {"65534"}, what=f"worker {pid} to be nobody")
        assert uids(px.proc.pid) == {"0"}  # the master keeps root to bind on reload
        s = _echoed(px.port("fe"), b"hi")
        s.close()


def test_reload_removes_a_frontend(tmp_path: Path) -> None:
    with Server(echo) as srv:
        two = _conf("mptcp@127.0.0.1:0", {"s": f'"tcp@127.0.0.1:{srv.port}"'}) + (
            '[frontend.gone]\nbind = "mptcp@127.0.0.1:0"\nbackend = "be"\n'
        )
        with run_proxy(tmp_path, two, args=[]) as px:
            gone = px.port("gone")
            (tmp_path / "proxy.toml").write_text(
                _conf("mptcp@127.0.0.1:0", {"s": f'"tcp@127.0.0.1:{srv.port}"'})
            )
            px.signal(signal.SIGHUP)
            wait_for(lambda: "old worker" in px.log(), what="the old worker to finish")
            with pytest.raises(ConnectionRefusedError):
                connect(gone, mptcp=True)


def test_workers_die_with_a_killed_master(tmp_path: Path) -> None:
    with Server(echo) as srv:
        conf = tmp_path / "p.toml"
        conf.write_text(
            _conf(
                "mptcp@127.0.0.1:0",
                {"s": f'"tcp@127.0.0.1:{srv.port}"'},
                glob='workers = 2\nmetrics = ""',
            )
        )
        px = ProxyProc(["-c", str(conf)], tmp_path).wait_ready()
        try:
            workers = wait_for(lambda: len(px.workers()) == 2 and px.workers(), what="workers")
            px.proc.kill()  # SIGKILL: the master cannot tell anyone
            px.proc.wait(10)

            def gone() -> bool:
                return not any(Path(f"/proc/{pid}").exists() for pid in workers)

            wait_for(gone, what="orphaned workers to exit")
        finally:
            px.stop()


def test_no_fd_leak_in_workers(tmp_path: Path) -> None:
    """Normal closes, resets, failed connects and retries all give their fds back."""
    dead = free_port()
    with (
        Server(echo) as srv,
        run_proxy(
            tmp_path,
            _conf(
                "mptcp@127.0.0.1:0",
                {"a": f'"tcp@127.0.0.1:{dead}"', "b": f'"mptcp@127.0.0.1:{srv.port}"'},
                glob='workers = 1\nmetrics = ""',
                # the turn-around pause before each retry is min(timeout.connect, 1 s)
                extra_fe='timeout = {connect = "20ms"}',
            ),
        ) as px,
    ):
        (worker,) = wait_for(lambda: px.workers(), what="worker")
        port = px.port("fe")

        def fds() -> int:
            return len(os.listdir(f"/proc/{worker}/fd"))

        s = connect(port, mptcp=True)  # warm up (lazy imports, loop internals)
        s.sendall(b"w")
        assert s.recv(1) == b"w"
        s.close()
        wait_for(lambda: len(px.conn_lines()) == 1, what="warm-up done")
        before = fds()
        for i in range(60):
            s = connect(port, mptcp=i % 2 == 0)
            s.sendall(b"x")
            if i % 3 == 0:  # reset instead of a clean close
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                assert s.recv(1) == b"x"
            s.close()
        wait_for(lambda: len(px.conn_lines()) == 61, what="all 60 connections logged")
        wait_for(lambda: fds() <= before, timeout=10, what=f"fds back to {before} (now {fds()})")
