"""The metrics endpoint in a process of its own, not root: the master binds, it serves.

The master keeps root (to bind new addresses on reload), so it serves nothing: it binds
`global.metrics`, forks one process that drops to `global.user`/`group` and answers
`/metrics` (the workers' counters, summed from their shared directory), and closes its
own copy of the socket. No HTTP request reaches a root process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import traceback

from mptcpkit.proxy import metrics, privileges
from mptcpkit.proxy.configmodel import Config, ConfigError
from mptcpkit.proxy.metrics import registry

__all__ = ["bind", "spawn", "start", "stop"]


def start(cfg: Config, metrics_dir: str, ids: tuple[int | None, int | None]) -> tuple[int, str]:
    """Serve `global.metrics` from the workers' counters in `metrics_dir` (made
    readable by `ids`): the serving process's pid and the line saying where. A port
    that cannot be bound is a ConfigError, with `metrics_dir` cleaned up."""
    m = cfg.global_.metrics
    assert m is not None
    uid, gid = ids
    if uid is not None or gid is not None:
        os.chown(metrics_dir, -1 if uid is None else uid, -1 if gid is None else gid)
    try:
        sock = bind(m.host or "127.0.0.1", m.port or 0)
    except OSError as exc:
        metrics.cleanup(metrics_dir)
        raise ConfigError(
            cfg.source,
            "global.metrics",
            f"cannot listen on {m}: {exc.strerror or exc}",
        ) from None
    host, port = m.host or "127.0.0.1", sock.getsockname()[1]
    with sock:  # the master keeps no copy: it serves no HTTP
        pid = spawn(sock, ids)
    return pid, f"metrics on http://{host}:{port}/metrics (pid {pid})"


def stop(pid: int | None, metrics_dir: str | None) -> None:
    """Stop the serving process (if any) and remove the counters' directory (if any)."""
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    if metrics_dir:
        metrics.cleanup(metrics_dir)


def bind(host: str, port: int) -> socket.socket:
    """The endpoint's listening socket (bound by the master, which may be root)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


def spawn(sock: socket.socket, ids: tuple[int | None, int | None]) -> int:
    """Fork the process serving `sock` as `ids` (uid, gid); its pid."""
    master_pid = os.getpid()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        code = _serve(sock, ids, master_pid)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _serve(sock: socket.socket, ids: tuple[int | None, int | None], master_pid: int) -> int:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for sig in (signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    keep = sock.fileno()
    os.closerange(3, keep)  # the master's listeners, pipes and log are not ours
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
    # Everything a scrape imports is imported now, as root: the new user may not be
    # able to read the Python installation.
    import gzip  # noqa: F401  (Accept-Encoding: gzip)
    from http.server import ThreadingHTTPServer

    import prometheus_client.openmetrics.exposition  # noqa: F401  (OpenMetrics scrapers)
    from prometheus_client.exposition import MetricsHandler, generate_latest

    reg = registry()
    generate_latest(reg)  # a first scrape loads the rest (the collector's modules)
    server = ThreadingHTTPServer(
        sock.getsockname()[:2], MetricsHandler.factory(reg), bind_and_activate=False
    )
    server.socket.close()
    server.socket = sock
    privileges.drop(ids)
    privileges.die_with_parent(master_pid)  # after setuid, which clears it
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0
