"""The proxy's promises to an operator (issue 12): the truth about the client, logging
that never blocks, bounded memory under backpressure, metrics that move.

Real proxy processes, real peers (HAProxy among them); every test runs on both data
paths (the C engine and the Python relay), as in test_proxy_e2e.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from mptcpkit.proxy import config
from proxy_harness import Server, echo, recv_all, run_proxy
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
