"""mptcpkit pmd: its configuration (pure) and its behaviour in the lab's namespaces."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mptcpkit
from mptcpkit import lab, pm
from mptcpkit.pm import config as cfgmod
from pmd_harness import Pmd

# ------------------------------------------------------------------ configuration


def test_config_example_parses() -> None:
    cfg = cfgmod.loads(
        """
        mode = "userspace"
        netns = "client"
        cleanup = false
        flags = ["subflow"]
        [interfaces]
        allow = ["eth*", "wlan0"]
        deny = ["eth9"]
        [interfaces.flags]
        "wwan*" = ["subflow", "backup"]
        [limits]
        subflows = 4
        add_addr_accepted = "auto"
        [userspace]
        policy = "ndiffports"
        ndiffports = 3
        [resubflow]
        backoff_initial = 0.5
        backoff_max = 10
        """
    )
    assert cfg.mode == "userspace" and cfg.netns == "client" and not cfg.cleanup
    assert cfg.wants("eth0") and cfg.wants("wlan0")
    assert not cfg.wants("eth9") and not cfg.wants("lo") and not cfg.wants("docker0")
    assert cfg.flags_for("wwan0") == pm.EndpointFlag.SUBFLOW | pm.EndpointFlag.BACKUP
    assert cfg.flags_for("eth0") == pm.EndpointFlag.SUBFLOW
    assert (cfg.subflows, cfg.add_addr_accepted) == (4, None)
    assert (cfg.policy, cfg.ndiffports) == ("ndiffports", 3)


def test_load_balancer_forces_signal() -> None:
    cfg = cfgmod.loads('load_balancer = true\nflags = ["subflow", "backup"]')
    assert cfg.flags_for("eth0") == pm.EndpointFlag.SIGNAL | pm.EndpointFlag.BACKUP


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('mode = "turbo"', "mode: expected one of kernel, userspace"),
        ('flags = ["subflow", "sideways"]', "flags: unknown endpoint flag 'sideways'"),
        ("[limits]\nsubflows = 9", "limits.subflows: expected"),
        ('[userspace]\npolicy = "roundrobin"', "userspace.policy: expected one of"),
        ("[interfaces]\nallowed = []", "unknown key 'allowed'"),
        ("colour = 1", "unknown key 'colour'"),
        ("[resubflow]\nbackoff_initial = 5\nbackoff_max = 1", "backoff_max must be >="),
        ("mode = ", "pmd.toml: "),
        # What the kernel would refuse at the first address is refused before anything.
        ('flags = ["signal", "fullmesh"]', "pmd.toml: flags: 'signal' and 'fullmesh' together"),
        ('flags = ["subflow", "implicit"]', "pmd.toml: flags: 'implicit' cannot be asked for"),
        ("flags = []", "pmd.toml: flags: expected at least one flag"),
        (
            '[interfaces.flags]\neth1 = ["fullmesh", "signal"]',
            "pmd.toml: interfaces.flags.eth1: 'signal' and 'fullmesh' together",
        ),
    ],
)
def test_config_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(cfgmod.ConfigError, match=message.replace(".", r"\.")):
        cfgmod.loads(text)


@given(
    allow=st.lists(st.from_regex(r"[a-z]{1,4}\*?", fullmatch=True), max_size=3),
    deny=st.lists(st.from_regex(r"[a-z]{1,4}\*?", fullmatch=True), max_size=3),
    name=st.from_regex(r"[a-z]{1,5}[0-9]?", fullmatch=True),
)
def test_deny_wins_over_allow(allow: list[str], deny: list[str], name: str) -> None:
    cfg = cfgmod.from_dict({"interfaces": {"allow": allow, "deny": deny}})
    import fnmatch

    if any(fnmatch.fnmatchcase(name, p) for p in deny) or name == "lo":
        assert not cfg.wants(name)
    elif not allow:
        assert cfg.wants(name)
    else:
        assert cfg.wants(name) == any(fnmatch.fnmatchcase(name, p) for p in allow)


@given(st.floats(0.05, 10), st.floats(0.05, 100), st.integers(0, 100))
def test_backoff_doubles_and_caps(initial: float, maximum: float, attempt: int) -> None:
    maximum = max(maximum, initial)
    delay = cfgmod.backoff(attempt, initial, maximum)
    assert initial <= delay <= maximum
    assert cfgmod.backoff(attempt + 1, initial, maximum) >= delay


# ------------------------------------------------------------------ live


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def v4(endpoints: list[pm.Endpoint]) -> list[str]:
    return [ep.address for ep in endpoints if ":" not in ep.address]


@pytest.fixture
def topo(lab_factory: Callable[..., lab.Topology]) -> lab.Topology:
    return lab_factory(lab.two_paths, paths=2, endpoints=None)


@pytest.fixture
def start_pmd(tmp_path: Path) -> Iterator[Callable[[str, str], Pmd]]:
    started: list[Pmd] = []

    def start(netns: str, text: str, again: Pmd | None = None) -> Pmd:
        """A pmd; `again`: in the directory of that (killed) one, sharing its state."""
        d = tmp_path / f"pmd{len(started)}" if again is None else again.config.parent
        d.mkdir(exist_ok=True)
        p = Pmd(d, netns, text)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


class Transfer:
    """An MPTCP connection client -> server with data flowing until closed."""

    def __init__(self, topo: lab.Topology) -> None:
        client, server = topo.host("client"), topo.host("server")
        with server.enter():
            self.listener = mptcpkit.create_server(("0.0.0.0", 0), mptcp=mptcpkit.Policy.REQUIRE)
        port = self.listener.getsockname()[1]
        with client.enter():
            self.sock = mptcpkit.create_connection(
                (server.address(0), port), timeout=30, mptcp=mptcpkit.Policy.REQUIRE
            )
        self.peer, _ = self.listener.accept()
        self.stopped = threading.Event()
        self.threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._recv, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _send(self) -> None:
        chunk = b"x" * 16384
        while not self.stopped.is_set():
            try:
                self.sock.sendall(chunk)
            except OSError:
                return

    def _recv(self) -> None:
        while True:
            try:
                if not self.peer.recv(65536):
                    return
            except OSError:
                return

    def locals(self) -> list[str]:
        return [sf.local[0] for sf in mptcpkit.subflows(self.sock) if sf.state == "ESTABLISHED"]

    def close(self) -> None:
        self.stopped.set()
        for s in (self.sock, self.peer, self.listener):
            s.close()
        for t in self.threads:
            t.join(10)


@pytest.mark.root
def test_new_address_gets_endpoint_and_subflow(
    topo: lab.Topology, start_pmd: Callable[..., Pmd]
) -> None:
    client = topo.host("client")
    eth1, addr1 = client.iface(1).name, client.address(1)
    client.run(["ip", "-4", "addr", "del", f"{addr1}/24", "dev", eth1])
    pmd = start_pmd(client.netns, '[interfaces]\nallow = ["eth*"]\n')
    assert v4(pm.endpoints(netns=client.netns)) == [client.address(0)]

    client.run(["ip", "addr", "add", f"{addr1}/24", "dev", eth1])
    assert wait_for(lambda: addr1 in v4(pm.endpoints(netns=client.netns)))
    (ep,) = [ep for ep in pm.endpoints(netns=client.netns) if ep.address == addr1]
    assert ep.ifname == eth1 and ep.flags == pm.EndpointFlag.SUBFLOW
    assert addr1 in [e["address"] for e in pmd.status()["endpoints"]]

    t = Transfer(topo)
    try:
        assert wait_for(lambda: addr1 in t.locals()), t.locals()
    finally:
        t.close()

    # The address goes away: so does the endpoint.
    client.run(["ip", "-4", "addr", "del", f"{addr1}/24", "dev", eth1])
    assert wait_for(lambda: addr1 not in [e.address for e in pm.endpoints(netns=client.netns)])
    assert wait_for(lambda: any("disappeared" in line for line in pmd.log))


USERSPACE_PER_INTERFACE = (
    'mode = "userspace"\n[interfaces]\nallow = ["eth*"]\n'
    '[userspace]\npolicy = "per-interface"\n[resubflow]\nbackoff_initial = 0.5\n'
)


@pytest.mark.root
@pytest.mark.parametrize("variant", ["pmd-kernel", "pmd-userspace", "kernel-alone"])
def test_link_down_up_subflow_comes_back(
    topo: lab.Topology, start_pmd: Callable[..., Pmd], variant: str
) -> None:
    client = topo.host("client")
    addr1 = client.address(1)
    # With pmd the subflow on the dead link is closed by pmd at once (the endpoint removed,
    # or SUBFLOW_DESTROY). The kernel alone leaves it to TCP: short retries in the client
    # namespace make it die during the outage (default: ~15 minutes), which is the case
    # the kernel never repairs.
    client.sysctl("net.ipv4.tcp_retries2", 3)
    with_pmd = variant != "kernel-alone"
    if variant == "pmd-userspace":
        pmd = start_pmd(client.netns, USERSPACE_PER_INTERFACE)
    elif with_pmd:
        pmd = start_pmd(
            client.netns, '[interfaces]\nallow = ["eth1"]\n[resubflow]\nbackoff_initial = 0.5\n'
        )
    else:
        pm.add_endpoint(addr1, flags="subflow", dev=client.iface(1).name, netns=client.netns)
    t = Transfer(topo)
    try:
        assert wait_for(lambda: addr1 in t.locals()), (t.locals(), with_pmd and pmd.log)
        topo.link(1).down()
        assert wait_for(lambda: addr1 not in t.locals(), timeout=60), "subflow never died"
        topo.link(1).up()
        if with_pmd:
            assert wait_for(lambda: addr1 in t.locals(), timeout=20), pmd.log
            # ...and it carries data: some of the transfer's was sent and acknowledged on it
            # (bytes_acked counts 1 for the SYN). Not "more from now on": the scheduler may
            # leave a healthy idle subflow unused for seconds while the other has room
            # (seen: 8 s after its first 229 KiB), which is no fault of pmd's.
            assert wait_for(
                lambda: any(
                    s.bytes_acked > 1 for s in mptcpkit.subflows(t.sock) if s.local[0] == addr1
                )
            ), (mptcpkit.subflows(t.sock), pmd.log)
        else:
            # The kernel alone: the endpoint is still there, the link is up, no subflow.
            time.sleep(6)
            assert addr1 not in t.locals()
            assert addr1 in [e.address for e in pm.endpoints(netns=client.netns)]
        info = mptcpkit.info(t.sock)
        assert info is not None
    finally:
        t.close()


class Idle:
    """An MPTCP connection client -> server that carries nothing once established: a
    subflow of it on a dead link has nothing to retransmit, so TCP never times it out."""

    def __init__(self, topo: lab.Topology) -> None:
        client, server = topo.host("client"), topo.host("server")
        with server.enter():
            self.listener = mptcpkit.create_server(("0.0.0.0", 0), mptcp=mptcpkit.Policy.REQUIRE)
        with client.enter():
            self.sock = mptcpkit.create_connection(
                (server.address(0), self.listener.getsockname()[1]),
                timeout=30,
                mptcp=mptcpkit.Policy.REQUIRE,
            )
        self.peer, _ = self.listener.accept()
        self.peer.settimeout(30)
        # A few bytes each way, then nothing: the connection is fully established (the
        # event the userspace pmd acts on), and idle.
        self.sock.sendall(b"hi")
        assert self.peer.recv(2) == b"hi"
        self.peer.sendall(b"hi")
        assert self.sock.recv(2) == b"hi"

    def locals(self) -> list[str]:
        return [sf.local[0] for sf in mptcpkit.subflows(self.sock) if sf.state == "ESTABLISHED"]

    def close(self) -> None:
        for s in (self.sock, self.peer, self.listener):
            s.close()


@contextlib.contextmanager
def idle_on_both_links(
    topo: lab.Topology, start_pmd: Callable[..., Pmd]
) -> Iterator[tuple[Idle, Pmd]]:
    """A userspace pmd (per-interface) and an idle connection with a subflow on eth1."""
    addr1 = topo.host("client").address(1)
    pmd = start_pmd(topo.host("client").netns, USERSPACE_PER_INTERFACE)
    c = Idle(topo)
    try:
        assert wait_for(lambda: addr1 in c.locals()), pmd.log
        yield c, pmd
    finally:
        c.close()


@pytest.mark.root
def test_userspace_link_down_closes_its_subflows(
    topo: lab.Topology, start_pmd: Callable[..., Pmd]
) -> None:
    # Once flaky in test_link_down_up_subflow_comes_back[pmd-userspace]: pmd left the
    # subflow of a link that went down to TCP, which times out only what is in flight;
    # an idle one (here: nothing sent after the first bytes) stays ESTABLISHED on the
    # dead link.
    client = topo.host("client")
    addr0, addr1 = client.address(0), client.address(1)
    with idle_on_both_links(topo, start_pmd) as (c, pmd):
        (old,) = [s for s in mptcpkit.subflows(c.sock) if s.local[0] == addr1]
        topo.link(1).down()
        assert wait_for(lambda: addr1 not in c.locals(), timeout=10), pmd.log
        assert c.locals() == [addr0]
        closed = f"subflow {addr1}:{old.local[1]} -> {old.remote[0]}:{old.remote[1]} closed"
        assert wait_for(lambda: any(f"{closed} (link eth1 down)" in line for line in pmd.log))
        (conn,) = pmd.status()["connections"]
        assert conn["subflows"] == [f"{addr0}->{old.remote[0]}"]

        topo.link(1).up()
        assert wait_for(lambda: addr1 in c.locals()), pmd.log
        c.sock.sendall(b"ping")  # and the connection still carries data
        assert c.peer.recv(4) == b"ping"


@pytest.mark.root
def test_userspace_address_gone_closes_its_subflows(
    topo: lab.Topology, start_pmd: Callable[..., Pmd]
) -> None:
    # The address deleted, its link still up: the subflow from it is as dead (nothing
    # can be sent from an address the host no longer has) and, idle, would never time out.
    client = topo.host("client")
    addr0, addr1 = client.address(0), client.address(1)
    with idle_on_both_links(topo, start_pmd) as (c, pmd):
        client.run(["ip", "-4", "addr", "del", f"{addr1}/24", "dev", client.iface(1).name])
        assert wait_for(lambda: addr1 not in c.locals(), timeout=10), pmd.log
        assert c.locals() == [addr0]
        assert wait_for(
            lambda: any(f"closed (address {addr1} disappeared)" in line for line in pmd.log)
        ), pmd.log


@pytest.mark.root
def test_userspace_link_down_leaves_the_only_subflow(
    topo: lab.Topology, start_pmd: Callable[..., Pmd]
) -> None:
    # ndiffports: every subflow on the initial pair, so on eth0. Its link going down
    # leaves the connection nothing else: pmd says so and closes nothing (TCP may ride
    # out a short flap; a connection without subflows could not).
    client = topo.host("client")
    addr0 = client.address(0)
    pmd = start_pmd(
        client.netns, 'mode = "userspace"\n[userspace]\npolicy = "ndiffports"\nndiffports = 2\n'
    )
    c = Idle(topo)
    try:
        assert wait_for(lambda: c.locals() == [addr0, addr0]), pmd.log
        topo.link(0).down()
        assert wait_for(lambda: any("left open (link eth0 down)" in line for line in pmd.log))
        assert not any(" closed (" in line for line in pmd.log), pmd.log
        assert c.locals() == [addr0, addr0]
    finally:
        c.close()


@pytest.mark.root
def test_userspace_fullmesh_2x2(
    lab_factory: Callable[..., lab.Topology], start_pmd: Callable[..., Pmd]
) -> None:
    # The server announces its second address (in-kernel PM, `signal` endpoint).
    topo = lab_factory(lab.two_paths, paths=2, endpoints="signal")
    client = topo.host("client")
    pmd = start_pmd(client.netns, 'mode = "userspace"\n[userspace]\npolicy = "fullmesh"\n')
    assert client.sysctl("net.mptcp.pm_type") == "1"
    t = Transfer(topo)
    try:

        def total() -> int:
            info = mptcpkit.info(t.sock)
            return info.subflow_count if info else 0

        assert wait_for(lambda: total() == 4), pmd.log
        pairs = {(s.local[0], s.remote[0]) for s in mptcpkit.subflows(t.sock)}
        assert pairs == {
            (client.address(i), topo.host("server").address(j)) for i in (0, 1) for j in (0, 1)
        }
        time.sleep(1)
        assert total() == 4  # no duplicates requested later
    finally:
        t.close()
    assert pmd.stop() == 0
    assert client.sysctl("net.mptcp.pm_type") == "0"  # restored


@pytest.mark.root
def test_sigterm_removes_what_it_added(topo: lab.Topology, start_pmd: Callable[..., Pmd]) -> None:
    client = topo.host("client")
    pm.set_limits(subflows=0, add_addr_accepted=0, netns=client.netns)
    pm.add_endpoint("10.9.9.9", flags="signal", netns=client.netns)  # not pmd's: must stay
    pmd = start_pmd(client.netns, '[interfaces.flags]\neth1 = ["subflow", "backup"]\n')
    state = pmd.status()
    ours = {ep["address"] for ep in state["endpoints"]}
    assert state["mode"] == "kernel"
    assert ours == set(client.addresses(4) + client.addresses(6))
    n = len(ours)
    assert pm.limits(netns=client.netns) == pm.Limits(n, n)  # raised to match
    flags = {ep.address: ep.flags for ep in pm.endpoints(netns=client.netns)}
    assert flags[client.address(0)] == pm.EndpointFlag.SUBFLOW
    assert flags[client.address(1)] == pm.EndpointFlag.SUBFLOW | pm.EndpointFlag.BACKUP
    assert pmd.stop() == 0
    assert [ep.address for ep in pm.endpoints(netns=client.netns)] == ["10.9.9.9"]
    assert pm.limits(netns=client.netns) == pm.Limits(0, 0)
    assert not os.path.exists(pmd.socket)


@pytest.mark.root
def test_load_balancer_option(topo: lab.Topology, start_pmd: Callable[..., Pmd]) -> None:
    server = topo.host("server")
    start_pmd(server.netns, "load_balancer = true\n")
    assert server.sysctl("net.mptcp.allow_join_initial_addr_port") == "0"
    eps = pm.endpoints(netns=server.netns)
    assert {ep.address for ep in eps} == set(server.addresses(4) + server.addresses(6))
    assert all(ep.flags == pm.EndpointFlag.SIGNAL for ep in eps)


# ------------------------------------------------------------------ errors: exit 2, nothing done


def run_pmd(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "mptcpkit", "pmd", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_pmd_bad_config_exit_2(tmp_path: Path) -> None:
    conf = tmp_path / "pmd.toml"
    conf.write_text('mode = "turbo"\n')
    r = run_pmd("-c", str(conf))
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == f"mptcpkit pmd: {conf}: mode: expected one of kernel, userspace, got 'turbo'"
    )
    # A flag set the kernel refuses: exit 2, file and key named, before anything starts.
    conf.write_text('flags = ["signal", "fullmesh"]\n')
    r = run_pmd("-c", str(conf), "--netns", "h14a-never-made")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"mptcpkit pmd: {conf}: flags: 'signal' and 'fullmesh'")
    assert len(r.stderr.splitlines()) == 1
    r = run_pmd("-c", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "No such file or directory" in r.stderr
    assert run_pmd().returncode == 2


@pytest.mark.root
def test_pmd_unknown_namespace_exit_2(tmp_path: Path) -> None:
    conf = tmp_path / "pmd.toml"
    conf.write_text("")
    r = run_pmd("-c", str(conf), "--netns", "mptk-pm-nope")
    assert r.returncode == 2 and "network namespace 'mptk-pm-nope' does not exist" in r.stderr


@pytest.mark.root
def test_pmd_without_privilege_exit_2(topo: lab.Topology, tmp_path: Path) -> None:
    client = topo.host("client")
    conf = tmp_path / "pmd.toml"
    conf.write_text(f'mode = "userspace"\nstatus_socket = "{tmp_path}/s.sock"\n')
    drop = (
        "ip",
        "netns",
        "exec",
        client.netns,
        "setpriv",
        "--bounding-set=-net_admin",
        "--inh-caps=-net_admin",
    )
    r = run_pmd("-c", str(conf), prefix=drop)
    assert r.returncode == 2, r.stderr
    assert "needs CAP_NET_ADMIN" in r.stderr
    # Nothing half-applied: the sysctl and the endpoints are untouched.
    assert client.sysctl("net.mptcp.pm_type") == "0"
    assert pm.endpoints(netns=client.netns) == []


@pytest.mark.root
def test_pmd_status_socket_unusable(topo: lab.Topology, tmp_path: Path) -> None:
    client = topo.host("client")
    conf = tmp_path / "pmd.toml"
    blocker = tmp_path / "file"
    blocker.write_text("")
    conf.write_text(f'status_socket = "{blocker}/pmd.sock"\n')
    r = run_pmd("-c", str(conf), "--netns", client.netns)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines()[-1].startswith(f"mptcpkit pmd: status socket {blocker}/pmd.sock: ")
    assert "added endpoint" not in r.stderr
    assert pm.endpoints(netns=client.netns) == []


@pytest.mark.root
def test_pmd_unusable_state_file_exit_2(topo: lab.Topology, tmp_path: Path) -> None:
    client = topo.host("client")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / f"pmd-{client.netns}.json").write_text("{not json")
    conf = tmp_path / "pmd.toml"
    conf.write_text(f'status_socket = "{tmp_path}/s.sock"\nstate_dir = "{state_dir}"\n')
    r = run_pmd("-c", str(conf), "--netns", client.netns)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        f"mptcpkit pmd: state file {state_dir}/pmd-{client.netns}.json: not a pmd state file"
        " (remove it if no pmd is running)"
    )
    assert pm.endpoints(netns=client.netns) == []


def test_pmd_status_without_daemon(tmp_path: Path) -> None:
    r = run_pmd("status", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 1 and "no pmd answering on" in r.stderr


@pytest.mark.root
def test_userspace_ndiffports(topo: lab.Topology, start_pmd: Callable[..., Pmd]) -> None:
    client = topo.host("client")
    start_pmd(
        client.netns, 'mode = "userspace"\n[userspace]\npolicy = "ndiffports"\nndiffports = 3\n'
    )
    t = Transfer(topo)
    try:
        assert wait_for(lambda: len(t.locals()) == 3), t.locals()
        subflows = mptcpkit.subflows(t.sock)
        assert {(s.local[0], s.remote) for s in subflows} == {
            (client.address(0), t.sock.getpeername())
        }
        assert len({s.local[1] for s in subflows}) == 3  # three source ports
    finally:
        t.close()


@pytest.mark.root
def test_userspace_server_announces(
    lab_factory: Callable[..., lab.Topology], start_pmd: Callable[..., Pmd]
) -> None:
    # Client: in-kernel PM accepting announcements; server: pmd announcing its addresses.
    topo = lab_factory(lab.two_paths, paths=2, endpoints=None)
    server = topo.host("server")
    pmd = start_pmd(server.netns, 'mode = "userspace"\n[interfaces]\nallow = ["eth*"]\n')
    t = Transfer(topo)
    try:
        assert wait_for(
            lambda: server.address(1) in [s.remote[0] for s in mptcpkit.subflows(t.sock)]
        ), pmd.log
        assert wait_for(lambda: any(f"announced {server.address(1)}" in line for line in pmd.log))
    finally:
        t.close()


# ------------------------------------------------------------------ surviving its own crash


def closed_pipe_run(*args: str) -> subprocess.CompletedProcess[str]:
    """`mptcpkit ARGS | head -c0`, deterministically: stdout is a pipe nobody reads."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(
            [sys.executable, "-m", "mptcpkit", *args],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(w)


@pytest.mark.root
def test_kill9_then_restart_kernel_mode(topo: lab.Topology, start_pmd: Callable[..., Pmd]) -> None:
    client = topo.host("client")
    ns, addr1 = client.netns, client.address(1)
    pm.set_limits(subflows=0, add_addr_accepted=0, netns=ns)
    text = '[interfaces]\nallow = ["eth*"]\n'
    first = start_pmd(ns, text)
    ours = set(client.addresses(4) + client.addresses(6))
    assert {e["address"] for e in first.status()["endpoints"]} == ours
    # A second pmd for the namespace is refused, and leaves the first one's socket alone.
    r = run_pmd("-c", str(first.config), "--netns", ns)
    assert r.returncode == 2 and f"pmd pid {first.proc.pid} already manages" in r.stderr
    assert first.status()["pid"] == first.proc.pid
    first.kill9()
    # While no pmd watches, an address goes away.
    v6 = client.address(1, family=6)
    client.run(["ip", "-6", "addr", "del", f"{v6}/64", "dev", client.iface(1).name])

    pmd = start_pmd(ns, text, again=first)
    log = "".join(pmd.log)
    assert "not ours" not in log and f"adopted what pmd pid {first.proc.pid} left" in log
    ours.discard(v6)
    assert {e["address"] for e in pmd.status()["endpoints"]} == ours
    assert v6 not in [e.address for e in pm.endpoints(netns=ns)]
    r = closed_pipe_run("pmd", "status", "--socket", pmd.socket)  # pmd status | head
    assert (r.returncode, r.stderr) == (0, "")

    # A subflow that dies with an error, of a connection open before this pmd: repaired.
    t = Transfer(topo)
    try:
        assert wait_for(lambda: addr1 in t.locals()), pmd.log
        pmd.kill9()  # the next one does not see this connection being created
        pmd = start_pmd(ns, text + "[resubflow]\nbackoff_initial = 0.2\n", again=first)
        assert wait_for(lambda: addr1 in t.locals()), pmd.log
        (old,) = [s for s in mptcpkit.subflows(t.sock) if s.local[0] == addr1]
        client.run(["ss", "-K", "-t", "src", addr1, "sport", "=", f":{old.local[1]}"])
        assert wait_for(
            lambda: any(
                s.local[0] == addr1 and s.local[1] != old.local[1]
                for s in mptcpkit.subflows(t.sock)
            )
        ), pmd.log
    finally:
        t.close()

    # What it adopted it manages: link down/up, address deleted...
    topo.link(1).down()
    assert wait_for(lambda: addr1 not in v4(pm.endpoints(netns=ns))), pmd.log
    topo.link(1).up()
    assert wait_for(lambda: addr1 in v4(pm.endpoints(netns=ns))), pmd.log
    client.run(["ip", "-4", "addr", "del", f"{addr1}/24", "dev", client.iface(1).name])
    assert wait_for(lambda: addr1 not in v4(pm.endpoints(netns=ns))), pmd.log
    # ...and SIGTERM removes it all and puts back the limits the first pmd found.
    assert pmd.stop() == 0
    assert pm.endpoints(netns=ns) == []
    assert pm.limits(netns=ns) == pm.Limits(0, 0)
    assert list(pmd.state_dir.iterdir()) == []


@pytest.mark.root
def test_kill9_then_restart_userspace_mode(
    topo: lab.Topology, start_pmd: Callable[..., Pmd]
) -> None:
    client = topo.host("client")
    addr1 = client.address(1)
    text = (
        'mode = "userspace"\n[interfaces]\nallow = ["eth*"]\n'
        '[userspace]\npolicy = "per-interface"\n[resubflow]\nbackoff_initial = 0.5\n'
    )
    first = start_pmd(client.netns, text)
    t = Transfer(topo)
    try:
        assert wait_for(lambda: addr1 in t.locals()), first.log
        first.kill9()
        assert client.sysctl("net.mptcp.pm_type") == "1"
        pmd = start_pmd(client.netns, text, again=first)
        info = mptcpkit.info(t.sock)
        assert info is not None
        (conn,) = pmd.status()["connections"]
        assert conn["token"] == f"{info.token:08x}"
        assert any(sf.startswith(f"{addr1}->") for sf in conn["subflows"])

        # A subflow of that connection killed with an error is created again.
        (old,) = [s for s in mptcpkit.subflows(t.sock) if s.local[0] == addr1]
        client.run(["ss", "-K", "-t", "src", addr1, "sport", "=", f":{old.local[1]}"])
        assert wait_for(
            lambda: any(
                s.local[0] == addr1 and s.local[1] != old.local[1]
                for s in mptcpkit.subflows(t.sock)
            )
        ), pmd.log
    finally:
        t.close()
    assert pmd.stop() == 0
    assert client.sysctl("net.mptcp.pm_type") == "0"  # the real original, not the crash's 1


@pytest.mark.root
def test_renames_followed_by_ifindex(topo: lab.Topology, start_pmd: Callable[..., Pmd]) -> None:
    client = topo.host("client")
    ns, addr1 = client.netns, client.address(1)
    pmd = start_pmd(ns, '[interfaces]\nallow = ["eth*"]\n')

    def dev_of_addr1() -> str | None:
        eps = [ep for ep in pm.endpoints(netns=ns) if ep.address == addr1]
        return eps[0].ifname if eps else None

    def ip(*args: str) -> None:
        client.run(["ip", "link", "set", *args])

    try:
        assert dev_of_addr1() == "eth1"
        # Renamed (while up) out of the managed names: its endpoint goes, status agrees.
        ip("eth1", "name", "wan1")
        assert wait_for(lambda: dev_of_addr1() is None), pmd.log
        state = pmd.status()
        assert state["interfaces"]["wan1"]["managed"] is False
        assert addr1 not in [e["address"] for e in state["endpoints"]]
        # Renamed back into them: managed again, endpoint on the new name.
        ip("wan1", "name", "eth7")
        assert wait_for(lambda: dev_of_addr1() == "eth7"), pmd.log
        assert [e["dev"] for e in pmd.status()["endpoints"] if e["address"] == addr1] == ["eth7"]
        # Down, renamed while down, up: the parked address comes back on the new name.
        ip("eth7", "down")
        assert wait_for(lambda: dev_of_addr1() is None), pmd.log
        ip("eth7", "name", "eth8")
        ip("eth8", "up")
        assert wait_for(lambda: dev_of_addr1() == "eth8"), pmd.log
        # And later down/up still follow it.
        ip("eth8", "down")
        assert wait_for(lambda: dev_of_addr1() is None), pmd.log
        ip("eth8", "up")
        assert wait_for(lambda: dev_of_addr1() == "eth8"), pmd.log
    finally:
        client.run(["ip", "link", "set", "eth8", "name", "eth1"], check=False)


@pytest.mark.root
def test_stop_without_cleanup_then_adopted(
    topo: lab.Topology, start_pmd: Callable[..., Pmd]
) -> None:
    client = topo.host("client")
    ns = client.netns
    pm.set_limits(subflows=0, add_addr_accepted=0, netns=ns)
    first = start_pmd(ns, 'cleanup = false\n[interfaces]\nallow = ["eth*"]\n')
    ours = set(client.addresses(4) + client.addresses(6))
    assert first.stop() == 0
    assert {ep.address for ep in pm.endpoints(netns=ns)} == ours  # left, as configured
    assert list(first.state_dir.iterdir())  # ...and remembered as pmd's
    pmd = start_pmd(ns, '[interfaces]\nallow = ["eth*"]\n', again=first)
    log = "".join(pmd.log)
    assert "not ours" not in log and "adopted what pmd pid" in log
    assert pmd.stop() == 0
    assert pm.endpoints(netns=ns) == []
    assert pm.limits(netns=ns) == pm.Limits(0, 0)
