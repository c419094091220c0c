"""Routing (HAProxy's `use_backend ... if`, `default_backend`): by destination port (one
frontend on a port range), by client source address (clients bound to 127.0.0.2), by
the TLS ClientHello's server name (curl and `openssl s_client` against TLS servers;
hellos cut into pieces; plain text; a client that sends nothing), on both data paths,
with the runtime API and the metrics counting each backend."""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy_harness import Server, recv_all, run_proxy, wait_for
from test_proxy_clienthello import openssl_hello
from test_proxy_control import ctl
from test_proxy_e2e import _free_port_range


@pytest.fixture(scope="module")
def tls_ctx(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    d = tmp_path_factory.mktemp("cert")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=test",
            "-keyout", str(d / "k.pem"), "-out", str(d / "c.pem"),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "c.pem", d / "k.pem")
    return ctx


def plain(name: str) -> Server:
    """Says its name, then the sha256 of all it received until the client's FIN."""

    def handler(c: socket.socket) -> None:
        c.sendall(name.encode() + b"\n")
        c.settimeout(20)
        c.sendall(hashlib.sha256(recv_all(c)).hexdigest().encode())

    return Server(handler)


def https(name: str, ctx: ssl.SSLContext) -> Server:
    """A TLS server answering any HTTP request with its name (and the name it was asked)."""

    def handler(c: socket.socket) -> None:
        c.settimeout(20)
        asked: list[str | None] = []
        ctx.sni_callback = lambda _s, n, _c: asked.append(n)  # type: ignore[assignment]
        with ctx.wrap_socket(c, server_side=True) as t:
            t.recv(4096)
            body = f"{name} (asked {asked[0] if asked else None})".encode()
            t.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    return Server(handler)


def ask(port: int, data: bytes = b"", *, src: str = "127.0.0.1", pieces: int = 1) -> str:
    """The name of the plain server a client reached; the bytes it sent arrived whole."""
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(20)
    s.connect(("127.0.0.1", port))
    step = max(1, -(-len(data) // pieces))
    for i in range(0, len(data), step):
        s.sendall(data[i : i + step])
        if pieces > 1:
            time.sleep(0.02)  # each piece its own segment (TCP_NODELAY on the proxy)
    s.shutdown(socket.SHUT_WR)
    name, _, digest = recv_all(s).decode().partition("\n")
    s.close()
    assert digest == hashlib.sha256(data).hexdigest(), (name, digest)
    return name


def curl(port: int, host: str) -> str:
    p = subprocess.run(
        [
            "curl",
            "-sSk",
            "--max-time",
            "20",
            "--resolve",
            f"{host}:{port}:127.0.0.1",
            f"https://{host}:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert p.returncode == 0, p.stderr
    return p.stdout


def s_client(port: int, host: str) -> str:
    p = subprocess.run(
        ["openssl", "s_client", "-quiet", "-connect", f"127.0.0.1:{port}", "-servername", host],
        input=b"GET / HTTP/1.0\r\n\r\n",
        capture_output=True,
        timeout=30,
    )
    return p.stdout.decode(errors="replace")


@pytest.fixture
def backends(tls_ctx: ssl.SSLContext) -> Iterator[dict[str, Server]]:
    servers = {n: plain(n) for n in ("app", "alt", "lan", "frag")}
    servers |= {n: https(n, tls_ctx) for n in ("api", "www")}
    try:
        yield servers
    finally:
        for s in servers.values():
            s.close()


def _config(base: int, sock: Path, servers: dict[str, Server]) -> str:
    return (
        f'[global]\nworkers = 2\nmetrics = "127.0.0.1:0"\nstats-socket = "unix@{sock}"\n'
        f'[frontend.fe]\nbind = "mptcp@127.0.0.1:{base}-{base + 2}"\n'
        f'use_backend = ["alt if {{ dst_port {base + 1}:{base + 2} }}",'
        ' "lan if { src 127.0.0.2 }"]\n'
        'default_backend = "app"\n'
        '[frontend.tls]\nbind = "tcp@127.0.0.1:0"\n'
        'tcp-request.inspect-delay = "300ms"\n'
        'acl.www = "req.ssl_sni -m end .example.org"\n'
        "use_backend = [\n"
        '  "api if { req.ssl_sni -i api.example.com }",\n'
        '  "www if www",\n'
        '  "frag if { req.ssl_sni frag.example.com }",\n'
        "]\n"
        'default_backend = "app"\n'
        + "".join(f'[backend.{n}]\nserver.s = "{s.address}"\n' for n, s in servers.items())
    )


def test_routes_by_port_source_and_sni(
    tmp_path: Path, relay: str, backends: dict[str, Server]
) -> None:
    base = _free_port_range(3)
    sock = tmp_path / "ctl.sock"
    with run_proxy(tmp_path, _config(base, sock, backends)) as px:
        # dst_port: one frontend on three ports; src: a client from 127.0.0.2
        assert [ask(p, b"x") for p in (base, base + 1, base + 2)] == ["app", "alt", "alt"]
        assert ask(base, b"y", src="127.0.0.2") == "lan"
        assert ask(base + 1, b"y", src="127.0.0.2") == "alt"  # the first rule met wins

        # req.ssl_sni: real TLS clients reach the TLS server their name picks
        tls = px.port("tls")
        assert curl(tls, "api.example.com") == "api (asked api.example.com)"
        assert "api (asked API.Example.COM)" in s_client(tls, "API.Example.COM")  # -i
        assert "www (asked shop.example.org)" in s_client(tls, "shop.example.org")
        # a hello cut into pieces (segments and records) is read whole and relayed as sent
        hello = openssl_hello("frag.example.com")
        assert ask(tls, hello, pieces=7) == "frag"
        assert ask(tls, hello + b"after the hello") == "frag"
        # not TLS, another name, no name, nothing at all: the default backend
        assert ask(tls, b"GET / HTTP/1.1\r\n\r\n") == "app"
        assert ask(tls, openssl_hello("FRAG.example.com")) == "app"  # no -i: case counts
        assert ask(tls, openssl_hello(None)) == "app"
        assert ask(tls, b"") == "app"  # after the inspect-delay

        # the runtime API and the metrics count each backend's connections
        code, rows = ctl(sock, "show", "servers")
        assert code == 0, rows
        totals = {r["backend"]: r["total"] for r in rows}
        want = {"app": 5, "alt": 3, "lan": 1, "frag": 2, "api": 2, "www": 1}
        assert totals == want, rows

        def counted() -> dict[str, float] | None:
            text = px.metrics()
            got: dict[str, float] = {}
            for m in re.finditer(
                r'mptcpkit_proxy_connections_total\{backend="(\w+)",frontend="\w+",'
                r'server="s"\} (\S+)',
                text,
            ):
                got[m.group(1)] = got.get(m.group(1), 0.0) + float(m.group(2))
            return got if got == {k: float(v) for k, v in want.items()} else None

        wait_for(counted, what="each backend's connections in the metrics")

        # show sessions names the backend a live connection was routed to
        held = socket.create_connection(("127.0.0.1", base + 2), timeout=20)
        assert held.recv(4) == b"alt\n"
        code, sessions = ctl(sock, "show", "sessions")
        assert code == 0 and [(s["frontend"], s["backend"]) for s in sessions] == [("fe", "alt")]
        held.close()
    for s in backends.values():
        assert not s.errors, s.errors


def test_a_freed_slot_lets_its_own_backends_waiter_go(tmp_path: Path, relay: str) -> None:
    """Two backends behind one frontend, each server at its maxconn with connections
    waiting: a slot freed in one backend lets that backend's oldest waiter go, and the
    other backend's waiters keep their order (HAProxy's queue is per backend)."""
    seen: list[bytes] = []

    def record(c: socket.socket) -> None:
        first = c.recv(2)
        seen.append(first)
        c.sendall(first)
        recv_all(c)

    sock = tmp_path / "ctl.sock"
    with Server(record) as a, Server(record) as b:
        conf = (
            f'[global]\nworkers = 1\nmetrics = ""\nstats-socket = "unix@{sock}"\n'
            '[frontend.fe]\nbind = "tcp@127.0.0.1:0"\ntimeout = { queue = "60s" }\n'
            'use_backend = ["b if { src 127.0.0.2 }"]\ndefault_backend = "a"\n'
            f'[backend.a]\nserver.s = {{ address = "{a.address}", maxconn = 1 }}\n'
            f'[backend.b]\nserver.s = {{ address = "{b.address}", maxconn = 1 }}\n'
        )
        with run_proxy(tmp_path, conf) as px:
            port = px.port("fe")
            clients: dict[str, socket.socket] = {}

            def waiting() -> int:
                code, rows = ctl(sock, "show", "sessions")
                assert code == 0, rows
                return [r["server"] for r in rows].count(None)

            for n, name in enumerate(("a0", "b0", "a1", "b1", "a2")):
                c = socket.socket()
                c.bind(("127.0.0.2" if name[0] == "b" else "127.0.0.1", 0))
                c.settimeout(20)
                c.connect(("127.0.0.1", port))
                c.sendall(name.encode())
                clients[name] = c
                if n < 2:
                    assert c.recv(2) == name.encode()  # holds its backend's one slot
                else:
                    wait_for(lambda n=n: waiting() == n - 1, what=f"{name} to wait")
            clients.pop("b0").close()
            assert clients["b1"].recv(2) == b"b1"
            clients.pop("a0").close()
            assert clients["a1"].recv(2) == b"a1"  # a's first waiter, before a2
            assert [x for x in seen if x.startswith(b"a")] == [b"a0", b"a1"]
            for c in clients.values():
                c.close()
