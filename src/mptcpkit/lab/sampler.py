"""Sampling a bench while it runs: bytes delivered, per subflow and per link.

Every `interval` a thread inside the client's namespace reads the bytes delivered to the
receivers (goodput), `bytes_acked` of each subflow of the sending sockets
(`mptcpkit.subflows()`; TCP_INFO for plain TCP) and the byte counters of the client's
links (`/proc/<thread>/net/dev`). What the samples mean is series.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from mptcpkit.abi.tcp_info import TCP_INFO_SIZE, decode_tcp_info
from mptcpkit.introspect import subflows as _subflows
from mptcpkit.lab.host import Host
from mptcpkit.lab.mib import read_sockstat
from mptcpkit.lab.transfer import Transfer


def read_net_dev() -> dict[str, dict[str, int]]:
    """Byte counters of every device in the calling thread's network namespace."""
    with open("/proc/thread-self/net/dev") as f:
        lines = f.read().splitlines()[2:]
    result = {}
    for line in lines:
        name, _, rest = line.partition(":")
        fields = rest.split()
        result[name.strip()] = {"rx_bytes": int(fields[0]), "tx_bytes": int(fields[8])}
    return result


@dataclasses.dataclass
class Sample:
    t: float
    received: int
    subflows: dict[str, int]
    links: dict[int, int]


def subflow_key(local: tuple[str, int], remote: tuple[str, int]) -> str:
    def fmt(a: tuple[str, int]) -> str:
        host = f"[{a[0]}]" if ":" in a[0] else a[0]
        return f"{host}:{a[1]}"

    return f"{fmt(local)}->{fmt(remote)}"


def sender_subflows(sock: socket.socket, mptcp: bool) -> dict[str, tuple[int, Any, Any]]:
    """key -> (bytes_acked, local, remote) of every subflow of the sending socket."""
    out: dict[str, tuple[int, Any, Any]] = {}
    if mptcp:
        for sf in _subflows(sock):
            out[subflow_key(sf.local, sf.remote)] = (sf.bytes_acked or 0, sf.local, sf.remote)
        if out:
            return out
    # Plain TCP (or an MPTCP connection that fell back): the connection is the subflow.
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    info = decode_tcp_info(raw)
    local, remote = sock.getsockname()[:2], sock.getpeername()[:2]
    out[subflow_key(local, remote)] = (info.bytes_acked or 0, local, remote)
    return out


class Sampler:
    def __init__(
        self,
        transfers: list[Transfer],
        conns: list[socket.socket],
        mptcp: bool,
        host: Host,
        interval: float,
        t0: float,
    ) -> None:
        self.transfers = transfers
        self.conns = conns
        self.mptcp = mptcp
        self.devs = {i.name: i.link.index for i in host.interfaces}
        self.interval = interval
        self.t0 = t0
        self.samples: list[Sample] = []
        self.subflow_addrs: dict[str, tuple[Any, Any]] = {}
        self.peak_tcp_pages = 0
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.on_sample: Callable[[dict[str, Any]], None] | None = None

    def take(self) -> None:
        sfs: dict[str, int] = {}
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                for key, (acked, local, remote) in sender_subflows(conn, self.mptcp).items():
                    sfs[key] = acked
                    self.subflow_addrs.setdefault(key, (local, remote))
        received = sum(s.received for s in self.transfers)
        t = time.monotonic() - self.t0
        counters = read_net_dev()
        with contextlib.suppress(OSError, KeyError):
            # TCP's pages are machine-wide: the same number in every namespace.
            pages = read_sockstat()["TCP"]["mem"]
            self.peak_tcp_pages = max(self.peak_tcp_pages, pages)
        links = {
            idx: counters[dev]["tx_bytes"] for dev, idx in self.devs.items() if dev in counters
        }
        self.samples.append(Sample(t, received, sfs, links))
        if self.on_sample is not None and len(self.samples) > 1:
            prev = self.samples[-2]
            dt = max(t - prev.t, 1e-9)
            with contextlib.suppress(Exception):
                self.on_sample(
                    {
                        "t": t,
                        "bytes": received,
                        "total_mbit": (received - prev.received) * 8 / dt / 1e6,
                        "subflows": len(sfs),
                    }
                )

    def run(self) -> None:
        try:
            self.take()
        finally:
            self.ready.set()
        next_t = self.interval
        while not self._stop.wait(max(0.0, self.t0 + next_t - time.monotonic())):
            self.take()
            next_t += self.interval
        self.take()

    def stop_and_join(self, thread: threading.Thread) -> None:
        self._stop.set()
        if thread is not threading.current_thread():
            thread.join(10)
