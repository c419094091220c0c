"""`mptcpkit limits ...`: the in-kernel PM's per-namespace limits (ip mptcp limits), with
ip's output and exit codes (see `mptcpkit.cli.endpoint`)."""

from __future__ import annotations

import argparse
import json

from mptcpkit.cli.endpoint import add_common, pm_errors, take_options


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "limits",
        help="show or set MPTCP limits (ip mptcp limits)",
        description=(
            "  limits show\n  limits set [subflows N] [add_addr_accepted N]   (N in 0..8)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(p)
    p.add_argument(
        "words",
        nargs=argparse.REMAINDER,
        metavar="WORD",
        help="show | set [subflows N] [add_addr_accepted N]",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mptcpkit import pm
    from mptcpkit.pm import grammar

    words = take_options(args)
    with pm_errors(args.netns, ip_codes=True):
        cmd = grammar.parse_limits(words)
        with pm.PathManager(args.netns) as mgr:
            if cmd.action == "set":  # like ip, prints nothing
                mgr.set_limits(subflows=cmd.subflows, add_addr_accepted=cmd.add_addr_accepted)
            else:
                limits = mgr.limits()
                if args.json:
                    print(json.dumps(limits.to_json(), separators=(",", ":")))
                else:
                    print(limits.ip_line())
    return 0
