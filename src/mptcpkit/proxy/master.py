"""The master process: bind, fork workers, reload on SIGHUP, drain on SIGTERM.

- Before anything listens, what workers need is resolved and checked (prepare.py),
  then everything is bound (listeners.py); a failure is a `ConfigError` (exit 2) and
  nothing stays listening. "ready" once every worker serves.
- Workers (workerproc.py) drop root (`global.user/group`) after the fork; the master
  keeps it to bind new addresses on reload and serves nothing but the runtime API:
  `/metrics` is answered by a child that dropped root too (metricsd.py), and health checks run in
  one checker process (checkerproc.py), unprivileged like the workers, restarted with each
  successful reload.
- SIGHUP: the new config is prepared and bound first, and its workers must serve;
  if anything is wrong the old workers keep running and the error is logged.
  Otherwise the old ones stop accepting and exit when their connections are done
  (SIGUSR1), or at `hard-stop-after` (SIGUSR2).
- SIGTERM/SIGINT: workers stop accepting and drain up to `global.stop-timeout`
  (stopping.py).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable

from mptcpkit import handover
from mptcpkit.proxy import (
    abuse,
    checkerproc,
    compiled,
    health,
    metricsd,
    reloadable,
    resolvers,
    stopping,
    workerproc,
)
from mptcpkit.proxy import metrics as metrics_mod
from mptcpkit.proxy.configmodel import Config, ConfigError
from mptcpkit.proxy.ctlserver import ControlServer
from mptcpkit.proxy.listeners import ListenerPool
from mptcpkit.proxy.logging import EventLog
from mptcpkit.proxy.prepare import Prepared, log_error, prepare

__all__ = ["Master", "run"]

_MASTER_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
_DIVERT_HOLD = 1.5  # s the droppers of dropped addresses outlive the old workers' settling
READY_TIMEOUT = 30.0  # seconds a new worker has to start serving


class Master:
    def __init__(self, cfg: Config, *, reload: Callable[[], Config] | None = None) -> None:
        self.cfg = cfg
        self.reload_fn = reload
        self.pool = ListenerPool()
        try:
            self.log = EventLog(
                cfg.global_.log if cfg.global_.log != "none" else "stderr",
                cfg.global_.log_format,
                prefix="master: ",
            )
        except OSError as exc:
            raise log_error(cfg, exc) from None
        self.workers: dict[int, int] = {}  # pid -> slot
        self.old: dict[int, float | None] = {}  # retired pid -> when hard-stop-after cuts it
        self.starting: dict[int, int] = {}  # pid -> read end of its "ready" pipe
        self.prep = Prepared()
        self.metrics_dir: str | None = None
        self.metrics_pid: int | None = None  # the process serving /metrics (metricsd.py)
        self.generation = 0
        self.retiring: list[socket.socket] = []
        self.diverted: list[tuple[float, list[socket.socket]]] = []  # (until, droppers)
        self.ctl: ControlServer | None = None  # the runtime API (global.stats-socket)
        self.board: health.Board | None = None  # the checker's health state (health.py)
        self.checker: int | None = None  # the checker process
        self.addrs: resolvers.AddressBoard | None = None  # re-resolved names (resolvers.py)
        self.sources: dict[str, abuse.SourceTable] = {}  # maxconn-per-source (abuse.py)
        self.resolver: resolvers.Resolver | None = None  # the thread that re-resolves them
        self.checker_due: float | None = None  # when a dead checker is restarted
        self._reload_waiters: list[tuple[threading.Event, list[str | None]]] = []

    # --- start -----------------------------------------------------------------------

    def start(self) -> None:
        """Resolve, check and bind everything, or raise ConfigError with nothing listening."""
        self.prep = prepare(self.cfg)
        self.cfg = self.prep.cfg or self.cfg
        for note in self.prep.notes:
            self.log.event(note)
        new, lines = self.pool.bind(self.cfg, self.cfg.global_.workers)
        self.pool.adopt(new)
        self.board = _board(self.cfg)
        self.addrs = resolvers.AddressBoard(self.cfg)
        self.sources = _sources(self.cfg)
        m = self.cfg.global_.metrics
        if m is not None:
            self.metrics_dir = metrics_mod.prepare()
            try:
                self.metrics_pid, line = metricsd.start(self.cfg, self.metrics_dir, self.prep.ids)
            except ConfigError:
                self.pool.close()
                raise
            lines.append(line)
        if self.cfg.global_.stats_socket is not None:
            self.ctl = ControlServer(self.cfg, self._reload_request)
            self.ctl.board = lambda: self.board
            lines.append(f"runtime API on {self.cfg.global_.stats_socket}")
        for line in lines:
            self.log.event(line)
        self.log.flush()

    def _spawn(self, slot: int) -> int:
        cfg = self.cfg
        mine = self.pool.for_worker(cfg, slot)
        own = {id(s) for socks in mine.values() for s in socks}
        # Close every listener that is not this worker's, including ones a reload is
        # retiring: an inherited copy would keep a removed address accepting into a void.
        others = [s for s in (*self.pool.all(), *self.retiring) if id(s) not in own]
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        ctl_m, ctl_w = self.ctl.channel() if self.ctl is not None else (None, None)
        sys.stderr.flush()
        master_pid = os.getpid()
        pid = os.fork()
        if pid:
            os.close(ready_w)
            self.workers[pid] = slot
            self.starting[pid] = ready_r
            if self.ctl is not None and ctl_m is not None and ctl_w is not None:
                ctl_w.close()
                self.ctl.add(pid, ctl_m)
            return pid
        code = 1
        try:
            os.close(ready_r)
            if self.ctl is not None and ctl_m is not None:
                ctl_m.close()
                self.ctl.forked()
            for fd in self.starting.values():
                os.close(fd)
            for s in others:
                s.close()
            self._close_droppers()
            code = workerproc.main(
                cfg,
                mine,
                slot,
                self.prep,
                self.metrics_dir is not None,
                master_pid,
                ready_w,
                (ctl_w, dict(self.ctl.overrides))
                if self.ctl is not None and ctl_w is not None
                else None,
                self.board,
                self.addrs,
                self.sources,
            )
        except BaseException as exc:
            traceback.print_exc()
            workerproc.tell(ready_w, b"E" + f"{type(exc).__name__}: {exc}".encode())
        finally:
            os._exit(code)

    def _await_ready(self, pids: list[int]) -> str | None:
        """Wait until each worker serves; None, or why one of them could not start."""
        pending = {self.starting[p]: p for p in pids if p in self.starting}
        deadline = time.monotonic() + READY_TIMEOUT
        error = None
        while pending and error is None:
            left = deadline - time.monotonic()
            if left <= 0:
                pid = next(iter(pending.values()))
                error = f"worker {self.workers.get(pid)} not ready after {READY_TIMEOUT:g}s"
                break
            poll = select.poll()  # not select(): the master's fds may be past 1024
            for fd in pending:
                poll.register(fd, select.POLLIN)
            for fd, _ in poll.poll(left * 1000):
                data = os.read(fd, 4096)
                pid = pending.pop(fd)
                self._started(pid)
                if data == b"R":
                    continue
                slot = self.workers.get(pid)
                why = data[1:].decode(errors="replace") if data else self._exit_status(pid)
                error = f"worker {slot} could not start: {why}"
        for pid in pending.values():
            self._started(pid)
        return error

    def _started(self, pid: int) -> None:
        fd = self.starting.pop(pid, None)
        if fd is not None:
            os.close(fd)

    def _exit_status(self, pid: int) -> str:
        """Reap a worker that closed its ready pipe without a word: how it ended."""
        self.workers.pop(pid, None)
        if self.ctl is not None:
            self.ctl.remove(pid)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return "exited"
        if self.metrics_dir:
            metrics_mod.worker_exited(pid)
        return f"exited ({os.waitstatus_to_exitcode(status)})"

    # --- main loop ---------------------------------------------------------------------

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _MASTER_SIGNALS)
        try:
            relay = compiled.data_path()  # before listening: a missing engine is an error
            self.start()
            for slot in range(self.cfg.global_.workers):
                self._spawn(slot)
            error = self._await_ready(list(self.workers))
            if error is not None:
                self.log.event(f"{error}; stopping", now=True)
                self._stop()
                return 1
            self.log.event(
                f"ready: {self.cfg.global_.workers} workers ({relay} relay), pid {os.getpid()}",
                now=True,
            )
            if self.ctl is not None:
                self.ctl.start()
            self._spawn_checker()
            self._start_resolver()
            return self._loop()
        finally:
            for pid in list(self.starting):
                self._started(pid)
            self.pool.close()
            metricsd.stop(self.metrics_pid, self.metrics_dir)
            if self.ctl is not None:
                self.ctl.close()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _MASTER_SIGNALS)

    def _loop(self) -> int:
        respawn_at: dict[int, float] = {}
        while True:
            info = signal.sigtimedwait(_MASTER_SIGNALS, 0.5)
            self._reap(respawn_at)
            now = time.monotonic()
            for slot, when in list(respawn_at.items()):
                if now >= when:
                    del respawn_at[slot]
                    self.log.event(f"restarting worker {slot}", now=True)
                    self._started(self._spawn(slot))
            self._hard_stop(now)
            for item in [d for d in self.diverted if now >= d[0]]:
                self.diverted.remove(item)
                handover.undivert(item[1])
            if self.checker_due is not None and now >= self.checker_due:
                self.log.event("restarting the health checker", now=True)
                self._spawn_checker()
            if info is None:
                continue
            if info.si_signo == signal.SIGHUP:
                error = self._reload()
                waiters, self._reload_waiters = self._reload_waiters, []
                for done, result in waiters:
                    result.append(error)
                    done.set()
            elif info.si_signo in (signal.SIGTERM, signal.SIGINT):
                return self._stop()

    def _hard_stop(self, now: float) -> None:
        """`hard-stop-after`: old workers still draining after it are cut (SIGUSR2)."""
        for pid, when in list(self.old.items()):
            if when is not None and now >= when:
                self.old[pid] = None
                self.log.event(
                    f"old worker {pid}: hard-stop-after reached, closing its connections",
                    now=True,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR2)

    def _reap(self, respawn_at: dict[int, float]) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.metrics_pid:
                self.metrics_pid = None
                code = os.waitstatus_to_exitcode(status)
                self.log.event(f"metrics server exited ({code}): /metrics is down", now=True)
                continue
            if self.metrics_dir:
                metrics_mod.worker_exited(pid)
            if self.ctl is not None:
                self.ctl.remove(pid)
            if pid == self.checker:
                self.checker = None
                if self.checker_due is None:  # not stopped by us: it died
                    self.log.event("health checker exited; restarting in 1s", now=True)
                    self.checker_due = time.monotonic() + 1.0
                continue
            if pid in self.old:
                del self.old[pid]
                self.log.event(f"old worker {pid} finished", now=True)
                continue
            slot = self.workers.pop(pid, None)
            if slot is not None:
                code = os.waitstatus_to_exitcode(status)
                self.log.event(
                    f"worker {slot} (pid {pid}) exited unexpectedly ({code}); restarting in 1s",
                    now=True,
                )
                respawn_at[slot] = time.monotonic() + 1.0
                for table in self.sources.values():  # its connections went with it
                    table.forget(slot)

    def _reload_request(self) -> str | None:
        """A reload asked on the runtime API (its thread): done by the main loop, which
        answers None or the error."""
        done, result = threading.Event(), list[str | None]()
        self._reload_waiters.append((done, result))
        os.kill(os.getpid(), signal.SIGHUP)
        if not done.wait(READY_TIMEOUT + 30.0):
            return "no answer from the master"
        return result[0]

    def _reload(self) -> str | None:
        if self.reload_fn is None:
            why = "no config file to reload (command-line config)"
            self.log.event(f"SIGHUP: {why}", now=True)
            return why
        try:
            cfg = self.reload_fn()
            cfg, notes = reloadable.keep_restart_only(self.cfg, cfg)
            for note in notes:
                self.log.event(note)
            prep = prepare(cfg)
            cfg = prep.cfg or cfg
            new, lines = self.pool.bind(cfg, cfg.global_.workers)
        except ConfigError as exc:
            self._reload_failed(str(exc))
            return str(exc)
        running = (self.cfg, self.prep, dict(self.workers))
        old_board, old_addrs, old_sources = self.board, self.addrs, self.sources
        self.board = _board(cfg)
        self.addrs = resolvers.AddressBoard(cfg)
        self.sources = _sources(cfg)
        self.cfg, self.prep = cfg, prep
        # Keep old sockets open until the new workers hold them (adopt closes the rest).
        prev = self.pool.socks
        self.retiring = self.pool.all()
        self.pool.socks = new
        self.workers = {}
        try:
            for slot in range(cfg.global_.workers):
                self._spawn(slot)
        finally:
            self.retiring = []
            self.pool.socks = prev
        error = self._await_ready(list(self.workers))
        if error is not None:
            # The new workers go (those serving already drain), the sockets only they
            # had are closed, and the running ones never knew.
            self._retire(list(self.workers), signal.SIGTERM, None)
            keep = {id(s) for s in self.pool.all()}
            for s in {id(s): s for socks in new.values() for s in socks}.values():
                if id(s) not in keep:
                    self.pool.discard(s)
            self.cfg, self.prep, self.workers = running
            self.board, self.addrs, self.sources = old_board, old_addrs, old_sources
            self._reload_failed(error)
            return error
        self.generation += 1
        self._stop_checker()
        self._spawn_checker()  # checks the new configuration's servers, on the new board
        self._start_resolver()
        if self.ctl is not None:
            self.ctl.reloaded(cfg)
        # Listeners the new configuration drops close with the old workers' copies: new
        # SYNs go to droppers first, and the old workers settle them (Runtime.stop).
        keep = {id(s) for socks in new.values() for s in socks}
        gone = {id(s) for s in self.pool.all() if id(s) not in keep}
        droppers: list[socket.socket] = []
        if gone:
            try:
                droppers, failed = self.pool.divert(running[0], only=gone)
            except Exception as exc:  # never in the way of reloading
                failed = [f"listeners dropped by the reload could not be held off: {exc}"]
            for line in failed:
                self.log.event(line)
            self.diverted.append((time.monotonic() + _DIVERT_HOLD, droppers))
        self.pool.adopt(new)
        hard = cfg.global_.hard_stop_after
        self._retire(
            list(running[2]),
            workerproc.RETIRE_SETTLE if droppers else signal.SIGUSR1,
            None if hard is None else time.monotonic() + hard,
        )
        for line in (*prep.notes, *lines):
            self.log.event(line)
        self.log.event(
            f"reloaded {cfg.source}: {cfg.global_.workers} new workers, "
            f"{len(running[2])} old ones finishing their connections",
            now=True,
        )
        return None

    def _reload_failed(self, why: str) -> None:
        self.log.event(f"reload failed: {why}, keeping the running configuration", now=True)

    def _retire(self, pids: list[int], sig: int, hard_stop: float | None) -> None:
        for pid in pids:
            self.workers.pop(pid, None)
            self.old[pid] = hard_stop
            if self.ctl is not None:
                self.ctl.retired.add(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _close_droppers(self) -> None:
        """In a child: a copy of a dropper would drop its address's SYNs for good."""
        for _, held in self.diverted:
            for s in held:
                s.close()

    def _spawn_checker(self) -> None:
        """The one process that checks servers (checkerproc.py), forked like a worker."""
        self.checker_due = None
        if self.board is None:
            return
        self.checker = checkerproc.spawn(
            self.cfg, self.board, self.addrs, self.prep, self._close_in_checker
        )

    def _close_in_checker(self) -> None:
        """In the checker: the master's listeners, droppers and pipes are not its own."""
        for s in self.pool.all():
            s.close()
        self._close_droppers()
        for fd in self.starting.values():
            os.close(fd)
        if self.ctl is not None:
            self.ctl.forked()

    def _start_resolver(self) -> None:
        """(Re)start the thread re-resolving server names on the current address board."""
        if self.resolver is not None:
            self.resolver.stop()
            self.resolver = None
        if self.addrs is None or not self.addrs.index:
            return
        start = {
            (b, s): where
            for b, servers in self.prep.targets.items()
            for s, where in servers.items()
            if f"{b}/{s}" not in self.prep.unresolved
        }
        self.resolver = resolvers.Resolver(self.addrs, start, self.log)
        self.resolver.start()

    def _stop_checker(self) -> None:
        pid, self.checker = self.checker, None
        self.checker_due = None
        if pid is not None:
            checkerproc.stop(pid)

    def _stop(self) -> int:
        self._stop_checker()
        if self.resolver is not None:
            self.resolver.stop()
        pids = set(self.workers) | set(self.old)
        stopping.drain(self.cfg, self.pool, pids, self.log, bool(self.metrics_dir), self.diverted)
        self.diverted = []
        self.log.event("stopped", now=True)
        return 0


def _sources(cfg: Config) -> dict[str, abuse.SourceTable]:
    """maxconn-per-source counts, one table per frontend for all of its workers."""
    return {
        f.name: abuse.SourceTable.create(f.maxconn, cfg.global_.workers)
        for f in cfg.frontends
        if f.maxconn_per_source
    }


def _board(cfg: Config) -> health.Board | None:
    """The shared health state, when some backend is checked."""
    if any(b.check is not None for b in cfg.backends.values()):
        return health.Board(cfg)
    return None


def run(cfg: Config, *, reload: Callable[[], Config] | None = None) -> int:
    """Run the proxy until SIGTERM/SIGINT; raises ConfigError before listening on anything."""
    return Master(cfg, reload=reload).run()
