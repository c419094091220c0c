"""`mptcpkit lab bench`: a measured bulk transfer over a lab, from the shell.

Its flags (faults, losses, scenarios) are checked together before root is needed, the
run is `mptcpkit.lab.bench.run_bench`, and the result is a table, JSON or a plot; the
exit code says whether the run was verified and as promised.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mptcpkit.cli import lab_build
from mptcpkit.cli.errors import CLIError, UsageError


def register(sub: Any) -> None:
    """`lab bench` under `lab`'s subparsers `sub`."""
    bench = sub.add_parser(
        "bench",
        help="measure a bulk transfer over N shaped paths, optionally with a link failure",
        description="Bring up client and server joined by --paths links of --rate, send a "
        "verified pseudo-random stream for --duration seconds over MPTCP (or --tcp), and "
        "report goodput in total, per subflow and per link. The topology is removed after.",
    )
    lab_build.shape_flags(bench, "50mbit")
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
        "-C",
        "--congestion",
        default=None,
        metavar="ALGO",
        help="TCP congestion control of both ends' sockets, e.g. cubic (as iperf3 -C); "
        "default: the namespaces' default, inherited from the host",
    )
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
    lab_build.prefix_flag(bench)
    bench.set_defaults(func=cmd_bench)


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
    if args.congestion is not None:
        from mptcpkit.lab import congestion

        try:
            congestion.check(args.congestion)
        except ValueError as exc:
            raise UsageError(f"--congestion: {exc}") from None
    lab_build.require_root()
    net = lab_build.build(args, "two_paths", lab_build.prefix(args))
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
        lab_build.bring_up(net)
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
                congestion=args.congestion,
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


def _congestion(d: dict[str, Any]) -> str:
    """`bbr; 12.3% of segments retransmitted` (the client's; both names when they differ)."""
    client, server = d["congestion"].get("client"), d["congestion"].get("server")
    same = client == server
    text = (client or "?") if same else f"{client or '?'} client, {server or '?'} server"
    if d.get("retrans_share") is not None:
        text += f"; {d['retrans_share']:.1%} of segments retransmitted"
    return text


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
    if d.get("congestion"):
        table.add_row("congestion control", escape(_congestion(d)))
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
