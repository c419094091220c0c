"""`mptcpkit endpoint ...`: the in-kernel PM's endpoints, in `ip mptcp endpoint`'s grammar.

Output and exit codes are ip's: the same bytes on stdout (text and `-j`), exit 1 for a
word that is not an address, 255 for the rest of the grammar, 2 when the kernel
refuses. Error messages are mptcpkit's one line, with ip's (or the kernel's) words.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
from collections.abc import Iterator

from mptcpkit.cli.errors import CLIError, UsageError

USAGE_ERRNOS = {errno.EPERM, errno.EACCES}
IP_GRAMMAR_EXIT = 255  # ip's exit(-1)
IP_FAILED_EXIT = 2  # ip's exit code when the kernel refuses


def failure(message: str, exit_code: int) -> CLIError:
    error = CLIError(message)
    error.exit_code = exit_code
    return error


@contextlib.contextmanager
def pm_errors(netns: str | None, *, ip_codes: bool = False) -> Iterator[None]:
    """Turn path-manager failures into one-line CLI errors: exit 2 for usage, 1 when the
    work failed; with `ip_codes`, the codes `ip mptcp` exits with for the same failure."""
    from mptcpkit import pm
    from mptcpkit.pm.grammar import GrammarError

    try:
        yield
    except BrokenPipeError:
        raise  # stdout's reader left: quiet exit (mptcpkit.cli.errors.quiet_on_epipe)
    except GrammarError as exc:
        raise failure(str(exc), exc.exit_code if ip_codes else 2) from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except pm.NamespaceNotFound as exc:
        raise UsageError(str(exc)) from None
    except pm.UnknownInterface as exc:
        raise failure(exc.strerror or str(exc), IP_GRAMMAR_EXIT if ip_codes else 2) from None
    except pm.UserspacePMUnavailable as exc:
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
        raise failure(exc.strerror or str(exc), IP_FAILED_EXIT if ip_codes else 1) from None


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
        elif word.startswith("-") and not word[1:2].isdigit():  # -1 is ip's word to judge
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
            "Manage the in-kernel path manager's endpoints with ip mptcp's words\n"
            "(abbreviations too), its output and its exit codes:\n"
            "  endpoint add ADDRESS [dev IFNAME] [id ID] [port PORT]\n"
            "               [signal|subflow|backup|fullmesh|laminar]...\n"
            "  endpoint delete id ID [ADDRESS] | endpoint delete ADDRESS\n"
            "  endpoint show [id ID]\n"
            "  endpoint flush\n"
            "  endpoint change id ID|ADDRESS [backup|nobackup] [fullmesh|nofullmesh]"
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
    with pm_errors(netns, ip_codes=True):
        cmd = grammar.parse_endpoint(words)
        with pm.PathManager(netns) as mgr:
            if cmd.action == "show":
                bare = cmd.id is None and cmd.address is None and not cmd.flags
                eps = mgr.endpoints() if bare else [mgr.endpoint(cmd.id or 0)]
                if args.json:
                    print(json.dumps([ep.to_json() for ep in eps], separators=(",", ":")))
                else:
                    for ep in eps:
                        print(ep.ip_line())
            elif cmd.action == "add":
                assert cmd.address is not None
                mgr.add_endpoint(
                    cmd.address,
                    id=cmd.id or None,
                    port=cmd.port,
                    flags=[w for w in cmd.flags if not w.startswith("no")],  # ip ignores noX
                    dev=cmd.dev,
                )
            elif cmd.action == "del":
                mgr.delete_endpoint(cmd.id, address=cmd.address)
            elif cmd.action == "flush":
                mgr.flush_endpoints()
            elif cmd.action == "change":
                id_ = cmd.id
                if id_ is None:
                    matches = [ep for ep in mgr.endpoints() if ep.address == cmd.address]
                    if not matches:
                        raise failure(
                            f"endpoint change {cmd.address}: no endpoint with this address",
                            IP_FAILED_EXIT,
                        )
                    id_ = matches[0].id
                current = mgr.endpoint(id_, what=f"endpoint change id {id_}")
                mgr.set_endpoint_flags(id_, grammar.change_flags(current.flags, cmd.flags))
    return 0
