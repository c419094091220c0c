"""Core library costs on loopback, measured side by side in one run.

    python3 benchmarks/core_bench.py [--connections 7000] [--burst 20]

Prints connect latency of `mptcpkit.create_connection` against a bare
`socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP)` + `connect()` (the library's own
overhead: target <= 1.02x), plain TCP for information, the cost of `status()`
(target < 1.5 us), `info()` and `subflows()`, of turning a fresh MPTCP socket into
plain TCP for a TCP-only option (target <= 30 us), of `import mptcpkit` in a fresh
interpreter (target <= 30 ms) and of `mptcpkit --help` (target <= 60 ms). Contenders
take turns of a few connects each, in a shuffled order, so drift on a shared machine
falls on all alike.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import struct
import sys
import time
import timeit
from collections.abc import Callable, Mapping
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


# Every contender is called directly (no lambda around some and not others).
CONTENDERS: dict[str, tuple[Connect, bool]] = {
    "bare socket(IPPROTO_MPTCP)": (bare_mptcp, True),
    "mptcpkit.create_connection": (mptcpkit.create_connection, True),
    "socket.create_connection (TCP)": (socket.create_connection, False),
    "bare socket (TCP)": (bare_tcp, False),
}


def drain(listener: socket.socket) -> None:
    """Accept and close whatever waits in the queue (not timed)."""
    listener.setblocking(False)
    try:
        while True:
            listener.accept()[0].close()
    except BlockingIOError:
        pass
    listener.setblocking(True)


def time_connects(
    listeners: Mapping[bool, socket.socket], turns: int, burst: int
) -> dict[str, list[float]]:
    """Per contender, the median seconds per connect+close of each turn.

    Contenders take turns in bursts of `burst` connects, in a shuffled order. Turns are
    short (a few ms), so comparing contenders turn by turn cancels drift on a shared
    machine; shuffling spreads the teardown work MPTCP leaves to a kernel worker after
    close, which lands on whoever connects next (a fixed rotation kept the same
    contender behind bare MPTCP, and it paid). Bursts keep each contender's code as
    warm as a program that connects repeatedly has it; with single connects, code only
    one contender runs was always cold, ~3 us.
    """
    medians: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    clock = time.perf_counter
    names = list(CONTENDERS)
    shuffle = random.Random(turns).shuffle
    addresses = {name: listeners[mptcp].getsockname() for name, (_, mptcp) in CONTENDERS.items()}
    times = [0.0] * burst
    for _turn in range(turns):
        shuffle(names)
        for name in names:
            connect, addr = CONTENDERS[name][0], addresses[name]
            for i in range(burst):
                start = clock()
                s = connect(addr)
                socket.socket.setsockopt(s, socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
                s.close()
                times[i] = clock() - start
            medians[name].append(statistics.median(times))
            drain(listeners[CONTENDERS[name][1]])  # each turn finds an empty accept queue
    return medians


def per_call(stmt: str, env: dict[str, object], count: int = 200_000) -> float:
    """Best of 5 runs of `stmt`, per call (timeit: no lambda in the measurement)."""
    return min(timeit.repeat(stmt, globals=env, number=count, repeat=5)) / count


def cli_help(runs: int = 21) -> None:
    """Wall time of `mptcpkit --help` in a fresh interpreter (what a user waits for),
    alternating with a bare interpreter start: medians and the difference."""
    import os
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "src"))
    commands = {
        "python3 -c pass": [sys.executable, "-c", "pass"],
        "mptcpkit --help": [sys.executable, "-m", "mptcpkit", "--help"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, command in commands.items():
            start = time.perf_counter()
            subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=True)
            times[name].append(time.perf_counter() - start)
    bare, help_ = (statistics.median(times[name]) * 1e3 for name in commands)
    verdict = "ok" if help_ <= 60 else "MISSED"
    print(f"start-up, median of {runs}")
    print(f"  python3 -c pass (interpreter alone)  {bare:6.1f} ms")
    print(f"  mptcpkit --help                      {help_:6.1f} ms (target <= 60 ms: {verdict})")
    print(f"  mptcpkit --help - interpreter        {help_ - bare:6.1f} ms")


def downgrade_cost(rounds: int = 7, count: int = 3000) -> float:
    """Seconds a TCP-only option adds to a fresh MPTCP socket (make, set TCP_USER_TIMEOUT,
    close) over the same socket without it (make, close): best of `rounds`, paired."""
    clock = time.perf_counter
    make, level, opt = mptcpkit.socket, socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT
    make().setsockopt(level, opt, 1000)  # the option table is probed once per process
    best = []
    for _ in range(rounds):
        start = clock()
        for _ in range(count):
            s = make()
            s.setsockopt(level, opt, 1000)
            s.close()
        with_option = clock() - start
        start = clock()
        for _ in range(count):
            s = make()
            s.close()
        best.append((with_option - (clock() - start)) / count)
    return min(best)


def import_time(runs: int = 21) -> float:
    """Wall time `import mptcpkit` and the socket layer's first use add to a fresh
    interpreter, in ms: medians of runs alternating with a bare interpreter start."""
    import os
    import subprocess

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "src"))
    # The import, and the first use of the socket layer (the package loads on use).
    use = "import mptcpkit; mptcpkit.create_connection, mptcpkit.subflows, mptcpkit.setsockopt"
    commands = {"bare": [sys.executable, "-c", "pass"], "import": [sys.executable, "-c", use]}
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, command in commands.items():
            start = time.perf_counter()
            subprocess.run(command, env=env, check=True)
            times[name].append(time.perf_counter() - start)
    return (statistics.median(times["import"]) - statistics.median(times["bare"])) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=7000, help="per contender")
    parser.add_argument("--burst", type=int, default=20, help="connects per turn")
    args = parser.parse_args()

    mptcp_listener = mptcpkit.create_server(("127.0.0.1", 0), backlog=4096, mptcp="require")
    tcp_listener = mptcpkit.create_server(("127.0.0.1", 0), backlog=4096, mptcp="off")
    listeners = {True: mptcp_listener, False: tcp_listener}
    turns = time_connects(listeners, args.connections // args.burst, args.burst)
    median = {name: statistics.median(v) for name, v in turns.items()}

    def paired(name: str, base: str) -> float:
        """Median over turns of name's time / base's time in the same turn."""
        return statistics.median(a / b for a, b in zip(turns[name], turns[base], strict=True))

    print(
        f"connect + close on loopback, {args.connections} per contender in turns of"
        f" {args.burst}; medians over turns, ratios paired turn by turn"
    )
    bare = "bare socket(IPPROTO_MPTCP)"
    for name, value in median.items():
        print(f"  {name:34s} {value * 1e6:8.1f} us   {paired(name, bare):5.3f}x bare MPTCP")
    ratio = paired("mptcpkit.create_connection", bare)
    verdict = "ok" if ratio <= 1.02 else "MISSED"
    print(f"  library overhead: {ratio:.3f}x (target <= 1.02x: {verdict})")
    print(f"  MPTCP vs TCP (bare): {1 / paired('bare socket (TCP)', bare):.2f}x (information)")

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
    verdict = "ok" if status_us < 1.5 else "MISSED"
    print(f"  status(): {status_us:.2f} us (target < 1.5 us: {verdict})")
    downgrade_us = downgrade_cost() * 1e6
    verdict = "ok" if downgrade_us <= 30 else "MISSED"
    print(f"  downgrade of a fresh socket (TCP_USER_TIMEOUT): {downgrade_us:.1f} us", end="")
    print(f" (target <= 30 us: {verdict})")
    import_ms = import_time()
    verdict = "ok" if import_ms <= 30 else "MISSED"
    print(f"  import mptcpkit + socket layer, fresh interpreter: {import_ms:.1f} ms", end="")
    print(f" (target <= 30 ms: {verdict})")
    for s in (client, accepted, fallback, fallback_server, mptcp_listener, tcp_listener):
        s.close()
    cli_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
