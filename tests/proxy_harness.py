"""Helpers for the proxy's end-to-end tests: run `mptcpkit proxy`, real peers in threads."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

IPPROTO_MPTCP = 262
PROXY_CMD = [sys.executable, "-m", "mptcpkit", "proxy"]


def wait_for(pred: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class ProxyProc:
    """A running `mptcpkit proxy` (master + workers), its log and its ports."""

    def __init__(self, args: list[str], tmp: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = tmp / f"proxy-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*PROXY_CMD, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 20.0) -> ProxyProc:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy exited {self.proc.returncode}:\n{self.log()}")
            return "ready:" in self.log()

        wait_for(ready, timeout, "the proxy to be ready")
        return self

    def ports(self, frontend: str) -> list[int]:
        return [
            int(p)
            for p in re.findall(
                rf"frontend {re.escape(frontend)} listening on \S+:(\d+)", self.log()
            )
        ]

    def port(self, frontend: str) -> int:
        return self.ports(frontend)[0]

    def metrics_port(self) -> int:
        m = re.search(r"metrics on http://[^:]+:(\d+)/", self.log())
        assert m, self.log()
        return int(m.group(1))

    def metrics(self) -> str:
        with socket.create_connection(("127.0.0.1", self.metrics_port()), timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            return recv_all(s).decode()

    def metrics_pid(self) -> int | None:
        """The process serving /metrics (a child of the master, not a worker)."""
        m = re.search(r"metrics on http://\S+ \(pid (\d+)\)", self.log())
        return int(m.group(1)) if m else None

    def workers(self) -> list[int]:
        out = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(p) for p in out if int(p) != self.metrics_pid()]

    def conn_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if " conn " in line]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def run_proxy(
    tmp: Path,
    config: str | None = None,
    args: list[str] | None = None,
    ready: bool = True,
    env: dict[str, str] | None = None,
) -> Iterator[ProxyProc]:
    argv = list(args or [])
    if config is not None:
        path = tmp / "proxy.toml"
        path.write_text(config)
        argv = ["-c", str(path), *argv]
    p = ProxyProc(argv, tmp, env)
    try:
        if ready:
            p.wait_ready()
        yield p
    finally:
        code = p.stop()
        if ready and code not in (0, None):
            raise AssertionError(f"proxy exited {code}:\n{p.log()}")


def recv_all(s: socket.socket, limit: int | None = None) -> bytes:
    chunks = []
    n = 0
    while limit is None or n < limit:
        d = s.recv(1 << 20 if limit is None else min(1 << 20, limit - n))
        if not d:
            break
        chunks.append(d)
        n += len(d)
    return b"".join(chunks)


class Server:
    """A real server in threads: TCP or MPTCP; `handler(conn)` per connection."""

    def __init__(
        self,
        handler: Callable[[socket.socket], None],
        *,
        mptcp: bool = False,
        port: int = 0,
        family: int = socket.AF_INET,
    ) -> None:
        self.handler = handler
        self.mptcp = mptcp
        self.sock = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1" if family == socket.AF_INET else "::1", port))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self.errors: list[BaseException] = []
        self._stop = False
        self._t = threading.Thread(target=self._serve, daemon=True)
        self._t.start()

    @property
    def address(self) -> str:
        return f"{'mptcp' if self.mptcp else 'tcp'}@127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(c)
            threading.Thread(target=self._run, args=(c,), daemon=True).start()

    def _run(self, c: socket.socket) -> None:
        try:
            self.handler(c)
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)
        finally:
            c.close()

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hash_reply(c: socket.socket) -> None:
    """Read to EOF, then answer sha256(received) + a deterministic payload, then close."""
    data = recv_all(c)
    c.sendall(hashlib.sha256(data).digest() + payload(3 << 20, b"srv"))
    c.shutdown(socket.SHUT_WR)


def echo(c: socket.socket) -> None:
    while True:
        d = c.recv(1 << 16)
        if not d:
            break
        c.sendall(d)
    c.shutdown(socket.SHUT_WR)


def payload(n: int, seed: bytes) -> bytes:
    out = bytearray()
    block = hashlib.sha256(seed).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


def connect(port: int, *, mptcp: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    return s


def proto_of(s: socket.socket) -> int:
    return s.getsockopt(socket.SOL_SOCKET, 38)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
