"""Stopping the proxy (SIGTERM/SIGINT): hold new connections off, let workers drain.

The master's last act, apart from its loop because it is one sequence with its own
rules: new SYNs are dropped first (clients send them again; no connection is refused),
then the workers take what is queued and finish their connections until
`global.stop-timeout`, and whoever is left after it is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time

from mptcpkit import handover
from mptcpkit.proxy import metrics as metrics_mod
from mptcpkit.proxy.configmodel import Config
from mptcpkit.proxy.listeners import ListenerPool
from mptcpkit.proxy.logging import EventLog

__all__ = ["drain"]


def drain(
    cfg: Config,
    pool: ListenerPool,
    pids: set[int],
    log: EventLog,
    with_metrics: bool,
    diverted: list[tuple[float, list[socket.socket]]],
) -> None:
    """Stop the workers `pids` (current and retired) gracefully, closing every listener
    of `pool`; then release the droppers, these and those a reload left in `diverted`."""
    log.event(
        f"stopping: draining {len(pids)} workers (up to {cfg.global_.stop_timeout:g}s)",
        now=True,
    )
    # New SYNs are dropped (and sent again by clients) from now on, so that workers
    # can take everything queued or in flight before closing their listeners.
    try:
        droppers, failed = pool.divert(cfg)
    except Exception as exc:  # never in the way of stopping
        droppers, failed = [], [f"new connections could not be held off while stopping: {exc}"]
    for line in failed:
        log.event(line, now=True)
    pool.close()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + cfg.global_.stop_timeout + 5.0
    while pids and time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            signal.sigtimedwait({signal.SIGCHLD}, 0.1)
            continue
        pids.discard(pid)
        if with_metrics:
            metrics_mod.worker_exited(pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    handover.undivert(droppers)
    for _, held in diverted:
        handover.undivert(held)
