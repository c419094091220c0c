"""What forcing costs: one socket() call under each strategy, and unrelated syscalls.

    PYTHONPATH=src python3 benchmarks/run_overhead.py [--sockets 3000] [--calls 200000]

Runs the same small Python probe unforced and under each `mptcpkit run` strategy
(strategies this host refuses are reported as such) and prints, in one table, the
median time per call and its ratio to the unforced run. "unrelated" is getppid(),
a system call the seccomp filter lets through in the kernel: its ratio is the
filter's cost on everything a program does besides making TCP sockets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent("""
    import _socket, json, os, sys, time
    n_sock, n_calls, repeat = (int(x) for x in sys.argv[1:4])
    def timed(fn, n):
        best = []
        for _ in range(repeat):
            t = time.perf_counter_ns()
            fn(n)
            best.append((time.perf_counter_ns() - t) / n)
        return sorted(best)[len(best) // 2]
    def tcp(n):
        for _ in range(n):
            _socket.socket(2, 1, 0).close()
    def udp(n):
        for _ in range(n):
            _socket.socket(2, 2, 0).close()
    def getppid(n):
        f = os.getppid
        for _ in range(n):
            f()
    proto = _socket.socket(2, 1, 0)
    made = proto.getsockopt(1, 38)
    proto.close()
    print(json.dumps({"tcp_socket": timed(tcp, n_sock), "udp_socket": timed(udp, n_sock),
                      "getppid": timed(getppid, n_calls), "protocol": made}))
""")


def measure(prefix: list[str], args: argparse.Namespace) -> dict[str, float] | str:
    cmd = [
        *prefix,
        sys.executable,
        "-c",
        PROBE,
        str(args.sockets),
        str(args.calls),
        str(args.repeat),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        why = lines[-1] if lines else f"exit {proc.returncode}"
        return why.split("not available here: ")[-1].split("; use ")[0]
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sockets", type=int, default=3000, help="socket() calls per sample")
    ap.add_argument("--calls", type=int, default=200000, help="getppid() calls per sample")
    ap.add_argument("--repeat", type=int, default=5, help="samples (median reported)")
    args = ap.parse_args()
    cli = [sys.executable, "-m", "mptcpkit.cli.run"]
    runs = {
        "unforced": [],
        "seccomp": [*cli, "--strategy", "seccomp", "--"],
        "preload": [*cli, "--strategy", "preload", "--"],
        "bpf": [*cli, "--strategy", "bpf", "--"],
    }
    results: dict[str, dict[str, float] | str] = {n: measure(p, args) for n, p in runs.items()}
    # in-process forcing patches socket.socket: compare it with socket.socket unforced
    py_base = measure_inprocess(args, force=False)
    results["in-process"] = measure_inprocess(args, force=True)
    base = results["unforced"]
    assert isinstance(base, dict), base
    print(f"{os.uname().release}, {os.cpu_count()} CPUs; medians of {args.repeat} samples;")
    print("ratios against unforced (in-process: against unforced socket.socket)")
    print(f"{'strategy':<12}{'TCP socket()':>22}{'UDP socket()':>22}{'getppid()':>20}  made")
    for name, res in results.items():
        if isinstance(res, str):
            print(f"{name:<12}  unavailable: {res}")
            continue
        ref = py_base if name == "in-process" and isinstance(py_base, dict) else base
        cells = []
        for key in ("tcp_socket", "udp_socket", "getppid"):
            cells.append(f"{res[key] / 1000:8.2f} us x{res[key] / ref[key]:6.2f}")
        print(f"{name:<12}{cells[0]:>22}{cells[1]:>22}{cells[2]:>20}  {int(res['protocol'])}")
    return 0


def measure_inprocess(args: argparse.Namespace, *, force: bool) -> dict[str, float] | str:
    """The probe through socket.socket (the class the in-process patch replaces)."""
    probe = PROBE.replace("_socket.socket(", "socket.socket(").replace(
        "import _socket, ", "import socket, _socket, "
    )
    if force:
        enter = "from mptcpkit.run.inprocess import forced\n_cm = forced()\n_cm.__enter__()\n"
        probe = enter + probe
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(args.sockets), str(args.calls), str(args.repeat)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        return proc.stderr.strip().splitlines()[-1]
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    sys.exit(main())
