"""`mptcpkit monitor`: MPTCP path-manager events as they happen (ip mptcp monitor)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import types

from mptcpkit.cli.endpoint import add_common, pm_errors


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "monitor",
        help="print MPTCP connection and subflow events (ip mptcp monitor)",
        description="One line per mptcp_pm event: readable, or JSON lines with --json.",
    )
    add_common(p)
    p.add_argument("--count", type=int, metavar="N", help="stop after N events")
    p.set_defaults(func=run)


class _Stop(Exception):
    pass


def _stop(signum: int, frame: types.FrameType | None) -> None:
    raise _Stop


def run(args: argparse.Namespace) -> int:
    from mptcpkit import pm

    if args.count is not None and args.count < 1:
        from mptcpkit.cli.errors import UsageError

        raise UsageError(f"--count must be at least 1, not {args.count}")
    with pm_errors(args.netns):
        stream = pm.events(args.netns)
    old = signal.signal(signal.SIGTERM, _stop)
    seen = 0
    try:
        with stream:
            # Tell a waiting parent (tests, scripts) that the subscription is live.
            print("monitoring mptcp_pm events", file=sys.stderr, flush=True)
            for event in stream:
                line = json.dumps(event.to_json()) if args.json else str(event)
                print(line, flush=True)
                seen += 1
                if args.count is not None and seen >= args.count:
                    break
    except (_Stop, KeyboardInterrupt):
        pass
    except BrokenPipeError:
        sys.stderr.close()
    finally:
        signal.signal(signal.SIGTERM, old)
    return 0
