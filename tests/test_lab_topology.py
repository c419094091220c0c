"""The lab's topologies: addressing, routing, reachability, MPTCP setup, and cleanup."""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from mptcpkit import lab
from mptcpkit.lab import netns as labns
from mptcpkit.support import read_sysctl

pytestmark = pytest.mark.root

SOL_MPTCP = 284
MPTCP_INFO = 1
SIOCGSKNS = 0x894C  # the network namespace of a socket, as an fd


def unique_prefix() -> str:
    return f"{lab.default_prefix()}lab-t{secrets.token_hex(3)}-"


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip() for line in out.stdout.splitlines()}


def netns_inode() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def listen(host: lab.Host, address: str, proto: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with host.enter():
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
    sock.bind((address, 0))
    sock.listen()
    return sock


def roundtrip(client: lab.Host, server: lab.Host, address: str, proto: int = 0) -> tuple:
    """Connect from `client` to `server` at `address`, echo a few bytes; return the 4-tuple."""
    with listen(server, address, proto) as lsock:
        port = lsock.getsockname()[1]
        family = lsock.family
        with client.enter():
            conn = socket.socket(family, socket.SOCK_STREAM, proto)
        with conn:
            conn.settimeout(10)
            conn.connect((address, port))
            peer, _ = lsock.accept()
            with peer:
                conn.sendall(b"ping")
                assert peer.recv(4) == b"ping"
                return conn.getsockname()[:2], peer.getsockname()[:2]


def addr_json(host: lab.Host) -> dict[str, list[str]]:
    out = json.loads(host.run(["ip", "-j", "address", "show"]).stdout)
    return {
        i["ifname"]: sorted(
            f"{a['local']}/{a['prefixlen']}" for a in i["addr_info"] if a["scope"] == "global"
        )
        for i in out
    }


def mptcp_subflows(sock: socket.socket) -> int:
    """All subflows of an MPTCP connection (mptcp_info.subflows counts only the extra ones)."""
    raw = sock.getsockopt(SOL_MPTCP, MPTCP_INFO, 96)
    return struct.unpack_from("B", raw, 0)[0] + 1


@pytest.mark.lab(paths=3)
def test_two_paths_addresses_and_routes(two_paths: lab.Topology) -> None:
    client, server = two_paths.host("client"), two_paths.host("server")
    assert client.netns.startswith(lab.default_prefix())
    assert client.netns.endswith("-client") and server.netns.endswith("-server")
    assert client.netns in lab.list_netns() and server.netns in lab.list_netns()
    addrs = addr_json(client)
    for i in range(3):
        v6 = ipaddress.ip_address(f"fd00:0:0:{i}::1")
        assert addrs[f"eth{i}"] == sorted([f"10.0.{i}.1/24", f"{v6}/64"])
        assert addr_json(server)[f"eth{i}"] == sorted([f"10.0.{i}.2/24", f"{v6 + 1}/64"])
    assert client.addresses(4) == ["10.0.0.1", "10.0.1.1", "10.0.2.1"]
    assert server.addresses(6) == ["fd00::2", "fd00:0:0:1::2", "fd00:0:0:2::2"]
    # Plain sockets use the direct link; a socket bound to another link leaves by it.
    assert client.route_get("10.0.0.2")["dev"] == "eth0"
    bound = client.route_get("10.0.0.2", dev="eth2")
    assert bound["dev"] == "eth2" and bound["gateway"] == "10.0.2.2"
    assert client.route_get("fd00::2", dev="eth1")["dev"] == "eth1"
    # No IPv6 address is tentative: usable at once.
    assert "tentative" not in client.run(["ip", "-6", "addr"]).stdout
    # One endpoint per extra link and family, so IPv6 connections use every path too.
    assert client.endpoints() == [
        {"address": "10.0.1.1", "id": 1, "subflow": True, "dev": "eth1"},
        {"address": "fd00:0:0:1::1", "id": 2, "subflow": True, "dev": "eth1"},
        {"address": "10.0.2.1", "id": 3, "subflow": True, "dev": "eth2"},
        {"address": "fd00:0:0:2::1", "id": 4, "subflow": True, "dev": "eth2"},
    ]
    assert server.endpoints() == []
    assert client.limits() == {"subflows": 8, "add_addr_accepted": 8}


@pytest.mark.lab(paths=2)
def test_two_paths_reachable_on_every_link_v4_and_v6(two_paths: lab.Topology) -> None:
    client, server = two_paths.host("client"), two_paths.host("server")
    for link in two_paths.links:
        for family in (4, 6):
            local, remote = roundtrip(client, server, link.iface(server).address(family))
            assert local[0] == link.iface(client).address(family)
            assert remote[0] == link.iface(server).address(family)
    # A connection from the client's link-1 address to the server's link-0 address works
    # too (that is what an extra MPTCP subflow does).
    with listen(server, "10.0.0.2") as lsock:
        with client.enter():
            conn = socket.socket()
        with conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth1")
            conn.bind(("10.0.1.1", 0))
            conn.settimeout(10)
            conn.connect(("10.0.0.2", lsock.getsockname()[1]))
            peer, (peer_addr, _) = lsock.accept()
            peer.close()
            assert peer_addr == "10.0.1.1"


@pytest.mark.lab(paths=2)
def test_two_paths_mptcp_opens_a_subflow_per_link(two_paths: lab.Topology) -> None:
    client, server = two_paths.host("client"), two_paths.host("server")
    before = [link.iface(client).counters()["tx_bytes"] for link in two_paths.links]
    with listen(server, "10.0.0.2", socket.IPPROTO_MPTCP) as lsock:
        with client.enter():
            conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_MPTCP)
        with conn:
            conn.settimeout(10)
            conn.connect(("10.0.0.2", lsock.getsockname()[1]))
            peer, _ = lsock.accept()
            with peer:
                # The client opens extra subflows once the connection is fully
                # established, which takes a first exchange of data.
                conn.sendall(b"ping")
                assert peer.recv(4) == b"ping"
                peer.sendall(b"pong")
                assert conn.recv(4) == b"pong"
                deadline = time.monotonic() + 10
                while mptcp_subflows(conn) < 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert mptcp_subflows(conn) == 2
                chunk = os.urandom(1 << 16)
                reader = threading.Thread(target=lambda: _drain(peer, 64 * len(chunk)))
                reader.start()
                for _ in range(64):
                    conn.sendall(chunk)
                reader.join(30)
                assert not reader.is_alive()
    after = [link.iface(client).counters()["tx_bytes"] for link in two_paths.links]
    # Both links carried data (4 MiB over two unshaped links: each gets a real share).
    assert all(a - b > 64 * 1024 for a, b in zip(after, before, strict=True)), (before, after)


def _drain(sock: socket.socket, total: int) -> None:
    got = 0
    while got < total:
        data = sock.recv(1 << 16)
        if not data:
            break
        got += len(data)


def test_gateway_routes_through_the_proxy(gateway: lab.Topology) -> None:
    client, proxy, server = (gateway.host(n) for n in ("client", "proxy", "server"))
    assert [h.name for h in gateway.hosts] == ["client", "proxy", "server"]
    assert len(gateway.links) == 3
    assert server.addresses(4) == ["10.0.2.2"] and server.addresses(6) == ["fd00:0:0:2::2"]
    assert proxy.addresses(4) == ["10.0.0.2", "10.0.1.2", "10.0.2.1"]
    assert proxy.sysctl("net.ipv4.ip_forward") == "1"
    assert proxy.sysctl("net.ipv6.conf.all.forwarding") == "1"
    assert client.sysctl("net.ipv4.ip_forward") == "0"
    assert client.route_get("10.0.2.2")["gateway"] == "10.0.0.2"
    assert client.route_get("fd00:0:0:2::2")["gateway"] == "fd00::2"
    assert server.route_get("10.0.1.1")["gateway"] == "10.0.2.1"
    for family in (4, 6):
        local, remote = roundtrip(client, server, server.address(family=family))
        assert local[0] == client.address(0, family)
        assert remote[0] == server.address(family=family)
        # and the proxy reaches both directly
        roundtrip(proxy, client, client.address(1, family))
    ping = client.run(["busybox", "ping", "-c", "1", "-W", "5", "10.0.2.2"], check=False)
    assert "ttl=63" in ping.stdout, ping  # one router in between
    assert client.endpoints() == [
        {"address": "10.0.1.1", "id": 1, "subflow": True, "dev": "eth1"},
        {"address": "fd00:0:0:1::1", "id": 2, "subflow": True, "dev": "eth1"},
    ]


def test_topology_removes_everything_even_when_the_body_raises() -> None:
    prefix = unique_prefix()
    links_before = root_links()
    net = lab.two_paths(paths=2, rate="20mbit", prefix=prefix)
    with pytest.raises(RuntimeError, match="boom"), net:
        assert len(lab.list_netns(prefix)) == 2
        proc = net.host("server").popen(["sleep", "300"])
        raise RuntimeError("boom")
    assert lab.list_netns(prefix) == []
    assert root_links() == links_before
    assert proc.poll() is not None
    assert not os.path.exists(f"/proc/{proc.pid}")


def test_gateway_removes_everything_and_an_open_socket_does_not_keep_veths() -> None:
    prefix = unique_prefix()
    links_before = root_links()
    with lab.gateway(paths=2, prefix=prefix) as net:
        with net.host("proxy").enter():
            sock = socket.socket()  # keeps the namespace alive after `ip netns delete`
        names = net.namespaces
        assert sorted(names) == lab.list_netns(prefix)
    with sock:
        assert lab.list_netns(prefix) == []
        assert root_links() == links_before
        # The anonymous namespace the socket still holds has no veth left in it.
        nsfd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
        try:
            links = subprocess.run(
                ["nsenter", f"--net=/proc/self/fd/{nsfd}", "ip", "-o", "link", "show"],
                capture_output=True,
                text=True,
                check=True,
                pass_fds=[nsfd],
            ).stdout
        finally:
            os.close(nsfd)
        assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]


def test_failed_up_leaves_nothing() -> None:
    prefix = unique_prefix()
    net = lab.two_paths(paths=2, prefix=prefix)
    net.host("client").endpoint_add("10.0.1.1", ["subflow"], dev="nosuchdev0")
    with pytest.raises(lab.LabError, match="nosuchdev0"):
        net.up()
    assert lab.list_netns(prefix) == []
    assert not net.is_up


def test_processes_output_and_stop(two_paths: lab.Topology) -> None:
    server = two_paths.host("server")
    proc = server.popen("echo out; echo err >&2; exec sleep 300")
    deadline = time.monotonic() + 10
    while "out" not in proc.stdout and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.stdout == "out\n"
    assert proc.stderr == "err\n"
    assert proc.poll() is None
    assert proc.stop() == -15
    done = server.run(["sh", "-c", "echo $((6*7))"])
    assert done.stdout == "42\n"
    failed = server.run(["false"], check=False)
    assert failed.returncode == 1
    with pytest.raises(subprocess.CalledProcessError):
        server.run(["false"])


def test_enter_and_call_are_per_thread(two_paths: lab.Topology) -> None:
    client = two_paths.host("client")
    own = netns_inode()
    inside = os.stat(f"/var/run/netns/{client.netns}").st_ino
    go, done = threading.Event(), threading.Event()
    seen: list[int] = []

    def other() -> None:
        go.wait(10)
        seen.append(netns_inode())
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with client.enter():
        assert netns_inode() == inside
        go.set()
        done.wait(10)
        assert seen == [own]  # other threads stay where they were
        # A thread started from inside inherits the namespace (clone copies it).
        t2 = threading.Thread(target=lambda: seen.append(netns_inode()))
        t2.start()
        t2.join()
        assert seen == [own, inside]
    t.join()
    assert netns_inode() == own
    assert client.call(netns_inode) == inside
    assert client.call(lambda a, b=0: a + b, 40, b=2) == 42
    with pytest.raises(ZeroDivisionError):
        client.call(lambda: 1 / 0)
    assert netns_inode() == own
    # A socket made inside lives in the namespace: its addresses are there.
    with client.enter():
        s = socket.socket()
    with s:
        s.bind(("10.0.1.1", 0))


def test_sysctls_and_mptcp_settings(lab_factory) -> None:
    root_before = read_sysctl("net.mptcp.enabled"), read_sysctl("net.mptcp.pm_type")
    net = lab.two_paths(paths=2, endpoints=None)
    net.host("server").sysctl("net.mptcp.pm_type", 1)
    net.host("server").limits(subflows=3, add_addr_accepted=1)
    lab_factory(net)
    client, server = net.host("client"), net.host("server")
    assert server.sysctl("net.mptcp.pm_type") == "1"
    assert client.sysctl("net.mptcp.pm_type") == "0"
    assert server.limits() == {"subflows": 3, "add_addr_accepted": 1}
    assert client.endpoints() == []
    client.sysctl("net.mptcp.enabled", 0)
    assert client.sysctl("net.mptcp.enabled") == "0"
    with client.enter(), pytest.raises(OSError):
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_MPTCP)
    schedulers = client.sysctl("net.mptcp.available_schedulers").split()
    client.sysctl("net.mptcp.scheduler", schedulers[-1])
    assert client.sysctl("net.mptcp.scheduler") == schedulers[-1]
    client.endpoint_add("10.0.1.1", ["signal", "backup"])
    client.endpoint_add("fd00:0:0:1::1", ["subflow", "fullmesh"], id=7)
    eps = client.endpoints()
    assert eps[0]["address"] == "10.0.1.1" and eps[0]["signal"] and eps[0]["backup"]
    assert eps[1] == {
        "address": "fd00:0:0:1::1",
        "id": 7,
        "subflow": True,
        "fullmesh": True,
        "dev": "eth1",
    }
    client.endpoint_del(7)
    assert len(client.endpoints()) == 1
    client.endpoint_flush()
    assert client.endpoints() == []
    with pytest.raises(ValueError, match="endpoint flags"):
        client.endpoint_add("10.0.1.1", ["subflows"])
    # The root namespace was not touched.
    assert (read_sysctl("net.mptcp.enabled"), read_sysctl("net.mptcp.pm_type")) == root_before


def test_shaping_limits_the_rate(two_paths: lab.Topology) -> None:
    """A functional check of tbf (wide tolerance), not a performance assertion."""
    client, server = two_paths.host("client"), two_paths.host("server")
    link = two_paths.link(0)
    link.set_rate("20mbit")
    assert "rate 20Mbit" in client.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
    assert "rate 20Mbit" in server.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
    rate = _measure_tcp(client, server, "10.0.0.2", seconds=1.5)
    assert 0.3 * 20e6 < rate < 1.15 * 20e6, rate
    link.set_rate(None)
    assert "tbf" not in client.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout


def _measure_tcp(client: lab.Host, server: lab.Host, address: str, seconds: float) -> float:
    received = [0]
    with listen(server, address) as lsock:
        with client.enter():
            conn = socket.socket()
        with conn:
            conn.settimeout(20)
            conn.connect((address, lsock.getsockname()[1]))
            peer, _ = lsock.accept()
            stop = threading.Event()

            def drain() -> None:
                with peer:
                    while data := peer.recv(1 << 16):
                        received[0] += len(data)

            t = threading.Thread(target=drain)
            t.start()
            chunk = b"x" * (1 << 16)
            time.sleep(0.1)
            start_bytes, start = received[0], time.monotonic()
            while time.monotonic() - start < seconds:
                conn.sendall(chunk)
            elapsed = time.monotonic() - start
            got = received[0] - start_bytes
            stop.set()
            conn.shutdown(socket.SHUT_WR)
            t.join(20)
    return got * 8 / elapsed


def test_remove_all_after_a_crash() -> None:
    prefix = unique_prefix()
    other = unique_prefix()
    script = textwrap.dedent(
        f"""
        import os
        from mptcpkit import lab
        net = lab.two_paths(paths=2, prefix={prefix!r}).up()
        net.host("server").popen(["sleep", "300"])
        print("up", flush=True)
        os._exit(9)  # no cleanup at all
        """
    )
    with lab.two_paths(paths=2, prefix=other) as survivor:
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert out.returncode == 9 and out.stdout == "up\n", out.stderr
        left = lab.list_netns(prefix)
        assert len(left) == 2
        pids = [p for n in left for p in labns.netns_pids(n)]
        assert pids  # the sleep is still there
        assert sorted(lab.remove_all(prefix)) == left
        assert lab.list_netns(prefix) == []
        for pid in pids:
            deadline = time.monotonic() + 10
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid)
        # Another lab's namespaces (another prefix) were left alone.
        assert sorted(survivor.namespaces) == lab.list_netns(other)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_removes_the_topology(sig: str) -> None:
    prefix = unique_prefix()
    script = textwrap.dedent(
        f"""
        import time
        from mptcpkit import lab
        with lab.gateway(paths=2, prefix={prefix!r}) as net:
            net.host("server").popen(["sleep", "300"])
            print("up", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "up\n"
        assert len(lab.list_netns(prefix)) == 3
        proc.send_signal(getattr(__import__("signal"), sig))
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
        leftover = lab.list_netns(prefix)
        if leftover:
            lab.remove_all(prefix)
    assert leftover == []


def test_bad_arguments_are_reported_clearly() -> None:
    with pytest.raises(ValueError, match="paths=0"):
        lab.two_paths(paths=0)
    with pytest.raises(ValueError, match="unknown unit 'mbits'"):
        lab.two_paths(rate="50mbits")
    with pytest.raises(ValueError, match="endpoints="):
        lab.gateway(endpoints="laminar")
    with pytest.raises(ValueError, match="host name"):
        lab.Topology().add_host("Client_1")
    with pytest.raises(ValueError, match="prefix"):
        lab.Topology(prefix="")
    net = lab.two_paths()
    with pytest.raises(lab.LabError, match="not up"):
        net.host("client").run(["true"])
    with pytest.raises(lab.LabError, match="no host 'proxy'"):
        net.host("proxy")
    with pytest.raises(lab.LabError, match=r"no link 5 .*links 0\.\.1"):
        net.link(5)


def test_core_api_inside_the_lab(two_paths: lab.Topology) -> None:
    """The docs' example: mptcpkit sockets made inside hosts, one subflow per link."""
    import mptcpkit

    client, server = two_paths.host("client"), two_paths.host("server")
    with server.enter():
        listener = mptcpkit.create_server(("0.0.0.0", 0))
    with listener:
        with client.enter():
            conn = mptcpkit.create_connection(("10.0.0.2", listener.getsockname()[1]), timeout=10)
        peer, _ = listener.accept()
        with conn, peer:
            conn.sendall(b"hello")
            assert peer.recv(5) == b"hello"
            peer.sendall(b"world")
            assert conn.recv(5) == b"world"
            deadline = time.monotonic() + 10
            while len(mptcpkit.subflows(conn)) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            flows = mptcpkit.subflows(conn)
            assert str(mptcpkit.status(conn)) == "MPTCP"
            assert sorted(sf.local[0] for sf in flows) == ["10.0.0.1", "10.0.1.1"]
            assert {sf.remote for sf in flows} == {("10.0.0.2", listener.getsockname()[1])}


def test_custom_topology_with_a_router(lab_factory) -> None:
    topo = lab.Topology("mine")
    a = topo.add_host("a")
    r = topo.add_host("r", forwarding=True)
    b = topo.add_host("b")
    topo.add_link(a, r, rate="20mbit")
    topo.add_link(r, b)
    a.route_add("default", "10.0.0.2")
    b.route_add("default", "10.0.1.1")
    a.route_add("default", "fd00::2")
    b.route_add("default", "fd00:0:0:1::1")
    lab_factory(topo)
    assert topo.describe()["links"][0]["rate"] == "20mbit"
    assert a.route_get("10.0.1.2")["gateway"] == "10.0.0.2"
    for family in (4, 6):
        local, _ = roundtrip(a, b, b.address(family=family))
        assert local[0] == a.address(family=family)
    # Routes through a link come back with it.
    topo.link(0).down()
    topo.link(0).up()
    for family in (4, 6):
        roundtrip(a, b, b.address(family=family))


@pytest.mark.parametrize(
    "gateway", [{"paths": 1}, {"paths": 3, "endpoints": "signal"}], indirect=True
)
def test_fixture_parametrized_indirectly(gateway: lab.Topology) -> None:
    paths = len(gateway.links) - 1
    assert len(gateway.host("client").interfaces) == paths
    signals = gateway.host("proxy").endpoints()
    assert len(signals) == 2 * max(paths - 1, 0)  # IPv4 and IPv6
    assert all(e.get("signal") for e in signals)
    assert gateway.host("client").endpoints() == []


def test_no_file_descriptor_leaks() -> None:
    from mptcpkit.lab.bench import run_bench

    def fds() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    before = fds()
    prefix = unique_prefix()
    for _ in range(2):
        with lab.two_paths(paths=2, rate="50mbit", prefix=prefix) as net:
            net.host("server").popen(["sleep", "30"])
            with net.host("client").enter():
                pass
            net.host("client").call(os.getpid)
            result = run_bench(net, duration=0.3, interval=0.1)
            assert result.verified
    assert fds() == before


@pytest.mark.root
def test_endpoint_added_before_up_keeps_its_port(lab_factory) -> None:
    net = lab.two_paths(paths=2, endpoints=None)
    server = net.host("server")
    server.endpoint_add("10.0.1.2", ["signal"], port=10000)
    lab_factory(net)
    (endpoint,) = server.endpoints()
    assert endpoint["address"] == "10.0.1.2" and endpoint["port"] == 10000
