"""Helpers for the bonding tests: a byte server on the "internet" host, downloads from the LAN."""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from mptcpkit.lab.host import Host

PORT = 8080  # inside the lab's own namespaces only


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def digest(n: int, seed: int) -> str:
    return hashlib.sha256(payload(n, seed)).hexdigest()


@contextlib.contextmanager
def byte_server(host: Host, port: int = PORT) -> Iterator[None]:
    """On `host`, [::]:port and 0.0.0.0:port: `GET n seed` -> n deterministic bytes, FIN."""
    stop = threading.Event()
    ready = threading.Barrier(3, timeout=10)

    def handle(c: socket.socket) -> None:
        with c:
            c.settimeout(30)
            try:
                req = c.recv(100).split()
                n, seed = int(req[1]), int(req[2])
                data = payload(n, seed)
                view = memoryview(data)
                for i in range(0, n, 1 << 16):
                    c.sendall(view[i : i + (1 << 16)])
            except (OSError, ValueError, IndexError):
                return

    def serve(family: int, addr: str) -> None:
        ls = socket.socket(family, socket.SOCK_STREAM)
        with ls:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            ls.bind((addr, port))
            ls.listen(512)
            ls.settimeout(0.1)
            ready.wait()
            while not stop.is_set():
                try:
                    c, _ = ls.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=handle, args=(c,), daemon=True).start()

    threads = [
        host.thread(serve, socket.AF_INET, "0.0.0.0"),
        host.thread(serve, socket.AF_INET6, "::"),
    ]
    ready.wait()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(5)


def fetch(dest: str, n: int, seed: int, *, port: int = PORT, read: int | None = None) -> bytes:
    """Connect (plain TCP, as an unmodified client) and read the reply to EOF (or `read` bytes)."""
    family = socket.AF_INET6 if ":" in dest else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect((dest, port))
        s.sendall(f"GET {n} {seed}\n".encode())
        chunks = []
        got = 0
        while read is None or got < read:
            b = s.recv(1 << 16)
            if not b:
                break
            chunks.append(b)
            got += len(b)
        return b"".join(chunks)


def fetch_ok(dest: str, n: int, seed: int) -> bool:
    return hashlib.sha256(fetch(dest, n, seed)).hexdigest() == digest(n, seed)


def fetch_many(jobs: list[tuple[str, int, int]], workers: int) -> list[bool]:
    """Run `fetch_ok` for every job at once (call inside the client host: threads inherit it)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda j: fetch_ok(*j), jobs))
