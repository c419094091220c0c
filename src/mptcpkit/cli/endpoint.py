"""`mptcpkit endpoint ...`: the in-kernel PM's endpoints, in `ip mptcp endpoint`'s grammar."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
from collections.abc import Iterator

from mptcpkit.cli.errors import CLIError, UsageError

USAGE_ERRNOS = {errno.EPERM, errno.EACCES}


@contextlib.contextmanager
def pm_errors(netns: str | None) -> Iterator[None]:
    """Turn path-manager failures into one-line CLI errors (exit 2 for usage, 1 otherwise)."""
    from mptcpkit import pm

    try:
        yield
    except BrokenPipeError:
        raise  # stdout's reader left: quiet exit (mptcpkit.cli.errors.quiet_on_epipe)
    except ValueError as exc:  # also grammar.GrammarError
        raise UsageError(str(exc)) from None
    except pm.NamespaceNotFound as exc:
        raise UsageError(str(exc)) from None
    except (pm.UnknownInterface, pm.UserspacePMUnavailable) as exc:
        raise UsageError(exc.strerror or str(exc)) from None
    except OSError as exc:
        if exc.errno in USAGE_ERRNOS:
            what = str(exc.strerror or "").rsplit(": ", 1)[0] if isinstance(exc, pm.PMError) else ""
            where = f" in network namespace {netns!r}" if netns else ""
            raise UsageError(
                (f"{what}: " if what and what != exc.strerror else "")
                + f"permission denied{where}: managing MPTCP needs CAP_NET_ADMIN (run as root)"
            ) from None
        if isinstance(exc, pm.FamilyNotFound):
            raise UsageError(exc.strerror or str(exc)) from None
        raise CLIError(exc.strerror or str(exc)) from None


def take_options(args: argparse.Namespace) -> list[str]:
    """Words with --netns/--json pulled out, so options may sit anywhere, as with ip."""
    words: list[str] = []
    it = iter(args.words)
    for word in it:
        if word in ("--netns", "-n"):
            value = next(it, None)
            if value is None:
                raise UsageError(f"{word} needs a namespace name")
            args.netns = value
        elif word.startswith("--netns="):
            args.netns = word.partition("=")[2]
        elif word in ("--json", "-j") and hasattr(args, "json"):
            args.json = True
        elif word.startswith("-"):
            raise UsageError(f"unknown option {word!r}")
        else:
            words.append(word)
    return words


def add_common(parser: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    parser.add_argument(
        "--netns", "-n", metavar="NAME", help="work in this network namespace (like ip -n)"
    )
    if json_flag:
        parser.add_argument("--json", "-j", action="store_true", help="JSON output")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "endpoint",
        help="list, add, delete, flush and change MPTCP endpoints (ip mptcp endpoint)",
        description=(
            "Manage the in-kernel path manager's endpoints with ip mptcp's words:\n"
            "  endpoint add ADDRESS [dev IFNAME] [id ID] [port PORT]\n"
            "               [signal|subflow|backup|fullmesh]...\n"
            "  endpoint del id ID | endpoint del ADDRESS\n"
            "  endpoint show [id ID]\n"
            "  endpoint flush\n"
            "  endpoint change id ID [backup|nobackup] [fullmesh|nofullmesh]"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common(p)
    p.add_argument(
        "words", nargs=argparse.REMAINDER, metavar="WORD", help="the command in ip mptcp's grammar"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mptcpkit import pm
    from mptcpkit.pm import grammar

    words = take_options(args)
    netns: str | None = args.netns
    with pm_errors(netns):
        cmd = grammar.parse_endpoint(words)
        with pm.PathManager(netns) as mgr:
            if cmd.action == "show":
                eps = [mgr.endpoint(cmd.id)] if cmd.id is not None else mgr.endpoints()
                if args.json:
                    print(json.dumps([ep.to_json() for ep in eps]))
                else:
                    for ep in eps:
                        print(ep)
            elif cmd.action == "add":
                assert cmd.address is not None
                ep = mgr.add_endpoint(
                    cmd.address, id=cmd.id, port=cmd.port, flags=list(cmd.flags), dev=cmd.dev
                )
                if args.json:
                    print(json.dumps(ep.to_json()))
            elif cmd.action == "del":
                mgr.delete_endpoint(cmd.id, address=cmd.address)
            elif cmd.action == "flush":
                mgr.flush_endpoints()
            elif cmd.action == "change":
                id_ = cmd.id
                if id_ is None:
                    matches = [ep for ep in mgr.endpoints() if ep.address == cmd.address]
                    if not matches:
                        raise CLIError(f"no endpoint with address {cmd.address}")
                    id_ = matches[0].id
                current = mgr.endpoint(id_)
                ep = mgr.set_endpoint_flags(id_, grammar.change_flags(current.flags, cmd.flags))
                if args.json:
                    print(json.dumps(ep.to_json()))
    return 0
