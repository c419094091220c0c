"""What a service manager hands "the program": socket activation and the watchdog.

systemd (and `systemd-socket-activate`, inetd-style managers) starts `mptcpkit run`
with the listening sockets on descriptors 3.. (`LISTEN_FDS`, sd_listen_fds(3)) and
addresses them to the process it started: `LISTEN_PID`, like `WATCHDOG_PID`, is
mptcpkit run's pid. The seccomp strategy execs CMD in that very process, so all is
CMD's already; a strategy that starts CMD as a child (bpf) must pass the descriptors
on and address the variables to the child's pid (sd_listen_fds() and
sd_watchdog_enabled() ignore them otherwise), then drop its own copies, so that a
connection handed over (Accept=yes) closes when CMD closes it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

from mptcpkit.abi._record import record

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
PID_VARIABLES = ("LISTEN_PID", "WATCHDOG_PID")


@record
class Activation:
    """The descriptors and pid-addressed variables this process was handed."""

    fds: tuple[int, ...] = ()
    readdress: tuple[str, ...] = ()  # variables to set to the child's pid

    @classmethod
    def inherited(cls, environ: Mapping[str, str] | None = None) -> Activation:
        env = os.environ if environ is None else environ
        me = str(os.getpid())
        readdress = tuple(v for v in PID_VARIABLES if env.get(v) == me)
        fds: tuple[int, ...] = ()
        if "LISTEN_PID" in readdress:
            try:
                count = int(env.get("LISTEN_FDS", "0"))
            except ValueError:
                count = 0
            fds = tuple(fd for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count) if _open(fd))
        return cls(fds, readdress)

    def in_child(self) -> None:
        """Between fork and exec, in the child: address the variables to it. Only
        effective when the child execs the inherited environment (env=None)."""
        me = str(os.getpid())
        for name in self.readdress:
            os.putenv(name, me)

    def close_in_parent(self) -> None:
        """After the child started: the supervisor keeps no copy of CMD's sockets."""
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
