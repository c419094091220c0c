"""Core library costs on loopback, measured side by side in one run.

    python3 benchmarks/core_bench.py [--connections 2000] [--rounds 7]

Prints connect latency of `mptcpkit.create_connection` against a bare
`socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP)` + `connect()` (the library's own
overhead: target <= 1.05x), plain TCP for information, and the cost of `status()`
(target < 2 us), `info()` and `subflows()`. Contenders alternate within each round, and
the median over rounds is reported, so drift on a shared machine hits all alike.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import mptcpkit

Connect = Callable[[tuple[str, int]], socket.socket]
# Close with RST: client-side TIME_WAIT would use up ephemeral ports over ~50k connects
# and make whoever runs later pay for the port search.
_ABORT = struct.pack("ii", 1, 0)


def bare_mptcp(addr: tuple[str, int]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, mptcpkit.IPPROTO_MPTCP)
    s.connect(addr)
    return s


def bare_tcp(addr: tuple[str, int]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect(addr)
    return s


CONTENDERS: dict[str, tuple[Connect, bool]] = {
    "bare socket(IPPROTO_MPTCP)": (bare_mptcp, True),
    "mptcpkit.create_connection": (lambda a: mptcpkit.create_connection(a), True),
    "socket.create_connection (TCP)": (lambda a: socket.create_connection(a), False),
    "bare socket (TCP)": (bare_tcp, False),
}


def time_connects(connect: Connect, listener: socket.socket, count: int) -> float:
    """Mean seconds per connect+close; the listener's queue absorbs, then is drained."""
    addr = listener.getsockname()
    start = time.perf_counter()
    for _ in range(count):
        s = connect(addr)
        socket.socket.setsockopt(s, socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
        s.close()
    elapsed = time.perf_counter() - start
    listener.setblocking(False)
    try:
        while True:
            listener.accept()[0].close()
    except BlockingIOError:
        pass
    listener.setblocking(True)
    return elapsed / count


def per_call(stmt: str, env: dict[str, object], count: int = 200_000) -> float:
    """Best of 5 runs of `stmt`, per call (timeit: no lambda in the measurement)."""
    return min(timeit.repeat(stmt, globals=env, number=count, repeat=5)) / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000, help="per contender and round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if args.connections > 4000:
        parser.error("--connections is bounded by the listener backlog (4000)")

    mptcp_listener = mptcpkit.create_server(("127.0.0.1", 0), backlog=4096, mptcp="require")
    tcp_listener = mptcpkit.create_server(("127.0.0.1", 0), backlog=4096, mptcp="off")
    samples: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    names = list(CONTENDERS)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            connect, mptcp = CONTENDERS[name]
            listener = mptcp_listener if mptcp else tcp_listener
            samples[name].append(time_connects(connect, listener, args.connections))
    median = {name: statistics.median(v) for name, v in samples.items()}

    print(f"connect + close on loopback, {args.connections} x {args.rounds} rounds, median")
    base = median["bare socket(IPPROTO_MPTCP)"]
    for name, value in median.items():
        print(f"  {name:34s} {value * 1e6:8.1f} us   {value / base:5.3f}x bare MPTCP")
    ratio = median["mptcpkit.create_connection"] / base
    verdict = "ok" if ratio <= 1.05 else "MISSED"
    print(f"  library overhead: {ratio:.3f}x (target <= 1.05x: {verdict})")
    print(f"  MPTCP vs TCP (bare): {base / median['bare socket (TCP)']:.2f}x (information)")

    client = mptcpkit.create_connection(mptcp_listener.getsockname())
    accepted, _ = mptcp_listener.accept()
    fallback_server = socket.create_server(("127.0.0.1", 0))
    fallback = mptcpkit.create_connection(fallback_server.getsockname())
    env = {"mptcpkit": mptcpkit, "client": client, "fallback": fallback}
    costs = {
        "status() MPTCP socket": per_call("mptcpkit.status(client)", env),
        "status() fallen-back socket": per_call("mptcpkit.status(fallback)", env),
        "getsockopt(SOL_MPTCP, MPTCP_INFO) (floor)": per_call("client.getsockopt(284, 1)", env),
        "info()": per_call("mptcpkit.info(client)", env, 50_000),
        "subflows() (MPTCP_FULL_INFO)": per_call("mptcpkit.subflows(client)", env, 20_000),
    }
    print("per call")
    for name, value in costs.items():
        print(f"  {name:44s} {value * 1e6:7.2f} us")
    status_us = costs["status() MPTCP socket"] * 1e6
    print(f"  status(): {status_us:.2f} us (target < 2 us: {'ok' if status_us < 2 else 'MISSED'})")
    for s in (client, accepted, fallback, fallback_server, mptcp_listener, tcp_listener):
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
