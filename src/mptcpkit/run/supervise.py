"""The background supervisor's life: the compiled `_supervise` program, then Python.

`mptcpkit run` spawns `_supervise` (built from `_supervise.c` by setup.py, next to
the `_fastpath` extension): a small program that forks into the background, takes the
seccomp listener and answers what the compiled core answers (`_force.h`, the same C
as `_fastpath`): socket() calls of threads in its own network namespace with its
credentials, and exec of programs that are not setuid, setgid or file-capability. So
the supervisor of a common program is a few hundred kB, not an interpreter.

The first call it cannot answer (a TCP-only option, another namespace or user, MPTCP
refused, `--only`, a privileged exec...), or the program's exit when `--stats` was
asked for, makes it exec the Python supervisor in its own process: `main()` here,
handed the listener, that call, the program's pidfd, the count and identities of the
sockets forced so far and the settings. Python then serves as it always did
(`Supervisor`, with `_fastpath` for the common calls), until no task uses the filter.
Without the program (no C compiler at install, `MPTCPKIT_RUN_FASTPATH=0`) the
supervisor is Python from the start (launch.py forks it).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
from collections.abc import Mapping

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import TextIO

    from mptcpkit.run.bpf import Only
    from mptcpkit.run.supervisor import Supervisor

PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_supervise")
SOCK_FD = 3  # where `_supervise` finds its end of the socketpair
FASTPATH_ENV = "MPTCPKIT_RUN_FASTPATH"  # fastpath.ENV (not imported: it loads the C)


def executable() -> str | None:
    """The compiled supervisor, if built here and not turned off."""
    if os.environ.get(FASTPATH_ENV) == "0":
        return None
    return PROGRAM if os.access(PROGRAM, os.X_OK) else None


def encode_tcp_only(table: Mapping[tuple[int, int], str]) -> str:
    return ",".join(f"{level}.{opt}.{name}" for (level, opt), name in sorted(table.items()))


def decode_tcp_only(text: str) -> dict[tuple[int, int], str]:
    table = {}
    for item in filter(None, text.split(",")):
        level, opt, name = item.split(".", 2)
        table[(int(level), int(opt))] = name
    return table


def spawn(
    program: str,
    sock: socket.socket,
    program_pid: int,
    *,
    only: Only | None,
    tcp_only: Mapping[tuple[int, int], str],
    stats: str | None,
) -> None:
    """Start `_supervise` with `sock` as its descriptor 3; it is in the background (and
    reaped) when this returns."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    argv = [
        program,
        f"pid={program_pid}",
        f"python={sys.executable}",
        f"root={root}",
        f"stats={stats or ''}",
        f"only={only.value if only is not None else ''}",
        f"tcponly={encode_tcp_only(tcp_only)}",
        f"context={'proc' if os.environ.get(FASTPATH_ENV) == 'proc' else 'pidfd'}",
    ]
    child = os.posix_spawn(
        program, argv, os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, sock.fileno(), SOCK_FD)]
    )
    os.waitpid(child, 0)


def serve(
    supervisor: Supervisor, pidfd: int, stats: str | None, warn: TextIO | None, devnull: int
) -> None:  # pragma: no cover - runs in the background process
    """Serve until no task uses the filter; print --stats when the program exits
    (pidfd < 0: it already did), then let go of its standard error."""
    from mptcpkit.run.stats import report

    listener = supervisor.fileno()
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    program_alive = pidfd >= 0
    if program_alive:
        poller.register(pidfd, select.POLLIN)
    while True:
        events = dict(poller.poll())
        hangup = False
        if listener in events:
            if events[listener] & select.POLLIN:
                supervisor.handle_one()
            elif events[listener] & (select.POLLHUP | select.POLLERR):
                hangup = True
        if program_alive and (pidfd in events or hangup):
            program_alive = False
            poller.unregister(pidfd)
            if stats and warn is not None:
                with contextlib.suppress(OSError):
                    report(supervisor.stats, stats, warn)
            # Keep serving what the program left behind, without holding its stderr
            # open: a reader of that pipe sees the end when the program ends.
            supervisor.mute()
            if warn is not None:
                with contextlib.suppress(OSError):
                    warn.close()
            os.dup2(devnull, 2)
        if hangup:
            return


def main(argv: list[str]) -> None:  # pragma: no cover - exec'd by `_supervise`
    """The Python supervisor taking over from `_supervise` (see the module's doc)."""
    try:
        _take_over(dict(arg.split("=", 1) for arg in argv))
    finally:
        os._exit(0)


def _take_over(given: dict[str, str]) -> None:  # pragma: no cover - see main
    from mptcpkit.run import abi, syscalls
    from mptcpkit.run.bpf import Only
    from mptcpkit.run.supervisor import Supervisor

    syscalls.set_name(b"mptcpkit-run")  # exec named it after the interpreter

    listener, pidfd, keys = int(given["listener"]), int(given["pidfd"]), int(given["keys"])
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for fd in (listener, pidfd, keys):
        if fd >= 0:
            os.set_inheritable(fd, False)
    warn = os.fdopen(os.dup(2), "w") if pidfd >= 0 else None
    supervisor = Supervisor(
        listener,
        abi.native_arch(),
        only=Only(given["only"]) if given["only"] else None,
        tcp_only=decode_tcp_only(given["tcponly"]),
        killable=given["killable"] == "1",
        warn=warn,
    )
    supervisor.stats.forced = int(given["forced"])
    if keys >= 0:
        with os.fdopen(keys, "rb") as f:
            f.seek(0)
            data = f.read()
        for i in range(0, len(data) - 15, 16):
            dev, ino = data[i : i + 8], data[i + 8 : i + 16]
            supervisor.remember((int.from_bytes(dev, "little"), int.from_bytes(ino, "little")))
    if given["pending"]:
        supervisor.answer(bytes.fromhex(given["pending"]))
    serve(supervisor, pidfd, given["stats"] or None, warn, devnull)
