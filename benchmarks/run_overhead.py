"""What forcing costs: socket(), concurrent socket(), other calls, start-up and memory.

    PYTHONPATH=src python3 benchmarks/run_overhead.py [--sockets 3000] [--starts 10]
        [--mptcpkit /opt/mptcpkit/bin/mptcpkit] [--redis-requests 20000]

The same small Python probe runs bare (plain TCP, and MPTCP asked for by the program
itself), under mptcpize, and under each `mptcpkit run` strategy this host allows.
Per call it reports the wall time seen by the program and the CPU time of *every*
process of the run: the program (its own CPU clock) and the supervisor (from
/proc/<pid>/task/*/schedstat, in ns; found as the run's other descendant, this script
being their subreaper). Ratios are against a bare MPTCP socket(), the floor forcing
can reach, and against bare TCP, what the program would have had. Then: start-up
(`true` run bare and under each tool, median wall and CPU of all processes, the
supervisor included once it has exited) and the supervisor's resident memory.
Start-up is mostly the interpreter's: measure an installed command (`--mptcpkit`, as
scripts/install.sh makes it) rather than `python -m mptcpkit` from a development
checkout, whose interpreter may load more (pyenv shims, .pth files); the output says
which interpreter ran and what it costs alone. Last, where redis is installed,
`redis-benchmark -t ping,set` against a redis-server, both bare, both under mptcpize
and both under `mptcpkit run` (wall time of the benchmark, ratios to bare).

Take numbers from one run only (ratios in one run); a loaded machine moves them all.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import textwrap
import time

PR_SET_CHILD_SUBREAPER = 36
IPPROTO_MPTCP = 262

PROBE = textwrap.dedent("""
    import _socket, json, os, sys, threading, time
    n, threads, repeat, proto, harness = (int(x) for x in sys.argv[1:6])

    def descendants():
        # every process under the harness but this one: the supervisor, if any
        parent = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open(f"/proc/{name}/stat") as f:
                        parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError):
                    pass
        found = []
        for pid in parent:
            p, seen = pid, 0
            while p in parent and p > 1 and seen < 64:
                p, seen = parent[p], seen + 1
                if p == harness and pid != os.getpid():
                    found.append(pid)
                    break
        return found

    def cpu_ns(pids):
        total = 0
        for pid in pids:
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        total += int(f.read().split()[0])
            except (OSError, ValueError):
                pass
        return total

    def sockets(count):
        make = _socket.socket
        for _ in range(count):
            make(2, 1, proto).close()

    def concurrent(count):
        per = count // threads
        ts = [threading.Thread(target=sockets, args=(per,)) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    def getppid(count):
        f = os.getppid
        for _ in range(count):
            f()

    others = descendants()

    def cpu_all():
        # our own clock is exact; a sleeping supervisor's schedstat is up to date
        return time.process_time_ns() + cpu_ns(others)

    def cpu_helper():
        return cpu_ns(others)

    def timed(fn, count):
        walls, cpus, helper = [], [], []
        for _ in range(repeat):
            h, c, t = cpu_helper(), cpu_all(), time.perf_counter_ns()
            fn(count)
            walls.append((time.perf_counter_ns() - t) / count)
            cpus.append((cpu_all() - c) / count)
            helper.append((cpu_helper() - h) / count)
        mid = len(walls) // 2
        return sorted(walls)[mid], sorted(cpus)[mid], sorted(helper)[mid]

    s = _socket.socket(2, 1, proto)
    made = s.getsockopt(1, 38)
    s.close()
    out = {"protocol": made}
    out["socket"] = timed(sockets, n)
    out["concurrent"] = timed(concurrent, n)
    out["getppid"] = timed(getppid, n * 20)
    rss = pss = 0
    for pid in others:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss = max(rss, int(line.split()[1]))
                    elif line.startswith("Pss:"):
                        pss = max(pss, int(line.split()[1]))
        except OSError:
            pass
    out["helper_rss_kb"] = rss
    out["helper_pss_kb"] = pss
    print(json.dumps(out))
""")


def subreaper() -> None:
    """Orphaned descendants (a supervisor outliving the program) become our children,
    so we find them and reap them, and their CPU time is counted in ours."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_CHILD_SUBREAPER")


def reap_all() -> None:
    while True:
        try:
            os.wait()
        except ChildProcessError:
            return


def probe(prefix: list[str], args: argparse.Namespace, proto: int) -> dict[str, object] | str:
    argv = [sys.executable, "-c", PROBE, str(args.sockets), str(args.threads)]
    argv += [str(args.repeat), str(proto), str(os.getpid())]
    proc = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=900)
    reap_all()
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        why = lines[-1] if lines else f"exit {proc.returncode}"
        return why.split("not available here: ")[-1].split("; use ")[0]
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def start(prefix: list[str], starts: int) -> tuple[float, float] | str:
    """Median wall and mean CPU (every process, reaped) of `prefix true`, in ms."""
    true = shutil.which("true") or "/bin/true"
    walls = []
    cpu0 = children_cpu()
    for _ in range(starts):
        t = time.perf_counter()
        proc = subprocess.run([*prefix, true], capture_output=True, text=True)
        walls.append(time.perf_counter() - t)
        reap_all()  # the supervisor, if it outlived the program
        if proc.returncode != 0:
            return (proc.stderr.strip().splitlines() or ["failed"])[-1]
    cpu = (children_cpu() - cpu0) / starts
    return statistics.median(walls) * 1000, cpu * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sockets", type=int, default=3000, help="socket() calls per sample")
    ap.add_argument("--threads", type=int, default=8, help="concurrent callers")
    ap.add_argument("--repeat", type=int, default=5, help="samples (median reported)")
    ap.add_argument("--starts", type=int, default=10, help="start-ups timed per tool")
    ap.add_argument(
        "--mptcpkit",
        metavar="CMD",
        help="the mptcpkit command to measure (default: python -m mptcpkit with this "
        "interpreter); an install made by scripts/install.sh measures what users run",
    )
    ap.add_argument("--redis-requests", type=int, default=20000, help="redis-benchmark -n")
    args = ap.parse_args()
    subreaper()
    command = [args.mptcpkit] if args.mptcpkit else [sys.executable, "-m", "mptcpkit"]
    run = [*command, "run"]
    mptcpize = shutil.which("mptcpize")
    tools: dict[str, tuple[list[str] | None, int]] = {
        "bare TCP": ([], 0),
        "bare MPTCP": ([], IPPROTO_MPTCP),
        "mptcpize": ([mptcpize, "run"] if mptcpize else None, 0),
        "seccomp": ([*run, "--strategy", "seccomp", "--"], 0),
        "seccomp, Python only": (
            ["env", "MPTCPKIT_RUN_FASTPATH=0", *run, "--strategy", "seccomp", "--"],
            0,
        ),
        "bpf": ([*run, "--strategy", "bpf", "--"], 0),
    }
    results: dict[str, dict[str, object] | str] = {}
    for name, (prefix, proto) in tools.items():
        results[name] = "not installed" if prefix is None else probe(prefix, args, proto)
    tcp, mptcp = results["bare TCP"], results["bare MPTCP"]
    assert isinstance(tcp, dict) and isinstance(mptcp, dict), (tcp, mptcp)

    print(f"{os.uname().release}, {os.cpu_count()} CPUs; medians of {args.repeat} samples.")
    print("wall: per call, seen by the program; cpu: per call, every process of the run")
    print("(superv.: the supervisor's part); x MPTCP / x TCP: ratio to the same call made bare")
    cols = (
        ("socket", f"socket()+close(), {args.sockets} in a row"),
        ("concurrent", f"socket()+close(), {args.threads} threads at once"),
        ("getppid", "getppid(), a call the filter lets through"),
    )
    for key, title in cols:
        head = f"{'wall':>9}{'x MPTCP':>9}{'x TCP':>7}{'cpu':>10}{'x MPTCP':>9}{'superv.':>10}"
        print(f"\n{title:<42}{head}")
        for name, res in results.items():
            if isinstance(res, str):
                print(f"  {name:<40}unavailable: {res}")
                continue
            wall, cpu, helper = res[key]  # type: ignore[misc]
            mw, mc, _ = mptcp[key]  # type: ignore[misc]
            tw = tcp[key][0]  # type: ignore[index]
            print(
                f"  {name:<40}{wall / 1000:6.2f} us{wall / mw:8.2f}x{wall / tw:6.2f}x"
                f"{cpu / 1000:7.2f} us{cpu / mc:8.2f}x{helper / 1000:7.2f} us"
            )
    print("\nsockets made (SO_PROTOCOL) and the supervisor's resident memory:")
    for name, res in results.items():
        if isinstance(res, dict):
            rss = int(res["helper_rss_kb"])  # type: ignore[call-overload]
            pss = int(res.get("helper_pss_kb", 0))  # type: ignore[call-overload]
            mem = f"{rss / 1024:.1f} MB RSS, {pss / 1024:.1f} MB PSS" if rss else "no supervisor"
            print(f"  {name:<21} {res['protocol']!s:>4}   {mem}")

    interpreter = interpreter_of(command)
    print(f"\nstart-up of `true` (median wall of {args.starts}, CPU of every process)")
    print(f"  mptcpkit: {' '.join(command)}")
    print(f"  its interpreter: {interpreter}")
    base = start([], args.starts)
    assert not isinstance(base, str), base
    starts = {
        "bare": [],
        "mptcpize": [mptcpize, "run"] if mptcpize else None,
        "python -c pass": [interpreter, "-c", "pass", ""],
        "python -I -S": [interpreter, "-I", "-S", "-c", "pass", ""],
        "run seccomp": [*run, "--strategy", "seccomp", "--"],
        "run (auto)": [*run, "--"],
    }
    for name, prefix in starts.items():
        if prefix is None:
            print(f"  {name:<15} not installed")
            continue
        got = base if name == "bare" else start(prefix, args.starts)
        if isinstance(got, str):
            print(f"  {name:<15} unavailable: {got}")
            continue
        print(
            f"  {name:<15} {got[0]:7.1f} ms wall (+{got[0] - base[0]:6.1f})"
            f"  {got[1]:7.1f} ms CPU (+{got[1] - base[1]:6.1f})"
        )
    redis(run, mptcpize, args.redis_requests)
    return 0


def interpreter_of(command: list[str]) -> str:
    """The Python that runs `command`: its `#!` line for an installed script."""
    if len(command) > 1:
        return command[0]
    path = shutil.which(command[0]) or command[0]
    try:
        with open(path, "rb") as f:
            line = f.readline(512)
    except OSError:
        return sys.executable
    return line[2:].decode().split()[0] if line.startswith(b"#!") else sys.executable


REDIS_TIMEOUT = 180
REDIS_ROUNDS = 3


def redis(run: list[str], mptcpize: str | None, requests: int) -> None:
    """redis-benchmark against redis-server, both bare, under mptcpize, under run."""
    server, bench = shutil.which("redis-server"), shutil.which("redis-benchmark")
    title = f"redis-benchmark -n {requests} -t ping,set (client and server under each tool)"
    if not server or not bench:
        print(f"\n{title}: skipped, redis is not installed (apt-get install redis-server)")
        return
    print(f"\n{title}, median wall of {REDIS_ROUNDS} (range):")
    tools = {
        "bare": [],
        "mptcpize": [mptcpize, "run"] if mptcpize else None,
        "mptcpkit run": [*run, "--"],
    }
    got: dict[str, list[float] | str] = {}
    for _ in range(REDIS_ROUNDS):  # interleaved rounds: a burst of load hits every tool
        for name, prefix in tools.items():
            if prefix is None or isinstance(got.get(name), str):
                continue
            one = redis_once(prefix, server, bench, requests)
            if isinstance(one, str):
                got[name] = one
            else:
                walls = got.setdefault(name, [])
                assert isinstance(walls, list)
                walls.append(one)
    medians: dict[str, float] = {}
    for name in tools:
        res = got.get(name)
        if res is None:
            print(f"  {name:<15} not installed")
            continue
        if isinstance(res, str):
            print(f"  {name:<15} failed: {res}")
            continue
        medians[name] = wall = statistics.median(res)
        others = [n for n in ("bare", "mptcpize") if n in medians and n != name]
        ratios = ", ".join(f"{wall / medians[n]:.2f}x {n}" for n in others)
        spread = f"({min(res):.2f}-{max(res):.2f})"
        print(f"  {name:<15} {wall:7.2f} s {spread:<13} {ratios}")


def redis_once(prefix: list[str], server: str, bench: str, requests: int) -> float | str:
    import socket

    with socket.socket() as s:  # a free port (the server binds it just after)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = subprocess.Popen(
        [
            *prefix,
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or srv.poll() is not None:
                    return "redis-server did not start"
                time.sleep(0.02)
        argv = [*prefix, bench, "-p", str(port), "-n", str(requests), "-t", "ping,set", "-q"]
        t = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=REDIS_TIMEOUT)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            return (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return wall
    finally:
        srv.terminate()
        try:
            srv.wait(10)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
        reap_all()


if __name__ == "__main__":
    sys.exit(main())
