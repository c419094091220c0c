"""`mptcpkit check`: can this host use MPTCP, and how is it set up?"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from mptcpkit.cli.hostreport import HostReport, gather


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check",
        help="report MPTCP support, settings and limits of this host",
        description="Report whether MPTCP is usable in this network namespace and why, "
        "its path manager, scheduler, limits, endpoints, kernel features, and the "
        "TCP-only options programs lose on MPTCP sockets. Exit 0 when usable, 1 when not.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[red]no[/]"


def render(report: HostReport, console: Console) -> None:
    s = report.support
    verdict = "[bold green]usable[/]" if s.usable else f"[bold red]not usable[/]: {s.detail}"
    console.print(f"MPTCP in this network namespace: {verdict}")
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("kernel", s.kernel)
    for name, value in report.sysctls.items():
        if value is not None:
            table.add_row(name, value)
    if report.limits is not None:
        table.add_row("limits", " ".join(f"{k} {v}" for k, v in sorted(report.limits.items())))
    if report.endpoints is not None:
        table.add_row("endpoints", str(len(report.endpoints)) if report.endpoints else "none")
        for ep in report.endpoints:
            flags = " ".join(k for k, v in ep.items() if v is True)
            dev = f" dev {ep['dev']}" if "dev" in ep else ""
            table.add_row("", f"{ep['address']} id {ep['id']} {flags}{dev}")
    table.add_row("MPTCP_INFO (5.16+)", _yes(s.sol_mptcp))
    table.add_row("MPTCP_FULL_INFO (6.5+)", _yes(s.full_info))
    table.add_row("TCP_IS_MPTCP", _yes(s.tcp_is_mptcp))
    table.add_row("TCP_MD5SIG through mptcpkit", _yes(report.tcp_md5sig_available))
    console.print(table)
    if report.options_lost:
        console.print(
            "TCP-only options an MPTCP socket rejects here (mptcpkit turns a socket into "
            "plain TCP for them while it is not connected yet):"
        )
        console.print("  " + ", ".join(report.options_lost))
    for error in report.errors:
        console.print(f"[yellow]note:[/] {error}")


def run(args: argparse.Namespace) -> int:
    report = gather()
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        render(report, Console(highlight=False))
    return 0 if report.support.usable else 1
