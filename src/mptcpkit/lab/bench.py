"""A bulk transfer across the lab, measured per interval, per subflow and per link.

The sender writes a deterministic pseudo-random stream and hashes it; the receiver hashes
what arrives: equal SHA-256 and byte counts prove nothing was lost, duplicated or
reordered end to end, faults or not. A sampler reads every `interval`: bytes delivered
to the receiver (goodput), `bytes_acked` of each subflow of the sending socket
(`mptcpkit.subflows()`; TCP_INFO for plain TCP) and the byte counters of the client's
links (`/proc/<thread>/net/dev`, read from a thread inside the client's namespace).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from mptcpkit.abi.tcp_info import TCP_INFO_SIZE, decode_tcp_info
from mptcpkit.introspect import subflows as _subflows
from mptcpkit.lab.faults import Fault, Schedule
from mptcpkit.lab.netns import LabError
from mptcpkit.lab.topology import Host, Topology
from mptcpkit.status import status

PROTOCOLS = ("mptcp", "tcp")
_CHUNK = 128 * 1024
_POOL = 4 * 1024 * 1024
_RECV = 256 * 1024
# A link counts as "recovered" once goodput is back to this share of what the surviving
# links carried per link before the fault.
RECOVERY_SHARE = 0.8


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


def stream(seed: int, size: int = _CHUNK) -> Iterator[memoryview]:
    """The deterministic pseudo-random byte stream the sender writes, chunk by chunk.

    Chunks are slices at pseudo-random offsets of a pseudo-random pool: as unpredictable
    as the hash check needs, and free to produce (generating fresh random bytes would
    cost the sender more CPU than the network stack at a few hundred Mbit/s).
    """
    rng = random.Random(seed)
    pool = memoryview(rng.randbytes(_POOL))
    while True:
        offset = rng.randrange(0, _POOL - size)
        yield pool[offset : offset + size]


@dataclasses.dataclass
class _Sample:
    t: float
    received: int
    subflows: dict[str, int]
    links: dict[int, int]


@dataclasses.dataclass
class BenchResult:
    """What `run_bench` measured; `as_dict()` is the JSON that `lab bench --json` prints."""

    paths: int
    rate_mbit: float | None
    protocol: str
    duration_s: float
    requested_duration_s: float
    bytes: int
    bytes_sent: int
    goodput_mbit: float
    verified: bool
    sha256_sent: str
    sha256_received: str
    interval_s: float
    intervals: list[dict[str, Any]]
    subflows: list[dict[str, Any]]
    links: list[dict[str, Any]]
    faults: list[dict[str, Any]]
    lost_bytes: int
    recovery_s: float | None
    mptcp: bool
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def series(self) -> dict[str, Any]:
        """The time series a plot draws: t, total and per subflow (Mbit/s)."""
        t = [iv["t"] for iv in self.intervals]
        total = [iv["total_mbit"] for iv in self.intervals]
        per_subflow = {
            sf["key"]: [iv["subflows"].get(sf["key"], 0.0) for iv in self.intervals]
            for sf in self.subflows
        }
        return {"t": t, "total": total, "subflows": per_subflow}


def _subflow_key(local: tuple[str, int], remote: tuple[str, int]) -> str:
    def fmt(a: tuple[str, int]) -> str:
        host = f"[{a[0]}]" if ":" in a[0] else a[0]
        return f"{host}:{a[1]}"

    return f"{fmt(local)}->{fmt(remote)}"


def _sender_subflows(sock: socket.socket, mptcp: bool) -> dict[str, tuple[int, Any, Any]]:
    """key -> (bytes_acked, local, remote) of every subflow of the sending socket."""
    out: dict[str, tuple[int, Any, Any]] = {}
    if mptcp:
        for sf in _subflows(sock):
            out[_subflow_key(sf.local, sf.remote)] = (sf.bytes_acked or 0, sf.local, sf.remote)
        if out:
            return out
    # Plain TCP (or an MPTCP connection that fell back): the connection is the subflow.
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    info = decode_tcp_info(raw)
    local, remote = sock.getsockname()[:2], sock.getpeername()[:2]
    out[_subflow_key(local, remote)] = (info.bytes_acked or 0, local, remote)
    return out


def run_bench(
    net: Topology,
    *,
    duration: float = 10.0,
    protocol: str = "mptcp",
    interval: float = 0.5,
    faults: Iterable[Fault] = (),
    client: str = "client",
    server: str = "server",
    address: str | None = None,
    family: int = 4,
    seed: int = 1,
    on_sample: Callable[[dict[str, Any]], None] | None = None,
    timeout: float = 60.0,
) -> BenchResult:
    """Send for `duration` seconds from `client` to `server`, then verify and summarise.

    `address` defaults to the server's first address of `family`; plain TCP therefore
    uses link 0 only, MPTCP adds a subflow per client endpoint. Faults are applied at
    their moment counted from the start of the transfer.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: expected mptcp or tcp")
    if duration <= 0 or interval <= 0:
        raise ValueError("duration and interval must be more than 0")
    chost, shost = net.host(client), net.host(server)
    target = address or shost.address(family=family)
    fam = socket.AF_INET6 if ":" in target else socket.AF_INET
    proto = socket.IPPROTO_MPTCP if protocol == "mptcp" else 0
    schedule = Schedule(net, faults)
    link_of = {i.address(f): i.link.index for i in chost.interfaces for f in (4, 6)}

    with contextlib.ExitStack() as stack:
        with shost.enter():
            listener = stack.enter_context(socket.socket(fam, socket.SOCK_STREAM, proto))
        listener.bind((target, 0))
        listener.listen(1)
        listener.settimeout(timeout)
        with chost.enter():
            conn = stack.enter_context(socket.socket(fam, socket.SOCK_STREAM, proto))
        conn.settimeout(timeout)

        state = _Transfer(seed)
        # On the way out (normal or Ctrl-C), wake threads blocked in send/recv first.
        stack.callback(state.abort, conn)
        receiver = threading.Thread(
            target=state.receive, args=(listener,), name="lab-bench-recv", daemon=True
        )
        receiver.start()
        conn.connect((target, listener.getsockname()[1]))
        t0 = time.monotonic()
        sampler = _Sampler(state, conn, proto == socket.IPPROTO_MPTCP, chost, interval, t0)
        sampler.on_sample = on_sample
        sampler_thread = chost.thread(sampler.run, name="lab-bench-sample")
        stack.callback(sampler.stop_and_join, sampler_thread)
        # The first sample is the baseline: nothing may be sent before it.
        if not sampler.ready.wait(timeout):
            raise LabError("bench: the sampler did not start")
        schedule.start(t0)
        stack.callback(schedule.stop)
        sender = threading.Thread(
            target=state.send, args=(conn, t0 + duration), name="lab-bench-send", daemon=True
        )
        sender.start()
        _join(sender, timeout + duration)
        _join(receiver, timeout)
        end = state.finished_at or time.monotonic()
        sampler.stop_and_join(sampler_thread)
        schedule.stop()
        mptcp_on = status(conn).is_mptcp if proto else False

    if state.error is None and receiver.is_alive():
        state.error = "the receiver did not finish in time"
    elapsed = max(end - t0, 1e-9)
    rate_bps = net.link(0).rate_bps if net.links else None
    paths = len([lk for lk in net.links if chost in lk.hosts])
    intervals, subflow_rows = _series(sampler.samples, link_of)
    applied = [a.as_dict() for a in schedule.applied]
    result = BenchResult(
        paths=paths,
        rate_mbit=rate_bps / 1e6 if rate_bps else None,
        protocol=protocol,
        duration_s=round(elapsed, 4),
        requested_duration_s=duration,
        bytes=state.received,
        bytes_sent=state.sent,
        goodput_mbit=state.received * 8 / elapsed / 1e6,
        verified=state.error is None
        and state.sent == state.received
        and state.tx_hash.hexdigest() == state.rx_hash.hexdigest(),
        sha256_sent=state.tx_hash.hexdigest(),
        sha256_received=state.rx_hash.hexdigest(),
        interval_s=interval,
        intervals=intervals,
        subflows=subflow_rows,
        links=[
            {
                "index": lk.index,
                "rate_mbit": (lk.rate_bps or 0) / 1e6 or None,
                "client_dev": lk.iface(chost).name,
                "client_address": lk.iface(chost).address(4 if fam == socket.AF_INET else 6),
                "bytes": sum(iv["link_bytes"].get(str(lk.index), 0) for iv in intervals),
            }
            for lk in net.links
            if chost in lk.hosts
        ],
        faults=applied,
        lost_bytes=state.sent - state.received,
        recovery_s=recovery_time(intervals, applied, paths),
        mptcp=mptcp_on,
        error=state.error,
    )
    return result


def _join(thread: threading.Thread, timeout: float) -> None:
    # Short joins keep the main thread responsive to Ctrl-C.
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.2)


class _Transfer:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.sent = 0
        self.received = 0
        self.tx_hash = hashlib.sha256()
        self.rx_hash = hashlib.sha256()
        self.error: str | None = None
        self.finished_at: float | None = None
        self.peer: socket.socket | None = None

    def abort(self, conn: socket.socket) -> None:
        for sock in (conn, self.peer):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def send(self, conn: socket.socket, deadline: float) -> None:
        try:
            for chunk in stream(self.seed):
                if time.monotonic() >= deadline:
                    break
                self.tx_hash.update(chunk)
                conn.sendall(chunk)
                self.sent += len(chunk)
            conn.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.error = self.error or f"sender: {exc}"

    def receive(self, listener: socket.socket) -> None:
        try:
            peer, _ = listener.accept()
            self.peer = peer
            with peer:
                peer.settimeout(listener.gettimeout())
                buf = bytearray(_RECV)
                view = memoryview(buf)
                while n := peer.recv_into(buf):
                    self.rx_hash.update(view[:n])
                    self.received += n
                self.finished_at = time.monotonic()
        except OSError as exc:
            self.error = self.error or f"receiver: {exc}"


class _Sampler:
    def __init__(
        self,
        state: _Transfer,
        conn: socket.socket,
        mptcp: bool,
        host: Host,
        interval: float,
        t0: float,
    ) -> None:
        self.state = state
        self.conn = conn
        self.mptcp = mptcp
        self.devs = {i.name: i.link.index for i in host.interfaces}
        self.interval = interval
        self.t0 = t0
        self.samples: list[_Sample] = []
        self.subflow_addrs: dict[str, tuple[Any, Any]] = {}
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.on_sample: Callable[[dict[str, Any]], None] | None = None

    def take(self) -> None:
        sfs: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for key, (acked, local, remote) in _sender_subflows(self.conn, self.mptcp).items():
                sfs[key] = acked
                self.subflow_addrs.setdefault(key, (local, remote))
        received = self.state.received
        t = time.monotonic() - self.t0
        counters = read_net_dev()
        links = {
            idx: counters[dev]["tx_bytes"] for dev, idx in self.devs.items() if dev in counters
        }
        self.samples.append(_Sample(t, received, sfs, links))
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


def _series(
    samples: list[_Sample], link_of: dict[str, int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    intervals: list[dict[str, Any]] = []
    totals: dict[str, int] = {}
    addrs: dict[str, tuple[str, str]] = {}
    for prev, cur in itertools.pairwise(samples):
        dt = cur.t - prev.t
        if dt <= 0:
            continue
        per_sf = {}
        for key, acked in cur.subflows.items():
            delta = acked - prev.subflows.get(key, 0)
            per_sf[key] = round(max(delta, 0) * 8 / dt / 1e6, 4)
            totals[key] = max(totals.get(key, 0), acked)
            local, _, remote = key.partition("->")
            addrs[key] = (local, remote)
        link_bytes = {
            str(idx): cur.links[idx] - prev.links.get(idx, cur.links[idx]) for idx in cur.links
        }
        intervals.append(
            {
                "t": round(cur.t, 4),
                "dt": round(dt, 4),
                "bytes": cur.received - prev.received,
                "total_mbit": round((cur.received - prev.received) * 8 / dt / 1e6, 4),
                "subflows": per_sf,
                "links": {idx: round(b * 8 / dt / 1e6, 4) for idx, b in link_bytes.items()},
                "link_bytes": link_bytes,
            }
        )
    rows = []
    for key, acked in totals.items():
        local, remote = addrs[key]
        host = local.rsplit(":", 1)[0].strip("[]")
        rows.append(
            {
                "key": key,
                "local": local,
                "remote": remote,
                "link": link_of.get(host),
                "bytes_acked": acked,
            }
        )
    rows.sort(key=lambda r: (r["link"] if r["link"] is not None else 999, r["key"]))
    return intervals, rows


def recovery_time(
    intervals: list[dict[str, Any]], faults: list[dict[str, Any]], paths: int
) -> float | None:
    """Seconds from the first link-down fault until goodput is back to the surviving share.

    "Back" = an interval (starting after the fault) whose goodput reaches RECOVERY_SHARE
    of the pre-fault goodput scaled to the links still up ((N-1)/N for one link of N).
    Resolution: one interval (the end of the first good interval counts). None when there
    was no down fault, not enough data before it, or no recovery.
    """
    downs = [f for f in faults if f.get("action") == "down" and not f.get("error")]
    if not downs or paths < 2:
        return None
    t_fault = float(downs[0]["t"])
    before = [iv for iv in intervals if iv["t"] <= t_fault and iv["t"] - iv["dt"] >= 0.5]
    if not before:
        before = [iv for iv in intervals if iv["t"] <= t_fault]
    if not before:
        return None
    pre = sum(iv["bytes"] for iv in before) / sum(iv["dt"] for iv in before)
    target = pre * (paths - 1) / paths * RECOVERY_SHARE
    for iv in intervals:
        if iv["t"] - iv["dt"] >= t_fault - 1e-9 and iv["bytes"] / iv["dt"] >= target:
            return round(float(iv["t"]) - t_fault, 4)
    return None


__all__ = ["PROTOCOLS", "BenchResult", "LabError", "read_net_dev", "recovery_time", "run_bench"]
