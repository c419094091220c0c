"""The master process: bind, fork workers, reload on SIGHUP, drain on SIGTERM.

- Everything is bound before any worker starts; a bind that fails (port in use) is a
  `ConfigError` and nothing stays listening.
- Each worker gets its own listening sockets on the same addresses (SO_REUSEPORT),
  so the kernel spreads connections across cores. The master keeps them, so that a
  reload hands unchanged listeners to the new workers: no connection is refused.
- Workers drop root (`global.user/group`) after the fork; the master keeps it to bind
  new addresses on reload and does no network I/O itself except serving metrics.
- SIGHUP: the new config is validated and bound first; if anything is wrong the old
  workers keep running and the error is logged. Otherwise new workers start and the
  old ones stop accepting and exit when their connections are done (SIGUSR1).
- SIGTERM/SIGINT: workers stop accepting and drain up to `global.stop-timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import grp
import os
import pwd
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import mptcpkit
from mptcpkit.proxy import compiled
from mptcpkit.proxy import metrics as metrics_mod
from mptcpkit.proxy.config import Config, ConfigError, Frontend
from mptcpkit.proxy.logging import EventLog

__all__ = ["Master", "run"]

_MASTER_SIGNALS = {signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
BACKLOG = 4096
_PR_SET_PDEATHSIG = 1
LOOP_ENV = "MPTCPKIT_PROXY_LOOP"  # "asyncio" runs workers on stock asyncio, not uvloop
_Key = tuple[str, int]  # (address text, worker index)


def address_text(sock: socket.socket, protocol: str) -> str:
    """`mptcp@127.0.0.1:40123`: what a listener really is, port 0 resolved."""
    if sock.family == socket.AF_UNIX:
        return f"unix@{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"{protocol}@[{host}]:{port}" if ":" in host else f"{protocol}@{host}:{port}"


def _unix_server(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if path.startswith("@"):
            s.bind("\0" + path[1:])
        else:
            if os.path.exists(path) and not _listening(path):
                os.unlink(path)  # a stale socket file from an earlier run
            s.bind(path)
        s.listen(BACKLOG)
    except BaseException:
        s.close()
        raise
    return s


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def resolve_ids(cfg: Config) -> tuple[int | None, int | None]:
    """(uid, gid) to switch to after binding; ConfigError for unknown names."""
    g = cfg.global_
    uid = gid = None
    if g.user:
        try:
            pw = pwd.getpwnam(g.user)
        except KeyError:
            raise ConfigError(cfg.source, "global.user", f"no such user {g.user!r}") from None
        uid, gid = pw.pw_uid, pw.pw_gid
    if g.group:
        try:
            gid = grp.getgrnam(g.group).gr_gid
        except KeyError:
            raise ConfigError(cfg.source, "global.group", f"no such group {g.group!r}") from None
    if (uid is not None or gid is not None) and os.geteuid() != 0:
        raise ConfigError(cfg.source, "global.user", "switching user needs root")
    return uid, gid


def _pool_key(f: Frontend, index: int) -> str:
    """Same address and options, same listening socket (across reloads); port 0 is never
    shared."""
    addr = f.binds[index]
    v6only = addr.family == socket.AF_INET6 and not f.dualstack(index)
    text = f"{addr} v6only" if v6only else str(addr)
    if addr.protocol != "unix" and addr.port == 0:
        return f"{text}#{f.name}[{index}]"
    return text


@contextlib.contextmanager
def _listen_errors(cfg: Config, key: str, addr: Any) -> Iterator[None]:
    """A bind or listen that fails is a config error naming the file, key and address."""
    try:
        yield
    except OSError as exc:
        raise ConfigError(
            cfg.source, key, f"cannot listen on {addr}: {exc.strerror or exc}"
        ) from None


class ListenerPool:
    """Listening sockets by (address, worker), kept across reloads."""

    def __init__(self) -> None:
        self.socks: dict[_Key, list[socket.socket]] = {}

    def bind(self, cfg: Config, workers: int) -> tuple[dict[_Key, list[socket.socket]], list[str]]:
        """Sockets for `cfg` (reusing ours), plus 'frontend address' lines; all or nothing."""
        new: dict[_Key, list[socket.socket]] = {}
        made: list[socket.socket] = []
        lines: list[str] = []
        try:
            for f in cfg.frontends:
                for i, addr in enumerate(f.binds):
                    key_name = f"frontend.{f.name}.bind" + (f"[{i}]" if len(f.binds) > 1 else "")
                    dual = f.dualstack(i)
                    text = _pool_key(f, i)
                    first = self._get(text, 0, new) or self._create(cfg, key_name, addr, made, dual)
                    new[(text, 0)] = first
                    for w in range(1, workers):
                        if addr.protocol == "unix":
                            new[(text, w)] = first
                            continue
                        got = self._get(text, w, new)
                        if got is None:
                            got = [self._sibling(cfg, key_name, addr, s, made, dual) for s in first]
                        new[(text, w)] = got
                    lines.extend(
                        f"frontend {f.name} listening on {address_text(s, addr.protocol)}"
                        for s in first
                    )
        except BaseException:
            for s in made:
                s.close()
            raise
        return new, lines

    def _get(
        self, text: str, w: int, new: dict[_Key, list[socket.socket]]
    ) -> list[socket.socket] | None:
        return new.get((text, w)) or self.socks.get((text, w))

    @staticmethod
    def _create(
        cfg: Config, key: str, addr: Any, made: list[socket.socket], dual: bool
    ) -> list[socket.socket]:
        with _listen_errors(cfg, key, addr):
            if addr.protocol == "unix":
                socks = [_unix_server(addr.path)]
            else:
                socks = list(
                    addr.create_server(backlog=BACKLOG, reuse_port=True, dualstack_ipv6=dual)
                )
        made.extend(socks)
        return socks

    @staticmethod
    def _sibling(
        cfg: Config,
        key: str,
        addr: Any,
        first: socket.socket,
        made: list[socket.socket],
        dual: bool,
    ) -> socket.socket:
        host, port = first.getsockname()[:2]
        with _listen_errors(cfg, key, addr):
            s = mptcpkit.create_server(
                (host, port),
                family=first.family,
                backlog=BACKLOG,
                reuse_port=True,
                mptcp=addr.policy,
                dualstack_ipv6=dual and first.family == socket.AF_INET6,
            )
        made.append(s)
        return s

    def adopt(self, new: dict[_Key, list[socket.socket]]) -> None:
        """Make `new` the pool; close what the new config no longer uses."""
        keep = {id(s) for socks in new.values() for s in socks}
        for socks in self.socks.values():
            for s in socks:
                if id(s) not in keep:
                    s.close()
        self.socks = new

    def for_worker(self, cfg: Config, w: int) -> dict[str, list[socket.socket]]:
        out: dict[str, list[socket.socket]] = {}
        for f in cfg.frontends:
            out[f.name] = [
                s for i, addr in enumerate(f.binds) for s in self.socks[(_pool_key(f, i), w)]
            ]
        return out

    def all(self) -> list[socket.socket]:
        seen: dict[int, socket.socket] = {}
        for socks in self.socks.values():
            for s in socks:
                seen[id(s)] = s
        return list(seen.values())

    def close(self) -> None:
        for s in self.all():
            s.close()
        self.socks = {}


class Master:
    def __init__(self, cfg: Config, *, reload: Callable[[], Config] | None = None) -> None:
        self.cfg = cfg
        self.reload_fn = reload
        self.pool = ListenerPool()
        self.log = EventLog(
            cfg.global_.log if cfg.global_.log != "none" else "stderr",
            cfg.global_.log_format,
            prefix="master: ",
        )
        self.workers: dict[int, int] = {}  # pid -> slot
        self.old: set[int] = set()
        self.ids: tuple[int | None, int | None] = (None, None)
        self.metrics_dir: str | None = None
        self.metrics_server: Any = None
        self.generation = 0
        self.retiring: list[socket.socket] = []

    # --- start -----------------------------------------------------------------------

    def start(self) -> None:
        """Bind everything or raise ConfigError with nothing left listening."""
        self.ids = resolve_ids(self.cfg)
        new, lines = self.pool.bind(self.cfg, self.cfg.global_.workers)
        self.pool.adopt(new)
        m = self.cfg.global_.metrics
        if m is not None:
            self.metrics_dir = metrics_mod.prepare()
            uid, gid = self.ids
            if uid is not None or gid is not None:
                os.chown(self.metrics_dir, -1 if uid is None else uid, -1 if gid is None else gid)
            try:
                self.metrics_server, port = metrics_mod.serve(m.host or "127.0.0.1", m.port or 0)
            except OSError as exc:
                self.pool.close()
                metrics_mod.cleanup(self.metrics_dir)
                raise ConfigError(
                    self.cfg.source,
                    "global.metrics",
                    f"cannot listen on {m}: {exc.strerror or exc}",
                ) from None
            host = m.host or "127.0.0.1"
            lines.append(f"metrics on http://{host}:{port}/metrics")
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
        sys.stderr.flush()
        master_pid = os.getpid()
        pid = os.fork()
        if pid:
            self.workers[pid] = slot
            return pid
        code = 1
        try:
            for s in others:
                s.close()
            if self.metrics_server is not None:
                with contextlib.suppress(OSError):
                    self.metrics_server.socket.close()
            code = _worker_main(cfg, mine, slot, self.ids, self.metrics_dir is not None, master_pid)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)

    # --- main loop ---------------------------------------------------------------------

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _MASTER_SIGNALS)
        try:
            relay = compiled.data_path()  # before listening: a missing engine is an error
            self.start()
            for slot in range(self.cfg.global_.workers):
                self._spawn(slot)
            self.log.event(
                f"ready: {self.cfg.global_.workers} workers ({relay} relay), pid {os.getpid()}",
                now=True,
            )
            return self._loop()
        finally:
            self.pool.close()
            if self.metrics_server is not None:
                self.metrics_server.shutdown()
            if self.metrics_dir:
                metrics_mod.cleanup(self.metrics_dir)
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
                    self._spawn(slot)
            if info is None:
                continue
            if info.si_signo == signal.SIGHUP:
                self._reload()
            elif info.si_signo in (signal.SIGTERM, signal.SIGINT):
                return self._stop()

    def _reap(self, respawn_at: dict[int, float]) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.metrics_dir:
                metrics_mod.worker_exited(pid)
            if pid in self.old:
                self.old.discard(pid)
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

    def _reload(self) -> None:
        if self.reload_fn is None:
            self.log.event("SIGHUP: no config file to reload (command-line config)", now=True)
            return
        try:
            cfg = self.reload_fn()
            if cfg.global_.metrics != self.cfg.global_.metrics:
                cfg = dataclasses.replace(
                    cfg, global_=dataclasses.replace(cfg.global_, metrics=self.cfg.global_.metrics)
                )
                self.log.event(
                    "reload: global.metrics changes need a restart; keeping the old address"
                )
            ids = resolve_ids(cfg)
            new, lines = self.pool.bind(cfg, cfg.global_.workers)
        except ConfigError as exc:
            self.log.event(f"reload failed, keeping the running config: {exc}", now=True)
            return
        self.generation += 1
        old = dict(self.workers)
        self.cfg, self.ids = cfg, ids
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
        self.pool.adopt(new)
        for pid in old:
            self.old.add(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        for line in lines:
            self.log.event(line)
        self.log.event(
            f"reloaded {cfg.source}: {cfg.global_.workers} new workers, "
            f"{len(old)} old ones finishing their connections",
            now=True,
        )

    def _stop(self) -> int:
        pids = set(self.workers) | self.old
        self.log.event(
            f"stopping: draining {len(pids)} workers (up to {self.cfg.global_.stop_timeout:g}s)",
            now=True,
        )
        self.pool.close()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.global_.stop_timeout + 5.0
        while pids and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                signal.sigtimedwait({signal.SIGCHLD}, 0.1)
                continue
            pids.discard(pid)
            if self.metrics_dir:
                metrics_mod.worker_exited(pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.log.event("stopped", now=True)
        return 0


def _die_with_parent(master_pid: int) -> None:
    """A worker must not outlive a master killed with SIGKILL: PR_SET_PDEATHSIG."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != master_pid:  # the master died before prctl took effect
        os._exit(1)


def _worker_main(
    cfg: Config,
    listeners: dict[str, list[socket.socket]],
    slot: int,
    ids: tuple[int | None, int | None],
    with_metrics: bool,
    master_pid: int,
) -> int:
    for sig in (signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    # Everything that reads files (modules, the log, metrics files, name lookups) happens
    # before dropping root: the new user may not be able to read the Python installation.
    import encodings.idna  # noqa: F401  (getaddrinfo needs it, lazily)

    from mptcpkit.proxy.runtime import Runtime, resolve_targets

    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if os.environ.get(LOOP_ENV, "uvloop") != "asyncio":
        with contextlib.suppress(ImportError):
            import uvloop

            factory = uvloop.new_event_loop
    targets = resolve_targets(cfg)
    log = EventLog(cfg.global_.log, cfg.global_.log_format, prefix=f"worker {slot}: ")
    metrics = metrics_mod.WorkerMetrics() if with_metrics else None
    uid, gid = ids
    if gid is not None:
        os.setgroups([])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
    _die_with_parent(master_pid)  # after setuid, which clears it

    # Startup objects will never be garbage: keep them out of every GC pass.
    gc.collect()
    gc.freeze()

    async def main() -> None:
        rt = Runtime(cfg, listeners, log=log, metrics=metrics, worker=slot, targets=targets)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, rt.stop, cfg.global_.stop_timeout)
        loop.add_signal_handler(signal.SIGUSR1, rt.stop, None)
        await rt.serve()

    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main())
    finally:
        log.close()
    return 0


def run(cfg: Config, *, reload: Callable[[], Config] | None = None) -> int:
    """Run the proxy until SIGTERM/SIGINT; raises ConfigError before listening on anything."""
    return Master(cfg, reload=reload).run()
