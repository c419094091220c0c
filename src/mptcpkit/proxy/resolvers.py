"""Resolvers: server names looked up again while the proxy runs (HAProxy's `resolvers`).

A backend with `resolve-interval` (HAProxy's `hold valid` / `timeout resolve`) has its
server names re-resolved by a thread of the master (`Resolver`), never by a worker.
Addresses travel like the health state: an `AddressBoard`, one anonymous MAP_SHARED
slot per named server, made before the fork; workers look at it every tenth of a
second (`follow`) and connect to the new address from then on, on both data paths,
without a reload. A name that stops resolving keeps its last address (logged once).

`init-addr` (HAProxy's, simplified): "libc" (default) fails at start when a name does
not resolve (exit 2 naming the server); "none" starts that server DOWN and brings it
up when its name resolves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import mmap
import socket
import threading
import time
from typing import Any

from mptcpkit.address import Address
from mptcpkit.proxy.configmodel import Config

__all__ = ["AddressBoard", "Resolver", "follow", "lookup", "named"]

SLOT = 18  # sequence (odd while written), family (0: unresolved, 4, 6), 16 address bytes
FOLLOW_INTERVAL = 0.1  # seconds between a worker's looks at the board
_FAMILY: dict[int, int] = {int(socket.AF_INET): 4, int(socket.AF_INET6): 6}


def lookup(addr: Address) -> tuple[int, Any]:
    """(family, sockaddr) of a server address; OSError when a name does not resolve."""
    if addr.protocol == "unix":
        return socket.AF_UNIX, addr.path
    family = addr.family if addr.family in (socket.AF_INET, socket.AF_INET6) else 0
    infos = socket.getaddrinfo(addr.host, addr.port, family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    fam, _, _, _, sockaddr = infos[0]
    return fam, sockaddr


def named(addr: Address) -> bool:
    """Is this address a name (not a literal IP, not a unix path)?"""
    if addr.protocol == "unix" or not addr.host:
        return False
    try:
        ipaddress.ip_address(addr.host)
    except ValueError:
        return True
    return False


class AddressBoard:
    """The current address of every named server of a backend with `resolve-interval`."""

    def __init__(self, cfg: Config) -> None:
        self.index: dict[tuple[str, str], int] = {}
        self.servers: list[tuple[str, Any, float]] = []  # (backend, Server, interval)
        for name, be in cfg.backends.items():
            if be.resolve_interval is None:
                continue
            for s in be.servers:
                if named(s.address):
                    self.index[(name, s.name)] = len(self.index)
                    self.servers.append((name, s, be.resolve_interval))
        self.mem = mmap.mmap(-1, max(SLOT * len(self.index), 1), flags=mmap.MAP_SHARED)

    def publish(self, i: int, family: int, sockaddr: Any) -> None:
        """Write slot i (the master's resolver; family 0: not resolved yet)."""
        o = i * SLOT
        seq = self.mem[o]
        self.mem[o] = (seq + 1) % 256  # odd: being written
        packed = socket.inet_pton(family, sockaddr[0]) if family else b""
        self.mem[o + 1] = _FAMILY.get(family, 0)
        self.mem[o + 2 : o + SLOT] = packed.ljust(16, b"\0")
        self.mem[o] = (seq + 2) % 256

    def seq(self, i: int) -> int:
        return self.mem[i * SLOT]

    def read(self, i: int, port: int) -> tuple[int, Any] | None:
        """(family, sockaddr) in slot i, None while unresolved; a torn read is retried."""
        o = i * SLOT
        while True:
            seq = self.mem[o]
            code = self.mem[o + 1]
            raw = self.mem[o + 2 : o + SLOT]
            if seq % 2 == 0 and self.mem[o] == seq:
                break
            time.sleep(0)
        if code == 4:
            return socket.AF_INET, (socket.inet_ntop(socket.AF_INET, raw[:4]), port)
        if code == 6:
            return socket.AF_INET6, (socket.inet_ntop(socket.AF_INET6, raw), port, 0, 0)
        return None

    def close(self) -> None:
        self.mem.close()


class Resolver:
    """The master's thread: every `resolve-interval`, look each name up again and
    publish changes; a failure keeps the last address and is logged once."""

    def __init__(
        self, board: AddressBoard, start: dict[tuple[str, str], tuple[int, Any]], log: Any
    ):
        self.board = board
        self.log = log
        self.last = dict(start)  # what was published: (backend, server) -> (family, sockaddr)
        self.failing: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        for key, i in board.index.items():
            fam, sockaddr = self.last.get(key, (0, None))
            board.publish(i, fam, sockaddr)
        self.thread = threading.Thread(target=self._run, name="resolvers", daemon=True)

    def start(self) -> None:
        if self.board.servers:
            self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join()

    def _run(self) -> None:
        due = {(b, s.name): time.monotonic() + iv for b, s, iv in self.board.servers}
        step = min(iv for _, _, iv in self.board.servers)
        while not self._stop.wait(min(step, 0.5)):
            now = time.monotonic()
            for backend, server, interval in self.board.servers:
                key = (backend, server.name)
                if now >= due[key]:
                    due[key] = now + interval
                    self.once(backend, server)

    def once(self, backend: str, server: Any) -> None:
        """Look one server's name up and publish a change."""
        key = (backend, server.name)
        where = f"backend {backend}: server {server.name}"
        try:
            fam, sockaddr = lookup(server.address)
        except OSError as exc:
            if key not in self.failing:
                self.failing.add(key)
                keep = "keeping its last address" if key in self.last else "still DOWN"
                self.log.event(
                    f"{where}: cannot resolve {server.address.host!r}:"
                    f" {exc.strerror or exc}; {keep}",
                    now=True,
                )
            return
        self.failing.discard(key)
        old = self.last.get(key)
        new = (fam, (sockaddr[0], sockaddr[1]))
        if old is not None and (old[0], tuple(old[1][:2])) == new:
            return
        self.last[key] = new
        self.board.publish(self.board.index[key], fam, sockaddr)
        if old is None:
            self.log.event(f"{where}: {server.address.host} resolved to {sockaddr[0]}", now=True)
        else:
            self.log.event(
                f"{where}: {server.address.host} moved from {old[1][0]} to {sockaddr[0]}",
                now=True,
            )


async def follow(rt: Any, board: AddressBoard) -> None:
    """A worker: connect to each server where the board says, from the next connection."""
    pairs = [
        (board.index[(name, st.server.name)], be, st)
        for name, be in rt.backends.items()
        for st in be.balancer.states
        if (name, st.server.name) in board.index
    ]
    seen = [-1] * len(pairs)
    while True:
        for j, (i, be, st) in enumerate(pairs):
            seq = board.seq(i)
            if seq == seen[j] or seq % 2 or seq == 0:  # 0: not published yet
                continue
            seen[j] = seq
            where = board.read(i, st.server.address.port or 0)
            if where is None:
                st.resolved = False
                continue
            be.readdress(st, where)
        await asyncio.sleep(FOLLOW_INTERVAL)
