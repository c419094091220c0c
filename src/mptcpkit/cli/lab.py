"""`mptcpkit lab`: multipath test networks in namespaces, from the shell.

mptcpkit lab up --paths 2 --rate 50mbit     # stays up until `lab down`
mptcpkit lab exec client -- ip mptcp endpoint show
mptcpkit lab bench --paths 2 --rate 50mbit --duration 10 --fail-link 1 --at 4s
mptcpkit lab down

`lab bench` is lab_bench.py; what it shares with `lab up` (the topology's flags,
building and bringing it up) is lab_build.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from mptcpkit.cli import lab_bench, lab_build
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

    up = sub.add_parser(
        "up",
        help="bring a topology up and leave it running",
        description="Bring a topology up and leave it running until `mptcpkit lab down`.",
    )
    up.add_argument("--topology", choices=TOPOLOGIES, default="two_paths")
    lab_build.shape_flags(up, None)
    lab_build.prefix_flag(up)
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
    lab_build.prefix_flag(ex)
    ex.set_defaults(func=cmd_exec)

    ls = sub.add_parser("ls", help="list the labs that are up")
    lab_build.prefix_flag(ls)
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
    lab_build.prefix_flag(down)
    down.add_argument(
        "--running", action="store_true", help="also labs whose program is still running"
    )
    down.set_defaults(func=cmd_down)

    lab_bench.register(sub)


def cmd_up(args: argparse.Namespace) -> int:
    lab_build.require_root()
    net = lab_build.build(args, args.topology, lab_build.prefix(args))
    lab_build.bring_up(net)
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
    lab_build.require_root()
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("exec: no command given (mptcpkit lab exec HOST -- CMD...)")
    prefix = lab_build.prefix(args)
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
    lab_build.require_root()
    from mptcpkit.lab.owner import read_all

    prefix = lab_build.prefix(args)
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
    lab_build.require_root()
    from mptcpkit.lab import LabError, remove_all

    prefix = lab_build.prefix(args)
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
