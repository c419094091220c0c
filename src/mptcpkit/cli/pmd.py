"""`mptcpkit pmd`: run the path-manager daemon, or ask a running one for its state."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from mptcpkit.cli.endpoint import pm_errors
from mptcpkit.cli.errors import CLIError, UsageError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "pmd",
        help="path-manager daemon: endpoints follow interfaces, subflows come back",
        description=(
            "  mptcpkit pmd -c pmd.toml            run (SIGTERM stops it)\n"
            "  mptcpkit pmd status [-c pmd.toml]   show a running daemon's state\n"
            "See docs/pm.md for the configuration."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", nargs="?", choices=["run", "status"], default="run")
    p.add_argument("-c", "--config", metavar="FILE", help="pmd.toml")
    p.add_argument("--netns", "-n", metavar="NAME", help="manage this network namespace")
    p.add_argument("--socket", metavar="PATH", help="status socket (default from the config)")
    p.add_argument("--json", "-j", action="store_true", help="status as JSON")
    p.add_argument("--verbose", "-v", action="store_true", help="log every event too")
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the configuration against the namespace's addresses and exit",
    )
    p.set_defaults(func=run)


def _config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from mptcpkit.pm import config as cfgmod

    try:
        cfg = cfgmod.load(args.config) if args.config else cfgmod.Config()
    except cfgmod.ConfigError as exc:
        raise UsageError(str(exc)) from None
    if args.netns:
        cfg = dataclasses.replace(cfg, netns=args.netns)
    if args.socket:
        cfg = dataclasses.replace(cfg, status_socket=args.socket)
    return cfg


def run(args: argparse.Namespace) -> int:
    from mptcpkit.pm import daemon, statussock
    from mptcpkit.pm.state import StateError

    cfg = _config(args)
    if args.action == "status":
        path = cfg.status_path()
        try:
            state = statussock.status(path)
        except OSError as exc:
            raise CLIError(f"no pmd answering on {path}: {exc.strerror or exc}") from None
        if args.json:
            print(json.dumps(state))
        else:
            _print_status(state)
        return 0
    if args.config is None:
        raise UsageError("pmd needs a configuration: mptcpkit pmd -c pmd.toml")
    if args.check:
        return _check(cfg, args.config)
    logging.basicConfig(stream=sys.stderr, format="%(asctime)s pmd: %(message)s")
    logging.getLogger("mptcpkit").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    with pm_errors(cfg.netns):
        try:
            daemon.run(cfg)
        except (statussock.StatusSocketError, daemon.AlreadyRunning, StateError) as exc:
            raise UsageError(exc.strerror or str(exc)) from None
    return 0


def _check(cfg, source: str) -> int:  # type: ignore[no-untyped-def]
    """The configuration parsed; warnings about it against the namespace on stderr."""
    from mptcpkit.pm import config as cfgmod
    from mptcpkit.pm import rtnl
    from mptcpkit.pm.netns import NamespaceNotFound

    try:
        addresses = rtnl.namespace_addresses(cfg.netns)
    except NamespaceNotFound:
        raise UsageError(f"network namespace {cfg.netns!r} does not exist") from None
    except PermissionError:
        raise UsageError("--check needs root to look into a namespace") from None
    for warning in cfgmod.check(cfg, addresses):
        print(f"mptcpkit pmd: warning: {warning}", file=sys.stderr)
    print(f"{source}: OK")
    return 0


def _print_status(state: dict) -> None:  # type: ignore[type-arg]
    print(
        f"pmd pid {state['pid']} mode {state['mode']} "
        f"netns {state['netns'] or '-'} up {state['uptime']}s"
    )
    for name, info in state["interfaces"].items():
        flags = ("running" if info["running"] else "down") + (" managed" if info["managed"] else "")
        print(f"  interface {name}: {flags}")
    for ep in state["endpoints"]:
        print(f"  endpoint {ep['address']} id {ep['id']}")
    for address in state["parked"]:
        print(f"  endpoint {address} parked (link down)")
    for conn in state["connections"]:
        print(f"  connection {conn['token']} subflows {' '.join(conn['subflows'])}")
    print(f"  pending retries: {state['pending_retries']}")
    for line in state["decisions"][-10:]:
        print(f"  {line}")
