"""The proxy's promises to an operator (issue 12): the truth about the client, logging
that never blocks, bounded memory under backpressure, metrics that move.

Real proxy processes, real peers (HAProxy among them); every test runs on both data
paths (the C engine and the Python relay), as in test_proxy_e2e.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptcpkit.proxy import config, proxyproto
from proxy_harness import Server, connect, echo, free_port, recv_all, run_proxy, wait_for
from test_proxy_e2e import _conf, relay  # noqa: F401  (relay: both data paths, autouse)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "proxy.toml"


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
