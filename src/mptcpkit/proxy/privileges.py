"""Dropping root in a process the master forks (a worker, the metrics server).

The master keeps root to bind new addresses on reload; what it forks gives it up
at once, after reading what it needs, and dies with the master.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

__all__ = ["die_with_parent", "drop"]

_PR_SET_PDEATHSIG = 1


def drop(ids: tuple[int | None, int | None]) -> None:
    """Become `ids` (uid, gid; None: keep), with no supplementary groups."""
    uid, gid = ids
    if gid is not None:
        os.setgroups([])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)


def die_with_parent(master_pid: int) -> None:
    """A child must not outlive a master killed with SIGKILL: PR_SET_PDEATHSIG (call it
    after setuid, which clears it)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != master_pid:  # the master died before prctl took effect
        os._exit(1)
