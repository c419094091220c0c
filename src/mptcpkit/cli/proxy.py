"""`mptcpkit proxy`: run the MPTCP gateway from a TOML file or --listen/--to pairs."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mptcpkit.cli.errors import UsageError

__all__ = ["register"]


class _Pair(argparse.Action):
    """Keeps --listen and --to in command-line order: each --to belongs to the last --listen."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        ns: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        pairs: list[tuple[str, list[str]]] = getattr(ns, "pairs", None) or []
        if self.dest == "listen":
            pairs.append((values, []))
        elif not pairs:
            parser.error("--to must follow a --listen")
        else:
            pairs[-1][1].append(values)
        ns.pairs = pairs


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "proxy",
        help="MPTCP gateway: terminate MPTCP in front of TCP services, or carry TCP over MPTCP",
        description=(
            "Relay connections between per-address protocols, HAProxy style: "
            "`mptcpkit proxy --listen mptcp@:8443 --to tcp@10.0.0.5:443`, or a TOML config "
            "(-c FILE; see docs/proxy.md). SIGHUP reloads the file, SIGTERM drains and stops."
        ),
    )
    p.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")
    p.add_argument(
        "--listen",
        metavar="ADDR",
        action=_Pair,
        dest="listen",
        help="address to accept on (repeatable), e.g. mptcp@:8443",
    )
    p.add_argument(
        "--to",
        metavar="ADDR",
        action=_Pair,
        dest="to",
        help="server for the preceding --listen (repeatable), e.g. tcp@10.0.0.5:443",
    )
    p.add_argument(
        "--workers", type=int, metavar="N", help="worker processes (default: one per core)"
    )
    p.add_argument(
        "--metrics",
        metavar="ADDR",
        help='Prometheus endpoint for the quick form (default 127.0.0.1:9464, "" = off)',
    )
    p.add_argument("--check", action="store_true", help="validate the configuration and exit")
    p.set_defaults(func=run, pairs=None)
    sub = p.add_subparsers(dest="proxy_command", metavar="ctl")
    c = sub.add_parser(
        "ctl",
        help="runtime API: show servers/sessions, set server state/weight, reload",
        description=(
            "Send one command to a running proxy's stats socket (global.stats-socket): "
            "show servers | show sessions | set server B/S state ready|drain|maint | "
            "set server B/S weight N | reload | help."
        ),
    )
    c.add_argument("socket", help="the stats socket path (global.stats-socket)")
    c.add_argument("words", nargs=argparse.REMAINDER, metavar="COMMAND", help="the command")
    c.add_argument("--json", action="store_true", help="answer as JSON")
    c.set_defaults(func=ctl)


def ctl(args: argparse.Namespace) -> int:
    """One runtime API command; exit 1 if the proxy refused it or cannot be reached."""
    from mptcpkit.proxy.ctlserver import request

    words = list(args.words)
    if "--json" in words:  # also accepted after the command
        words.remove("--json")
        args.json = True
    if not words:
        raise UsageError("proxy ctl: give a command (try: help)")
    path = args.socket.removeprefix("unix@")
    try:
        answer = request(path, " ".join(words) + (" json" if args.json else ""))
    except OSError as exc:
        print(f"mptcpkit proxy ctl: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    sys.stdout.write(answer)
    failed = answer.startswith("error: ")
    if args.json:
        import json

        try:
            data = json.loads(answer)
        except ValueError:
            return 1
        failed = isinstance(data, dict) and "error" in data
    return 1 if failed else 0


def _load(args: argparse.Namespace) -> Any:
    from mptcpkit.proxy import config

    if args.config and args.pairs:
        raise UsageError("use either -c FILE or --listen/--to, not both")
    if args.config:
        if args.workers is not None or args.metrics is not None:
            raise UsageError("--workers/--metrics go with --listen/--to; with -c use [global]")
        return config.load(args.config)
    if not args.pairs:
        raise UsageError("nothing to do: give -c FILE, or --listen ADDR --to ADDR")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    return config.quick(args.pairs, workers=args.workers, metrics=args.metrics)


def run(args: argparse.Namespace) -> int:
    from mptcpkit.proxy import config, master, prepare

    try:
        cfg = _load(args)
        if args.check:
            prep = prepare.prepare(cfg)  # as at start: names, log, users, fd limit
            for note in prep.notes:
                print(f"{cfg.source}: {note}")
            n_srv = sum(len(b.servers) for b in cfg.backends.values())
            print(
                f"{cfg.source}: OK: {len(cfg.frontends)} frontends, {len(cfg.backends)} "
                f"backends, {n_srv} servers"
            )
            for warning in _balancer_warnings(cfg):
                print(f"mptcpkit proxy: warning: {warning}", file=sys.stderr)
            return 0
        path = args.config
        reload = (lambda: config.load(path)) if path else None
        return master.run(cfg, reload=reload)
    except config.ConfigError as exc:
        raise UsageError(str(exc)) from None
    finally:
        sys.stdout.flush()


def _balancer_warnings(cfg: Any) -> list[str]:
    """An MPTCP frontend bound to an address on `lo` (a VIP, as behind a direct-return
    L4 balancer) in a namespace that announces nothing or lacks the C flag: clients'
    extra subflows go through the balancer and reach other instances (docs/fleet.md)."""
    import ipaddress

    from mptcpkit import pm
    from mptcpkit.pm.rtnl import namespace_addresses
    from mptcpkit.support import read_sysctl

    try:
        on_lo = {a for a, ifname in namespace_addresses(None).items() if ifname == "lo"}
        signal = any(ep.flags & pm.EndpointFlag.SIGNAL for ep in pm.endpoints())
    except OSError:
        return []
    c_flag = read_sysctl("net.mptcp.allow_join_initial_addr_port") == "0"
    out = []
    for fe in cfg.frontends:
        for addr in fe.binds:
            if addr.protocol != "mptcp" or addr.host not in on_lo:
                continue
            if ipaddress.ip_address(addr.host).is_loopback or (signal and c_flag):
                continue
            missing = " and ".join(
                what
                for what, ok in (
                    ("no signal endpoint announces a unicast address", signal),
                    ("net.mptcp.allow_join_initial_addr_port is not 0", c_flag),
                )
                if not ok
            )
            out.append(
                f"frontend {fe.name}: binds {addr.host}, an address on lo (a load balancer's "
                f"virtual address?), but {missing}: clients' extra subflows would go "
                "through the balancer to other instances (see docs/fleet.md; "
                "pmd: load_balancer = true, announce = [...])"
            )
    return out
