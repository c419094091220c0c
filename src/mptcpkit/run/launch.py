"""Run a program under the seccomp filter in this very process, as `exec` would.

The supervisor is started in the background first (a grandchild in a session of its
own, so group and terminal signals meant for the program never reach it): the
compiled `_supervise` program where it was built (supervise.py), else this
interpreter forked. This
process then installs the filter on itself, hands the listener descriptor to the
supervisor (SCM_RIGHTS), lets it use ptrace-level access where Yama asks for a
declaration (PR_SET_PTRACER), and execs CMD. CMD therefore keeps this process id, its
parent, its inherited descriptors, terminal and signal dispositions, and its exit or
death by a signal is what the caller sees; nothing forwards or re-raises signals.

The supervisor serves the filter as long as any task uses it (the program, its
threads, and descendants such as a daemon it forked), prints `--stats` when the
program itself exits, then lets go of its standard error and keeps serving whatever
the program left behind, silently, until the last of them exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence

from mptcpkit.run import abi, execute, supervise, syscalls
from mptcpkit.run.bpf import Only, filter_program
from mptcpkit.run.options import tcp_only_options

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import NoReturn

PR_SET_PTRACER = 0x59616D61  # Yama: "the supervisor may ptrace me" (pidfd_getfd)
# The supervisor stays out of the program's job control and terminal.
_SUPERVISOR_IGNORES = (
    # systemd's stop signals every process of the unit (KillMode=control-group): the
    # supervisor must outlive the program's shutdown, it leaves when the program does.
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGPIPE,
)


class SeccompUnavailable(OSError):
    """The filter could not be installed."""


def exec_forced(
    argv: Sequence[str],
    path: str,
    *,
    only: Only | None = None,
    env: Mapping[str, str] | None = None,
    stats: str | None = None,
) -> NoReturn:
    """Become `argv` (already resolved to `path`) with the filter installed; `stats`
    is the `--stats` format ("text", "json") or None.

    Raises SeccompUnavailable if the filter cannot be installed, and
    execute.ExecError if the program cannot be executed (as a shell would say).
    """
    environ = dict(os.environ if env is None else env)
    arch = abi.native_arch()
    tcp_only = tcp_only_options()
    bpf_program = filter_program(arch, only, tcp_only)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    me = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    compiled = supervise.executable()
    supervisor = b""
    if compiled is not None:
        with theirs:
            supervise.spawn(compiled, theirs, me, only=only, tcp_only=tcp_only, stats=stats)
        # its first process wrote the supervisor's pid before it exited: no waiting for
        # the supervisor itself, which takes the listener whenever it gets to run
        supervisor = ours.recv(32)
        if not supervisor.isdigit():
            ours.close()
            raise SeccompUnavailable(0, "the supervisor did not start")
    else:
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the forked processes
            code = 1
            try:
                ours.close()
                if os.fork() == 0:
                    _supervise(theirs, me, arch, only, tcp_only, stats)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        os.waitpid(child, 0)
    with ours:
        try:
            listener, killable = syscalls.install_filter(bpf_program, arch)
        except OSError as exc:
            raise SeccompUnavailable(
                exc.errno,
                f"cannot install the seccomp filter ({exc.strerror}); the kernel needs "
                "seccomp user notification (5.14+): try --strategy preload",
            ) from None
        try:
            socket.send_fds(ours, [b"K" if killable else b"L"], [listener])
        finally:
            os.close(listener)
        if compiled is None:
            supervisor = ours.recv(32)  # the Python supervisor answers once it has it
    if not supervisor.isdigit():
        raise SeccompUnavailable(0, "the supervisor did not start")
    _allow_ptrace(int(supervisor))
    execute.restore_dispositions(environ)
    execute.exec_program(path, argv, environ)


def _allow_ptrace(pid: int) -> None:
    """Under Yama's ptrace_scope 1 only ancestors may pidfd_getfd: declare the supervisor."""
    with contextlib.suppress(OSError):  # EINVAL without Yama
        syscalls.prctl(PR_SET_PTRACER, pid)


def _supervise(
    sock: socket.socket,
    program_pid: int,
    arch: abi.Arch,
    only: Only | None,
    tcp_only: Mapping[tuple[int, int], str],
    stats: str | None,
) -> NoReturn:  # pragma: no cover - runs in the background process
    """The background supervisor's life, in Python: serve until no task uses the filter."""
    try:
        # Its own process group, out of the terminal's job control (^C, ^Z, kill -PGID),
        # but not its own session: a new session is a new scheduler autogroup, and a
        # trapped thread's hand-off to a supervisor of another autogroup is no longer
        # synchronous (the kernel wakes each side on the other CPU: 3x the cost of a
        # socket() call here).
        os.setpgid(0, 0)
        syscalls.set_name(b"mptcpkit-run")
        for sig in _SUPERVISOR_IGNORES:
            signal.signal(sig, signal.SIG_IGN)
        devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        keep = {0, 1, 2, devnull, sock.fileno()}
        for name in os.listdir("/proc/self/fd"):
            if int(name) not in keep:
                with contextlib.suppress(OSError):
                    os.close(int(name))  # the program's descriptors are not ours to hold
        pidfd = os.pidfd_open(program_pid)
        msg, fds, _flags, _addr = socket.recv_fds(sock, 1, 1)
        if not fds:
            os._exit(0)
        sock.sendall(str(os.getpid()).encode())
        sock.close()
        # Imported here, after the program was let go: it starts without waiting for
        # the supervisor's modules, and its first trapped call waits for them instead.
        from mptcpkit.run.supervisor import Supervisor

        warn = os.fdopen(os.dup(2), "w")
        supervisor = Supervisor(
            fds[0], arch, only=only, tcp_only=dict(tcp_only), killable=msg == b"K", warn=warn
        )
        supervise.serve(supervisor, pidfd, stats, warn, devnull)
    finally:
        os._exit(0)
