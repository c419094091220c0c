"""mptcpkit.pm and its CLI against the real kernel, inside throwaway namespaces."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import uvloop

from mptcpkit import lab, pm
from mptcpkit.pm import EventType, netns

pytestmark = pytest.mark.root
IPPROTO_MPTCP = 262


class Net:
    """The lab's two_paths topology, seen by namespace name (what mptcpkit.pm takes)."""

    def __init__(self, topo: lab.Topology) -> None:
        self.topo = topo
        self.c = topo.host("client")
        self.s = topo.host("server")
        self.client = self.c.netns
        self.server = self.s.netns
        self.procs: list[subprocess.Popen[str]] = []

    def run(self, ns: str, *cmd: str) -> subprocess.CompletedProcess[str]:
        host = self.c if ns == self.client else self.s
        return host.run(list(cmd))

    def client_addr(self, i: int) -> str:
        return self.c.address(i)

    def server_addr(self, i: int) -> str:
        return self.s.address(i)

    def client_dev(self, i: int) -> str:
        return self.c.iface(i).name


@pytest.fixture
def net(lab_factory: Callable[..., lab.Topology]) -> Iterator[Net]:
    n = Net(lab_factory(lab.two_paths, paths=2, endpoints=None))
    try:
        yield n
    finally:
        for p in n.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def cli(
    *args: str, ns_exec: str | None = None, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    cmd = [*prefix, sys.executable, "-m", "mptcpkit", *args]
    if ns_exec:
        cmd = ["ip", "netns", "exec", ns_exec, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def ip_endpoints(net: Net, ns: str) -> list[list[str]]:
    out = net.run(ns, "ip", "mptcp", "endpoint", "show").stdout
    return [line.split() for line in out.splitlines() if line.strip()]


def test_endpoints_match_ip(net: Net) -> None:
    ns = net.client
    with pm.PathManager(ns) as mgr:
        a = mgr.add_endpoint("10.0.0.1", flags=["signal"], port=5001, dev="eth0", id=10)
        b = mgr.add_endpoint("10.0.1.1", flags="subflow backup fullmesh")
        c = mgr.add_endpoint("fd00::1", flags=["subflow"])
        assert a.id == 10 and a.port == 5001 and a.ifname == "eth0"
        assert (
            b.flags == pm.EndpointFlag.SUBFLOW | pm.EndpointFlag.BACKUP | pm.EndpointFlag.FULLMESH
        )
        assert [str(ep).split() for ep in mgr.endpoints()] == ip_endpoints(net, ns)
        assert {ep.id for ep in mgr.endpoints()} == {a.id, b.id, c.id}

        changed = mgr.set_endpoint_flags(b.id, "fullmesh")
        assert changed.flags == pm.EndpointFlag.SUBFLOW | pm.EndpointFlag.FULLMESH
        mgr.delete_endpoint(a.id)
        mgr.delete_endpoint(address="fd00::1")
        assert [str(ep).split() for ep in mgr.endpoints()] == ip_endpoints(net, ns)
        assert [ep.id for ep in mgr.endpoints()] == [b.id]
        mgr.flush_endpoints()
        assert mgr.endpoints() == [] and ip_endpoints(net, ns) == []
    # The server namespace was never touched.
    assert ip_endpoints(net, net.server) == []


def test_limits_roundtrip(net: Net) -> None:
    assert pm.set_limits(subflows=5, add_addr_accepted=3, netns=net.client) == pm.Limits(5, 3)
    assert pm.limits(netns=net.client) == pm.Limits(5, 3)
    assert pm.set_limits(subflows=1, netns=net.client) == pm.Limits(1, 3)
    out = net.run(net.client, "ip", "mptcp", "limits").stdout.split()
    assert out == ["add_addr_accepted", "3", "subflows", "1"]
    with pytest.raises(ValueError, match="out of range"):
        pm.set_limits(subflows=9, netns=net.client)
    assert pm.limits(netns=net.client) == pm.Limits(1, 3)


def open_connection(net: Net) -> tuple[socket.socket, socket.socket, socket.socket]:
    with netns.entered(net.server):
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    srv.bind(("0.0.0.0", 0))
    srv.listen()
    with netns.entered(net.client):
        cli_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    cli_sock.settimeout(30)
    cli_sock.connect((net.server_addr(0), srv.getsockname()[1]))
    conn, _ = srv.accept()
    cli_sock.sendall(b"x" * 1000)
    conn.recv(1000)
    return srv, cli_sock, conn


def collect(stream: pm.EventStream, until: EventType, timeout: float = 30) -> list[pm.Event]:
    got: list[pm.Event] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ev = stream.poll(max(0.0, deadline - time.monotonic()))
        if ev is None:
            break
        got.append(ev)
        if ev.type is until:
            break
    return got


def test_event_stream_for_one_connection(net: Net) -> None:
    pm.add_endpoint(net.client_addr(1), flags="subflow", dev=net.client_dev(1), netns=net.client)
    with pm.events(net.client) as stream:
        srv, c, a = open_connection(net)
        port = srv.getsockname()[1]
        first = collect(stream, EventType.SUB_ESTABLISHED)
        c.close()
        a.close()
        srv.close()
        rest = collect(stream, EventType.CLOSED)
    events = [e for e in first + rest if e.token == first[0].token]
    assert [e.type for e in events] == [
        EventType.CREATED,
        EventType.ESTABLISHED,
        EventType.SUB_ESTABLISHED,
        EventType.CLOSED,
    ]
    created, established, sub, _closed = events
    for ev in (created, established):
        assert ev.local == (net.client_addr(0), c_port(ev))
        assert ev.remote == (net.server_addr(0), port)
        assert ev.family == socket.AF_INET and not ev.server_side
    assert sub.saddr == net.client_addr(1) and sub.dport == port
    assert sub.loc_id == 1 and sub.backup is False
    assert sub.ifindex == netns.if_nametoindex(net.client, net.client_dev(1))


def c_port(ev: pm.Event) -> int:
    assert ev.sport is not None
    return ev.sport


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_events_async_iterator(net: Net, loop: str) -> None:
    async def main() -> list[pm.Event]:
        got: list[pm.Event] = []
        with pm.events(net.server) as stream:
            # The connection opens while the iterator is already waiting for events.
            opening = asyncio.ensure_future(asyncio.to_thread(open_connection, net))
            try:
                async with asyncio.timeout(30):
                    async for ev in stream:
                        got.append(ev)
                        if ev.type is EventType.ESTABLISHED:
                            break
            finally:
                for s in await opening:
                    s.close()
        return got

    got = uvloop.run(main()) if loop == "uvloop" else asyncio.run(main())
    types = [e.type for e in got]
    assert types[:1] == [EventType.LISTENER_CREATED]
    assert types[-2:] == [EventType.CREATED, EventType.ESTABLISHED]
    assert got[-1].server_side is True
    assert got[-1].saddr == net.server_addr(0) and got[-1].daddr == net.client_addr(0)


def test_async_path_manager(net: Net) -> None:
    async def main() -> list[pm.Endpoint]:
        async with pm.AsyncPathManager(net.client) as mgr:
            await mgr.add_endpoint(net.client_addr(1), flags="subflow", id=4)
            return list(await mgr.endpoints())

    (ep,) = asyncio.run(main())
    assert (ep.id, ep.address) == (4, net.client_addr(1))


def test_userspace_command_on_in_kernel_connection(net: Net) -> None:
    """The userspace PM's commands refuse connections the in-kernel PM drives."""
    with pm.events(net.client) as stream:
        srv, c, a = open_connection(net)
        token = collect(stream, EventType.ESTABLISHED)[-1].token
    try:
        assert token is not None
        with pytest.raises(pm.PMError) as info:
            pm.announce(token, net.client_addr(1), id=5, netns=net.client)
        assert "announce 10.0.1.1 id 5" in str(info.value)
    finally:
        for s in (c, a, srv):
            s.close()


# ------------------------------------------------------------------ CLI


def test_cli_endpoint_and_limits(net: Net) -> None:
    ns = net.client
    r = cli(
        "endpoint",
        "add",
        "10.0.0.1",
        "dev",
        "eth0",
        "id",
        "3",
        "port",
        "4000",
        "signal",
        "--netns",
        ns,
    )
    assert r.returncode == 0, r.stderr
    # Options may sit anywhere among ip's words.
    r = cli("endpoint", "add", "10.0.1.1", "--netns", ns, "subflow", "backup")
    assert r.returncode == 0, r.stderr
    shown = cli("endpoint", "show", "--netns", ns)
    assert [line.split() for line in shown.stdout.splitlines()] == ip_endpoints(net, ns)
    ours = json.loads(cli("endpoint", "show", "--json", "--netns", ns).stdout)
    theirs = json.loads(net.run(ns, "ip", "-j", "mptcp", "endpoint", "show").stdout)
    assert ours == theirs
    assert cli("endpoint", "change", "id", "4", "nobackup", "fullmesh", "-n", ns).returncode == 0
    assert ip_endpoints(net, ns)[1] == ["10.0.1.1", "id", "4", "subflow", "fullmesh"]
    assert cli("endpoint", "del", "id", "3", "-n", ns).returncode == 0
    assert [e[0] for e in ip_endpoints(net, ns)] == ["10.0.1.1"]
    assert cli("endpoint", "flush", "-n", ns).returncode == 0
    assert ip_endpoints(net, ns) == []

    assert cli("limits", "set", "subflows", "4", "add_addr_accepted", "2", "-n", ns).returncode == 0
    assert (
        cli("limits", "show", "-n", ns).stdout.split()
        == net.run(ns, "ip", "mptcp", "limits").stdout.split()
    )
    assert json.loads(cli("limits", "show", "--json", "-n", ns).stdout) == {
        "add_addr_accepted": 2,
        "subflows": 4,
    }


def _monitor(net: Net, *args: str) -> subprocess.Popen[str]:
    """`mptcpkit monitor ARGS`, once it says it is monitoring."""
    p = subprocess.Popen(
        [sys.executable, "-m", "mptcpkit", "monitor", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    net.procs.append(p)
    assert p.stderr is not None
    assert "monitoring" in p.stderr.readline()
    return p


def test_cli_monitor_lines(net: Net) -> None:
    p = _monitor(net, "-n", net.server, "--count", "3")
    srv, c, a = open_connection(net)
    port = srv.getsockname()[1]
    try:
        out, _ = p.communicate(timeout=30)
    finally:
        for s in (c, a, srv):
            s.close()
    assert p.returncode == 0
    listener, created, established = out.splitlines()
    assert listener == f"[LISTENER_CREATED] saddr4=0.0.0.0 sport={port}"
    assert created.startswith("[         CREATED] token=")
    assert f"saddr4={net.server_addr(0)} daddr4={net.client_addr(0)} sport={port}" in created
    assert established.startswith("[     ESTABLISHED] token=")


def test_cli_monitor_stops_on_sigterm(net: Net) -> None:
    p = _monitor(net, "-n", net.client)
    p.terminate()
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and out == "" and err == ""


def test_cli_monitor_json(net: Net) -> None:
    p = _monitor(net, "--json", "--netns", net.client, "--count", "2")
    srv, c, a = open_connection(net)
    try:
        out, _ = p.communicate(timeout=30)
    finally:
        for s in (c, a, srv):
            s.close()
    assert p.returncode == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [e["type"] for e in lines[:2]] == ["CREATED", "ESTABLISHED"]
    assert lines[0]["saddr"] == net.client_addr(0) and lines[0]["family"] == "inet"
    # Tokens as ip mptcp monitor and pmd status print them: 8 hex digits.
    assert lines[0]["token"] == lines[1]["token"]
    assert len(lines[0]["token"]) == 8 and int(lines[0]["token"], 16) >= 0


def test_set_endpoint_flags_as_documented(net: Net) -> None:
    """docs/pm.md: set_endpoint_flags(ep.id, "subflow backup") on a subflow endpoint."""
    with pm.PathManager(net.client) as mgr:
        ep = mgr.add_endpoint(net.client_addr(1), flags=["subflow"], dev=net.client_dev(1))
        changed = mgr.set_endpoint_flags(ep.id, "subflow backup")
        assert changed.flags == pm.EndpointFlag.SUBFLOW | pm.EndpointFlag.BACKUP
        assert mgr.set_endpoint_flags(ep.id, "fullmesh").flags == (
            pm.EndpointFlag.SUBFLOW | pm.EndpointFlag.FULLMESH
        )
        with pytest.raises(ValueError, match="is not signal"):
            mgr.set_endpoint_flags(ep.id, "signal backup")
        assert mgr.endpoint(ep.id).flags == pm.EndpointFlag.SUBFLOW | pm.EndpointFlag.FULLMESH


# ------------------------------------------------------------------ errors: exit 2, nothing applied


@pytest.mark.parametrize(
    ("words", "message", "code"),
    [  # ip's exit codes: 1 not an address, 255 grammar, 2 refused (here before the kernel)
        (["endpoint", "add", "10.0.0.300", "subflow"], 'rather than "10.0.0.300"', 1),
        (
            ["endpoint", "add", "10.0.0.9", "dev", "nosuchdev", "subflow"],
            "unknown interface 'nosuchdev'",
            255,
        ),
        (["endpoint", "add", "10.0.0.9", "subflow", "bogus"], 'rather than "bogus"', 1),
        (
            ["limits", "set", "subflows", "3", "add_addr_accepted", "9"],
            "add_addr_accepted 9 out of range",
            2,
        ),
    ],
)
def test_cli_usage_errors_change_nothing(
    net: Net, words: list[str], message: str, code: int
) -> None:
    before = pm.limits(netns=net.client)
    r = cli(*words, "--netns", net.client)
    assert r.returncode == code
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert ip_endpoints(net, net.client) == []
    assert pm.limits(netns=net.client) == before


def test_cli_unknown_namespace() -> None:
    r = cli("endpoint", "show", "--netns", "mptk-pm-does-not-exist")
    assert r.returncode == 2
    assert "network namespace 'mptk-pm-does-not-exist' does not exist" in r.stderr


def test_cli_missing_privilege(net: Net) -> None:
    # Root without CAP_NET_ADMIN, already inside the client namespace.
    drop = ("setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin")
    r = cli("endpoint", "add", "10.0.0.1", "subflow", ns_exec=net.client, prefix=drop)
    assert r.returncode == 2
    assert "needs CAP_NET_ADMIN" in r.stderr
    assert ip_endpoints(net, net.client) == []


def test_cli_kernel_refusal_exits_2_like_ip(net: Net) -> None:
    r = cli("endpoint", "del", "id", "77", "--netns", net.client)
    assert r.returncode == 2
    assert "endpoint del id 77" in r.stderr and "address not found" in r.stderr
    r = cli("endpoint", "change", "id", "99", "backup", "--netns", net.client)
    assert r.returncode == 2
    assert r.stderr.startswith("mptcpkit endpoint: endpoint change id 99: ")


def test_no_fd_leaks(net: Net) -> None:
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = fds()
    for _ in range(5):
        with pm.PathManager(net.client) as mgr:
            mgr.endpoints()
            with pytest.raises(pm.UnknownInterface):
                mgr.add_endpoint(net.client_addr(1), dev="nosuchdev")
        with pm.events(net.client) as stream:
            stream.poll(0)
        with pytest.raises(pm.NamespaceNotFound):
            pm.PathManager("mptk-pm-does-not-exist")
        with pytest.raises(OSError) as missing:  # an OSError like every other pm failure
            pm.endpoints(netns="mptk-pm-does-not-exist")
        assert missing.value.errno == errno.ENOENT
        with pytest.raises(pm.PMError):
            pm.delete_endpoint(200, netns=net.client)
    assert fds() == before


def test_userspace_pm_commands(net: Net) -> None:
    """Every userspace-PM command, seen through the events on both sides."""
    net.c.sysctl("net.mptcp.pm_type", 1)
    with pm.events(net.client) as cev, pm.events(net.server) as sev:
        srv, c, a = open_connection(net)
        port = srv.getsockname()[1]
        try:
            token = collect(cev, EventType.ESTABLISHED)[-1].token
            assert token is not None
            with pm.PathManager(net.client) as mgr:
                mgr.check_userspace()
                mgr.announce(token, net.client_addr(1), id=5)
                ann = collect(sev, EventType.ANNOUNCED)[-1]
                assert ann.type is EventType.ANNOUNCED and ann.daddr == net.client_addr(1)
                mgr.remove(token, 5)
                rem = collect(sev, EventType.REMOVED)[-1]
                assert rem.type is EventType.REMOVED and rem.rem_id == 5

                mgr.create_subflow(
                    token,
                    net.client_addr(1),
                    (net.server_addr(0), port),
                    id=1,
                    dev=net.client_dev(1),
                )
                sub = collect(cev, EventType.SUB_ESTABLISHED)[-1]
                assert sub.type is EventType.SUB_ESTABLISHED and sub.saddr == net.client_addr(1)
                assert sub.sport is not None
                local, remote = (net.client_addr(1), sub.sport), (net.server_addr(0), port)

                mgr.set_subflow_backup(token, local, remote, True)
                prio = collect(sev, EventType.SUB_PRIORITY)[-1]
                assert prio.type is EventType.SUB_PRIORITY and prio.backup is True

                mgr.destroy_subflow(token, local, remote)
                closed = collect(cev, EventType.SUB_CLOSED)[-1]
                assert closed.type is EventType.SUB_CLOSED and closed.sport == sub.sport

        finally:
            for s in (c, a, srv):
                s.close()
