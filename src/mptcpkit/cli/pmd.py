"""`mptcpkit pmd`: the path-manager daemon (placeholder until the daemon lands)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("pmd", help="path-manager daemon")
    p.set_defaults(func=lambda args: 0)
