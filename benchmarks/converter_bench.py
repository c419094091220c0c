#!/usr/bin/env python3
"""CPU per connection of the converter (remote gateway) against the plain proxy.

On loopback, one run, all contenders, on each data path (the Python relay and the C
engine): `mptcpkit proxy` as a plain relay, as a plain `accept-proxy` frontend (the
reference: it reads a header before connecting, as a converter does), and as a remote
gateway reading an RFC 8803 Connect TLV or a PROXY v2 header, checking its destination
policy and connecting where the client says. Each connection: connect, send the
header (if any) and 1 byte, read the 1-byte answer (after the Convert reply), close.
The figure is the CPU time
(user+sys, from schedstat) of the proxy's process tree per connection, which a busy
machine distorts least; contenders go round-robin, --repeat times, medians.

    python3 benchmarks/converter_bench.py [--connections 2000] [--repeat 3] [--engine both|python|c]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 1.1  # issue 16: the converter's CPU per connection within 1.1 x the plain proxy's
sys.path.insert(0, str(ROOT / "src"))

from mptcpkit.proxy import convertproto as cp  # noqa: E402
from mptcpkit.proxy import proxyproto  # noqa: E402

PLAIN = """
[global]
workers = 1
metrics = ""
log = "none"
[frontend.f]
bind = "tcp@127.0.0.1:0"
backend = "b"
[backend.b]
server.s = "tcp@127.0.0.1:{port}"
"""
REMOTE = """
[global]
workers = 1
metrics = ""
log = "none"
[frontend.f]
bind = "tcp@127.0.0.1:0"
backend = "b"
{accept} = true
destinations = {{ clients = ["127.0.0.0/8"], allow = ["127.0.0.1/32"] }}
[backend.b]
server.s = "tcp@0.0.0.0:0"
"""


def backend() -> tuple[socket.socket, int]:
    ls = socket.create_server(("127.0.0.1", 0), backlog=4096)

    def serve() -> None:
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            with c:
                if c.recv(1):
                    c.sendall(b"y")

    threading.Thread(target=serve, daemon=True).start()
    return ls, ls.getsockname()[1]


def tree_cpu(pid: int) -> float:
    """Seconds of CPU (user+sys) of a process and its children so far: the sum of every
    thread's schedstat, in nanoseconds (the tick counts of /proc/PID/stat are 10 ms)."""
    pids = [pid]
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    pids += [int(p) for p in out.split()]
    total = 0
    for p in pids:
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                total += int(Path(f"/proc/{p}/task/{t}/schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


class Proxy:
    def __init__(self, name: str, cfg: str, engine: str, tmp: Path) -> None:
        self.name = name
        path = tmp / f"{name}.toml"
        path.write_text(cfg)
        self.log = tmp / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mptcpkit", "proxy", "-c", str(path)],
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "MPTCPKIT_PROXY_ENGINE": engine},
            start_new_session=True,
        )
        end = time.monotonic() + 20
        while "ready:" not in self.log.read_text():
            if time.monotonic() > end or self.proc.poll() is not None:
                raise SystemExit(f"{name} did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        text = self.log.read_text()
        self.port = int(text.split("listening on tcp@127.0.0.1:")[1].split()[0])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def one(port: int, head: bytes, skip: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + b"x")
        got = b""
        while len(got) < skip + 1:
            b = s.recv(64)
            if not b:
                break
            got += b
        if got[skip:] != b"y":
            raise SystemExit(f"port {port}: unexpected answer {got!r}")


def load(p: Proxy, head: bytes, skip: int, n: int) -> float:
    before = tree_cpu(p.proc.pid)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: one(p.port, head, skip), range(n)))
    time.sleep(0.2)  # let the last closes be accounted
    return (tree_cpu(p.proc.pid) - before) / n * 1e6  # microseconds per connection


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--connections", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--engine", choices=("both", "python", "c"), default="both", help="data paths to run"
    )
    args = ap.parse_args()
    if not 1 <= args.connections <= 100_000 or not 1 <= args.repeat <= 20:
        ap.error("--connections 1..100000, --repeat 1..20")
    ls, port = backend()
    tmp = Path(tempfile.mkdtemp(prefix="converter-bench-"))
    convert = cp.connect_request("127.0.0.1", port)
    pv2 = proxyproto.build_v2(("127.0.0.1", 1), ("127.0.0.1", port))
    accept_proxy = PLAIN.format(port=port).replace(
        'backend = "b"', 'backend = "b"\naccept-proxy = true'
    )
    runs: dict[str, tuple[str, str, bytes, int]] = {}
    paths = [(e, lab) for e, lab in (("python", "python"), ("c", "C engine"))]
    paths = [p for p in paths if args.engine in ("both", p[0])]
    for engine, label in paths:
        runs[f"plain ({label})"] = (PLAIN.format(port=port), engine, b"", 0)
        runs[f"plain, accept-proxy ({label})"] = (accept_proxy, engine, pv2, 0)
        runs[f"remote gw, RFC 8803 ({label})"] = (
            REMOTE.format(accept="accept-convert"),
            engine,
            convert,
            4,
        )
        runs[f"remote gw, PROXY v2 ({label})"] = (
            REMOTE.format(accept="accept-proxy"),
            engine,
            pv2,
            0,
        )
    proxies = {name: Proxy(f"p{i}", cfg, eng, tmp) for i, (name, (cfg, eng, _, _)) in
               enumerate(runs.items())}  # fmt: skip
    results: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for _ in range(args.repeat):
            for name, (_, _, head, skip) in runs.items():
                results[name].append(load(proxies[name], head, skip, args.connections))
    finally:
        for p in proxies.values():
            p.stop()
        ls.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"CPU per connection, median of {args.repeat} x {args.connections} (loopback);"
        f" target: a converter <= {TARGET} x plain accept-proxy on the same engine:"
    )
    met = True
    for _, label in paths:
        base = statistics.median(results[f"plain ({label})"])
        ref = statistics.median(results[f"plain, accept-proxy ({label})"])
        for name, xs in results.items():
            if not name.endswith(f"({label})"):
                continue
            med = statistics.median(xs)
            line = f"  {name:34s} {med:7.1f} us  ({med / base:.2f} x plain)"
            if name.startswith("remote gw"):
                ratio = med / ref
                ok = ratio <= TARGET
                met = met and ok
                line += f"  {ratio:.2f} x accept-proxy: {'met' if ok else 'NOT met'}"
            print(line)
    print(f"target met on {args.engine if args.engine != 'both' else 'both engines'}" if met
          else "target NOT met")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
