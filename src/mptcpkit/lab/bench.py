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
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from mptcpkit.abi.tcp_info import TCP_INFO_SIZE, decode_tcp_info
from mptcpkit.introspect import subflows as _subflows
from mptcpkit.lab.faults import Fault, Schedule
from mptcpkit.lab.mib import Memory, delta, read_mib, read_sockstat, read_tcp_mem
from mptcpkit.lab.netns import LabError
from mptcpkit.lab.scenario import filter_counters
from mptcpkit.lab.topology import Host, Topology
from mptcpkit.lab.verdict import judge, promise
from mptcpkit.status import status

PROTOCOLS = ("mptcp", "tcp")
_CHUNK = 128 * 1024
_POOL = 4 * 1024 * 1024
_RECV = 256 * 1024
# A link counts as "recovered" once goodput is back to this share of what the surviving
# links carried per link before the fault.
RECOVERY_SHARE = 0.8
# "Steady" goodput leaves out the first second (slow start, joins) and the final drain.
WARMUP_S = 1.0


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
    rate_mbit: float | None  # the rate every link shares (client->server), else None
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
    rates_mbit: list[float | None] = dataclasses.field(default_factory=list)
    sum_rate_mbit: float | None = None
    share_of_sum: float | None = None
    steady_mbit: float | None = None
    steady_share_of_sum: float | None = None
    family: int = 4
    flows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    claim: dict[str, Any] = dataclasses.field(default_factory=dict)
    mib: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    memory: dict[str, Any] = dataclasses.field(default_factory=dict)
    filters: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    scenario: dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Verified, and the run used the paths it promised (see `claim`)."""
        return self.verified and bool(self.claim.get("ok", True))

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


def stream_digest(seed: int, nbytes: int) -> str:
    """SHA-256 of the first `nbytes` of `stream(seed)`: what a receiver cut short should hold."""
    return prefix_digest(stream(seed), nbytes)


def prefix_digest(chunks: Iterable[bytes | memoryview], nbytes: int) -> str:
    """SHA-256 of the first `nbytes` of an endless stream of chunks."""
    digest = hashlib.sha256()
    left = nbytes
    for chunk in chunks:
        if left <= 0:
            break
        part = chunk[:left]
        digest.update(part)
        left -= len(part)
    return digest.hexdigest()


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
    flows: int = 1,
    fastclose: bool = False,
    scenario: dict[str, Any] | None = None,
) -> BenchResult:
    """Send for `duration` seconds from `client` to `server`, then verify and summarise.

    `address` defaults to the server's first address of `family`; plain TCP therefore
    uses link 0 only, MPTCP adds a subflow per endpoint. The listener binds the wildcard
    address, so joins to addresses the server announces (signal endpoints) are accepted.
    Faults are applied at their moment counted from the start of the transfer. `flows`
    connections run at once (each verified); `fastclose` ends each with SO_LINGER 0, an
    MP_FASTCLOSE, instead of a clean shutdown. `scenario` (what `mptcpkit.lab.scenario`
    set up: "strip_mptcp", "backup", ...) shapes the promise `claim` checks.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: expected mptcp or tcp")
    if duration <= 0 or interval <= 0:
        raise ValueError("duration and interval must be more than 0")
    if flows < 1:
        raise ValueError(f"flows {flows!r}: expected 1 or more")
    scenario = dict(scenario or {})
    chost, shost = net.host(client), net.host(server)
    target = address or shost.address(family=family)
    fam = socket.AF_INET6 if ":" in target else socket.AF_INET
    proto = socket.IPPROTO_MPTCP if protocol == "mptcp" else 0
    faults = list(faults)
    schedule = Schedule(net, faults)
    link_of = {i.address(f): i.link.index for i in chost.interfaces for f in (4, 6)}
    tcp_mem = read_tcp_mem()
    sockstat_before = read_sockstat()
    mib_before = {h.name: h.call(read_mib) for h in (chost, shost)}
    transfers = [_Transfer(seed + k, fastclose=fastclose) for k in range(flows)]

    with contextlib.ExitStack() as stack:
        with shost.enter():
            listener = stack.enter_context(socket.socket(fam, socket.SOCK_STREAM, proto))
        listener.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", 0))
        listener.listen(flows)
        listener.settimeout(timeout)
        conns = []
        for _ in range(flows):
            with chost.enter():
                conn = stack.enter_context(socket.socket(fam, socket.SOCK_STREAM, proto))
            conn.settimeout(timeout)
            conns.append(conn)
        for state, conn in zip(transfers, conns, strict=True):
            # On the way out (normal or Ctrl-C), wake threads blocked in send/recv first.
            stack.callback(state.abort, conn)
        receiver = threading.Thread(
            target=_accept_all, args=(listener, transfers), name="lab-bench-recv", daemon=True
        )
        receiver.start()
        for conn in conns:
            conn.connect((target, listener.getsockname()[1]))
        # Known after the handshake (a fastclose closes the sockets before the end).
        mptcp_flags = [status(c).is_mptcp if proto else False for c in conns]
        t0 = time.monotonic()
        sampler = _Sampler(transfers, conns, proto == socket.IPPROTO_MPTCP, chost, interval, t0)
        sampler.on_sample = on_sample
        sampler_thread = chost.thread(sampler.run, name="lab-bench-sample")
        stack.callback(sampler.stop_and_join, sampler_thread)
        # The first sample is the baseline: nothing may be sent before it.
        if not sampler.ready.wait(timeout):
            raise LabError("bench: the sampler did not start")
        schedule.start(t0)
        stack.callback(schedule.stop)
        senders = [
            threading.Thread(
                target=state.send, args=(conn, t0 + duration), name="lab-bench-send", daemon=True
            )
            for state, conn in zip(transfers, conns, strict=True)
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            _join(sender, timeout + duration)
        _join(receiver, timeout)
        ends = [s.finished_at for s in transfers if s.finished_at is not None]
        end = max(ends) if len(ends) == flows else time.monotonic()
        sampler.stop_and_join(sampler_thread)
        schedule.stop()
        for k, conn in enumerate(conns):
            # A fallback can also happen later (RFC 8684 3.7: infinite mapping).
            with contextlib.suppress(OSError):
                mptcp_flags[k] = mptcp_flags[k] and status(conn).is_mptcp

    for state in transfers:
        if state.error is None and state.finished_at is None:
            state.error = "the receiver did not finish in time"
    mib_after = {h.name: h.call(read_mib) for h in (chost, shost)}
    mib = {name: delta(mib_before[name], mib_after[name]) for name in mib_after}
    memory = Memory(
        tcp_mem=tcp_mem,
        peak_pages=sampler.peak_tcp_pages,
        pressures={name: d.get("TcpExtTCPMemoryPressures", 0) for name, d in mib.items()},
        sockstat_before=sockstat_before,
        sockstat_after=read_sockstat(),
    )
    elapsed = max(end - t0, 1e-9)
    client_links = [lk for lk in net.links if chost in lk.hosts]
    paths = len(client_links)
    rates = [lk.iface(chost).rate_bps for lk in client_links]
    intervals, subflow_rows = _series(sampler.samples, link_of)
    applied = [a.as_dict() for a in schedule.applied]
    received = sum(s.received for s in transfers)
    sent = sum(s.sent for s in transfers)
    flow_rows = [s.summary(elapsed) for s in transfers]
    mptcp_on = all(mptcp_flags) and bool(proto)
    want = promise(
        protocol=protocol,
        links=paths,
        endpoint_links=_endpoint_links(chost, shost, link_of),
        backup_links=scenario.get("backup", ()),
        faults=[*applied, *(f.as_dict() for f in faults if f.at <= 0)],
        strip_mptcp=bool(scenario.get("strip_mptcp")),
    )
    warnings = []
    memory_warning = memory.warning()
    if memory_warning:
        warnings.append(memory_warning)
    verdict = judge(want, subflow_rows, mptcp=mptcp_on, memory_warning=memory_warning)
    if fastclose:
        closed = mib[chost.name].get("MPTcpExtMPFastcloseTx", 0)
        seen = mib[shost.name].get("MPTcpExtMPFastcloseRx", 0)
        if proto and (closed < flows or seen < flows):
            verdict.ok = False
            verdict.reasons.append(
                f"MP_FASTCLOSE: {closed} sent by the client, {seen} received by the server, "
                f"for {flows} connection(s)"
            )
    if proto and not mptcp_on and not want.fallback:
        warnings.append("MPTCP was asked for, but the connection fell back to TCP")
    filters = {h.name: c for h in net.hosts if (c := filter_counters(h))}
    known = [r for r in rates if r]
    sum_rate = sum(known) if len(known) == len(rates) and rates else None
    goodput = received * 8 / elapsed
    steady = steady_rate(intervals, duration)
    return BenchResult(
        paths=paths,
        rate_mbit=rates[0] / 1e6 if rates and rates[0] and len(set(rates)) == 1 else None,
        protocol=protocol,
        duration_s=round(elapsed, 4),
        requested_duration_s=duration,
        bytes=received,
        bytes_sent=sent,
        goodput_mbit=goodput / 1e6,
        verified=all(s.verified for s in transfers),
        sha256_sent=transfers[0].tx_hash.hexdigest(),
        sha256_received=transfers[0].rx_hash.hexdigest(),
        interval_s=interval,
        intervals=intervals,
        subflows=subflow_rows,
        links=[
            {
                "index": lk.index,
                "rate_mbit": (lk.iface(chost).rate_bps or 0) / 1e6 or None,
                "rate_back_mbit": (lk.iface(chost).peer.rate_bps or 0) / 1e6 or None,
                "client_dev": lk.iface(chost).name,
                "client_address": lk.iface(chost).address(4 if fam == socket.AF_INET else 6),
                "bytes": sum(iv["link_bytes"].get(str(lk.index), 0) for iv in intervals),
            }
            for lk in client_links
        ],
        faults=applied,
        lost_bytes=0 if fastclose else sent - received,
        recovery_s=recovery_time(intervals, applied, paths),
        mptcp=mptcp_on,
        error=next((s.error for s in transfers if s.error), None),
        rates_mbit=[r / 1e6 if r else None for r in rates],
        sum_rate_mbit=sum_rate / 1e6 if sum_rate else None,
        share_of_sum=round(goodput / sum_rate, 4) if sum_rate else None,
        steady_mbit=round(steady / 1e6, 4) if steady is not None else None,
        steady_share_of_sum=round(steady / sum_rate, 4) if sum_rate and steady else None,
        family=6 if fam == socket.AF_INET6 else 4,
        flows=flow_rows,
        claim=verdict.as_dict(),
        mib=mib,
        memory=memory.as_dict(),
        filters=filters,
        scenario={**scenario, "flows": flows, "fastclose": fastclose},
        warnings=warnings,
    )


def steady_rate(intervals: list[dict[str, Any]], duration: float) -> float | None:
    """Goodput (bit/s) of the intervals after WARMUP_S and before `duration`, None if none."""
    ivs = [iv for iv in intervals if iv["t"] - iv["dt"] >= WARMUP_S and iv["t"] <= duration]
    seconds = sum(iv["dt"] for iv in ivs)
    return sum(iv["bytes"] for iv in ivs) * 8 / seconds if seconds else None


def _endpoint_links(client: Host, server: Host, link_of: dict[str, int]) -> set[int]:
    """Links with a client subflow endpoint or a server signal endpoint."""
    links = set()
    for ep in client.endpoints():
        if ep.get("subflow") and ep.get("address") in link_of:
            links.add(link_of[ep["address"]])
    server_link = {i.address(f): i.link.index for i in server.interfaces for f in (4, 6)}
    for ep in server.endpoints():
        if ep.get("signal") and ep.get("address") in server_link:
            links.add(server_link[ep["address"]])
    return links


def _join(thread: threading.Thread, timeout: float) -> None:
    # Short joins keep the main thread responsive to Ctrl-C.
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.2)


def _accept_all(listener: socket.socket, transfers: list[_Transfer]) -> None:
    """Accept one connection per transfer and receive each in its own thread."""
    threads = []
    for state in transfers:
        try:
            peer, _ = listener.accept()
        except OSError as exc:
            state.error = state.error or f"receiver: {exc}"
            break
        t = threading.Thread(target=state.receive, args=(peer, listener.gettimeout()))
        t.daemon = True
        t.start()
        threads.append(t)
    for t in threads:
        _join(t, (listener.gettimeout() or 60.0) * 2)


class _Transfer:
    def __init__(self, seed: int, *, fastclose: bool = False) -> None:
        self.seed = seed
        self.fastclose = fastclose
        self.sent = 0
        self.received = 0
        self.tx_hash = hashlib.sha256()
        self.rx_hash = hashlib.sha256()
        self.error: str | None = None
        self.reset = False
        self.finished_at: float | None = None
        self.peer: socket.socket | None = None

    @property
    def verified(self) -> bool:
        if self.error is not None:
            return False
        if self.fastclose:
            # Cut short on purpose: what arrived must be an intact prefix of what was sent.
            return self.reset and self.rx_hash.hexdigest() == stream_digest(
                self.seed, self.received
            )
        return self.sent == self.received and self.tx_hash.digest() == self.rx_hash.digest()

    def summary(self, elapsed: float) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "bytes": self.received,
            "bytes_sent": self.sent,
            "goodput_mbit": round(self.received * 8 / elapsed / 1e6, 4),
            "verified": self.verified,
            "reset": self.reset,
            "error": self.error,
        }

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
            if self.fastclose:
                # Linger 0: close() aborts the connection, which MPTCP signals with
                # MP_FASTCLOSE on every subflow.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            else:
                conn.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.error = self.error or f"sender: {exc}"

    def receive(self, peer: socket.socket, timeout: float | None) -> None:
        self.peer = peer
        try:
            with peer:
                peer.settimeout(timeout)
                buf = bytearray(_RECV)
                view = memoryview(buf)
                while n := peer.recv_into(buf):
                    self.rx_hash.update(view[:n])
                    self.received += n
                self.finished_at = time.monotonic()
        except ConnectionResetError as exc:
            self.finished_at = time.monotonic()
            self.reset = True
            if not self.fastclose:
                self.error = self.error or f"receiver: {exc}"
        except OSError as exc:
            self.error = self.error or f"receiver: {exc}"


class _Sampler:
    def __init__(
        self,
        transfers: list[_Transfer],
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
        self.samples: list[_Sample] = []
        self.subflow_addrs: dict[str, tuple[Any, Any]] = {}
        self.peak_tcp_pages = 0
        self._stop = threading.Event()
        self.ready = threading.Event()
        self.on_sample: Callable[[dict[str, Any]], None] | None = None

    def take(self) -> None:
        sfs: dict[str, int] = {}
        for conn in self.conns:
            with contextlib.suppress(OSError, ValueError):
                for key, (acked, local, remote) in _sender_subflows(conn, self.mptcp).items():
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
