"""Prometheus metrics shared by all workers (prometheus_client's multiprocess mode).

Workers count into plain Python dicts on the hot path and push them into
prometheus_client once a second (`flush`); the master serves the sum of every
worker's files on the metrics address. PROMETHEUS_MULTIPROC_DIR must be set before
prometheus_client is first imported: `prepare()` does that in the master.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter as Tally
from typing import TYPE_CHECKING, Any

from mptcpkit.proxy.logging import ConnRecord

if TYPE_CHECKING:
    from mptcpkit.proxy.runtime import Runtime

__all__ = ["WorkerMetrics", "prepare", "serve"]

_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare() -> str:
    """Make the shared directory and point prometheus_client at it (before importing it)."""
    path = tempfile.mkdtemp(prefix="mptcpkit-proxy-metrics-")
    os.environ[_ENV] = path
    return path


def cleanup(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def worker_exited(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def serve(host: str, port: int) -> tuple[Any, int]:
    """Start the HTTP endpoint in a thread; (server, bound port)."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    server, _thread = start_http_server(port, addr=host or "0.0.0.0", registry=registry)
    return server, server.server_address[1]


class WorkerMetrics:
    """A worker's counters: cheap tallies, flushed to prometheus_client once a second."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.m_conns = Counter(
            "mptcpkit_proxy_connections",
            "Finished proxied connections",
            ["frontend", "backend", "server"],
        )
        self.m_active = Gauge(
            "mptcpkit_proxy_connections_active",
            "Connections open now, per frontend",
            ["frontend"],
            multiprocess_mode="livesum",
        )
        self.m_server_active = Gauge(
            "mptcpkit_proxy_server_connections_active",
            "Connections open now, per server",
            ["backend", "server"],
            multiprocess_mode="livesum",
        )
        self.m_legs = Counter(
            "mptcpkit_proxy_legs",
            "Finished connection legs by protocol: MPTCP, fallback (asked MPTCP, got TCP), TCP",
            ["frontend", "leg", "state"],
        )
        self.m_subflows = Histogram(
            "mptcpkit_proxy_subflows",
            "Most subflows seen on an MPTCP leg",
            ["leg"],
            buckets=(1, 2, 3, 4, 6, 8, 16),
        )
        self.m_bytes = Counter(
            "mptcpkit_proxy_bytes",
            "Bytes relayed; in = client to server, out = server to client",
            ["frontend", "direction"],
        )
        self.m_up = Gauge(
            "mptcpkit_proxy_server_up",
            "1 if the server passes its health checks",
            ["backend", "server"],
            multiprocess_mode="livemax",
        )
        self.m_fail = Counter(
            "mptcpkit_proxy_connect_failures",
            "Failed connects to a server",
            ["backend", "server"],
        )
        self.m_log_dropped = Counter(
            "mptcpkit_log_dropped",
            "Log lines dropped because the log destination did not take them in time",
        )
        self._log_counted = 0
        self._conns: Tally[tuple[str, str, str]] = Tally()
        self._legs: Tally[tuple[str, str, str]] = Tally()
        self._bytes: Tally[tuple[str, str]] = Tally()
        self._fail: Tally[tuple[str, str]] = Tally()
        self._subflows: list[tuple[str, int]] = []
        self._up: dict[tuple[str, str], bool] = {}

    def conn_done(self, rec: ConnRecord) -> None:
        self._conns[(rec.frontend, rec.backend, rec.server or "-")] += 1
        self._legs[(rec.frontend, "client", rec.client_state)] += 1
        if rec.server is not None:
            self._legs[(rec.frontend, "server", rec.server_state)] += 1
        self._bytes[(rec.frontend, "in")] += rec.bytes_in
        self._bytes[(rec.frontend, "out")] += rec.bytes_out
        if rec.client_subflows:
            self._subflows.append(("client", rec.client_subflows))
        if rec.server_subflows:
            self._subflows.append(("server", rec.server_subflows))

    def connect_failed(self, backend: str, server: str) -> None:
        self._fail[(backend, server)] += 1

    def server_health(self, backend: str, server: str, up: bool) -> None:
        self._up[(backend, server)] = up

    def flush(self, rt: Runtime) -> None:
        for k, n in self._conns.items():
            self.m_conns.labels(*k).inc(n)
        for k, n in self._legs.items():
            self.m_legs.labels(*k).inc(n)
        for k2, n in self._bytes.items():
            self.m_bytes.labels(*k2).inc(n)
        for k2, n in self._fail.items():
            self.m_fail.labels(*k2).inc(n)
        for leg, n in self._subflows:
            self.m_subflows.labels(leg).observe(n)
        self._conns.clear()
        self._legs.clear()
        self._bytes.clear()
        self._fail.clear()
        self._subflows.clear()
        if rt.log.dropped > self._log_counted:
            self.m_log_dropped.inc(rt.log.dropped - self._log_counted)
            self._log_counted = rt.log.dropped
        for fe in rt.frontends:
            self.m_active.labels(fe.cfg.name).set(fe.count())
        for be in rt.backends.values():
            for st in be.balancer.states:
                self.m_server_active.labels(be.cfg.name, st.server.name).set(st.active)
                up = self._up.get((be.cfg.name, st.server.name), st.up)
                self.m_up.labels(be.cfg.name, st.server.name).set(1 if up else 0)
