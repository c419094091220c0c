"""Resolvers: server names re-resolved at runtime (`resolve-interval`), `init-addr`.

The name lives in an /etc/hosts of the test's own: the proxy runs in a private mount
namespace (`unshare --mount`) with a temporary file bind-mounted over /etc/hosts, which
the test rewrites in place to move the name to another backend.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import proxy_harness
from proxy_harness import run_proxy, wait_for

NAME = "app.resolvers.mptcpkit.test"
MOUNT = 'mount --bind "$0" /etc/hosts && exec "$@"'
ENGINES = ["c", "python"]


class Tagged:
    """A server on `host`:`port` answering every connection with its tag."""

    def __init__(self, host: str, port: int, tag: bytes) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.tag = tag
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with c:
                c.sendall(self.tag)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def private_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A hosts file the proxy (and only it) sees as /etc/hosts."""
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) is missing")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    cmd = ["unshare", "--mount", "sh", "-c", MOUNT, str(hosts), sys.executable, "-m"]
    monkeypatch.setattr(proxy_harness, "PROXY_CMD", [*cmd, "mptcpkit", "proxy"])
    yield hosts


def point(hosts: Path, ip: str | None) -> None:
    """Rewrite the private hosts file in place (the bind mount follows the inode)."""
    line = f"{ip} {NAME}\n" if ip else ""
    with open(hosts, "r+") as f:
        f.truncate(0)
        f.write("127.0.0.1 localhost\n" + line)


def answer(port: int) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            return proxy_harness.recv_all(s)
    except OSError:
        return b""


def config(port: int, init_addr: str = "libc", interval: str = "200ms", check: str = "") -> str:
    return f"""
[global]
workers = 2
log = "stderr"

[frontend.f]
bind = "tcp@127.0.0.1:0"
backend = "b"

[backend.b]
resolve-interval = "{interval}"
init-addr = "{init_addr}"
server.s1 = "tcp@{NAME}:{port}"
{check}
"""


@pytest.mark.root
@pytest.mark.parametrize("engine", ENGINES)
def test_a_moved_name_is_followed_without_a_reload(
    tmp_path: Path, private_hosts: Path, engine: str
) -> None:
    a = Tagged("127.0.0.1", 0, b"A")
    b = Tagged("127.0.0.2", a.port, b"B")
    try:
        point(private_hosts, "127.0.0.1")
        env = {"MPTCPKIT_PROXY_ENGINE": engine}
        check = 'check = { interval = "100ms", fall = 1 }'
        with run_proxy(tmp_path, config(a.port, check=check), env=env) as p:
            port = p.port("f")
            assert answer(port) == b"A"
            point(private_hosts, "127.0.0.2")
            moved = lambda: all(answer(port) == b"B" for _ in range(6))  # noqa: E731
            wait_for(moved, 10, "connections in every worker to reach the new address")
            checked = b.accepted  # no traffic from here: what b accepts now are checks
            wait_for(lambda: b.accepted >= checked + 2, 10, "the checker to follow")
            a.close()  # the checker follows too: the old address going away is no failure
            for _ in range(10):
                assert answer(port) == b"B"
                time.sleep(0.05)
            assert "is DOWN" not in p.log()
            point(private_hosts, None)  # the name stops resolving: the last address stays
            wait_for(lambda: "cannot resolve" in p.log(), 10, "the failure to be logged")
            assert all(answer(port) == b"B" for _ in range(6))
            log = p.log()
            assert "moved from 127.0.0.1 to 127.0.0.2" in log, log
            assert log.count("cannot resolve") == 1, log  # logged once
            assert "reload" not in log
    finally:
        a.close()
        b.close()


@pytest.mark.root
@pytest.mark.parametrize("engine", ENGINES)
def test_init_addr_none_starts_down_and_comes_up(
    tmp_path: Path, private_hosts: Path, engine: str
) -> None:
    a = Tagged("127.0.0.1", 0, b"A")
    try:
        env = {"MPTCPKIT_PROXY_ENGINE": engine}
        with run_proxy(tmp_path, config(a.port, "none"), env=env) as p:
            port = p.port("f")
            assert "starting it DOWN (init-addr none)" in p.log()
            assert answer(port) == b""  # no server: the client is closed
            point(private_hosts, "127.0.0.1")
            # every worker follows (each looks at the board on its own)
            up = lambda: all(answer(port) == b"A" for _ in range(6))  # noqa: E731
            wait_for(up, 10, "the server to come up in every worker")
            assert f"{NAME} resolved to 127.0.0.1" in p.log()
            p.signal(signal.SIGHUP)  # a reload resolves at once, a new resolver follows
            wait_for(lambda: "reloaded" in p.log(), 10, "the reload")
            wait_for(up, 10, "the new workers to serve")
    finally:
        a.close()


@pytest.mark.root
def test_init_addr_libc_fails_at_start_naming_the_server(
    tmp_path: Path, private_hosts: Path
) -> None:
    path = tmp_path / "p.toml"
    path.write_text(config(9, "libc"))
    done = subprocess.run(
        [*proxy_harness.PROXY_CMD, "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr
    assert "backend.b.server.s1" in done.stderr and "cannot resolve" in done.stderr


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ('resolve-interval = "0s"', "backend.b.resolve-interval"),
        ('resolve-interval = "soon"', "backend.b.resolve-interval"),
        ('init-addr = "last"', "backend.b.init-addr"),
        ('init-addr = "none"', "backend.b.init-addr"),  # without resolve-interval
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, body: str, key: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[frontend.f]\nbind = "tcp@127.0.0.1:0"\nbackend = "b"\n'
        f'[backend.b]\nserver.s1 = "tcp@127.0.0.1:9"\n{body}\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "mptcpkit", "proxy", "--check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert key in done.stderr, done.stderr
