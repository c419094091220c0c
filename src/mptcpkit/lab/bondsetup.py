"""Connection setup through the converter pair, in WAN round trips.

Issue 16's target: the pair adds at most one WAN round trip to a connection's setup,
none with TCP Fast Open. This kernel has no netem, so the uplinks get their delay
from `wandelay` (NFQUEUE, `delay` each way: a WAN round trip of 2 x delay), and the
time that counts is the one the destination sees: from the client's connect() to the
destination reading the client's first byte. It is measured three ways on the same
lab, one after the other:

- direct: plain TCP from the client to the destination, routed across uplink 1 (the
  site gateway not intercepting);
- through the pair (the site gateway's MPTCP connect, then the Connect TLV);
- through the pair with TFO (a warm-up connection first, for the cookie: then the
  Connect TLV and the client's first bytes ride the SYN).

Each is the median of `tries` connections, in round trips (time / WAN RTT); what the
pair adds is the difference to direct. `measure()` checks its own numbers: direct TCP
must take at least one round trip (else the delay did not apply) and each path must
answer every try.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mptcpkit.lab import bonding as bl
from mptcpkit.lab.host import Host
from mptcpkit.lab.netns import LabError
from mptcpkit.lab.topology import Topology
from mptcpkit.lab.wandelay import wan_delay

__all__ = ["DELAY", "PORT", "clear_intercept", "measure"]

DELAY = 0.025  # seconds each way on the uplinks: a 50 ms WAN round trip
PORT = 8090  # the first-byte server, inside the lab's own namespaces


def clear_intercept(site: Host) -> None:
    """Undo `bonding.intercept` (rules and tproxy routing) in the site's namespace."""
    site.run("nft delete table inet mptcpkit_bond 2>/dev/null; true")
    for fam in ("-4", "-6"):
        site.run(f"ip {fam} rule del pref 233 2>/dev/null; ip {fam} route flush table 233; true")


@contextlib.contextmanager
def _first_byte_server(host: Host, port: int) -> Iterator[list[float]]:
    """On `host` (all addresses): note when each connection's first byte arrives
    (CLOCK_MONOTONIC, one clock for every namespace), answer one byte, close."""
    arrivals: list[float] = []
    stop = threading.Event()
    ready = threading.Event()

    def serve() -> None:
        ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        with ls:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            ls.bind(("::", port))
            ls.listen(64)
            ls.settimeout(0.1)
            ready.set()
            while not stop.is_set():
                try:
                    c, _ = ls.accept()
                except TimeoutError:
                    continue
                with c:
                    c.settimeout(10)
                    try:
                        if c.recv(1):
                            arrivals.append(time.monotonic())
                            c.sendall(b"y")
                    except OSError:
                        continue

    t = host.thread(serve)
    if not ready.wait(10):
        raise LabError(f"the first-byte server on {host.name} did not start")
    try:
        yield arrivals
    finally:
        stop.set()
        t.join(5)


def _probe(dest: str, port: int) -> float:
    """Connect as an unmodified client, send one byte, wait for the answer; when it began."""
    family = socket.AF_INET6 if ":" in dest else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        t0 = time.monotonic()
        s.connect((dest, port))
        s.sendall(b"x")
        if s.recv(1) != b"y":
            raise OSError(f"no answer from {dest}:{port}")
        return t0


def _times(client: Host, arrivals: list[float], dest: str, tries: int, warm: int) -> list[float]:
    """Seconds from connect() to the destination's first byte, `tries` times (after
    `warm` connections that are not counted: neighbours, TFO cookie)."""
    out = []
    for i in range(warm + tries):
        before = len(arrivals)
        t0 = client.call(_probe, dest, PORT)
        if len(arrivals) != before + 1:
            raise LabError(f"the destination did not see connection {i + 1} to {dest}")
        if i >= warm:
            out.append(arrivals[-1] - t0)
        time.sleep(0.05)
    return out


def measure(
    topo: Topology,
    workdir: Path,
    *,
    mode: str = "redirect",
    encoding: str = "convert",
    delay: float = DELAY,
    tries: int = 5,
) -> dict[str, Any]:
    """Setup round trips: direct, through the pair, through the pair with TFO. The
    topology's gateways must not be running (this starts its own, twice)."""
    site, remote = topo.host("site"), topo.host("remote")
    client, internet = topo.host("client"), topo.host("internet")
    ups = [link for link in topo.links if set(link.hosts) == {site, remote}]
    dest = bl.DESTINATIONS[0]
    rtt = 2 * delay
    clear_intercept(site)
    times: dict[str, list[float]] = {}
    with (
        _first_byte_server(internet, PORT) as arrivals,
        wan_delay(site, [link.iface(site).name for link in ups], delay) as delayer,
    ):
        via = ups[0].iface(remote).address(4)
        site.run(["ip", "route", "add", "10.200.0.0/24", "via", via])  # direct, for once
        try:
            times["direct"] = _times(client, arrivals, dest, tries, warm=1)
        finally:
            site.run(["ip", "route", "del", "10.200.0.0/24", "via", via], check=False)
        for name, tfo in (("pair", False), ("pair_tfo", True)):
            gw = bl.start_gateways(topo, workdir, mode=mode, encoding=encoding, tfo=tfo)
            try:
                times[name] = _times(client, arrivals, dest, tries, warm=2 if tfo else 1)
            finally:
                gw.site.stop()
                gw.remote.stop()
                clear_intercept(site)
        held = delayer.held
    rt = {name: statistics.median(ts) / rtt for name, ts in times.items()}
    if rt["direct"] < 1.0:
        raise LabError(
            f"direct TCP took {rt['direct']:.2f} WAN round trips, less than its handshake:"
            f" the {delay * 1000:g} ms delay on the uplinks did not apply"
        )
    added = round(rt["pair"] - rt["direct"], 1) + 0.0  # no "-0.0"
    added_tfo = round(rt["pair_tfo"] - rt["direct"], 1) + 0.0
    return {
        "wan_rtt_ms": rtt * 1000,
        "tries": tries,
        "packets_delayed": held,
        "direct_rtts": round(rt["direct"], 2),
        "pair_rtts": round(rt["pair"], 2),
        "pair_tfo_rtts": round(rt["pair_tfo"], 2),
        "added_rtts": added,
        "added_tfo_rtts": added_tfo,
        # whole round trips: a fraction is the lab's own processing, not a WAN exchange
        "target_met": round(added) <= 1 and round(added_tfo) <= 0,
        "times_ms": {name: [round(t * 1000, 1) for t in ts] for name, ts in times.items()},
    }
