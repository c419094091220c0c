"""A bulk transfer across the lab, measured per interval, per subflow and per link.

`run_bench` sets up the connections, runs verified transfers (transfer.py: equal
SHA-256 and byte counts prove nothing was lost, duplicated or reordered end to end,
faults or not) while a sampler reads every `interval` (sampler.py: goodput, each
subflow's `bytes_acked`, the client's link counters), applies the faults on schedule,
and summarises what the samples say (series.py) and what the run promised (verdict.py)"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from mptcpkit.lab import congestion as cc
from mptcpkit.lab.faults import Fault, Schedule
from mptcpkit.lab.host import Host
from mptcpkit.lab.mib import Memory, delta, read_mib, read_sockstat, read_tcp_mem
from mptcpkit.lab.netns import LabError
from mptcpkit.lab.sampler import Sampler
from mptcpkit.lab.scenario import filter_counters, qdisc_drops
from mptcpkit.lab.series import recovery_time, series, steady_rate
from mptcpkit.lab.topology import Topology
from mptcpkit.lab.transfer import Transfer, accept_all, join
from mptcpkit.lab.verdict import judge, promise
from mptcpkit.status import status

PROTOCOLS = ("mptcp", "tcp")


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
    qdisc_drops: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    scenario: dict[str, Any] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    # The algorithm each end used, read back from its socket (TCP_CONGESTION), and the
    # share of the segments the client sent that were retransmissions: TcpRetransSegs /
    # (TcpOutSegs + TcpRetransSegs), since TcpOutSegs leaves retransmissions out (RFC 1213
    # tcpOutSegs; the kernel counts a segment there only if it carries new data or none).
    congestion: dict[str, str | None] = dataclasses.field(default_factory=dict)
    retrans_share: float | None = None

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
    fastclose_grace: float = 5.0,
    congestion: str | None = None,
) -> BenchResult:
    """Send for `duration` seconds from `client` to `server`, then verify and summarise.

    `address` defaults to the server's first address of `family`; plain TCP therefore
    uses link 0 only, MPTCP adds a subflow per endpoint. The listener binds the wildcard
    address, so joins to addresses the server announces (signal endpoints) are accepted.
    Faults are applied at their moment counted from the start of the transfer. `flows`
    connections run at once (each verified); `fastclose` ends each with SO_LINGER 0, an
    MP_FASTCLOSE, instead of a clean shutdown, once what was sent is acknowledged (at most
    5 s; a RST is not retransmitted, and one racing lost data is ignored by the server);
    the server must then see the reset within `fastclose_grace` seconds. `scenario`
    (what `mptcpkit.lab.scenario` set up: "strip_mptcp", "backup", ...) shapes the promise
    `claim` checks. `congestion` names the TCP congestion control both ends use (set on
    the listener and on each client socket, as `iperf3 -C`; MPTCP subflows follow), None
    the namespaces' default; a name the kernel refuses raises ValueError before any
    socket is made.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: expected mptcp or tcp")
    if duration <= 0 or interval <= 0:
        raise ValueError("duration and interval must be more than 0")
    if flows < 1:
        raise ValueError(f"flows {flows!r}: expected 1 or more")
    if congestion is not None:
        cc.check(congestion)
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
    transfers = [Transfer(seed + k, fastclose=fastclose) for k in range(flows)]

    with contextlib.ExitStack() as stack:
        with shost.enter():
            listener = stack.enter_context(socket.socket(fam, socket.SOCK_STREAM, proto))
        if congestion is not None:
            cc.choose(listener, congestion)  # the accepted sockets inherit it
        listener.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", 0))
        listener.listen(flows)
        listener.settimeout(timeout)
        conns = []
        for _ in range(flows):
            with chost.enter():
                conn = stack.enter_context(socket.socket(fam, socket.SOCK_STREAM, proto))
            if congestion is not None:
                cc.choose(conn, congestion)
            conn.settimeout(timeout)
            conns.append(conn)
        for state, conn in zip(transfers, conns, strict=True):
            # On the way out (normal or Ctrl-C), wake threads blocked in send/recv first.
            stack.callback(state.abort, conn)
        receiver = threading.Thread(
            target=accept_all, args=(listener, transfers), name="lab-bench-recv", daemon=True
        )
        receiver.start()
        for conn in conns:
            conn.connect((target, listener.getsockname()[1]))
        # Known after the handshake (a fastclose closes the sockets before the end).
        mptcp_flags = [status(c).is_mptcp if proto else False for c in conns]
        client_cc = _one(cc.of(c) for c in conns)
        t0 = time.monotonic()
        sampler = Sampler(transfers, conns, proto == socket.IPPROTO_MPTCP, chost, interval, t0)
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
            join(sender, timeout + duration)
        if fastclose:
            # A lost MP_FASTCLOSE is never sent again: the server would wait forever.
            join(receiver, fastclose_grace)
            for state in transfers:
                if state.closed_at is not None and state.finished_at is None:
                    state.give_up(
                        f"the server saw no reset within {fastclose_grace:g} s of the MP_FASTCLOSE"
                    )
        join(receiver, timeout)
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
    drops = {h.name: d for h in (chost, shost) if (d := qdisc_drops(h))}
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
    intervals, subflow_rows = series(sampler.samples, link_of)
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
        unsettled = [
            f"flow {k}: {s.unacked_at_close or 0} bytes unacknowledged, "
            f"{s.subflows_unsettled_at_close or 0} subflow(s) holding data"
            for k, s in enumerate(transfers)
            if s.closed_at is not None and (s.unacked_at_close or s.subflows_unsettled_at_close)
        ]
        if unsettled:
            warnings.append(
                f"fastclose: aborted before all that was sent was acknowledged (waited "
                f"{transfers[0].drain_timeout:g} s): {'; '.join(unsettled)}; the RST of a "
                "subflow whose data was lost on the way may be ignored (RFC 5961 3.2)"
            )
        closed = mib[chost.name].get("MPTcpExtMPFastcloseTx", 0)
        seen = mib[shost.name].get("MPTcpExtMPFastcloseRx", 0)
        if proto and (closed < flows or seen < flows):
            verdict.ok = False
            unacked = [s.unacked_at_close for s in transfers]
            verdict.reasons.append(
                f"MP_FASTCLOSE: {closed} sent by the client, {seen} received by the server, "
                f"for {flows} connection(s)"
                + _challenged(mib[shost.name], drops.get(chost.name, {}))
                + (f"; bytes unacknowledged at the close: {unacked}" if any(unacked) else "")
            )
    elif any(a["action"] == "rst" and "error" not in a for a in applied):
        sent_rst = mib[chost.name].get("MPTcpExtMPRstTx", 0)
        took = mib[shost.name].get("MPTcpExtMPRstRx", 0)
        if took < sent_rst:
            warnings.append(
                f"rst: the server took {took} of the {sent_rst} subflow resets (MP_TCPRST) "
                "the client sent" + _challenged(mib[shost.name], drops.get(chost.name, {}))
            )
    if proto and not mptcp_on and not want.fallback:
        warnings.append("MPTCP was asked for, but the connection fell back to TCP")
    filters = {h.name: c for h in net.hosts if (c := filter_counters(h))}
    known = [r for r in rates if r]
    sum_rate = sum(known) if len(known) == len(rates) and rates else None
    goodput = received * 8 / elapsed
    steady = steady_rate(intervals, duration)
    out_segs = mib[chost.name].get("TcpOutSegs", 0)
    retrans_segs = mib[chost.name].get("TcpRetransSegs", 0)
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
        qdisc_drops=drops,
        scenario={**scenario, "flows": flows, "fastclose": fastclose},
        warnings=warnings,
        congestion={"client": client_cc, "server": _one(s.peer_congestion for s in transfers)},
        retrans_share=round(retrans_segs / (out_segs + retrans_segs), 4)
        if out_segs + retrans_segs > 0
        else None,
    )


def _one(names: Iterable[str | None]) -> str | None:
    """The algorithm of one end's sockets: one name, or each distinct one, comma-separated."""
    seen = list(dict.fromkeys(n for n in names if n))
    return ",".join(seen) or None


def _challenged(server_mib: dict[str, int], client_drops: dict[str, int]) -> str:
    """Why a server ignores RSTs that reached it, when its counters say so (RFC 5961 3.2)."""
    challenged = server_mib.get("TcpExtTCPChallengeACK", 0)
    skipped = server_mib.get("TcpExtTCPACKSkippedChallenge", 0)
    if not challenged and not skipped:
        return ""
    dropped = sum(client_drops.values())
    return (
        f"; the server answered RSTs with {challenged} challenge ACK(s) "
        f"({skipped} more rate-limited): RFC 5961 3.2, a RST whose sequence number is not "
        "the next one expected, as when data sent before it was lost on the link "
        f"(the client's qdiscs dropped {dropped} packets); the plain RST that answers a "
        "challenge closes a subflow without MPTCP's reason"
    )


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


__all__ = ["PROTOCOLS", "BenchResult", "LabError", "run_bench"]
