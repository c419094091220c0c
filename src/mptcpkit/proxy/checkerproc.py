"""The health checker process: forked by the master like a worker, checking servers.

Checks run in one process for the whole proxy (health.py does the checking and keeps
the shared board), unprivileged like the workers and restarted with each successful
reload. This module is its life cycle as seen from the master: fork it, and stop it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable

from mptcpkit.proxy import health, privileges, resolvers
from mptcpkit.proxy.configmodel import Config
from mptcpkit.proxy.logging import EventLog
from mptcpkit.proxy.prepare import Prepared

__all__ = ["spawn", "stop"]


def spawn(
    cfg: Config,
    board: health.Board,
    addrs: resolvers.AddressBoard | None,
    prep: Prepared,
    close_inherited: Callable[[], None],
) -> int:
    """Fork the checker; its pid. In the child, `close_inherited` closes what the
    master holds that the checker must not (listeners, droppers, pipes)."""
    targets = prep.targets
    sys.stderr.flush()
    master_pid = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    try:
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        close_inherited()
        log = EventLog(cfg.global_.log, cfg.global_.log_format, prefix="checks: ")
        privileges.drop(prep.ids)
        privileges.die_with_parent(master_pid)  # after setuid, which clears it
        health.run_checker(cfg, board, targets, log, addrs)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(1)


def stop(pid: int) -> None:
    """SIGTERM the checker and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
