"""The `mptcpkit` command: one entry point, one module per subcommand.

Each subcommand module exposes `register(subparsers)`, which adds its parser and
sets `func` to a callable taking the parsed namespace and returning an exit code.
Exit codes: 0 success, 1 the work failed (or MPTCP is unusable), 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mptcpkit.cli.errors import CLIError, quiet_on_epipe

# Subcommand modules, in the order `mptcpkit --help` lists them.
SUBCOMMANDS: tuple[str, ...] = (
    "mptcpkit.cli.demo",
    "mptcpkit.cli.check",
    "mptcpkit.cli.proxy",
    "mptcpkit.cli.run",
    "mptcpkit.cli.endpoint",
    "mptcpkit.cli.limits",
    "mptcpkit.cli.monitor",
    "mptcpkit.cli.pmd",
    "mptcpkit.cli.lab",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mptcpkit",
        description="Multipath TCP (RFC 8684) on Linux: sockets, gateway, forcing, paths, lab.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return quiet_on_epipe(lambda: dispatch(build_parser().parse_args(argv)))


def dispatch(args: argparse.Namespace) -> int:
    """Run a parsed subcommand: its exit code, or one line and the error's code."""
    try:
        code: int = args.func(args)
    except CLIError as exc:
        print(f"mptcpkit {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"mptcpkit {args.command}: interrupted", file=sys.stderr)
        return 130
    return code
