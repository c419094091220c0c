"""The relay's behaviour, written once; both data paths must pass every case.

`_engine.c` (compiled) and `relay.py` (Python) are the same state machine. Each case
here runs on both (MPTCPKIT_PROXY_ENGINE=c and python), so a change made to one and
not the other fails a test. One proxy per data path serves all cases (module
fixture), with MPTCPKIT_PROXY_BURST=1: every bulk read ends its leg's turn, so each
transfer exercises the resume after a burst. Real kernel sockets, real peers on
loopback.

Cases: half-close either way; backpressure (a stalled reader stops the server, and
gets every byte once it reads); PROXY headers in (v1, v2) and out (v2); routing
(use_backend) on what follows a PROXY header: a ClientHello peeked at whole or in
pieces, plain text, the header's addresses (`src`, `dst_port`); timeouts
(idle, no PROXY header, connect); aborts either way (RST crosses); burst resume;
EMFILE (accepting pauses and resumes).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mptcpkit.proxy import compiled, proxyproto
from mptcpkit.proxy.config import ConfigError
from mptcpkit.proxy.datapath import BURST_ENV
from proxy_harness import (
    PROXY_CMD,
    ProxyProc,
    Server,
    connect,
    payload,
    recv_all,
    run_proxy,
    wait_for,
)
from test_proxy_clienthello import openssl_hello

_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class Script:
    """The server behind the proxy: the client's first line names what it does."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}
        self.sent: dict[str, int] = {}

    def __call__(self, c: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n"):
            d = c.recv(1)
            if not d:
                return
            line += d
        cmd, token = line.decode().split()
        getattr(self, cmd)(c, token)

    def hash(self, c: socket.socket, token: str) -> None:
        """Read to EOF; answer sha256 of it and 4 MiB; close."""
        data = recv_all(c)
        c.sendall(hashlib.sha256(data).digest() + payload(4 << 20, token.encode()))

    def first(self, c: socket.socket, token: str) -> None:
        """Greet and half-close first; then read the client to EOF."""
        c.sendall(b"hello " + token.encode())
        c.shutdown(socket.SHUT_WR)
        self.seen[token] = recv_all(c)

    def flood(self, c: socket.socket, token: str) -> None:
        """Send 64 MiB, counting what the socket took."""
        data = payload(64 << 20, token.encode())
        self.sent[token] = 0
        view = memoryview(data)
        while self.sent[token] < len(data):
            self.sent[token] += c.send(view[self.sent[token] : self.sent[token] + (1 << 20)])

    def wait(self, c: socket.socket, token: str) -> None:
        """Read until the connection ends; note how."""
        try:
            self.seen[token] = recv_all(c)
        except OSError as exc:
            self.seen[token] = exc

    def reset(self, c: socket.socket, token: str) -> None:
        """Send a little, then reset."""
        c.sendall(b"bye")
        time.sleep(0.1)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)


def _proxy_header(c: socket.socket, headers: list[proxyproto.ProxyHeader]) -> None:
    """A server behind send-proxy: note the header, echo the rest, close."""
    buf = b""
    while (r := proxyproto.parse(buf)) is None:
        d = c.recv(4096)
        if not d:
            return
        buf += d
    headers.append(r[0])
    c.sendall(buf[r[1] :] + recv_all(c))


class Rig:
    def __init__(self, px: ProxyProc, script: Script, headers: list[Any], hole: int) -> None:
        self.px, self.script, self.headers, self.hole = px, script, headers, hole

    def line(self, client: socket.socket) -> str:
        """The log line of `client`'s connection."""
        me = f"127.0.0.1:{client.getsockname()[1]} "
        return str(
            wait_for(
                lambda: next((x for x in self.px.conn_lines() if me in x), None),
                what=f"the log line of {me}",
            )
        )


def _config(script_port: int, proxy_port: int, hole: int) -> str:
    return f"""[global]
workers = 1
metrics = ""
[frontend.fe]
bind = "mptcp@127.0.0.1:0"
backend = "be"
[frontend.idle]
bind = "tcp@127.0.0.1:0"
backend = "be"
timeout = {{ client = "300ms", server = "30s" }}
[frontend.pp]
bind = "tcp@127.0.0.1:0"
backend = "pp"
accept-proxy = true
timeout = {{ client = "300ms" }}
[frontend.ppout]
bind = "mptcp@127.0.0.1:0"
backend = "pp"
[frontend.sni]
bind = "tcp@127.0.0.1:0"
accept-proxy = true
tcp-request.inspect-delay = "5s"
use_backend = [
  "pp if {{ req.ssl_sni pp.example }}",
  "pp if {{ src 192.0.2.77 }} {{ dst_port 8443 }}",
]
default_backend = "be"
[frontend.hole]
bind = "tcp@127.0.0.1:0"
backend = "hole"
timeout = {{ connect = "300ms" }}
[backend.be]
server.s = "tcp@127.0.0.1:{script_port}"
[backend.pp]
server.s = {{ address = "tcp@127.0.0.1:{proxy_port}", send-proxy = "v2" }}
[backend.hole]
retries = 0
server.h = "tcp@127.0.0.1:{hole}"
"""


@pytest.fixture(scope="module", params=["c", "python"], ids=["compiled", "python"])
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(compiled.ENGINE_ENV, request.param)
        try:
            compiled.data_path()
        except ConfigError as exc:
            pytest.skip(f"{exc} (build it: python3 setup.py build_ext --inplace)")
        headers: list[proxyproto.ProxyHeader] = []
        script = Script()
        with contextlib.ExitStack() as stack:
            # A listener whose accept queue is full drops SYNs: only the connect timeout
            # ends a connect to it.
            hole = stack.enter_context(socket.socket())
            hole.bind(("127.0.0.1", 0))
            hole.listen(0)
            for _ in range(2):
                filler = stack.enter_context(socket.socket())
                filler.settimeout(0.2)
                with contextlib.suppress(OSError):
                    filler.connect(hole.getsockname())
            srv = stack.enter_context(Server(script))
            psrv = stack.enter_context(Server(lambda c: _proxy_header(c, headers)))
            tmp = tmp_path_factory.mktemp(request.param)
            px = stack.enter_context(
                run_proxy(
                    tmp,
                    _config(srv.port, psrv.port, hole.getsockname()[1]),
                    env={compiled.ENGINE_ENV: request.param, BURST_ENV: "1"},
                )
            )
            want = "compiled" if request.param == "c" else "python"
            assert f"({want} relay)" in px.log(), px.log()
            yield Rig(px, script, headers, hole.getsockname()[1])
            assert not srv.errors and not psrv.errors, (srv.errors, psrv.errors)


def _client(rig: Rig, cmd: str, frontend: str = "fe") -> tuple[socket.socket, str]:
    token = f"{cmd}-{time.monotonic_ns()}"
    s = connect(rig.px.port(frontend), mptcp=frontend == "fe")
    s.sendall(f"{cmd} {token}\n".encode())
    return s, token


# --- half-close -----------------------------------------------------------------------


def test_half_close_client_first_then_bulk_reply(rig: Rig) -> None:
    """The client's FIN reaches the server after all its bytes; the server's reply
    (bigger than a burst) then comes back whole, and its FIN ends the connection."""
    s, token = _client(rig, "hash")
    data = payload(3 << 20, b"up")
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    reply = recv_all(s)
    assert reply[:32] == hashlib.sha256(data).digest()
    assert reply[32:] == payload(4 << 20, token.encode())
    assert "ended='both closed'" in rig.line(s)
    s.close()


def test_half_close_server_first_client_keeps_sending(rig: Rig) -> None:
    s, token = _client(rig, "first")
    assert recv_all(s) == b"hello " + token.encode()  # the server's FIN crossed
    late = payload(2 << 20, b"late")
    s.sendall(late)  # the other direction still flows
    s.shutdown(socket.SHUT_WR)
    wait_for(lambda: token in rig.script.seen, what="the server to read to EOF")
    assert rig.script.seen[token] == late
    assert "ended='both closed'" in rig.line(s)
    s.close()


# --- backpressure and burst resume ------------------------------------------------------


def test_stalled_reader_stops_the_server_then_gets_every_byte(rig: Rig) -> None:
    s, token = _client(rig, "flood")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)

    def settled() -> bool:
        before = rig.script.sent.get(token, -1)
        time.sleep(0.3)
        return before >= 0 and rig.script.sent[token] == before

    wait_for(settled, what="the server to be stopped by the stalled client")
    stalled = rig.script.sent[token]
    assert stalled < 32 << 20, f"the server pushed {stalled} bytes into a stalled client"
    got = recv_all(s)  # resumed: every byte, in order
    s.shutdown(socket.SHUT_WR)
    assert (
        hashlib.sha256(got).digest() == hashlib.sha256(payload(64 << 20, token.encode())).digest()
    )
    assert "ended='both closed'" in rig.line(s)
    s.close()


# --- PROXY protocol ------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_proxy_header_in_and_out(rig: Rig, version: int) -> None:
    """accept-proxy reads the client's header (v1 or v2), send-proxy v2 carries its
    addresses to the server, and the bytes after the header are relayed."""
    src, dst = ("203.0.113.9", 4000 + version), ("198.51.100.1", 443)
    hdr = proxyproto.build_v1(src, dst) if version == 1 else proxyproto.build(2, src, dst)
    s = connect(rig.px.port("pp"), mptcp=False)
    s.sendall(hdr + b"data")
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == b"data"
    (h,) = [h for h in rig.headers if h.source == src]
    assert h.version == 2 and h.destination == dst
    line = wait_for(
        lambda: next((x for x in rig.px.conn_lines() if f"{src[0]}:{src[1]} " in x), None),
        what="the log line of the client named in the header",
    )
    assert "in=4" in line and "ended='both closed'" in line, line
    s.close()


def test_proxy_header_out_names_the_client(rig: Rig) -> None:
    s = connect(rig.px.port("ppout"), mptcp=True)
    s.sendall(b"body")
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == b"body"
    (h,) = [h for h in rig.headers if h.source == s.getsockname()]
    assert h.destination == ("127.0.0.1", rig.px.port("ppout"))
    s.close()


def test_bad_proxy_header_is_refused(rig: Rig) -> None:
    s = connect(rig.px.port("pp"), mptcp=False)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    with contextlib.suppress(ConnectionResetError):
        assert recv_all(s) == b""
    line = rig.line(s)
    assert "PROXY" in line and "-> pp/-" in line, line
    s.close()


# --- routing: peeking after a PROXY header ---------------------------------------------


@pytest.mark.parametrize("pieces", [1, 5])
def test_routing_peeks_at_the_hello_after_a_proxy_header(rig: Rig, pieces: int) -> None:
    """A ClientHello that came with the PROXY header (or after it, in pieces) routes
    the connection and reaches the server as it was sent."""
    src = ("203.0.113.50", 5000 + pieces)
    hello = openssl_hello("pp.example")
    s = connect(rig.px.port("sni"), mptcp=False)
    wire = proxyproto.build(2, src, ("198.51.100.1", 443)) + hello
    step = -(-len(wire) // pieces)
    for i in range(0, len(wire), step):
        s.sendall(wire[i : i + step])
        time.sleep(0.02 if pieces > 1 else 0)
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == hello  # the pp server echoes what followed its header
    assert [h.destination for h in rig.headers if h.source == src] == [("198.51.100.1", 443)]
    s.close()


def test_routing_on_the_proxy_headers_addresses(rig: Rig) -> None:
    """`src` and `dst_port` are the PROXY header's; plain text is no ClientHello: the
    rules are evaluated at once, and the default backend takes what they do not."""
    for dport, routed in ((8443, True), (443, False)):
        src = ("192.0.2.77", dport)
        s = connect(rig.px.port("sni"), mptcp=False)
        token = f"hash-{dport}-{time.monotonic_ns()}"
        body = f"hash {token}\n".encode() + b"plain text, no TLS"
        s.sendall(proxyproto.build(2, src, ("198.51.100.1", dport)) + body)
        s.shutdown(socket.SHUT_WR)
        got = recv_all(s)
        if routed:
            assert got == body
        else:  # the script behind "be" hashes what it read after its command line
            assert got[:32] == hashlib.sha256(b"plain text, no TLS").digest()
        s.close()


# --- timeouts ------------------------------------------------------------------------


def test_idle_client_is_cut(rig: Rig) -> None:
    s, token = _client(rig, "wait", "idle")
    assert recv_all(s) == b""  # the proxy closed it
    assert "ended='client timeout (0.3s idle)'" in rig.line(s)
    wait_for(lambda: token in rig.script.seen, what="the server leg to close")
    s.close()


def test_missing_proxy_header_is_cut(rig: Rig) -> None:
    s = connect(rig.px.port("pp"), mptcp=False)
    with contextlib.suppress(ConnectionResetError):
        assert recv_all(s) == b""
    assert "ended='client timeout (no PROXY header)'" in rig.line(s)
    s.close()


def test_connect_timeout(rig: Rig) -> None:
    s = connect(rig.px.port("hole"), mptcp=False)
    assert recv_all(s) == b""
    line = rig.line(s)
    assert "connect failed: timeout" in line, line
    assert f"connect to h (tcp@127.0.0.1:{rig.hole}) failed: timeout" in rig.px.log()
    s.close()


# --- aborts --------------------------------------------------------------------------


def test_client_reset_resets_the_server(rig: Rig) -> None:
    s, token = _client(rig, "wait")
    s.sendall(b"x")
    time.sleep(0.1)  # let the bytes cross before the reset
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    s.close()
    wait_for(lambda: token in rig.script.seen, what="the server leg to end")
    assert isinstance(rig.script.seen[token], ConnectionResetError), rig.script.seen[token]


def test_server_reset_resets_the_client(rig: Rig) -> None:
    s, _ = _client(rig, "reset")
    got = b""
    with pytest.raises(ConnectionResetError):
        while d := s.recv(4096):
            got += d
    assert got in (b"", b"bye")
    assert "server error: ECONNRESET" in rig.line(s) or "reset" in rig.line(s)
    s.close()


# --- EMFILE (last: it squeezes the worker's fds) --------------------------------------


def test_out_of_fds_pauses_accepting_then_recovers(rig: Rig) -> None:
    (worker,) = rig.px.workers()
    soft, hard = resource.prlimit(worker, resource.RLIMIT_NOFILE)
    top = max(int(fd) for fd in os.listdir(f"/proc/{worker}/fd"))
    held: list[socket.socket] = []
    resource.prlimit(worker, resource.RLIMIT_NOFILE, (top + 5, hard))
    try:
        for _ in range(40):
            c = connect(rig.px.port("fe"), mptcp=True)
            held.append(c)
            if "(EMFILE), retrying in 1s" in rig.px.log():
                break
            time.sleep(0.05)
        assert "(EMFILE), retrying in 1s" in rig.px.log()
    finally:
        resource.prlimit(worker, resource.RLIMIT_NOFILE, (soft, hard))
        for c in held:
            c.close()

    def serves() -> bool:
        try:
            s, _ = _client(rig, "hash")
            s.shutdown(socket.SHUT_WR)
            return len(recv_all(s)) == 32 + (4 << 20)
        except OSError:
            return False

    wait_for(serves, what="the worker to accept again")


# --- the burst knob fails closed ---------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "many", "1025"])
def test_bad_burst_exits_2_listening_on_nothing(tmp_path: Path, value: str) -> None:
    conf = tmp_path / "proxy.toml"
    conf.write_text(_config(1, 1, 1))
    done = subprocess.run(
        [*PROXY_CMD, "-c", str(conf)],
        env={**os.environ, BURST_ENV: value},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert f"MPTCPKIT_PROXY_BURST: {value!r} is not a whole number from 1 to 1024" in done.stderr
    assert "listening on" not in done.stdout + done.stderr
