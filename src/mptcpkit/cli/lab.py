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
from rich.markup import escape
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
            default=None,
            help=f"rate of each link, tc syntax (default {rate or 'unshaped'})",
        )
        p.add_argument(
            "--rates",
            default=None,
            metavar="R0,R1,...",
            help="one rate per link instead of --rate; UP/DOWN gives the two directions "
            "their own (client->server/server->client), e.g. 50mbit,10mbit or 50mbit/5mbit,20mbit",
        )
        p.set_defaults(default_rate=rate)
        p.add_argument("--burst", default="32kbit", help="tbf burst (default 32kbit)")
        p.add_argument("--latency", default="50ms", help="tbf latency (default 50ms)")
        p.add_argument(
            "--endpoints",
            default="subflow",
            choices=("subflow", "fullmesh", "signal", "none"),
            help="MPTCP endpoints for the extra links (default subflow, on the client)",
        )
        p.add_argument(
            "--backup",
            default="",
            metavar="LINKS",
            help="extra links whose endpoints are backups, e.g. 1 or 1,2",
        )
        p.add_argument(
            "--signal-port",
            action="store_true",
            help="with --endpoints signal: announce each address with a port (10100+link)",
        )
        p.add_argument("--delay", default=None, help="netem delay on every link (needs netem)")
        p.add_argument("--jitter", default=None, help="netem jitter (needs --delay)")
        p.add_argument(
            "--reorder", default=None, metavar="PCT", help="netem reordering %% (needs --delay)"
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
        help="remove the labs left up and those of crashed programs",
        description="Remove the labs with the prefix that `lab up` left running and those "
        "whose program died without cleaning up, with their devices and processes. Only "
        "namespaces a lab made (its marker in /run/mptcpkit-labs lists them) are removed; "
        "labs of programs still running are left alone unless --running is given.",
    )
    common(down)
    down.add_argument(
        "--running", action="store_true", help="also labs whose program is still running"
    )
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
        help="a fault: down:LINK@T, up:LINK@T, rate:LINK=RATE@T, rst:LINK@T (repeatable)",
    )
    bench.add_argument(
        "--loss",
        action="append",
        default=[],
        metavar="[LINK=]PCT",
        help="random loss on a link (both directions, nftables), e.g. 1=2%%; PCT alone: "
        "every link (repeatable)",
    )
    bench.add_argument(
        "--strip-mptcp",
        action="store_true",
        help="a middlebox on link 0 strips MPTCP options: the connection must fall back",
    )
    bench.add_argument(
        "--drop-add-addr",
        type=int,
        default=0,
        metavar="N",
        help="drop the first N ADD_ADDRs the server sends (add_addr_timeout set to 1 s); "
        "implies --endpoints signal",
    )
    bench.add_argument("--flows", type=int, default=1, help="simultaneous connections")
    bench.add_argument(
        "--fastclose", action="store_true", help="end each connection with MP_FASTCLOSE"
    )
    bench.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when the run was disturbed (TCP memory pressure), not only warn",
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


def _split_list(text: str, flag: str) -> list[str]:
    items = [x.strip() for x in text.split(",")]
    if not all(items):
        raise UsageError(f"{flag} {text!r}: expected a comma-separated list with no empty item")
    return items


def _build(args: argparse.Namespace, topology: str, prefix: str) -> Any:
    from mptcpkit import lab

    make = lab.two_paths if topology == "two_paths" else lab.gateway
    rates = _split_list(args.rates, "--rates") if args.rates else None
    if rates is not None and args.rate is not None:
        raise UsageError("give --rate or --rates, not both")
    rate = args.rate if rates is not None or args.rate is not None else args.default_rate
    try:
        backup = [int(x) for x in _split_list(args.backup, "--backup")] if args.backup else []
    except ValueError:
        raise UsageError(f"--backup {args.backup!r}: expected link numbers, e.g. 1,2") from None
    kwargs: dict[str, Any] = {}
    if rates is not None:
        kwargs["rates"] = rates
    if backup:
        kwargs["backup"] = backup
    if args.signal_port:
        kwargs["signal_port"] = True
    if args.delay is not None or args.jitter is not None or args.reorder is not None:
        kwargs.update(delay=args.delay, jitter=args.jitter)
        if args.reorder is not None:
            try:
                kwargs["reorder"] = float(args.reorder.rstrip("%"))
            except ValueError:
                raise UsageError(f"--reorder {args.reorder!r}: expected a percentage") from None
    if getattr(args, "ipv6", False):
        kwargs["family"] = 6  # IPv6 endpoints only: all 8 paths fit the kernel's 8 endpoints
    if kwargs and topology != "two_paths":
        raise UsageError(f"--{next(iter(kwargs)).replace('_', '-')}: only for two_paths")
    try:
        return make(
            paths=args.paths,
            rate=None if rates is not None else rate,
            burst=args.burst,
            latency=args.latency,
            endpoints=args.endpoints,
            prefix=prefix,
            **kwargs,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _up(net: Any) -> None:
    """Bring `net` up; a kernel without netem is a usage error (exit 2), said plainly."""
    from mptcpkit.lab import LabError
    from mptcpkit.lab.topology import NetemMissing

    try:
        net.up()
    except NetemMissing as exc:
        raise UsageError(str(exc)) from None
    except LabError as exc:
        raise CLIError(str(exc)) from None


def cmd_up(args: argparse.Namespace) -> int:
    _require_root()
    net = _build(args, args.topology, _prefix(args))
    _up(net)
    net.detach()
    desc = net.describe()
    if args.json:
        print(json.dumps(desc, indent=2))
        return 0
    # Plain lines, never wrapped or cut: the names are meant to be copied.
    print(
        f"lab {net.id} is up ({args.topology}, {args.paths} path(s), "
        f"rate {args.rates or args.rate or 'unshaped'}); it stays up until `mptcpkit lab down`."
    )
    for name, host in desc["hosts"].items():
        print(f"  {name}: ip netns exec {host['netns']} bash")
        for i in host["interfaces"]:
            print(f"      {i['name']}  {i['ipv4']}/24  {i['ipv6']}/64  (link {i['link']})")
    print("or: mptcpkit lab exec client -- ip mptcp endpoint show")
    return 0


def _labs(prefix: str, *, live: bool = True) -> dict[str, dict[str, str]]:
    """lab id -> host name -> namespace, of the labs whose markers name this prefix.

    `live`: only labs left up (`lab up`) or whose program still runs, not orphans.
    """
    from mptcpkit.lab.owner import ORPHAN, read_all

    labs: dict[str, dict[str, str]] = {}
    for record in read_all(prefix):
        if live and record.state == ORPHAN:
            continue
        labs[record.id] = {**record.hosts, "": record.topology}
    return labs


def _orphans(prefix: str) -> list[str]:
    from mptcpkit.lab.owner import ORPHAN, read_all

    return [r.id for r in read_all(prefix) if r.state == ORPHAN]


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
    from mptcpkit.lab.owner import read_all

    prefix = _prefix(args)
    records = read_all(prefix)
    if args.json:
        print(
            json.dumps(
                {
                    r.id: {"topology": r.topology, "hosts": r.hosts, "state": r.state, "pid": r.pid}
                    for r in records
                }
            )
        )
        return 0
    live = [r for r in records if r.state != "orphan"]
    orphans = [r for r in records if r.state == "orphan"]
    if not live:
        print("no lab is up")
    for r in sorted(live, key=lambda r: r.id):
        names = " ".join(f"{h}={n}" for h, n in sorted(r.hosts.items()))
        how = "left up" if r.state == "detached" else f"run by pid {r.pid}"
        print(f"{r.id} {r.topology} ({how}): {names}")
    if orphans:
        ids = " ".join(sorted(r.id for r in orphans))
        print(
            f"{len(orphans)} orphaned lab(s) of programs that died: {ids} (`lab down` reaps them)"
        )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    _require_root()
    from mptcpkit.lab import LabError, remove_all

    prefix = _prefix(args)
    try:
        removed = remove_all(prefix, running=args.running)
    except LabError as exc:
        raise CLIError(str(exc)) from None
    running = [] if args.running else _labs(prefix)
    if removed:
        print(f"removed {len(removed)} namespace(s): {' '.join(removed)}")
    else:
        print(f"nothing to remove (no lab with prefix {prefix!r} is left up or orphaned)")
    if running:
        print(
            f"left {len(running)} lab(s) whose program is still running: "
            f"{' '.join(sorted(running))} (--running removes them too)"
        )
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
        if f.at >= duration:
            raise UsageError(
                f"fault {f}: at {f.at:g} s it would never happen, the transfer lasts "
                f"{duration:g} s (--duration)"
            )
    return faults


def _losses(args: argparse.Namespace) -> dict[int, float]:
    """--loss [LINK=]PCT -> link -> percent."""
    losses: dict[int, float] = {}
    for spec in args.loss:
        link_text, sep, pct_text = spec.rpartition("=")
        try:
            pct = float(pct_text.strip().rstrip("%"))
            links = [int(link_text)] if sep else list(range(args.paths))
        except ValueError:
            raise UsageError(f"--loss {spec!r}: expected [LINK=]PERCENT, e.g. 1=2%") from None
        if not 0 < pct < 100:
            raise UsageError(f"--loss {spec!r}: the percentage must be above 0 and below 100")
        for link in links:
            if not 0 <= link < args.paths:
                raise UsageError(f"--loss {spec!r}: there is no link {link}")
            losses[link] = pct
    return losses


def _scenario(args: argparse.Namespace) -> dict[str, Any]:
    """Check the scenario flags together; what run_bench records as `scenario`."""
    if not 1 <= args.flows <= 64:
        raise UsageError(f"--flows {args.flows}: expected 1 to 64")
    if args.drop_add_addr < 0:
        raise UsageError(f"--drop-add-addr {args.drop_add_addr}: expected 0 or more")
    if args.drop_add_addr:
        if args.endpoints not in ("signal", "subflow"):
            raise UsageError("--drop-add-addr needs --endpoints signal (ADD_ADDR is the server's)")
        args.endpoints = "signal"
        if args.paths < 2:
            raise UsageError("--drop-add-addr needs --paths 2 or more (something to announce)")
    if args.tcp and (args.strip_mptcp or args.drop_add_addr or args.fastclose):
        raise UsageError("--strip-mptcp, --drop-add-addr and --fastclose are MPTCP scenarios")
    scenario: dict[str, Any] = {}
    losses = _losses(args)
    if losses:
        scenario["loss"] = losses
    if args.strip_mptcp:
        scenario["strip_mptcp"] = True
    if args.drop_add_addr:
        scenario["drop_add_addr"] = args.drop_add_addr
    if args.backup:
        scenario["backup"] = sorted({int(x) for x in args.backup.split(",") if x.strip()})
    return scenario


def _apply(net: Any, scenario: dict[str, Any]) -> None:
    from mptcpkit.lab import scenario as sc

    for link, pct in scenario.get("loss", {}).items():
        sc.add_loss(net, link, pct)
    if scenario.get("strip_mptcp"):
        client = net.host("client")
        sc.strip_mptcp(client, net.link(0).iface(client).name)
    if scenario.get("drop_add_addr"):
        sc.drop_add_addr(net.host("server"), scenario["drop_add_addr"])


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
    scenario = _scenario(args)
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
        _up(net)
        with net, progress:
            from mptcpkit.lab.scenario import netem_available

            _apply(net, scenario)
            netem = netem_available(net.host("client"))
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
                flows=args.flows,
                fastclose=args.fastclose,
                scenario=scenario,
            )
    except (LabError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    data = result.as_dict()
    data["netem"] = netem
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
        err.print(f"mptcpkit lab bench: {escape(result.error)}", highlight=False, soft_wrap=True)
    for reason in data["claim"].get("reasons", []):
        err.print(
            f"mptcpkit lab bench: not as promised: {escape(reason)}",
            highlight=False,
            soft_wrap=True,
        )
    for warning in result.warnings:
        err.print(
            f"mptcpkit lab bench: warning: {escape(warning)}", highlight=False, soft_wrap=True
        )
    return exit_code(data, strict=args.strict)


def exit_code(data: dict[str, Any], *, strict: bool) -> int:
    """0 verified and as promised; 1 not, or (with --strict) disturbed by memory pressure."""
    if not data["verified"] or not data.get("claim", {}).get("ok", True):
        return 1
    if strict and data.get("memory", {}).get("under_pressure"):
        return 1
    return 0


def _rates(d: dict[str, Any]) -> str:
    rates = d.get("rates_mbit") or []
    if not rates or any(r is None for r in rates):
        return "unshaped"
    if len(set(rates)) == 1:
        return f"{rates[0]:g} Mbit/s"
    return "+".join(f"{r:g}" for r in rates) + " Mbit/s"


def _summary(console: Console, d: dict[str, Any]) -> None:
    title = f"{d['protocol'].upper()} over {d['paths']} path(s) of {_rates(d)}"
    table = Table(title=escape(title))
    table.add_column("measure")
    table.add_column("value", justify="right")
    claim = d.get("claim", {})
    table.add_row("duration", f"{d['duration_s']:.2f} s")
    table.add_row("bytes", f"{d['bytes']:,}")
    table.add_row("goodput", f"{d['goodput_mbit']:.1f} Mbit/s")
    if d.get("share_of_sum") is not None:
        table.add_row(
            f"of the sum of path rates ({d['sum_rate_mbit']:g})", f"{d['share_of_sum']:.1%}"
        )
        if d.get("steady_share_of_sum") is not None:
            table.add_row("  steady (after the first second)", f"{d['steady_share_of_sum']:.1%}")
    if len(d.get("flows", [])) > 1:
        rates = ", ".join(f"{f['goodput_mbit']:.1f}" for f in d["flows"])
        table.add_row(f"{len(d['flows'])} flows (Mbit/s)", rates)
    table.add_row("verified (sha256)", "yes" if d["verified"] else "[red]NO[/]")
    table.add_row("bytes lost", str(d["lost_bytes"]))
    mptcp = "yes" if d["mptcp"] else "no"
    if not d["mptcp"] and d["protocol"] == "mptcp":
        mptcp = "no: fell back to TCP"
    table.add_row("MPTCP in use", mptcp)
    if claim:
        used = ", ".join(map(str, claim["used_links"])) or "none"
        want = ", ".join(map(str, claim["expected_links"]))
        verdict = "yes" if claim["ok"] else "[red]NO[/]"
        table.add_row("links that carried data", f"{used} (promised {want}): {verdict}")
        for note in claim.get("notes", []):
            table.add_row("  promise", escape(note))
    for f in d["faults"]:
        table.add_row(f"fault at {f['t']:.2f} s", f"{f['action']} link {f.get('link', '')}")
    if d["recovery_s"] is not None:
        table.add_row("recovery after link down", f"{d['recovery_s']:.2f} s")
    for host, counters in sorted(d.get("filters", {}).items()):
        for name, packets in sorted(counters.items()):
            table.add_row(escape(f"{name} ({host})"), f"{packets:,} packets")
    if d.get("scenario"):
        from mptcpkit.lab.scenario import describe

        text = describe(d["scenario"])
        if text:
            table.add_row("scenario", escape(text))
    console.print(table)
    sub = Table(title="per subflow / link")
    for col in ("link", "subflow", "bytes acked", "share"):
        sub.add_column(col, justify="right" if col != "subflow" else "left")
    total = sum(s["bytes_acked"] for s in d["subflows"]) or 1
    for s in d["subflows"]:
        sub.add_row(
            str(s["link"]),
            escape(s["key"]),
            f"{s['bytes_acked']:,}",
            f"{s['bytes_acked'] / total:.0%}",
        )
    console.print(sub)
