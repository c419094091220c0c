"""`mptcpkit demo`: MPTCP through the mptcpkit gateway, live, in a throwaway lab.

The lab's `gateway` topology: client —(2 shaped links)— proxy —(1 link)— server. A
TCP-only server in the server host serves a file; `mptcpkit proxy` in the proxy host
terminates MPTCP; an MPTCP client downloads the file while a live view shows each
subflow's throughput; halfway through, link 0 (where the connection started) goes
down. The summary compares against a single path, checks the bytes by hash, reads the
MPTCP state of both legs from the proxy's log line, and draws the lab's PNG plot.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from mptcpkit.cli.errors import CLIError, UsageError

__all__ = ["register"]

PROXY_PORT = 8443  # inside the demo's own namespaces: nothing else listens there
SERVER_PORT = 8080
_RECV = 256 * 1024


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="watch MPTCP survive a link failure through the mptcpkit gateway (needs root)",
        description=(
            "Build a lab (client, proxy, server; two shaped links client<->proxy), run "
            "`mptcpkit proxy` with an MPTCP frontend in front of a TCP-only server, download "
            "a file over MPTCP with a live per-subflow view, take link 0 down halfway, and "
            "summarise: throughput vs a single path, hash check, MPTCP state of both legs, "
            "and a PNG plot. Takes about 30 seconds."
        ),
    )
    p.add_argument("--rate", default="50mbit", help="shaping of each client<->proxy link")
    p.add_argument("--size", default="64M", help="size of the downloaded file (default 64M)")
    p.add_argument(
        "--baseline",
        type=float,
        default=3.0,
        help="seconds of single-path plain TCP download first (default 3)",
    )
    p.add_argument("--plot", metavar="PATH", help="where to write the PNG (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(func=run)
    variants = p.add_subparsers(dest="variant", metavar="VARIANT")
    from mptcpkit.cli import demo_bonding, demo_fleet

    demo_fleet.register(variants)
    demo_bonding.register(variants)


@dataclass
class Download:
    """One download through the proxy, measured by the lab-shaped interval samples."""

    size: int | None
    received: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    error: str | None = None
    done_at: float | None = None
    samples: list[tuple[float, int, dict[str, int]]] = field(default_factory=list)
    subflows_seen: int = 0


def _parse_size(text: str) -> int:
    from mptcpkit.lab import parse_size

    try:
        return int(parse_size(text))
    except ValueError as exc:
        raise UsageError(f"--size: {exc}") from None


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise UsageError("the demo needs root (it builds network namespaces): run it with sudo")
    size = _parse_size(args.size)
    from mptcpkit import lab

    try:
        rate_bps = lab.parse_rate(args.rate)
    except ValueError as exc:
        raise UsageError(f"--rate: {exc}") from None
    plot_path = args.plot or os.path.join(tempfile.mkdtemp(prefix="mptcpkit-demo-"), "demo.png")
    err = sys.stderr
    print(f"mptcpkit demo: building the lab (2 x {args.rate} links client<->proxy) ...", file=err)
    with lab.gateway(paths=2, rate=args.rate) as net:
        return _demo(net, args, size, rate_bps, plot_path)


def _demo(net: Any, args: argparse.Namespace, size: int, rate_bps: float, plot_path: str) -> int:

    client, proxy, server = net.host("client"), net.host("proxy"), net.host("server")
    server_addr = server.address(family=4)
    proxy_addr = proxy.address(net.link(0), family=4)
    with server.enter():
        listener = socket.create_server((server_addr, SERVER_PORT))  # plain TCP only
    stop = threading.Event()
    sent: dict[int, str] = {}
    seed = 7
    endless = 1 << 40  # the baseline is bounded by time, not size
    backend = threading.Thread(
        target=_serve_one_by_one,
        args=(listener, seed, stop, sent),
        daemon=True,
        name="demo-backend",
    )
    backend.start()
    px = proxy.popen(
        [
            sys.executable,
            "-m",
            "mptcpkit",
            "proxy",
            "--listen",
            f"mptcp@0.0.0.0:{PROXY_PORT}",
            "--to",
            f"tcp@{server_addr}:{SERVER_PORT}",
            "--workers",
            "1",
            "--metrics",
            "",
        ],
        env={**os.environ},
    )
    try:
        _wait_ready(px)
        # 1) single path, plain TCP through the same proxy, for comparison
        print(f"single path: plain TCP download for {args.baseline:g}s ...", file=sys.stderr)
        base = _download(
            client, proxy_addr, mptcp=False, size=endless, limit_s=args.baseline, live=None
        )
        base_mbit = base.received * 8 / max(args.baseline, 1e-9) / 1e6
        # 2) the MPTCP download, link 0 down halfway
        print(
            f"MPTCP: downloading {size / 2**20:.0f} MiB through the proxy; link 0 goes down "
            "halfway ...",
            file=sys.stderr,
        )
        faults: list[dict[str, Any]] = []
        dl = _download(
            client,
            proxy_addr,
            mptcp=True,
            size=size,
            limit_s=120.0,
            live=_LiveView(size),
            halfway=lambda t: _link_down(net, faults, t),
        )
        log = _proxy_conn_lines(px)
    finally:
        stop.set()
        listener.close()
        px.stop()
    mptcp_line = log[-1] if log else ""
    legs = _legs(mptcp_line)
    summary = _summary(args, size, rate_bps, base_mbit, dl, faults, sent, legs, plot_path, net)
    mptcpkit_ok = summary["verified"] and legs.get("client", "").startswith("MPTCP")
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(_format(summary))
    return 0 if mptcpkit_ok else 1


_SIZES: list[int] = []  # what the backend serves to each next connection, in order


def _serve_one_by_one(
    listener: socket.socket, seed: int, stop: threading.Event, sent: dict[int, str]
) -> None:
    from mptcpkit.lab.transfer import stream

    listener.settimeout(0.5)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        size = _SIZES.pop(0) if _SIZES else 0
        with conn:
            h = hashlib.sha256()
            left = size
            with contextlib.suppress(OSError):
                for chunk in stream(seed):
                    if left <= 0 or stop.is_set():
                        break
                    chunk = chunk[:left]
                    conn.sendall(chunk)
                    h.update(chunk)
                    left -= len(chunk)
                conn.shutdown(socket.SHUT_WR)
                sent[size] = h.hexdigest()


def _wait_ready(px: Any, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if "ready:" in px.stderr:
            return
        if px.poll() is not None:
            raise CLIError(f"the proxy did not start:\n{px.stderr}")
        time.sleep(0.05)
    raise CLIError("the proxy did not start within 20s")


def _proxy_conn_lines(px: Any) -> list[str]:
    end = time.monotonic() + 5
    while time.monotonic() < end:
        lines = [ln for ln in px.stderr.splitlines() if " conn " in ln]
        if len(lines) >= 2:
            return lines
        time.sleep(0.1)
    return [ln for ln in px.stderr.splitlines() if " conn " in ln]


def _legs(line: str) -> dict[str, str]:
    m = re.search(r"client=(\S+) server=(\S+)", line)
    if not m:
        return {}
    return {"client": _leg_words(m.group(1)), "server": _leg_words(m.group(2))}


def _leg_words(text: str) -> str:
    m = re.fullmatch(r"MPTCP\((\d+)\)", text)
    if m:
        return f"MPTCP ({m.group(1)} subflows at most)"
    return {"fallback": "fell back to TCP"}.get(text, text)


def _link_down(net: Any, faults: list[dict[str, Any]], t: float) -> None:
    net.link(0).down()
    faults.append({"t": round(t, 3), "action": "down", "link": 0})


class _LiveView:
    """A rich Live table on stderr: per-subflow Mbit/s, total, progress."""

    def __init__(self, size: int) -> None:
        from rich.console import Console
        from rich.live import Live

        self.size = size
        self.console = Console(stderr=True)
        self.live = Live(console=self.console, refresh_per_second=4, transient=False)

    def __enter__(self) -> _LiveView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)
        self.console.print()

    def update(
        self, t: float, received: int, per_sf: dict[str, float], total: float, event: str | None
    ) -> None:
        from rich.table import Table

        table = Table(
            title=f"MPTCP download via mptcpkit proxy — {t:5.1f}s, "
            f"{received / 2**20:6.1f} / {self.size / 2**20:.0f} MiB"
            + (f" — {event}" if event else "")
        )
        table.add_column("subflow (client -> proxy)")
        table.add_column("Mbit/s", justify="right")
        table.add_column("", min_width=30)
        top = max([total, 1.0])
        for key, mbit in per_sf.items():
            table.add_row(key, f"{mbit:7.1f}", "█" * int(30 * mbit / top))
        table.add_row("[bold]total", f"[bold]{total:7.1f}", "█" * int(30 * total / top))
        self.live.update(table)


def _download(
    client: Any,
    proxy_addr: str,
    *,
    mptcp: bool,
    size: int,
    limit_s: float,
    live: _LiveView | None,
    halfway: Any = None,
) -> Download:
    """Connect from the client host through the proxy and read until EOF (or `limit_s`)."""
    import mptcpkit

    _SIZES.append(size)
    dl = Download(size)
    with client.enter():
        sock = mptcpkit.socket(
            socket.AF_INET, socket.SOCK_STREAM, mptcp="require" if mptcp else "off"
        )
    sock.settimeout(30)
    sock.connect((proxy_addr, PROXY_PORT))
    t0 = time.monotonic()
    stop = threading.Event()

    def reader() -> None:
        buf = bytearray(_RECV)
        view = memoryview(buf)
        try:
            while not stop.is_set():
                n = sock.recv_into(buf)
                if not n:
                    break
                dl.digest.update(view[:n])
                dl.received += n
        except OSError as exc:
            if not stop.is_set():
                dl.error = str(exc)
        dl.done_at = time.monotonic()

    th = threading.Thread(target=reader, daemon=True, name="demo-client")
    th.start()
    ctx = live if live is not None else contextlib.nullcontext()
    fired = False
    prev: tuple[float, int, dict[str, int]] | None = None
    with ctx:
        while th.is_alive():
            th.join(0.5)
            t = time.monotonic() - t0
            sfs: dict[str, int] = {}
            if mptcp:
                with contextlib.suppress(OSError):
                    for sf in mptcpkit.subflows(sock):
                        key = f"{sf.local[0]}:{sf.local[1]}->{sf.remote[0]}:{sf.remote[1]}"
                        sfs[key] = sf.bytes_received or 0
                dl.subflows_seen = max(dl.subflows_seen, len(sfs))
            cur = (t, dl.received, sfs)
            dl.samples.append(cur)
            event = None
            if halfway is not None and not fired and dl.received >= size / 2:
                halfway(t)
                fired = True
                event = "link 0 DOWN"
            if live is not None and prev is not None:
                dt = max(t - prev[0], 1e-9)
                per = {k: max(v - prev[2].get(k, v), 0) * 8 / dt / 1e6 for k, v in sfs.items()}
                live.update(
                    t,
                    dl.received,
                    per,
                    (dl.received - prev[1]) * 8 / dt / 1e6,
                    event or ("link 0 down" if fired else None),
                )
            prev = cur
            if t >= limit_s:
                stop.set()
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
    th.join(5)
    sock.close()
    return dl


def _intervals(dl: Download) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The lab's interval/subflow rows (`mptcpkit.lab.bench` result shape) for its plot."""
    intervals = []
    keys: dict[str, None] = {}
    for (t0, r0, s0), (t1, r1, s1) in zip(dl.samples, dl.samples[1:], strict=False):
        dt = t1 - t0
        if dt <= 0:
            continue
        per = {k: round(max(v - s0.get(k, v), 0) * 8 / dt / 1e6, 4) for k, v in s1.items()}
        keys.update(dict.fromkeys(s1))
        intervals.append(
            {
                "t": round(t1, 4),
                "dt": round(dt, 4),
                "bytes": r1 - r0,
                "total_mbit": round((r1 - r0) * 8 / dt / 1e6, 4),
                "subflows": per,
            }
        )
    rows = []
    for k in keys:
        local = k.split("->")[0].rsplit(":", 1)[0]
        link = int(local.split(".")[2]) if local.count(".") == 3 else None
        rows.append({"key": k, "link": link})
    return intervals, rows


def _summary(
    args: argparse.Namespace,
    size: int,
    rate_bps: float,
    base_mbit: float,
    dl: Download,
    faults: list[dict[str, Any]],
    sent: dict[int, str],
    legs: dict[str, str],
    plot_path: str,
    net: Any,
) -> dict[str, Any]:
    from mptcpkit.lab import plot as lab_plot
    from mptcpkit.lab.series import recovery_time

    intervals, rows = _intervals(dl)
    t_end = dl.samples[-1][0] if dl.samples else 0.0
    t_fault = faults[0]["t"] if faults else None

    def avg(lo: float, hi: float) -> float | None:
        ivs = [iv for iv in intervals if lo <= iv["t"] - iv["dt"] and iv["t"] <= hi]
        secs = sum(iv["dt"] for iv in ivs)
        return sum(iv["bytes"] for iv in ivs) * 8 / secs / 1e6 if secs > 0 else None

    both = avg(0.5, t_fault) if t_fault is not None else avg(0.5, t_end)
    recovery = recovery_time(intervals, faults, 2)
    # the single surviving path, once the connection has recovered from the loss; a short
    # download may end before a whole interval follows the recovery: then all after the loss
    after = (
        avg(t_fault + (recovery or 1.0), t_end) or avg(t_fault, t_end)
        if t_fault is not None
        else None
    )
    digest = dl.digest.hexdigest()
    expected = sent.get(size)
    verified = dl.error is None and dl.received == size and expected == digest
    total_s = dl.samples[-1][0] if dl.samples else 0.0
    goodput = dl.received * 8 / total_s / 1e6 if total_s else 0.0
    data = {
        "protocol": "mptcp",
        "paths": 2,
        "rate_mbit": rate_bps / 1e6,
        "goodput_mbit": goodput,
        "verified": verified,
        "intervals": intervals,
        "subflows": rows,
        "faults": faults,
    }
    lab_plot.plot(data, plot_path)
    return {
        "rate_per_link": args.rate,
        "single_path_mbit": round(base_mbit, 2),
        "mptcp_both_links_mbit": round(both, 2) if both else None,
        "speedup_vs_single_path": round(both / base_mbit, 2) if both and base_mbit else None,
        "link0_down_at_s": t_fault,
        "after_link_down_mbit": round(after, 2) if after else None,
        "recovery_s": recovery,
        "bytes": dl.received,
        "size": size,
        "seconds": round(total_s, 2),
        "goodput_mbit": round(goodput, 2),
        "sha256": digest,
        "verified": verified,
        "error": dl.error,
        "subflows_seen": dl.subflows_seen,
        "client_leg": legs.get("client", "unknown (no proxy log line)"),
        "server_leg": legs.get("server", "unknown (no proxy log line)"),
        "plot": plot_path,
    }


def _format(s: dict[str, Any]) -> str:
    def mbit(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} Mbit/s"

    lines = [
        f"mptcpkit demo: client =[2 x {s['rate_per_link']}]= mptcpkit proxy -- TCP-only server",
        f"  single path (plain TCP via the proxy): {mbit(s['single_path_mbit'])}",
        f"  MPTCP over both links:                 {mbit(s['mptcp_both_links_mbit'])}"
        + (
            f"  ({s['speedup_vs_single_path']:.2f}x single path)"
            if s["speedup_vs_single_path"]
            else ""
        ),
    ]
    if s["link0_down_at_s"] is not None:
        lines.append(
            f"  after link 0 went down at {s['link0_down_at_s']:.1f}s:".ljust(41)
            + f"{mbit(s['after_link_down_mbit'])} (the connection survived"
            + (f", recovered in {s['recovery_s']:.1f}s)" if s["recovery_s"] is not None else ")")
        )
    check = "verified" if s["verified"] else "MISMATCH"
    lines += [
        f"  downloaded {s['bytes']} of {s['size']} bytes in {s['seconds']:.1f}s "
        f"({mbit(s['goodput_mbit'])}); sha256 {s['sha256'][:16]}... {check}",
        f"  MPTCP state: client leg {s['client_leg']}, server leg {s['server_leg']}",
        f"  plot: {s['plot']}",
    ]
    if s["error"]:
        lines.append(f"  error: {s['error']}")
    return "\n".join(lines)
