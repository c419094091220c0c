"""The proxy's promises to an operator (issue 12): the truth about the client, logging
that never blocks, bounded memory under backpressure, metrics that move.

Real proxy processes, real peers (HAProxy among them); every test runs on both data
paths (the C engine and the Python relay), as in test_proxy_e2e.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptcpkit.proxy import config, proxyproto
from proxy_harness import (
    PROXY_CMD,
    Server,
    connect,
    echo,
    free_port,
    recv_all,
    rss_kib,
    run_proxy,
    wait_for,
)
from test_proxy_e2e import _cli, _conf, _metric

# every test here runs on both data paths (the `relay` fixture, tests/conftest.py)
pytestmark = pytest.mark.usefixtures("relay")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "proxy.toml"


def _scrape(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        return recv_all(s).decode()


def _echo_v(port: int, family: int, host: str) -> bytes:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect((host, port))
        s.sendall(b"hello")
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


# --- item 7: [::] is dual-stack, as in HAProxy -------------------------------------------


def test_ipv6_wildcard_bind_takes_ipv4_clients(tmp_path: Path) -> None:
    with (
        Server(echo) as srv,
        run_proxy(tmp_path, _conf("mptcp@[::]:0", {"s": f'"tcp@127.0.0.1:{srv.port}"'})) as px,
    ):
        port = px.port("fe")
        assert _echo_v(port, socket.AF_INET, "127.0.0.1") == b"hello"
        assert _echo_v(port, socket.AF_INET6, "::1") == b"hello"


def test_v6only_bind_option_refuses_ipv4(tmp_path: Path) -> None:
    with (
        Server(echo) as srv,
        run_proxy(
            tmp_path, _conf("mptcp@[::]:0 v6only", {"s": f'"tcp@127.0.0.1:{srv.port}"'})
        ) as px,
    ):
        port = px.port("fe")
        assert _echo_v(port, socket.AF_INET6, "::1") == b"hello"
        with pytest.raises(ConnectionRefusedError):
            _echo_v(port, socket.AF_INET, "127.0.0.1")


def test_example_config_serves_ipv4_clients() -> None:
    cfg = config.load(EXAMPLE)
    web = next(f for f in cfg.frontends if f.name == "web")
    assert str(web.binds[0]) == "mptcp@[::]:443" and web.dualstack(0)


def test_bind_options_checked() -> None:
    base = '[frontend.f]\nbind = "{}"\nbackend = "b"\n[backend.b]\nserver.s = "tcp@h:1"\n'
    cfg = config.parse_text(base.format("mptcp@[::]:80 v4v6"), "p.toml")
    assert cfg.frontends[0].dualstack(0)
    with pytest.raises(config.ConfigError, match=r"frontend\.f\.bind: unknown bind option 'v6'"):
        config.parse_text(base.format("mptcp@[::]:80 v6"), "p.toml")
    with pytest.raises(config.ConfigError, match="v6only needs an IPv6 address"):
        config.parse_text(base.format("mptcp@:80 v6only"), "p.toml")


# --- item 6: the PROXY header forwards what it received, HAProxy on either side ----------


@contextlib.contextmanager
def _haproxy(tmp: Path, body: str) -> Iterator[tuple[int, Path]]:
    """HAProxy (mode tcp) with `body` ({port} is its frontend port); (port, its log)."""
    port = free_port()
    cfg = tmp / f"haproxy-{port}.cfg"
    log = tmp / f"haproxy-{port}.log"
    cfg.write_text(
        "global\n    log stdout format raw local0\n"
        "defaults\n    mode tcp\n    log global\n    timeout connect 5s\n"
        "    timeout client 20s\n    timeout server 20s\n" + body.format(port=port)
    )
    with open(log, "wb") as out:
        p = subprocess.Popen(["haproxy", "-f", str(cfg), "-db"], stdout=out, stderr=out)
    try:
        wait_for(lambda: _listening(port) or p.poll() is not None, what="haproxy")
        assert p.poll() is None, log.read_text()
        yield port, log
    finally:
        p.terminate()
        p.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@pytest.mark.parametrize("send_proxy", ["v1", "v2"])
def test_send_proxy_forwards_received_addresses_to_haproxy(tmp_path: Path, send_proxy: str) -> None:
    """accept-proxy + send-proxy: HAProxy behind the proxy logs the client and the
    destination the first PROXY header named, IPv6 ones over an IPv4 hop too."""
    with (
        Server(echo) as srv,
        _haproxy(
            tmp_path,
            "frontend f\n    bind 127.0.0.1:{port} accept-proxy\n"
            '    log-format "seen %ci:%cp %fi:%fp"\n    default_backend b\n'
            f"backend b\n    server s 127.0.0.1:{srv.port}\n",
        ) as (hp, hlog),
        run_proxy(
            tmp_path,
            _conf(
                "tcp@127.0.0.1:0",
                {"s": f'{{ address = "tcp@127.0.0.1:{hp}", send-proxy = "{send_proxy}" }}'},
                extra_fe="accept-proxy = true",
            ),
        ) as px,
    ):
        for header, seen in (
            (
                b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 80\r\n",
                "203.0.113.7:40000 198.51.100.1:80",
            ),
            (
                b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 443\r\n",
                "2001:db8::1:1234 2001:db8::2:443",
            ),
        ):
            with connect(px.port("fe"), mptcp=False) as s:
                s.sendall(header + b"data")
                s.shutdown(socket.SHUT_WR)
                assert recv_all(s) == b"data"
            wait_for(
                lambda seen=seen: f"seen {seen}" in hlog.read_text(),
                what=f"{seen} in {hlog.read_text()}",
            )  # type: ignore[misc]


@pytest.mark.parametrize("haproxy_sends", ["send-proxy", "send-proxy-v2"])
def test_accept_proxy_from_haproxy_forwards_its_addresses(
    tmp_path: Path, haproxy_sends: str
) -> None:
    """HAProxy in front (send-proxy): the server behind the proxy gets HAProxy's client
    and HAProxy's frontend address, not the proxy's own."""
    headers: list[proxyproto.ProxyHeader] = []

    def handler(c: socket.socket) -> None:
        buf = b""
        while (r := proxyproto.parse(buf)) is None:
            buf += c.recv(4096)
        headers.append(r[0])
        c.sendall(buf[r[1] :] + recv_all(c))
        c.shutdown(socket.SHUT_WR)

    with (
        Server(handler) as srv,
        run_proxy(
            tmp_path,
            _conf(
                "tcp@127.0.0.1:0",
                {"s": f'{{ address = "tcp@127.0.0.1:{srv.port}", send-proxy = "v1" }}'},
                extra_fe="accept-proxy = true",
            ),
        ) as px,
        _haproxy(
            tmp_path,
            "frontend f\n    bind 127.0.0.1:{port}\n    default_backend b\n"
            f"backend b\n    server s 127.0.0.1:{px.port('fe')} {haproxy_sends}\n",
        ) as (hp, _),
        connect(hp, mptcp=False) as s,
    ):
        s.sendall(b"data")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"data"
        (h,) = headers
        assert h.source == s.getsockname()
        assert h.destination == ("127.0.0.1", hp)


# --- item 3: logging never blocks the data path -------------------------------------------


def _many_through(port: int, n: int) -> None:
    """`n` echo round trips through the proxy, 8 at a time; each must finish."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for got in pool.map(lambda _: _echo_v(port, socket.AF_INET, "127.0.0.1"), range(n)):
            assert got == b"hello"


def _read_until(fd: int, pattern: str, seen: bytearray, timeout: float = 20) -> re.Match[str]:
    end = time.monotonic() + timeout
    while not (m := re.search(pattern, seen.decode(errors="replace"))):
        left = end - time.monotonic()
        assert left > 0, f"{pattern!r} not in {seen.decode(errors='replace')[-2000:]}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 1 << 16)
            assert chunk, seen.decode(errors="replace")
            seen += chunk
    return m


def test_stalled_stdout_reader_does_not_stop_traffic(tmp_path: Path) -> None:
    """stdout piped into a reader that stops reading: connections keep flowing, the
    lines that did not fit are dropped, counted, and reported once it reads again."""
    cfg = tmp_path / "p.toml"
    with Server(echo) as srv:
        cfg.write_text(_conf("tcp@127.0.0.1:0", {"s": f'"tcp@127.0.0.1:{srv.port}"'}))
        p = subprocess.Popen(
            [*PROXY_CMD, "-c", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert p.stdout is not None
        fd = p.stdout.fileno()
        seen = bytearray()
        try:
            _read_until(fd, r"ready:", seen)
            port = int(_read_until(fd, r"listening on \S+:(\d+)", seen).group(1))
            mport = int(_read_until(fd, r"metrics on http://[^:]+:(\d+)/", seen).group(1))
            _many_through(port, 3000)  # ~450 KB of log lines; the pipe holds 64 KiB
            _read_until(fd, r"(\d+) log lines dropped", seen)  # reading again: reported
            # workers publish their counters once a second
            dropped = lambda: _metric(_scrape(mport), "mptcpkit_log_dropped_total")  # noqa: E731
            wait_for(lambda: dropped() > 0, what="mptcpkit_log_dropped_total > 0")
        finally:
            p.terminate()
            with contextlib.suppress(OSError):
                while os.read(fd, 1 << 16):  # drain so that it can exit
                    pass
            p.wait(20)


def test_syslog_udp_rfc5424(tmp_path: Path) -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        Server(echo) as srv,
    ):
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(20)
        target = f"udp@127.0.0.1:{rx.getsockname()[1]} rfc5424 local3"
        conf = _conf(
            "tcp@127.0.0.1:0",
            {"s": f'"tcp@127.0.0.1:{srv.port}"'},
            glob=f'workers = 1\nmetrics = ""\nlog = "{target}"',
        )
        with run_proxy(tmp_path, conf, ready=False):
            got = _datagrams(rx, r"listening on \S+:(\d+)")
            _echo_v(int(got.group(1)), socket.AF_INET, "127.0.0.1")
            line = _datagrams(rx, r".* conn fe .*").group(0)
        # <facility 19 * 8 + info 6>1 TIMESTAMP HOST APP PROCID MSGID SD MSG
        assert re.fullmatch(
            r"<158>1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z \S+ mptcpkit-proxy \d+ - - "
            r"\S+ conn fe .*",
            line,
        ), line


def _datagrams(rx: socket.socket, pattern: str) -> re.Match[str]:
    while True:
        m = re.search(pattern, rx.recv(65536).decode(errors="replace"))
        if m:
            return m


def test_syslog_unix_stalled_reader_does_not_stop_traffic(tmp_path: Path) -> None:
    path = str(tmp_path / "log.sock")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx,
        Server(echo) as srv,
    ):
        rx.bind(path)
        rx.settimeout(20)
        conf = _conf(
            "tcp@127.0.0.1:0",
            {"s": f'"tcp@127.0.0.1:{srv.port}"'},
            glob=f'workers = 1\nmetrics = ""\nlog = "unix@{path}"',
        )
        with run_proxy(tmp_path, conf, ready=False):
            port = int(_datagrams(rx, r"listening on \S+:(\d+)").group(1))
            _many_through(port, 1500)  # the socket queues 512 datagrams unread (max_dgram_qlen)
            line = _datagrams(rx, r".* conn fe .*").group(0)
            assert re.fullmatch(
                r"<134>\w{3} [ \d]\d \d\d:\d\d:\d\d mptcpkit-proxy\[\d+\]: \S+ conn fe .*", line
            ), line
            _datagrams(rx, r"\d+ log lines dropped")


def test_log_targets_checked() -> None:
    base = '[global]\nlog = "{}"\n[frontend.f]\nbind = ":1"\nbackend = "b"\n'
    base += '[backend.b]\nserver.s = "tcp@h:1"\n'
    assert config.parse_text(base.format("udp@[::1]:5514 rfc5424 daemon")).global_.log
    for bad, why in (
        ("udp@:514", "udp@ needs a host"),
        ("unix@/dev/log rfc1234", "unknown syslog option 'rfc1234'"),
    ):
        with pytest.raises(config.ConfigError, match=f"global.log: {why}"):
            config.parse_text(base.format(bad))


# --- item 9: metrics that move while connections live, and scrapes that never fail -------


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample (labels in any order), 0 if absent."""
    for line in text.splitlines():
        m = re.fullmatch(rf"{re.escape(name)}\{{(.*)\}} (\S+)", line)
        if m and dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))) == labels:
            return float(m.group(2))
    return 0.0


def test_bytes_counted_while_the_connection_lives(tmp_path: Path) -> None:
    """bytes_total moves within a sweep or two of the bytes, not when the connection ends."""
    with (
        Server(echo) as srv,
        run_proxy(tmp_path, _conf("tcp@127.0.0.1:0", {"s": f'"tcp@127.0.0.1:{srv.port}"'})) as px,
        connect(px.port("fe"), mptcp=False) as s,
    ):
        data = b"x" * (1 << 20)
        s.sendall(data)
        got = 0
        while got < len(data):
            got += len(s.recv(1 << 20))
        wait_for(
            lambda: (
                _sample(px.metrics(), "mptcpkit_proxy_bytes_total", direction="in", frontend="fe")
                >= len(data)
                and _sample(
                    px.metrics(), "mptcpkit_proxy_bytes_total", direction="out", frontend="fe"
                )
                >= len(data)
            ),
            what="bytes_total of a live connection",
        )


def test_scrape_with_a_worker_file_being_created(tmp_path: Path) -> None:
    """A worker's metrics file exists empty for a moment before prometheus_client sizes it
    (new workers at every reload): a scrape then must still answer 200."""
    with run_proxy(tmp_path, _conf("tcp@127.0.0.1:0", {"s": '"tcp@127.0.0.1:9"'})) as px:
        (worker,) = px.workers()
        maps = wait_for(
            lambda: re.search(r"(/\S+)/counter_\d+\.db", Path(f"/proc/{worker}/maps").read_text()),
            what="the worker's metrics file",
        )
        creating = Path(maps.group(1)) / "counter_999999999.db"
        creating.touch()
        try:
            with socket.create_connection(("127.0.0.1", px.metrics_port()), timeout=10) as s:
                s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
                reply = recv_all(s).decode()
        finally:
            creating.unlink()
        assert reply.startswith("HTTP/1.0 200"), reply[:300]
        assert "mptcpkit_log_dropped_total 0.0" in reply


def test_duration_connect_time_and_end_reasons(tmp_path: Path) -> None:
    dead = free_port()
    with (
        Server(echo) as srv,
        run_proxy(
            tmp_path,
            _conf(
                "tcp@127.0.0.1:0",
                {"s": f'"tcp@127.0.0.1:{srv.port}"', "dead": f'"tcp@127.0.0.1:{dead}"'},
                extra_be="retries = 0",
            ),
        ) as px,
    ):
        for _ in range(4):  # round robin: two reach the echo server, two a closed port
            with contextlib.suppress(OSError):
                _echo_v(px.port("fe"), socket.AF_INET, "127.0.0.1")

        def counted() -> str | None:
            """The metrics once a worker's flush is all in (a scrape may land amid one)."""
            text = px.metrics()
            done = _sample(
                text, "mptcpkit_proxy_connections_total", frontend="fe", backend="be", server="s"
            )
            published = _sample(text, "mptcpkit_proxy_connect_time_seconds_count", backend="be")
            return text if done == 2 and published else None

        text = wait_for(counted, what="4 connections in the metrics")
        assert _sample(text, "mptcpkit_proxy_ended_total", frontend="fe", reason="both closed") == 2
        assert (
            _sample(
                text,
                "mptcpkit_proxy_ended_total",
                frontend="fe",
                reason="connect failed: ECONNREFUSED",
            )
            == 2
        )
        assert _sample(text, "mptcpkit_proxy_connection_duration_seconds_count", frontend="fe") == 4
        assert _sample(text, "mptcpkit_proxy_connect_time_seconds_count", backend="be") == 2
        assert 0 < _sample(text, "mptcpkit_proxy_connect_time_seconds_sum", backend="be") < 60


# --- item 8: memory under backpressure ----------------------------------------------------


def _stall(port: int, n: int) -> tuple[list[socket.socket], int]:
    """`n` clients that send until nothing moves: the backend never reads. (sockets,
    bytes they got into the proxy's direction)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        socks.append(s)
    block = b"x" * (1 << 18)
    total = 0
    quiet = 0
    while quiet < 5:  # five passes, 0.1 s apart, in which no client could send a byte
        moved = 0
        for s in socks:
            with contextlib.suppress(BlockingIOError):
                while True:
                    moved += s.send(block)
        total += moved
        quiet = 0 if moved else quiet + 1
        time.sleep(0.1)
    return socks, total


def test_stalled_connections_hold_little_memory(tmp_path: Path) -> None:
    """Against a backend that never reads, each stalled connection costs the worker at
    most what HAProxy holds (2 x 16 KiB), not a copy of a 1 MiB read per direction."""
    hold = threading.Event()
    with contextlib.ExitStack() as stack:
        srv = stack.enter_context(Server(lambda c: hold.wait(60)))
        stack.callback(hold.set)
        px = stack.enter_context(
            run_proxy(
                tmp_path,
                _conf(
                    "tcp@127.0.0.1:0",
                    {"s": f'"tcp@127.0.0.1:{srv.port}"'},
                    glob='workers = 1\nmetrics = ""\nstop-timeout = "0s"',
                ),
            )
        )
        (worker,) = px.workers()
        warm, _ = _stall(px.port("fe"), 2)  # the read buffer and the allocator warmed up
        before = rss_kib(worker)
        n = 20
        socks, moved = _stall(px.port("fe"), n)
        per_conn = (rss_kib(worker) - before) / n
        for s in warm + socks:
            s.close()
        assert moved > n << 20, "the clients could not push data: nothing was stalled"
        assert per_conn <= 32, f"{per_conn:.0f} KiB per stalled connection ({moved} bytes sent)"


def test_v6only_wildcard_does_not_overlap_ipv4() -> None:
    """`[::]:P v6only` and `:P` (IPv4) in two frontends take different clients; without
    v6only the dual-stack `[::]` covers IPv4 and that is a config error."""
    two = (
        '[frontend.a]\nbind = "{}"\nbackend = "b"\n[frontend.c]\nbind = "tcp@:8443"\n'
        'backend = "b"\n[backend.b]\nserver.s = "tcp@h:1"\n'
    )
    config.parse_text(two.format("tcp@[::]:8443 v6only"))
    with pytest.raises(config.ConfigError, match="overlaps"):
        config.parse_text(two.format("tcp@[::]:8443"))


def test_unresolvable_syslog_host_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text(
        _conf(
            "tcp@127.0.0.1:0",
            {"s": '"tcp@127.0.0.1:9"'},
            glob='workers = 1\nmetrics = ""\nlog = "udp@no-such-host.invalid:514"',
        )
    )
    for args in (["--check", "-c", str(cfg)], ["-c", str(cfg)]):
        r = _cli(args)
        assert r.returncode == 2, r
        assert "global.log: cannot open 'udp@no-such-host.invalid:514'" in r.stderr, r.stderr
