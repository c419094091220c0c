"""The `mptcpkit` command: one entry point, one module per subcommand.

Each subcommand module exposes `register(subparsers)`, which adds its parser and
sets `func` to a callable taking the parsed namespace and returning an exit code.
Exit codes: 0 success, 1 the work failed (or MPTCP is unusable), 2 usage error.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

from mptcpkit.cli.errors import CLIError, quiet_on_epipe

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    import argparse
    from typing import Any

# (subcommand, its one-line help), in the order `mptcpkit --help` lists them. The help
# is the one the module's register() gives (a test compares): it is written here too so
# that `mptcpkit --help`, and any one subcommand, import no other subcommand's module.
COMMANDS: tuple[tuple[str, str], ...] = (
    ("demo", "watch MPTCP survive a link failure through the mptcpkit gateway (needs root)"),
    ("check", "report MPTCP support, settings and limits of this host"),
    ("proxy", "MPTCP gateway: terminate MPTCP in front of TCP services, or carry TCP over MPTCP"),
    ("run", "run a program with its TCP sockets forced to MPTCP"),
    ("endpoint", "list, add, delete, flush and change MPTCP endpoints (ip mptcp endpoint)"),
    ("limits", "show or set MPTCP limits (ip mptcp limits)"),
    ("monitor", "print MPTCP connection and subflow events (ip mptcp monitor)"),
    ("pmd", "path-manager daemon: endpoints follow interfaces, subflows come back"),
    ("lab", "multipath test networks in network namespaces (needs root)"),
)
SUBCOMMANDS: tuple[str, ...] = tuple(f"mptcpkit.cli.{name}" for name, _ in COMMANDS)


def _parser_class() -> type[argparse.ArgumentParser]:
    """argparse's parser, whose formatters are told the terminal's width: argparse
    makes one for every add_argument(), and a formatter left to find the width itself
    imports shutil (with bz2 and lzma), about 2 ms of every command's start. (argparse
    itself is imported only here: `mptcpkit run -- CMD` goes without it.)"""
    import argparse

    class Parser(argparse.ArgumentParser):
        def _get_formatter(self) -> argparse.HelpFormatter:
            make: Any = self.formatter_class  # every HelpFormatter takes width=
            formatter: argparse.HelpFormatter = make(prog=self.prog, width=_columns() - 2)
            return formatter  # (width: as HelpFormatter does with shutil's answer)

    return Parser


def _columns() -> int:
    """shutil.get_terminal_size().columns, without importing shutil."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only that subcommand's module is imported (the
    others are listed by name and help line), without it every module is."""
    parser_class = _parser_class()
    parser = parser_class(
        prog="mptcpkit",
        description="Multipath TCP (RFC 8684) on Linux: sockets, gateway, forcing, paths, lab.",
    )
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=parser_class
    )
    for name, summary in COMMANDS:
        if command is None or name == command:
            importlib.import_module(f"mptcpkit.cli.{name}").register(subparsers)
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["run"]:  # the common forms of `mptcpkit run`, without argparse
        quick = importlib.import_module("mptcpkit.cli.run").parse_quickly(args[1:])
        if quick is not None:
            return quiet_on_epipe(lambda: dispatch(quick))
    # the first word is the subcommand (the top level has no option taking a value)
    command = next((arg for arg in args if not arg.startswith("-")), "")
    return quiet_on_epipe(lambda: dispatch(build_parser(command).parse_args(args)))


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
