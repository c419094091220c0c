"""The remote gateway's RFC 8803 side on loopback: real proxy, raw Convert messages.

Every case runs on both data paths (MPTCPKIT_PROXY_ENGINE=c and python): the engine
parses Convert messages in C and asks compiledconvert.py; the Python relay runs
converter.py. Same bytes on the wire, same log lines.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mptcpkit.proxy import compiled, proxyproto
from mptcpkit.proxy import convertproto as cp
from mptcpkit.proxy.config import ConfigError
from proxy_harness import Server, echo, recv_all, run_proxy, wait_for


@pytest.fixture(autouse=True, params=["c", "python"], ids=["compiled", "python"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv(compiled.ENGINE_ENV, request.param)
    try:
        compiled.data_path()
    except ConfigError as exc:
        pytest.skip(f"{exc} (build it: python3 setup.py build_ext --inplace)")
    yield request.param


def _remote(clients: str, extra: str = "") -> str:
    return f"""
[global]
workers = 1
metrics = ""
[frontend.bond]
bind = "mptcp@127.0.0.1:0"
backend = "out"
accept-convert = true
timeout = {{ client = "1s", connect = "2s", server = "10s" }}
destinations = {{ clients = ["{clients}"]{extra} }}
[backend.out]
server.dest = "mptcp@0.0.0.0:0"
"""


def _ask(port: int, msg: bytes, then: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(msg + then)
        s.shutdown(socket.SHUT_WR)  # FIN right behind the message: it is still read whole
        return recv_all(s)


def test_refusals_are_rfc8803_errors(tmp_path: Path) -> None:
    """Loopback destinations (default deny) and a missing key come back as Error TLVs,
    then FIN; the log names each refusal with its reason."""
    with run_proxy(tmp_path, _remote("127.0.0.0/8", ', psk = "abcd"')) as p:
        port = p.port("bond")
        no_key = _ask(port, cp.connect_request("127.0.0.1", 9))
        assert no_key == cp.error_reply(cp.ErrorCode.MISSING_COOKIE)  # then FIN
        loop = _ask(port, cp.connect_request("127.0.0.1", 9, cookie=b"abcd"))
        assert loop[:8] == cp.error_reply(cp.ErrorCode.NOT_AUTHORIZED)
        bad = _ask(port, b"\x02\x01\x00\x00")  # version 2
        msg = cp.parse_reply(bad)
        assert msg is not None and msg[0].tlvs[0] == cp.Error(
            cp.ErrorCode.UNSUPPORTED_VERSION, b"\x01"
        )
        info = _ask(port, cp.build([cp.Info()]))
        assert cp.parse_reply(info) == (cp.Message((cp.SupportedTCPExtensions((30,)),)), 12)
        wait_for(
            lambda: (
                "no pre-shared key" in p.log() and "destination 127.0.0.1 is loopback" in p.log()
            ),
            what="the refusals in the log",
        )


def test_allowed_destination_is_relayed(tmp_path: Path) -> None:
    """An allowed destination: the Convert reply (a bare header), then the server's bytes;
    what came after the Connect TLV reaches the server."""
    with Server(echo) as srv:
        cfg = _remote("127.0.0.0/8", ', allow = ["127.0.0.1/32"]')
        with run_proxy(tmp_path, cfg) as p:
            got = _ask(p.port("bond"), cp.connect_request("127.0.0.1", srv.port), b"hello")
            assert got[:4] == cp.build([]) and got[4:] == b"hello"
            big = _ask(p.port("bond"), cp.connect_request("127.0.0.1", srv.port), b"z" * 1_000_000)
            assert big[:4] == cp.build([]) and big[4:] == b"z" * 1_000_000
            with Server(lambda c: None) as silent:  # accepts, says nothing, closes
                bare = _ask(p.port("bond"), cp.connect_request("127.0.0.1", silent.port))
                assert bare == cp.build([])  # the reply alone, then FIN
            refused = _ask(p.port("bond"), cp.connect_request("127.0.0.1", 1))  # nobody there
            assert refused[:8] == cp.error_reply(cp.ErrorCode.CONNECTION_RESET)


def test_client_not_in_networks_and_silent_client(tmp_path: Path) -> None:
    with run_proxy(tmp_path, _remote("10.99.0.0/16")) as p:
        port = p.port("bond")
        r = _ask(port, cp.connect_request("192.0.2.1", 80))
        assert r[:8] == cp.error_reply(cp.ErrorCode.NOT_AUTHORIZED)
        wait_for(lambda: "client 127.0.0.1 is not in an allowed network" in p.log(), what="log")
        # a client that never sends its Convert message is cut after the client timeout
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            with contextlib.suppress(ConnectionResetError):  # cut: FIN or RST, nothing else
                assert s.recv(10) == b""
        wait_for(lambda: "no Convert message" in p.log(), what="the cut in the log")


def test_split_message_option_refused_and_proxy_v2(tmp_path: Path) -> None:
    """A Convert message that arrives a few bytes at a time is read whole; a Connect
    asking for a TCP option the converter does not set is refused with Unsupported TCP
    Option (its kind as the value); a PROXY v2 remote gateway resets what it refuses."""
    with Server(echo) as srv:
        cfg = _remote("127.0.0.0/8", ', allow = ["127.0.0.1/32"]')
        with run_proxy(tmp_path, cfg) as p:
            msg = cp.connect_request("127.0.0.1", srv.port) + b"split"
            with socket.create_connection(("127.0.0.1", p.port("bond")), timeout=10) as s:
                for i in range(0, len(msg), 5):
                    s.sendall(msg[i : i + 5])
                    time.sleep(0.02)
                s.shutdown(socket.SHUT_WR)
                assert recv_all(s) == cp.build([]) + b"split"
            mss = cp.build(
                [cp.Connect(ipaddress.ip_address("127.0.0.1"), srv.port, b"\x02\x04\x05\xb4")]
            )
            assert _ask(p.port("bond"), mss) == cp.error_reply(
                cp.ErrorCode.UNSUPPORTED_TCP_OPTION, b"\x02"
            )
            wait_for(lambda: "TCP option 2 asked" in p.log(), what="the refusal in the log")
        pcfg = cfg.replace("accept-convert = true", "accept-proxy = true")
        with run_proxy(tmp_path, pcfg) as p:
            ok = proxyproto.build_v2(("127.0.0.1", 1), ("127.0.0.1", srv.port))
            assert _ask(p.port("bond"), ok, b"pp") == b"pp"
            lo = proxyproto.build_v2(("127.0.0.1", 1), ("127.0.0.2", srv.port))
            with pytest.raises(OSError):  # reset: on the shutdown, or on the read
                _ask(p.port("bond"), lo, b"pp")
            wait_for(lambda: "destination 127.0.0.2 is loopback" in p.log(), what="log")


def test_proxy_header_without_destination_is_reset(tmp_path: Path) -> None:
    """A PROXY v2 LOCAL (or v1 UNKNOWN) header names no destination. HAProxy would keep
    the connection's own addresses, but here that destination is the gateway itself: it
    is refused as every PROXY client is, with a RST (docs/bonding.md), on both paths."""
    with Server(echo) as srv:
        cfg = _remote("127.0.0.0/8", ', allow = ["127.0.0.1/32"]')
        pcfg = cfg.replace("accept-convert = true", "accept-proxy = true")
        with run_proxy(tmp_path, pcfg) as p:
            for header in (proxyproto.build_v2(None, None, local=True), b"PROXY UNKNOWN\r\n"):
                with socket.create_connection(("127.0.0.1", p.port("bond")), timeout=10) as s:
                    s.sendall(header + b"pp")  # no shutdown: a FIN reads as b"", a RST raises
                    with pytest.raises(ConnectionResetError):
                        s.recv(100)
            wait_for(
                lambda: p.log().count("PROXY LOCAL (no destination)") == 2,
                what="both ends in the log",
            )
            ok = proxyproto.build_v2(("127.0.0.1", 1), ("127.0.0.1", srv.port))
            assert _ask(p.port("bond"), ok, b"pp") == b"pp"  # the gateway still relays
