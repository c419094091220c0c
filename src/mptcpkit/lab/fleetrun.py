"""Traffic through a `fleet`: many hash-verified MPTCP downloads via the VIP, counted.

Each connection asks for `size` bytes of its own pseudo-random stream (a 12-byte request:
size and seed) and checks their SHA-256. Instances either serve the bytes themselves
(`proxy=False`, an MPTCP listener per instance) or run `mptcpkit proxy` (MPTCP frontend,
TCP to the backend `srv`, which serves them). What the run reports comes from the
kernel: subflows per connection from the client's subflow list (`MPTCP_FULL_INFO`),
connections per instance and joins from each instance's MIB (`MPCapableACKRX`,
`MPJoinSynRx`); a join that reached an instance without its token is `MPJoinNoTokenFound`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from mptcpkit import introspect, sockets
from mptcpkit.lab import mib
from mptcpkit.lab.fleet import Fleet
from mptcpkit.lab.host import Host
from mptcpkit.lab.netns import LabError
from mptcpkit.lab.process import Process
from mptcpkit.lab.transfer import prefix_digest

PORT = 8443  # the instances' frontend (inside the lab's own namespaces)
BACKEND_PORT = 8080
_REQUEST = struct.Struct("!QI")  # size, seed
_RECV = 256 * 1024
_NOT_YET = frozenset({"SYN_SENT", "SYN_RECV", "CLOSE", "LISTEN", "NEW_SYN_RECV"})
_LOOK_EVERY = 0.02  # seconds between two looks at a connection's subflows
_POOL = 1 << 20
_CHUNK = 64 * 1024
_pool: list[bytes] = []


def _stream(seed: int) -> Iterator[memoryview]:
    """Stream `seed`: chunks of one shared random pool at offsets that depend on the seed
    (unique enough to catch bytes of another connection, and free to produce)."""
    if not _pool:
        _pool.append(random.Random(0x666C6565).randbytes(_POOL))
    pool = memoryview(_pool[0])
    rng = random.Random(seed)
    while True:
        offset = rng.randrange(0, _POOL - _CHUNK)
        yield pool[offset : offset + _CHUNK]


def stream_digest(seed: int, nbytes: int) -> str:
    """SHA-256 of the first `nbytes` of stream `seed`."""
    return prefix_digest(_stream(seed), nbytes)


# -- serving ------------------------------------------------------------------------------


def _serve_conn(conn: socket.socket) -> None:
    with conn:
        try:
            conn.settimeout(60)
            head = b""
            while len(head) < _REQUEST.size:
                part = conn.recv(_REQUEST.size - len(head))
                if not part:
                    return
                head += part
            left, seed = _REQUEST.unpack(head)
            for chunk in _stream(seed):
                if left <= 0:
                    break
                conn.sendall(chunk[:left])
                left -= min(left, len(chunk))
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # until the client closes: no RST for unread data
        except OSError:
            return


def _accept_loop(listener: socket.socket) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_serve_conn, args=(conn,), daemon=True).start()


def _listen(host: Host, port: int, *, mptcp: bool) -> socket.socket:
    with host.enter():
        if mptcp:
            ls: socket.socket = sockets.create_server(
                ("0.0.0.0", port), mptcp="require", backlog=1024
            )
        else:
            ls = socket.create_server(("0.0.0.0", port), backlog=1024)
    threading.Thread(target=_accept_loop, args=(ls,), daemon=True).start()
    return ls


def _wait_ready(proc: Process, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if "ready:" in proc.stderr:
            return
        if proc.poll() is not None:
            raise LabError(f"mptcpkit proxy in {proc.host.name} did not start:\n{proc.stderr}")
        time.sleep(0.05)
    raise LabError(f"mptcpkit proxy in {proc.host.name} did not start within {timeout:g}s")


@contextlib.contextmanager
def serving(net: Fleet, *, proxy: bool) -> Iterator[None]:
    """Serve the fleet's VIP on PORT in every instance, for the `with` block."""
    listeners: list[socket.socket] = []
    procs: list[Process] = []
    try:
        if proxy:
            assert net.server is not None
            listeners.append(_listen(net.server, BACKEND_PORT, mptcp=False))
            src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
            }
            for inst in net.instances:
                backend = inst.backlink.iface(net.server).address4
                argv = [
                    sys.executable, "-m", "mptcpkit", "proxy",
                    "--listen", f"mptcp@0.0.0.0:{PORT}",
                    "--to", f"tcp@{backend}:{BACKEND_PORT}",
                    "--workers", "1", "--metrics", "",
                ]  # fmt: skip
                procs.append(inst.host.popen(argv, env=env))
            for proc in procs:
                _wait_ready(proc)
        else:
            for inst in net.instances:
                listeners.append(_listen(inst.host, PORT, mptcp=True))
        yield
    finally:
        for ls in listeners:
            with contextlib.suppress(OSError):
                ls.shutdown(socket.SHUT_RDWR)
            ls.close()
        for proc in procs:
            proc.stop()


# -- one connection -----------------------------------------------------------------------


@dataclasses.dataclass
class Conn:
    """One download: what arrived, whether it is the right bytes, and its subflows."""

    client: str
    seed: int
    size: int
    received: int = 0
    verified: bool = False
    subflows: int = 0  # subflows the kernel listed once the last byte had arrived
    subflows_with_data: int = 0
    first: tuple[str, int] | None = None  # the initial subflow's local address
    remotes: list[str] = dataclasses.field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    error: str | None = None


def _established(sock: socket.socket) -> list[introspect.Subflow]:
    """The connection's subflows past their handshake (a join in SYN_SENT may yet fail)."""
    return [s for s in introspect.subflows(sock) if s.state not in _NOT_YET]


def download(
    host: Host,
    address: str,
    size: int,
    seed: int,
    *,
    mptcp: bool = True,
    limit_s: float | None = None,
    started: threading.Event | None = None,
    timeout: float = 60.0,
) -> Conn:
    """Fetch `size` bytes of stream `seed` from address:PORT; check them (unless cut
    short by `limit_s`). `started` is set once connected; `timeout` applies to connecting
    and to each read (a stall). Subflows: the most the kernel listed at once during the
    download (a look every 20 ms and one after the last byte)."""
    conn = Conn(host.name, seed, size)
    digest = hashlib.sha256()
    conn.started = time.monotonic()
    try:
        with host.enter():
            if mptcp:
                sock: socket.socket = sockets.create_connection(
                    (address, PORT), timeout=timeout, mptcp="require"
                )
            else:
                sock = socket.create_connection((address, PORT), timeout=timeout)
        with sock:
            local = sock.getsockname()
            conn.first = (str(local[0]), int(local[1]))
            if started is not None:
                started.set()
            sock.sendall(_REQUEST.pack(size, seed))
            buf = bytearray(_RECV)
            view = memoryview(buf)
            seen: list[introspect.Subflow] = []
            look = 0.0
            while conn.received < size:
                now = time.monotonic()
                if limit_s is not None and now - conn.started >= limit_s:
                    break
                if mptcp and now >= look:  # the most subflows the connection had at once
                    look = now + _LOOK_EVERY
                    seen = max(seen, _established(sock), key=len)
                n = sock.recv_into(view, min(_RECV, size - conn.received))
                if n == 0:
                    break
                digest.update(view[:n])
                conn.received += n
            conn.ended = time.monotonic()
            if mptcp:
                seen = max(seen, _established(sock), key=len)
                conn.subflows = len(seen)
                conn.subflows_with_data = sum(1 for s in seen if s.bytes_received)
                conn.remotes = [str(s.remote[0]) for s in seen]
    except OSError as exc:
        conn.error = f"{type(exc).__name__}: {exc}"
        conn.ended = time.monotonic()
    if limit_s is None and conn.received == size:
        conn.verified = digest.hexdigest() == stream_digest(seed, size)
    if started is not None:
        started.set()
    return conn


def _in_threads(jobs: list[tuple[Host, int, int]], address: str, concurrency: int) -> list[Conn]:
    """Run the downloads, at most `concurrency` at a time, in job order."""
    results: list[Conn | None] = [None] * len(jobs)
    lock = threading.Lock()
    todo = iter(range(len(jobs)))

    def worker() -> None:
        while True:
            with lock:
                k = next(todo, None)
            if k is None:
                return
            host, size, seed = jobs[k]
            results[k] = download(host, address, size, seed)

    threads = [
        threading.Thread(target=worker, daemon=True)
        for _ in range(max(1, min(concurrency, len(jobs))))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


# -- a run --------------------------------------------------------------------------------


def _mibs(net: Fleet) -> dict[int, dict[str, int]]:
    return {inst.index: inst.host.call(mib.read_mib) for inst in net.instances}


def _count(deltas: dict[int, dict[str, int]], name: str) -> dict[int, int]:
    return {i: d.get("MPTcpExt" + name, 0) for i, d in deltas.items()}


@dataclasses.dataclass
class FleetRun:
    """M concurrent downloads through the balancer, and what the kernels counted."""

    recipe: bool
    instances: int
    connections: int
    size: int
    per_instance: list[int]
    joins: int
    joins_established: int  # joins the instances completed (MPJoinAckRx)
    misrouted_joins: int
    subflows_per_conn_min: int
    subflows_per_conn_max: int
    subflows_with_data_min: int
    conns_with_all_subflows: int  # connections that had one subflow per client link
    verified: bool
    errors: list[str]
    seconds: float
    goodput_bps: dict[str, float]  # per client: its bytes over its connections' span
    client_mib: dict[str, int]  # the clients' join and ADD_ADDR counters (deltas, summed)
    conns: list[Conn] = dataclasses.field(repr=False, default_factory=list)

    @property
    def misroute_rate(self) -> float:
        return self.misrouted_joins / self.joins if self.joins else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["conns"]
        d["misroute_rate"] = round(self.misroute_rate, 4)
        d["goodput_bps"] = {k: round(v) for k, v in self.goodput_bps.items()}
        d["seconds"] = round(self.seconds, 3)
        return d


def run(
    net: Fleet, connections: int, size: int, *, concurrency: int = 16, seed: int = 1
) -> FleetRun:
    """`connections` downloads of `size` bytes, spread over the clients, `concurrency` at
    a time."""
    jobs = [(net.clients[k % len(net.clients)], size, seed + k) for k in range(connections)]
    paths = len(net.client_links[net.clients[0].name])
    before = _mibs(net)
    cbefore = {h.name: h.call(mib.read_mib) for h in net.clients}
    t0 = time.monotonic()
    conns = _in_threads(jobs, net.vip, concurrency)
    seconds = time.monotonic() - t0
    time.sleep(0.2)  # the last ACKs reach the instances' counters
    after = _mibs(net)
    deltas = {i: mib.delta(before[i], after[i]) for i in before}
    client_joins: dict[str, int] = {}
    for h in net.clients:
        for k, v in mib.delta(cbefore[h.name], h.call(mib.read_mib)).items():
            if k.startswith("MPTcpExt") and ("Join" in k or "AddAddr" in k or "Echo" in k):
                client_joins[k] = client_joins.get(k, 0) + v
    accepted = _count(deltas, "MPCapableACKRX")
    goodput: dict[str, float] = {}
    for host in net.clients:
        mine = [c for c in conns if c.client == host.name]
        if mine:
            span = max(c.ended for c in mine) - min(c.started for c in mine)
            goodput[host.name] = sum(c.received for c in mine) * 8 / max(span, 1e-9)
    subflows = [c.subflows for c in conns] or [0]
    return FleetRun(
        recipe=net.recipe,
        instances=len(net.instances),
        connections=connections,
        size=size,
        per_instance=[accepted[i.index] for i in net.instances],
        joins=sum(_count(deltas, "MPJoinSynRx").values()),
        joins_established=sum(_count(deltas, "MPJoinAckRx").values()),
        misrouted_joins=sum(_count(deltas, "MPJoinNoTokenFound").values()),
        subflows_per_conn_min=min(subflows),
        subflows_per_conn_max=max(subflows),
        subflows_with_data_min=min([c.subflows_with_data for c in conns] or [0]),
        conns_with_all_subflows=sum(1 for c in conns if c.subflows >= paths),
        verified=len(conns) == connections and all(c.verified for c in conns),
        errors=[f"{c.client} seed {c.seed}: {c.error}" for c in conns if c.error],
        seconds=seconds,
        goodput_bps=goodput,
        client_mib=client_joins,
        conns=conns,
    )


def single_path(net: Fleet, seconds: float = 2.0) -> float:
    """Plain TCP goodput (bits/s) of one connection from the first client to the VIP (by
    its first link): the single-path reference."""
    conn = download(net.clients[0], net.vip, 1 << 40, 0, mptcp=False, limit_s=seconds)
    if conn.error:
        raise LabError(f"single-path TCP download failed: {conn.error}")
    return conn.received * 8 / max(conn.ended - conn.started, 1e-9)


# -- draining -----------------------------------------------------------------------------


def owners(net: Fleet) -> dict[tuple[str, int], int]:
    """(client address, port) of every established subflow to the VIP -> its instance."""
    out: dict[tuple[str, int], int] = {}
    for inst in net.instances:
        text = inst.host.run(
            ["ss", "-Htn", "state", "established", "src", f"{net.vip}:{PORT}"]
        ).stdout
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 4:
                continue
            addr, _, port = fields[-1].rpartition(":")
            with contextlib.suppress(ValueError):
                out[(addr.strip("[]"), int(port))] = inst.index
    return out


@dataclasses.dataclass
class Drain:
    """Instance `drained` taken out of the balancer while its connections were open."""

    recipe: bool
    drained: int
    open_on_drained: int  # connections it owned when it was drained
    finished_on_drained: int  # of those, completed with verified bytes
    open_elsewhere: int
    finished_elsewhere: int
    new_connections: int
    new_on_drained: int  # new connections that still reached it (MPCapableACKRX)
    new_verified: bool

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def drain(
    net: Fleet,
    *,
    index: int | None = None,
    connections: int | None = None,
    size: int,
    settle: float = 1.0,
    stall: float = 5.0,
    seed: int = 10_000,
) -> Drain:
    """Open `connections` long downloads, drain instance `index` (default: the one owning
    most of them) once they flow, open as
    many new short ones, and follow what becomes of each (a download that gets no byte
    for `stall` seconds has failed). The balancer is restored."""
    n = connections or 2 * len(net.instances)
    results: list[Conn | None] = [None] * n
    ready = [threading.Event() for _ in range(n)]

    def one(k: int) -> None:
        host = net.clients[k % len(net.clients)]
        results[k] = download(host, net.vip, size, seed + k, started=ready[k], timeout=stall)

    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for ev in ready:
        ev.wait(30)
    time.sleep(settle)  # joins done, bytes flowing on every subflow
    owner = owners(net)
    if index is None:
        counts = [(sum(1 for o in owner.values() if o == i.index), -i.index) for i in net.instances]
        index = -max(counts)[1]
    before = _mibs(net)
    t_drain = time.monotonic()
    net.drain(index)
    try:
        fresh = run(net, n, 64 * 1024, seed=seed + n)
        after = _mibs(net)
        for t in threads:
            t.join()
    finally:
        net.restore()
    new_on = mib.delta(before[index], after[index]).get("MPTcpExtMPCapableACKRX", 0)
    # Connections that ended before the drain say nothing about it.
    done = [r for r in results if r is not None and r.ended > t_drain]
    mine = [c for c in done if c.first is not None and owner.get(c.first) == index]
    rest = [c for c in done if c not in mine]
    return Drain(
        recipe=net.recipe,
        drained=index,
        open_on_drained=len(mine),
        finished_on_drained=sum(1 for c in mine if c.verified),
        open_elsewhere=len(rest),
        finished_elsewhere=sum(1 for c in rest if c.verified),
        new_connections=fresh.connections,
        new_on_drained=new_on,
        new_verified=fresh.verified,
    )


__all__ = [
    "BACKEND_PORT",
    "PORT",
    "Conn",
    "Drain",
    "FleetRun",
    "download",
    "drain",
    "owners",
    "run",
    "serving",
    "single_path",
]
