"""`mptcpkit demo fleet`: MPTCP gateways behind a stateless L4 balancer, with and without
the recipe.

Two labs of the `fleet` topology (clients with two links each -> nftables jhash balancer
-> N instances of `mptcpkit proxy` -> backend): the recipe (each instance announces its
unicast address and sets the C flag) and the naive fleet. In each: a single-path TCP
reference, M hash-verified MPTCP downloads through the VIP, then one instance drained
while connections run. Every claim printed is checked; exit 1 when the recipe falls short.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from mptcpkit.cli.errors import CLIError, UsageError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "fleet",
        help="N MPTCP gateways behind a stateless L4 balancer: the recipe vs the naive fleet",
        description=(
            "Build a lab (clients with two links each, an nftables jhash balancer, N "
            "instances of `mptcpkit proxy`, a backend), run M hash-verified MPTCP downloads "
            "through the balancer's virtual address with the recipe (each instance "
            "announces its unicast address and sets the C flag) and without it, drain one "
            "instance while connections run, and report connections per instance, subflows "
            "per connection, joins that reached the wrong instance and goodput against "
            "single-path TCP. Exit 1 if the recipe run misrouted a join, had a connection "
            "that sent no join, an unverified byte or lost a drained connection. About a "
            "minute."
        ),
    )
    p.add_argument("--instances", type=int, default=2, metavar="N", help="gateways (default 2)")
    p.add_argument(
        "--connections",
        type=int,
        metavar="M",
        help="MPTCP connections per run (default: max(100, 2N))",
    )
    p.add_argument("--clients", type=int, default=1, help="client hosts, two links each")
    p.add_argument("--rate", default="20mbit", help="shaping of each client link (20mbit)")
    p.add_argument("--size", default="1M", help="bytes each connection downloads (1M)")
    p.add_argument(
        "--concurrency", type=int, default=8, help="connections open at a time (default 8)"
    )
    p.add_argument("--no-naive", action="store_true", help="skip the naive fleet")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> tuple[int, int]:
    from mptcpkit.lab import parse_rate, parse_size

    for name, lo, hi in (("instances", 1, 8), ("clients", 1, 8), ("concurrency", 1, 256)):
        v = getattr(args, name)
        if not lo <= v <= hi:
            raise UsageError(f"--{name}: expected {lo}..{hi}, got {v}")
    m = args.connections if args.connections is not None else max(100, 2 * args.instances)
    if m < 2 * args.instances:
        raise UsageError(f"--connections: at least 2 per instance ({2 * args.instances}), got {m}")
    try:
        size = int(parse_size(args.size))
    except ValueError as exc:
        raise UsageError(f"--size: {exc}") from None
    if not 1 <= size <= 1 << 30:
        raise UsageError(f"--size: expected 1 byte to 1G, got {args.size}")
    try:
        parse_rate(args.rate)
    except ValueError as exc:
        raise UsageError(f"--rate: {exc}") from None
    return m, size


def run(args: argparse.Namespace) -> int:
    m, size = _check_args(args)
    if os.geteuid() != 0:
        raise UsageError("the demo needs root (it builds network namespaces): run it with sudo")
    from mptcpkit.lab.netns import LabError

    summary: dict[str, Any] = {}
    try:
        summary.update(_one(args, m, size, recipe=True))
        if not args.no_naive:
            summary["naive"] = _one(args, m, size, recipe=False)
    except LabError as exc:
        raise CLIError(str(exc)) from None
    summary["checks"] = _checks(summary)
    summary["ok"] = all(c["ok"] for c in summary["checks"])
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(_format(summary))
    return 0 if summary["ok"] else 1


def _one(args: argparse.Namespace, m: int, size: int, *, recipe: bool) -> dict[str, Any]:
    from mptcpkit.lab import fleetrun, parse_rate
    from mptcpkit.lab.fleet import fleet

    err = sys.stderr
    what = "recipe" if recipe else "naive"
    print(
        f"fleet ({what}): {args.instances} instances, {args.clients} client(s) with 2 x "
        f"{args.rate} links ...",
        file=err,
    )
    with (
        fleet(args.instances, clients=args.clients, rate=args.rate, recipe=recipe) as net,
        fleetrun.serving(net, proxy=True),
    ):
        print("  single-path TCP reference (2 s) ...", file=err)
        single = fleetrun.single_path(net, 2.0)
        print(f"  {m} MPTCP downloads of {size} bytes through {net.vip} ...", file=err)
        result = fleetrun.run(net, m, size, concurrency=args.concurrency)
        print(f"  draining an instance while {4 * args.instances} connections run ...", file=err)
        # Each drained download lasts about 4 s: long enough to be open at the drain.
        n = 4 * args.instances
        long = max(size, int(parse_rate(args.rate) / 8 * 2 * args.clients * 4 / n))
        drained = fleetrun.drain(net, connections=n, size=long)
    out = result.as_dict()
    out["single_path_bps"] = round(single)
    paths = 2
    out["paths"] = paths
    out["goodput_ratio"] = {
        c: round(bps / (paths * single), 3) for c, bps in result.goodput_bps.items()
    }
    out["drain"] = drained.as_dict()
    return out


def _checks(s: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipe's claims, each with whether it held."""
    d = s["drain"]
    checks = [
        ("every download of the recipe run has verified bytes", s["verified"]),
        (
            f"0 misrouted joins in {s['connections']} connections (recipe)",
            s["misrouted_joins"] == 0,
        ),
        (
            "every connection sent its joins, all to its own instance (recipe)",
            s["client_mib"].get("MPTcpExtMPJoinSynTx", 0) >= s["connections"] * (s["paths"] - 1)
            and s["misrouted_joins"] == 0,
        ),
        (
            f"connections of drained gw{d['drained']} finished over their unicast subflows",
            d["finished_on_drained"] == d["open_on_drained"] and d["open_on_drained"] > 0,
        ),
        ("new connections avoid the drained instance", d["new_on_drained"] == 0),
        (
            "connections of the other instances finished",
            d["finished_elsewhere"] == d["open_elsewhere"] and d["new_verified"],
        ),
    ]
    naive = s.get("naive")
    if naive is not None:
        checks.append(("the naive run's downloads have verified bytes", naive["verified"]))
    return [{"claim": c, "ok": bool(ok)} for c, ok in checks]


def _mbit(bps: float) -> str:
    return f"{bps / 1e6:.1f} Mbit/s"


def _format_run(title: str, r: dict[str, Any]) -> list[str]:
    per = ", ".join(f"gw{i + 1} {n}" for i, n in enumerate(r["per_instance"]))
    lines = [
        f"{title}:",
        f"  connections      {r['connections']} x {r['size']} bytes, verified: "
        f"{'yes' if r['verified'] else 'NO'}"
        + (f" ({len(r['errors'])} errors)" if r["errors"] else ""),
        f"  per instance     {per}",
        f"  subflows/conn    min {r['subflows_per_conn_min']} max {r['subflows_per_conn_max']} "
        f"({r['conns_with_all_subflows']} of {r['connections']} with all {r['paths']})",
        f"  joins            {r['joins']} ({r['joins_established']} established), misrouted "
        f"{r['misrouted_joins']} "
        f"({100 * r['misroute_rate']:.0f}%: MPJoinNoTokenFound on the instances)",
    ]
    for client, bps in r["goodput_bps"].items():
        lines.append(
            f"  goodput {client:<8} {_mbit(bps)} = {r['goodput_ratio'][client]:.2f} x "
            f"({r['paths']} x single-path TCP {_mbit(r['single_path_bps'])})"
        )
    d = r["drain"]
    lines.append(
        f"  drain gw{d['drained']}        its {d['open_on_drained']} open connections: "
        f"{d['finished_on_drained']} finished; others {d['finished_elsewhere']}/"
        f"{d['open_elsewhere']}; new connections on it: {d['new_on_drained']} of "
        f"{d['new_connections']}"
    )
    return lines


def _format(s: dict[str, Any]) -> str:
    lines = _format_run(
        f"recipe (announce unicast address + C flag), {s['instances']} instances", s
    )
    if "naive" in s:
        lines += _format_run("naive (joins through the VIP)", s["naive"])
    lines.append("checks:")
    lines += [f"  [{'ok' if c['ok'] else 'FAILED'}] {c['claim']}" for c in s["checks"]]
    return "\n".join(lines)
