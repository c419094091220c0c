"""Prometheus metrics shared by all workers (prometheus_client's multiprocess mode).

Workers count into plain Python dicts on the hot path and push them into
prometheus_client once a second (`flush`); the master serves the sum of every
worker's files on the metrics address. PROMETHEUS_MULTIPROC_DIR must be set before
prometheus_client is first imported: `prepare()` does that in the master.
"""

from __future__ import annotations

import bisect
import glob
import os
import shutil
import struct
import tempfile
from collections import Counter as Tally
from typing import TYPE_CHECKING, Any

from mptcpkit.proxy.logging import ConnRecord

if TYPE_CHECKING:
    from mptcpkit.proxy.runtime import Runtime

__all__ = ["WorkerMetrics", "prepare", "registry"]

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


def registry() -> Any:
    """A registry of the workers' counters, summed from the shared directory (served
    by metricsd.py)."""
    from prometheus_client import CollectorRegistry

    reg = CollectorRegistry()
    reg.register(_WorkerFiles(os.environ[_ENV]))
    return reg


class _WorkerFiles:
    """prometheus_client's MultiProcessCollector, minus files a worker is still creating.

    A new worker's file exists empty for a moment before prometheus_client sizes it
    (a reload starts several): read as it is, that fails the whole scrape (HTTP 500).
    Such a file holds no samples yet, so it is left out of this scrape.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self) -> Any:
        from prometheus_client.mmap_dict import MmapedDict
        from prometheus_client.multiprocess import MultiProcessCollector

        ready = []
        for f in glob.glob(os.path.join(self.path, "*.db")):
            try:
                list(MmapedDict.read_all_values_from_file(f))  # type: ignore[no-untyped-call]
            except (OSError, ValueError, struct.error):
                continue  # being created (or removed: a worker that exited)
            ready.append(f)
        return MultiProcessCollector.merge(ready, accumulate=True)  # type: ignore[no-untyped-call]


DURATION_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0)
CONNECT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


def end_reason(ended: str) -> str:
    """The log's `ended=` without its details, a bounded set for a metric label:
    "client timeout (60s idle)" -> "client timeout", "bad PROXY header: ..." -> "bad
    PROXY header"; errors keep their errno name ("server error: ECONNRESET")."""
    head, sep, detail = ended.partition(": ")
    if sep and head in ("client error", "server error", "connect failed"):
        return f"{head}: {detail.split(' ', 1)[0]}"
    return head.split(" (", 1)[0]


class _Buckets:
    """Observations counted per label and bucket here, published in one go per flush:
    prometheus_client's observe() writes its shared file on every call."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts: dict[str, list[float]] = {}  # label -> per-bucket counts, then the sum

    def add(self, label: str, value: float) -> None:
        row = self.counts.get(label)
        if row is None:
            row = self.counts[label] = [0.0] * (len(self.bounds) + 2)
        row[bisect.bisect_left(self.bounds, value)] += 1
        row[-1] += value

    def publish(self, hist: Any) -> None:
        for label, row in self.counts.items():
            child = hist.labels(label)
            # the histogram's own per-bucket values and sum (what observe() increments)
            for i, n in enumerate(row[:-1]):
                if n:
                    child._buckets[i].inc(n)
            child._sum.inc(row[-1])
        self.counts.clear()


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
        self.m_ended = Counter(
            "mptcpkit_proxy_ended",
            "Finished connections by why they ended (the log's ended=, without details)",
            ["frontend", "reason"],
        )
        self.m_duration = Histogram(
            "mptcpkit_proxy_connection_duration_seconds",
            "How long connections lasted, accept to close",
            ["frontend"],
            buckets=DURATION_BUCKETS,
        )
        self.m_connect = Histogram(
            "mptcpkit_proxy_connect_time_seconds",
            "First connect attempt to a server until a server leg was established",
            ["backend"],
            buckets=CONNECT_BUCKETS,
        )
        self.m_log_dropped = Counter(
            "mptcpkit_log_dropped",
            "Log lines dropped because the log destination did not take them in time",
        )
        self._log_counted = 0
        self.m_errors = Counter(
            "mptcpkit_proxy_errors",
            "The proxy's own failures (out of fds or memory), not a server's",
            ["frontend", "error"],
        )
        self._errors: Tally[tuple[str, str]] = Tally()
        self._conns: Tally[tuple[str, str, str]] = Tally()
        self._legs: Tally[tuple[str, str, str]] = Tally()
        self._bytes: Tally[tuple[str, str]] = Tally()
        self._fail: Tally[tuple[str, str]] = Tally()
        self._subflows: list[tuple[str, int]] = []
        self._ended: Tally[tuple[str, str]] = Tally()
        self._durations = _Buckets(DURATION_BUCKETS)
        self._connects = _Buckets(CONNECT_BUCKETS)
        self._up: dict[tuple[str, str], bool] = {}

    def conn_done(self, rec: ConnRecord) -> None:
        self._conns[(rec.frontend, rec.backend, rec.server or "-")] += 1
        self._legs[(rec.frontend, "client", rec.client_state)] += 1
        if rec.server is not None:
            self._legs[(rec.frontend, "server", rec.server_state)] += 1
        self._ended[(rec.frontend, end_reason(rec.ended))] += 1
        self._durations.add(rec.frontend, rec.duration)
        if rec.connect_time is not None:
            self._connects.add(rec.backend, rec.connect_time)
        if rec.client_subflows:
            self._subflows.append(("client", rec.client_subflows))
        if rec.server_subflows:
            self._subflows.append(("server", rec.server_subflows))

    def connect_failed(self, backend: str, server: str) -> None:
        self._fail[(backend, server)] += 1

    def proxy_error(self, frontend: str, error: str) -> None:
        self._errors[(frontend, error)] += 1

    def server_health(self, backend: str, server: str, up: bool) -> None:
        self._up[(backend, server)] = up

    def flush(self, rt: Runtime) -> None:
        for k, n in self._conns.items():
            self.m_conns.labels(*k).inc(n)
        for k, n in self._legs.items():
            self.m_legs.labels(*k).inc(n)
        for fe in rt.frontends:  # live connections' bytes too, not only finished ones
            b_in, b_out = fe.take_bytes()
            self._bytes[(fe.cfg.name, "in")] += b_in
            self._bytes[(fe.cfg.name, "out")] += b_out
        for k2, n in self._bytes.items():
            if n:
                self.m_bytes.labels(*k2).inc(n)
        for k2, n in self._ended.items():
            self.m_ended.labels(*k2).inc(n)
        self._durations.publish(self.m_duration)
        self._connects.publish(self.m_connect)
        for k2, n in self._fail.items():
            self.m_fail.labels(*k2).inc(n)
        for k2, n in self._errors.items():
            self.m_errors.labels(*k2).inc(n)
        self._errors.clear()
        for leg, n in self._subflows:
            self.m_subflows.labels(leg).observe(n)
        self._conns.clear()
        self._legs.clear()
        self._bytes.clear()
        self._fail.clear()
        self._subflows.clear()
        self._ended.clear()
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
