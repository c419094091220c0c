"""A worker process: what a child forked by the master runs until it exits.

The master (master.py) forks; the child ignores the master's signals, drops root,
takes its share of each frontend's limits, and serves its listeners on an event loop
(runtime.py), saying "ready" (or why not) on a pipe the master waits on. Kept apart
from the master so that the master's module is about supervising, this one about
being supervised: the signals below are the whole contract between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

from mptcpkit.proxy import abuse, control, health, privileges, resolvers
from mptcpkit.proxy import metrics as metrics_mod
from mptcpkit.proxy.configmodel import Config
from mptcpkit.proxy.logging import EventLog
from mptcpkit.proxy.prepare import Prepared

__all__ = ["LOOP_ENV", "RETIRE_SETTLE", "main", "tell"]

# Retired by a reload that drops listening addresses: those listeners close with the
# worker's copies, so it settles them first (Runtime.stop); SIGUSR1 retires without.
RETIRE_SETTLE = signal.SIGRTMIN + 1
LOOP_ENV = "MPTCPKIT_PROXY_LOOP"  # "asyncio" runs workers on stock asyncio, not uvloop


def tell(fd: int, what: bytes) -> None:
    """One message to the master on the ready pipe ("R", or "E" and why), then close it."""
    with contextlib.suppress(OSError):
        os.write(fd, what[:4096])
    with contextlib.suppress(OSError):
        os.close(fd)


def main(
    cfg: Config,
    listeners: dict[str, list[socket.socket]],
    slot: int,
    prep: Prepared,
    with_metrics: bool,
    master_pid: int,
    ready_fd: int,
    ctl: tuple[socket.socket, dict[tuple[str, str], dict[str, Any]]] | None = None,
    board: health.Board | None = None,
    addrs: resolvers.AddressBoard | None = None,
    sources: dict[str, abuse.SourceTable] | None = None,
) -> int:
    for sig in (signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    # Everything that reads files (modules, the log, metrics files) happens before
    # dropping root: the new user may not be able to read the Python installation.
    # Server names were resolved by the master (prepare.py): a worker never looks one up.
    from mptcpkit.proxy.runtime import Runtime

    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if os.environ.get(LOOP_ENV, "uvloop") != "asyncio":
        with contextlib.suppress(ImportError):
            import uvloop

            factory = uvloop.new_event_loop
    log = EventLog(cfg.global_.log, cfg.global_.log_format, prefix=f"worker {slot}: ")
    metrics = metrics_mod.WorkerMetrics() if with_metrics else None
    privileges.drop(prep.ids)
    privileges.die_with_parent(master_pid)  # after setuid, which clears it

    # Startup objects will never be garbage: keep them out of every GC pass.
    gc.collect()
    gc.freeze()

    # maxconn is for the whole proxy: this worker takes its share of each frontend's.
    cfg = dataclasses.replace(
        cfg,
        frontends=tuple(
            dataclasses.replace(
                f,
                maxconn=cfg.maxconn_share(f, slot),
                maxconnrate=abuse.share(f.maxconnrate, cfg.global_.workers, slot),
            )
            for f in cfg.frontends
        ),
    )

    async def main() -> None:
        rt = Runtime(
            cfg,
            listeners,
            log=log,
            metrics=metrics,
            worker=slot,
            targets=prep.targets,
            sources=sources,
        )
        rt.board = board
        rt.addrs = addrs
        for key in prep.unresolved:  # init-addr none: DOWN until the name resolves
            backend, server = key.split("/", 1)
            for st in rt.backends[backend].balancer.states:
                if st.server.name == server:
                    st.resolved = False
        if ctl is not None:  # the runtime API: changes made before this worker started
            for (backend, server), change in ctl[1].items():
                control.apply(rt, backend, server, change)
            asyncio.get_running_loop().create_task(control.worker_loop(rt, ctl[0]))
        loop = asyncio.get_running_loop()
        # SIGTERM: the master diverted new SYNs first; handshakes in flight settle.
        loop.add_signal_handler(signal.SIGTERM, rt.stop, cfg.global_.stop_timeout, True)
        loop.add_signal_handler(signal.SIGUSR1, rt.stop, None)  # retired by a reload
        loop.add_signal_handler(RETIRE_SETTLE, rt.stop, None, True)  # and addresses dropped
        loop.add_signal_handler(signal.SIGUSR2, rt.stop, 0.0)  # hard-stop-after
        await rt.serve(ready=lambda: tell(ready_fd, b"R"))

    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main())
    finally:
        log.close()
    return 0
