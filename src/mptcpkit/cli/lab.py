"""`mptcpkit lab`: multipath test networks in namespaces, from the shell.

mptcpkit lab up --paths 2 --rate 50mbit     # stays up until `lab down`
mptcpkit lab exec client -- ip mptcp endpoint show
mptcpkit lab bench --paths 2 --rate 50mbit --duration 10 --fail-link 1 --at 4s
mptcpkit lab down
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mptcpkit.cli.errors import CLIError, UsageError

TOPOLOGIES = ("two_paths", "gateway")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "lab",
        help="multipath test networks in network namespaces (needs root)",
        description="Build small multipath networks in network namespaces: client and server "
        "joined by N shaped links (or through a proxy), run programs in them, measure MPTCP "
        "against TCP, take links down. Everything is named with a prefix (default 'mptk-', "
        "or $MPTCPKIT_LAB_PREFIX) and `lab down` removes it all.",
    )
    sub = parser.add_subparsers(dest="lab_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--prefix",
            default=None,
            help="name prefix of the namespaces (default: $MPTCPKIT_LAB_PREFIX or 'mptk-')",
        )

    def shape(p: argparse.ArgumentParser, rate: str | None) -> None:
        p.add_argument("--paths", type=int, default=2, help="parallel links (default 2)")
        p.add_argument(
            "--rate",
            default=rate,
            help=f"rate of each link, tc syntax (default {rate or 'unshaped'})",
        )
        p.add_argument("--burst", default="32kbit", help="tbf burst (default 32kbit)")
        p.add_argument("--latency", default="50ms", help="tbf latency (default 50ms)")
        p.add_argument(
            "--endpoints",
            default="subflow",
            choices=("subflow", "fullmesh", "signal", "none"),
            help="MPTCP endpoints for the extra links (default subflow, on the client)",
        )

    up = sub.add_parser(
        "up",
        help="bring a topology up and leave it running",
        description="Bring a topology up and leave it running until `mptcpkit lab down`.",
    )
    up.add_argument("--topology", choices=TOPOLOGIES, default="two_paths")
    shape(up, None)
    common(up)
    up.add_argument("--json", action="store_true", help="print the topology as JSON")
    up.set_defaults(func=cmd_up)

    ex = sub.add_parser(
        "exec",
        help="run a command inside a host of a running lab",
        description="Run CMD inside HOST (client, server, proxy) of the lab that is up. "
        "The exit code is the command's.",
    )
    ex.add_argument("host", metavar="HOST")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")
    ex.add_argument("--lab", default=None, help="the lab id, when several labs are up")
    common(ex)
    ex.set_defaults(func=cmd_exec)

    ls = sub.add_parser("ls", help="list the labs that are up")
    common(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_ls)

    down = sub.add_parser(
        "down",
        help="remove every namespace with the prefix (also after a crash)",
        description="Remove every network namespace whose name starts with the prefix, "
        "with its devices and processes.",
    )
    common(down)
    down.set_defaults(func=cmd_down)

    bench = sub.add_parser(
        "bench",
        help="measure a bulk transfer over N shaped paths, optionally with a link failure",
        description="Bring up client and server joined by --paths links of --rate, send a "
        "verified pseudo-random stream for --duration seconds over MPTCP (or --tcp), and "
        "report goodput in total, per subflow and per link. The topology is removed after.",
    )
    shape(bench, "50mbit")
    bench.add_argument("--duration", default="10", help="seconds of sending (default 10)")
    bench.add_argument("--tcp", action="store_true", help="plain single-path TCP instead")
    bench.add_argument("--ipv6", action="store_true", help="connect over IPv6")
    bench.add_argument("--fail-link", type=int, default=None, metavar="N", help="link to fail")
    bench.add_argument("--at", default=None, help="when --fail-link fails (default: half-way)")
    bench.add_argument("--restore-at", default=None, help="bring the failed link back then")
    bench.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="a fault: down:LINK@T, up:LINK@T, rate:LINK=RATE@T (repeatable)",
    )
    bench.add_argument("--interval", default="0.5", help="sampling interval (default 0.5s)")
    bench.add_argument("--plot", default=None, metavar="PNG", help="write a throughput plot")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    common(bench)
    bench.set_defaults(func=cmd_bench)


def _require_root() -> None:
    if os.geteuid() != 0:
        raise UsageError(
            "needs root (network namespaces, veth devices, tc): run it as root or with sudo"
        )


def _prefix(args: argparse.Namespace) -> str:
    from mptcpkit.lab.netns import check_prefix, default_prefix

    try:
        if args.prefix is None:
            return default_prefix()
        check_prefix(args.prefix)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    prefix: str = args.prefix
    return prefix


def _build(args: argparse.Namespace, topology: str, prefix: str) -> Any:
    from mptcpkit import lab

    make = lab.two_paths if topology == "two_paths" else lab.gateway
    try:
        return make(
            paths=args.paths,
            rate=args.rate,
            burst=args.burst,
            latency=args.latency,
            endpoints=args.endpoints,
            prefix=prefix,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_up(args: argparse.Namespace) -> int:
    _require_root()
    from mptcpkit.lab import LabError

    net = _build(args, args.topology, _prefix(args))
    try:
        net.up()
    except LabError as exc:
        raise CLIError(str(exc)) from None
    net.detach()
    desc = net.describe()
    if args.json:
        print(json.dumps(desc, indent=2))
        return 0
    # Plain lines, never wrapped or cut: the names are meant to be copied.
    print(
        f"lab {net.id} is up ({args.topology}, {args.paths} path(s), "
        f"rate {args.rate or 'unshaped'}); it stays up until `mptcpkit lab down`."
    )
    for name, host in desc["hosts"].items():
        print(f"  {name}: ip netns exec {host['netns']} bash")
        for i in host["interfaces"]:
            print(f"      {i['name']}  {i['ipv4']}/24  {i['ipv6']}/64  (link {i['link']})")
    print("or: mptcpkit lab exec client -- ip mptcp endpoint show")
    return 0


def _labs(prefix: str) -> dict[str, dict[str, str]]:
    """lab id -> host name -> namespace, from the namespaces that exist."""
    from mptcpkit.lab import list_netns

    labs: dict[str, dict[str, str]] = {}
    for name in list_netns(prefix):
        parts = name[len(prefix) :].split("-")
        if len(parts) != 3:
            continue
        topo, lab_id, host = parts
        labs.setdefault(lab_id, {})[host] = name
        labs[lab_id].setdefault("", topo)
    return labs


def cmd_exec(args: argparse.Namespace) -> int:
    _require_root()
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("exec: no command given (mptcpkit lab exec HOST -- CMD...)")
    prefix = _prefix(args)
    labs = _labs(prefix)
    if args.lab is not None:
        labs = {k: v for k, v in labs.items() if k == args.lab}
    if not labs:
        where = f" with id {args.lab}" if args.lab else ""
        raise UsageError(f"exec: no lab{where} is up (prefix {prefix!r}); start one with `lab up`")
    if len(labs) > 1:
        raise UsageError(
            f"exec: several labs are up ({', '.join(sorted(labs))}); pick one with --lab ID"
        )
    ((lab_id, hosts),) = labs.items()
    if args.host not in hosts or not args.host:
        known = ", ".join(h for h in hosts if h)
        raise UsageError(f"exec: lab {lab_id} has no host {args.host!r} (hosts: {known})")
    sys.stdout.flush()
    try:
        os.execvp("ip", ["ip", "netns", "exec", hosts[args.host], *cmd])
    except OSError as exc:
        raise CLIError(f"exec: cannot run ip netns exec: {exc}") from None
    return 1  # not reached


def cmd_ls(args: argparse.Namespace) -> int:
    _require_root()
    labs = _labs(_prefix(args))
    if args.json:
        print(
            json.dumps(
                {
                    k: {"topology": v.get("", ""), "hosts": {h: n for h, n in v.items() if h}}
                    for k, v in labs.items()
                }
            )
        )
        return 0
    if not labs:
        print("no lab is up")
        return 0
    for lab_id, hosts in sorted(labs.items()):
        names = " ".join(f"{h}={n}" for h, n in sorted(hosts.items()) if h)
        print(f"{lab_id} {hosts.get('', '')}: {names}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    _require_root()
    from mptcpkit.lab import LabError, remove_all

    prefix = _prefix(args)
    try:
        removed = remove_all(prefix)
    except LabError as exc:
        raise CLIError(str(exc)) from None
    if removed:
        print(f"removed {len(removed)} namespace(s): {' '.join(removed)}")
    else:
        print(f"nothing to remove (no namespace starts with {prefix!r})")
    return 0


def _faults(args: argparse.Namespace, duration: float) -> list[Any]:
    from mptcpkit.lab.faults import Fault, parse_fault
    from mptcpkit.lab.units import parse_duration

    faults = []
    try:
        for spec in args.fault:
            faults.append(parse_fault(spec))
        if args.fail_link is not None:
            at = parse_duration(args.at) if args.at is not None else duration / 2
            faults.append(Fault(at, args.fail_link, "down"))
            if args.restore_at is not None:
                faults.append(Fault(parse_duration(args.restore_at), args.fail_link, "up"))
        elif args.at is not None or args.restore_at is not None:
            raise UsageError("--at and --restore-at need --fail-link N")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for f in faults:
        if not 0 <= f.link < args.paths:
            raise UsageError(f"fault {f}: there is no link {f.link} (links 0..{args.paths - 1})")
    return faults


def cmd_bench(args: argparse.Namespace) -> int:
    from mptcpkit.lab import LabError
    from mptcpkit.lab.bench import run_bench
    from mptcpkit.lab.units import parse_duration

    try:
        duration = parse_duration(args.duration)
        interval = parse_duration(args.interval)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if duration <= 0 or interval <= 0:
        raise UsageError("--duration and --interval must be more than 0")
    faults = _faults(args, duration)
    _require_root()
    net = _build(args, "two_paths", _prefix(args))
    err = Console(stderr=True)
    protocol = "tcp" if args.tcp else "mptcp"
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    try:
        with net, progress:
            task = progress.add_task(
                f"{protocol.upper()} x{args.paths}", total=duration, rate="starting"
            )

            def on_sample(s: dict[str, Any]) -> None:
                progress.update(
                    task,
                    completed=min(s["t"], duration),
                    rate=f"{s['total_mbit']:7.1f} Mbit/s  {s['subflows']} subflow(s)",
                )

            result = run_bench(
                net,
                duration=duration,
                protocol=protocol,
                interval=interval,
                faults=faults,
                family=6 if args.ipv6 else 4,
                on_sample=on_sample,
            )
    except LabError as exc:
        raise CLIError(str(exc)) from None
    data = result.as_dict()
    if args.plot:
        from mptcpkit.lab.plot import plot

        try:
            plot(result, args.plot)
        except OSError as exc:
            raise CLIError(f"--plot {args.plot}: {exc}") from None
        data["plot"] = os.path.abspath(args.plot)
    if args.json:
        print(json.dumps(data))
    else:
        _summary(Console(), data)
    if result.error:
        err.print(f"mptcpkit lab bench: {result.error}")
    return 0 if result.verified else 1


def _summary(console: Console, d: dict[str, Any]) -> None:
    rate = f"{d['rate_mbit']:g} Mbit/s" if d["rate_mbit"] else "unshaped"
    table = Table(title=f"{d['protocol'].upper()} over {d['paths']} path(s) of {rate}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("duration", f"{d['duration_s']:.2f} s")
    table.add_row("bytes", f"{d['bytes']:,}")
    table.add_row("goodput", f"{d['goodput_mbit']:.1f} Mbit/s")
    if d["rate_mbit"]:
        share = d["goodput_mbit"] / (d["rate_mbit"] * d["paths"])
        table.add_row("of the sum of path rates", f"{share:.1%}")
    table.add_row("verified (sha256)", "yes" if d["verified"] else "[red]NO[/]")
    table.add_row("bytes lost", str(d["lost_bytes"]))
    table.add_row("MPTCP in use", "yes" if d["mptcp"] else "no")
    for f in d["faults"]:
        table.add_row(f"fault at {f['t']:.2f} s", f"{f['action']} link {f.get('link', '')}")
    if d["recovery_s"] is not None:
        table.add_row("recovery after link down", f"{d['recovery_s']:.2f} s")
    console.print(table)
    sub = Table(title="per subflow / link")
    for col in ("link", "subflow", "bytes acked", "share"):
        sub.add_column(col, justify="right" if col != "subflow" else "left")
    total = sum(s["bytes_acked"] for s in d["subflows"]) or 1
    for s in d["subflows"]:
        sub.add_row(
            str(s["link"]), s["key"], f"{s['bytes_acked']:,}", f"{s['bytes_acked'] / total:.0%}"
        )
    console.print(sub)
