"""`mptcpkit run`: run an unmodified program with its TCP sockets made MPTCP."""

from __future__ import annotations

import os
import sys
import types

from mptcpkit.cli import dispatch
from mptcpkit.cli.errors import CLIError, UsageError

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    import argparse
    from typing import Any

STRATEGIES = ("auto", "seccomp", "preload", "bpf")
ONLY = ("listen", "connect", "repair")
STATS = ("text", "json")


def register(subparsers: Any) -> None:
    import argparse

    p = subparsers.add_parser(
        "run",
        help="run a program with its TCP sockets forced to MPTCP",
        description=(
            "Run CMD so that its IPv4/IPv6 stream sockets (protocol 0 or TCP) are MPTCP, "
            "and plain TCP wherever MPTCP cannot be made. CMD's terminal, exit status and "
            "signals pass through."
        ),
        epilog="example: mptcpkit run --stats -- curl http://example.test/",
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="auto",
        help="seccomp (any binary; default), preload (mptcpize's libmptcpwrap), "
        "bpf (update_socket_protocol, where the kernel allows it); auto picks bpf only "
        "when a probe load succeeds and nothing needs seccomp",
    )
    p.add_argument(
        "--only",
        choices=ONLY,
        help="keep MPTCP only for listening or only for connecting sockets, decided when "
        "the program calls listen() or connect(); repair: force nothing, only make the "
        "program's own MPTCP sockets plain TCP when it sets a TCP-only option (Go 1.24+ "
        "listeners and TCP_MD5SIG)",
    )
    p.add_argument(
        "--stats",
        nargs="?",
        const="text",
        choices=STATS,
        help="print at exit how many sockets were forced, fell back, or were left alone "
        "(on stderr)",
    )
    p.add_argument(
        "--systemd-dropin",
        metavar="UNIT",
        help="write a drop-in that runs UNIT's ExecStart under mptcpkit run (the unit "
        "file itself is never edited); with --remove, delete it",
    )
    p.add_argument("--remove", action="store_true", help="with --systemd-dropin: remove it")
    p.add_argument(
        "--root", metavar="DIR", default="/", help="with --systemd-dropin: file-system root"
    )
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    p.set_defaults(func=main)


def parse_quickly(argv: list[str]) -> argparse.Namespace | None:
    """What register()'s parser makes of `run ARGS` (without the word `run`), for the
    forms that need no argparse (which costs a program's start about 5 ms): options
    spelt out in full, each value one of its choices, then `--` and the command. For
    anything else (help, abbreviations, a command without `--`, --systemd-dropin,
    mistakes) None: argparse decides, and words its errors."""
    values: dict[str, str | None] = {"strategy": "auto", "only": None, "stats": None}
    choices = {"strategy": STRATEGIES, "only": ONLY, "stats": STATS}
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            if i + 1 == len(argv):
                return None
            namespace = types.SimpleNamespace(
                command="run",
                func=main,
                systemd_dropin=None,
                remove=False,
                root="/",
                argv=argv[i:],
                **values,
            )
            return namespace  # type: ignore[return-value]
        name, eq, value = word.partition("=")
        key = name[2:] if name.startswith("--") else ""
        if key not in choices:
            return None
        if not eq:
            if key == "stats":  # optional value: "--stats text" would take it
                if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                    return None
                value = "text"
            elif i + 1 < len(argv):
                i += 1
                value = argv[i]
            else:
                return None
        if value not in choices[key]:
            return None
        values[key] = value
        i += 1
    return None


def main(args: argparse.Namespace) -> int:
    command = list(args.argv)
    if command and command[0] == "--":
        command = command[1:]
    if args.systemd_dropin:
        return _dropin(args, command)
    if args.remove:
        raise UsageError("--remove goes with --systemd-dropin UNIT")
    if not command:
        raise UsageError("no command given: mptcpkit run [OPTIONS] -- CMD ARGS...")
    strategy = _choose(args)
    if strategy == "preload":
        return _preload(command)
    if strategy == "bpf":
        return _bpf(command)
    return _seccomp(args, command)


def _choose(args: argparse.Namespace) -> str:
    strategy: str = args.strategy
    if strategy in ("preload", "bpf") and (args.only or args.stats):
        flag = "--only" if args.only else "--stats"
        raise UsageError(f"{flag} needs --strategy seccomp, not {strategy}")
    if strategy != "auto":
        return strategy
    if args.only or args.stats:
        return "seccomp"
    from mptcpkit.run import bpfload

    return "bpf" if bpfload.probe() is None else "seccomp"


def _seccomp(args: argparse.Namespace, command: list[str]) -> int:
    from mptcpkit.run import abi, binary, execute, launch
    from mptcpkit.run.bpf import Only

    try:
        abi.native_arch()
    except LookupError as exc:
        raise UsageError(str(exc)) from None
    only = Only(args.only) if args.only else None
    env = dict(os.environ)
    try:
        path = execute.resolve(command[0], env)
        why = binary.privilege(path)
        if why is not None:
            _warn(
                f"{path} is {why}: under forcing (no_new_privs) it would start without its "
                "privileges, so it runs unforced"
            )
            execute.restore_dispositions(env)
            execute.exec_program(path, command, env)
        launch.exec_forced(command, path, only=only, env=env, stats=args.stats)
    except execute.ExecError as exc:
        return _not_started(exc)
    except launch.SeccompUnavailable as exc:
        raise CLIError(exc.strerror or str(exc)) from None


def _warn(message: str) -> None:
    print(f"mptcpkit run: warning: {message}", file=sys.stderr, flush=True)


def _not_started(exc: Exception) -> int:
    """A shell's answer to a program that cannot be run: 127 not found, 126 not runnable."""
    print(f"mptcpkit run: {exc}", file=sys.stderr)
    return getattr(exc, "status", 126)


def _preload(command: list[str]) -> int:
    from mptcpkit.run import binary, execute, preload

    library = preload.find_library()
    if library is None:
        raise CLIError(
            f"--strategy preload needs {preload.LIBRARY} (Debian/Ubuntu package "
            "libmptcpwrap0, from mptcpize); it is not installed: use --strategy seccomp"
        )
    env = preload.environment(library, os.environ)
    try:
        path = execute.resolve(command[0], env)
        kind = binary.elf_kind(path)
        if kind == "static":
            _warn(
                f"{path} is statically linked: the preload strategy cannot reach it and its "
                "sockets stay TCP; use --strategy seccomp"
            )
        elif kind == "go":
            version = binary.go_version(path)
            if version is not None and version >= (1, 21):
                _warn(
                    f"{path} is a Go {version[0]}.{version[1]} program: libmptcpwrap cannot "
                    "reach it, Go itself makes its sockets MPTCP under "
                    "GODEBUG=multipathtcp=1 (set); TCP-only options such as TCP_MD5SIG then "
                    "fail: --strategy seccomp rescues them"
                )
            else:
                _warn(
                    f"{path} is a Go program older than 1.21, which makes its system calls "
                    "without libc: the preload strategy cannot reach it and its sockets stay "
                    "TCP; use --strategy seccomp"
                )
        why = binary.privilege(path)
        if why is not None:
            _warn(f"{path} is {why}: the dynamic loader ignores LD_PRELOAD for it")
        execute.restore_dispositions(env)
        execute.exec_program(path, command, env)
    except execute.ExecError as exc:
        return _not_started(exc)


def _bpf(command: list[str]) -> int:
    from mptcpkit.run import bpfload

    reason = bpfload.probe()
    if reason is not None:
        raise CLIError(
            f"--strategy bpf is not available here: {reason}; use --strategy seccomp "
            "(works without BPF)"
        )
    return bpfload.run(command)


def _dropin(args: argparse.Namespace, command: list[str]) -> int:
    from mptcpkit.run import systemd

    if command:
        raise UsageError("--systemd-dropin takes no command: the unit's ExecStart is wrapped")
    try:
        if args.remove:
            path = systemd.remove_dropin(args.systemd_dropin, root=args.root)
            print(f"removed {path}" if path else f"no drop-in for {args.systemd_dropin}")
            return 0
        options = []
        if args.strategy != "auto":
            options += ["--strategy", args.strategy]
        if args.only:
            options += ["--only", args.only]
        plan = systemd.write_dropin(args.systemd_dropin, options, root=args.root)
    except systemd.UnitError as exc:
        raise CLIError(str(exc)) from None
    except OSError as exc:
        raise CLIError(f"cannot write the drop-in: {exc}") from None
    for note in plan.notes:
        print(f"mptcpkit run: note: {note}", file=sys.stderr)
    print(f"wrote {plan.path}; run `systemctl daemon-reload` and restart {args.systemd_dropin}")
    return 0


def standalone(argv: list[str] | None = None) -> int:
    """`python -m mptcpkit.cli.run ...`: the subcommand alone, same messages and codes."""
    import argparse

    parser = argparse.ArgumentParser(prog="mptcpkit")
    register(parser.add_subparsers(dest="command", required=True))
    return dispatch(parser.parse_args(["run", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(standalone())
