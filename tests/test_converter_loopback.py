"""The remote gateway's RFC 8803 side on loopback: real proxy, raw Convert messages."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from mptcpkit.proxy import convertproto as cp
from proxy_harness import Server, echo, recv_all, run_proxy, wait_for


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
