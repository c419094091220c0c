"""What `mptcpkit lab` subcommands share: the flags that shape a topology, and
building and bringing it up (`lab up` and `lab bench` both do).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from mptcpkit.cli.errors import CLIError, UsageError


def prefix_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prefix",
        default=None,
        help="name prefix of the namespaces (default: $MPTCPKIT_LAB_PREFIX or 'mptk-')",
    )


def shape_flags(p: argparse.ArgumentParser, rate: str | None) -> None:
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


def require_root() -> None:
    if os.geteuid() != 0:
        raise UsageError(
            "needs root (network namespaces, veth devices, tc): run it as root or with sudo"
        )


def prefix(args: argparse.Namespace) -> str:
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


def build(args: argparse.Namespace, topology: str, prefix: str) -> Any:
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


def bring_up(net: Any) -> None:
    """Bring `net` up; a kernel without netem is a usage error (exit 2), said plainly."""
    from mptcpkit.lab import LabError
    from mptcpkit.lab.link import NetemMissing

    try:
        net.up()
    except NetemMissing as exc:
        raise UsageError(str(exc)) from None
    except LabError as exc:
        raise CLIError(str(exc)) from None
