"""Start a program under the seccomp filter and supervise it until its last task exits.

The filter is installed in the child between fork and exec (after unblocking the
signals the supervisor keeps for itself); the child hands the listener descriptor
back over a socketpair (SCM_RIGHTS) before exec. The supervisor then answers
notifications, forwards signals sent to it, reaps the child, and returns the child's
exit status once the listener reports that no task uses the filter anymore: a
daemon forked by the program is still served after the program itself exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import socket
import subprocess
from collections.abc import Mapping, Sequence

from mptcpkit.run import abi, syscalls
from mptcpkit.run.activation import Activation
from mptcpkit.run.options import tcp_only_options
from mptcpkit.run.stats import Stats
from mptcpkit.run.supervisor import Only, Supervisor, filter_program

# Signals a user sends to "the program" that reach the supervisor instead: forwarded.
FORWARDED = (
    signal.SIGHUP,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
    signal.SIGALRM,
)


@dataclasses.dataclass
class Result:
    returncode: int  # shell style: 128+N when killed by signal N
    stats: Stats


def spawn(
    argv: Sequence[str],
    program: bytes,
    arch: abi.Arch,
    *,
    env: Mapping[str, str] | None = None,
    sigmask: set[int] | None = None,
) -> tuple[subprocess.Popen[bytes], int, bool]:
    """Start argv with the filter installed: the process, the listener fd, and whether
    received calls wait killable (see syscalls.install_filter)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    activation = Activation.inherited()  # socket activation, watchdog: CMD's, not ours

    def install() -> None:  # runs in the child, single-threaded, before exec
        activation.in_child()
        if sigmask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, sigmask)
        try:
            listener, killable = syscalls.install_filter(program, arch)
        except OSError as exc:
            theirs.send(f"E{exc.strerror or exc}".encode())
            raise
        socket.send_fds(theirs, [b"K" if killable else b"L"], [listener])
        os.close(listener)

    with ours:
        try:
            proc = subprocess.Popen(
                list(argv), env=env, preexec_fn=install, pass_fds=activation.fds
            )
        except subprocess.SubprocessError as exc:
            ours.setblocking(False)
            try:
                why = ours.recv(512).decode(errors="replace")[1:] or str(exc)
            except BlockingIOError:
                why = str(exc)
            raise SeccompUnavailable(
                f"cannot install the seccomp filter ({why}); the kernel needs seccomp user "
                "notification (5.14+): try --strategy preload"
            ) from None
        finally:
            theirs.close()
        activation.close_in_parent()
        msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
    if not fds:
        proc.wait()
        raise SeccompUnavailable("the child did not hand over its seccomp listener")
    return proc, fds[0], msg == b"K"


class SeccompUnavailable(OSError):
    """The filter could not be installed in the child."""


def run(
    argv: Sequence[str],
    *,
    only: Only | None = None,
    env: Mapping[str, str] | None = None,
    forward_signals: bool = True,
) -> Result:
    """Run argv forced to MPTCP through seccomp; return its status and what was done."""
    arch = abi.native_arch()
    tcp_only = tcp_only_options()
    program = filter_program(arch, only, tcp_only)
    sigfd = -1
    old_mask: set[int] | None = None
    if forward_signals:
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
        sigfd = syscalls.signalfd(FORWARDED)
    try:
        proc, listener, killable = spawn(argv, program, arch, env=env, sigmask=old_mask)
        try:
            supervisor = Supervisor(listener, arch, only=only, tcp_only=tcp_only, killable=killable)
        except BaseException:
            os.close(listener)  # the program's trapped calls now fail with ENOSYS
            proc.kill()
            proc.wait()
            raise
        try:
            returncode = _supervise(supervisor, proc, sigfd)
        finally:
            supervisor.close()
    finally:
        if sigfd >= 0:
            os.close(sigfd)
        if old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return Result(returncode, supervisor.stats)


def _supervise(supervisor: Supervisor, proc: subprocess.Popen[bytes], sigfd: int) -> int:
    listener = supervisor.fileno()
    pidfd = os.pidfd_open(proc.pid)
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    poller.register(pidfd, select.POLLIN)
    if sigfd >= 0:
        poller.register(sigfd, select.POLLIN)
    status: int | None = None
    served = False
    try:
        while status is None or not served:
            for fd, events in poller.poll():
                if fd == listener:
                    if events & select.POLLIN:
                        supervisor.handle_one()
                    elif events & (select.POLLHUP | select.POLLERR):
                        served = True
                        poller.unregister(listener)
                elif fd == pidfd:
                    status = proc.wait()
                    poller.unregister(pidfd)
                elif fd == sigfd:
                    _forward(sigfd, proc, status)
    finally:
        os.close(pidfd)
    return 128 - status if status < 0 else status


def _forward(sigfd: int, proc: subprocess.Popen[bytes], status: int | None) -> None:
    while (sig := syscalls.read_signal(sigfd)) is not None:
        signo, code, sender = sig
        # A terminal's ^C / hangup already reached the whole foreground process
        # group (the program included); so did a signal the program sent itself.
        if code == syscalls.SI_KERNEL or sender == proc.pid or status is not None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signo)
