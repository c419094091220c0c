"""HAProxy's bind options `interface`, `namespace` and `transparent`: real listening
sockets made by the proxy's listener pool, and a real proxy process."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from mptcpkit import netns
from mptcpkit.lab.topology import Topology
from mptcpkit.proxy.config import parse_text
from mptcpkit.proxy.listeners import ListenerPool
from proxy_harness import PROXY_CMD, Server, connect, echo, recv_all, run_proxy

IP_TRANSPARENT = 19


def _conf(bind: str, server: str = "tcp@127.0.0.1:9") -> str:
    return (
        '[global]\nworkers = 2\nmetrics = ""\n'
        f'[frontend.fe]\nbind = {bind!r}\nbackend = "be"\n'
        f'[backend.be]\nserver.s = "{server}"\n'
    )


def test_interface_bind_relays_and_is_bound_to_the_device(tmp_path: Path) -> None:
    with (
        Server(echo) as srv,
        run_proxy(tmp_path, _conf("mptcp@127.0.0.1:0 interface lo", srv.address)) as px,
    ):
        port = px.port("fe")
        s = connect(port, mptcp=True)
        s.sendall(b"over lo")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"over lo"
        s.close()
        ss = subprocess.run(
            ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout
        assert ss.count("%lo:") == 2, ss  # both workers' listeners


@pytest.mark.root
def test_pool_sets_the_options_on_every_worker_socket() -> None:
    cfg = parse_text(_conf("tcp@127.0.0.1:0 interface lo transparent"))
    pool = ListenerPool()
    new, _ = pool.bind(cfg, 2)
    try:
        socks = [s for group in new.values() for s in group]
        assert len(socks) == 2
        for s in socks:
            dev = s.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16)
            assert dev.rstrip(b"\0") == b"lo"
            assert s.getsockopt(socket.SOL_IP, IP_TRANSPARENT) == 1
    finally:
        pool.adopt(new)
        pool.close()


@pytest.mark.parametrize(
    ("bind", "reason"),
    [
        ("mptcp@127.0.0.1:0 interface nosuchdev0", "No such device"),
        ("mptcp@127.0.0.1:0 namespace h15b-nosuchns", "does not exist"),
        ("unix@/tmp/h15b-x.sock transparent", "applies to TCP/MPTCP binds"),
        ("mptcp@127.0.0.1:0 interface", "needs a name"),
        ("mptcp@127.0.0.1:0 interface a-very-long-interface", "at most 15 characters"),
    ],
)
def test_bad_bind_option_exits_2_naming_the_bind(tmp_path: Path, bind: str, reason: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(_conf(bind))
    r = subprocess.run([*PROXY_CMD, "-c", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r
    assert f"{path}: frontend.fe.bind: " in r.stderr and reason in r.stderr, r.stderr


@pytest.mark.root
def test_namespace_bind_listens_inside_the_namespace(tmp_path: Path) -> None:
    topo = Topology("bindns")
    topo.add_host("a")
    with topo, Server(echo) as srv:
        ns = topo.host("a").netns
        with run_proxy(tmp_path, _conf(f"mptcp@127.0.0.1:0 namespace {ns}", srv.address)) as px:
            port = px.port("fe")
            with netns.entered(ns):  # the client lives in the namespace, as the listener
                s = connect(port, mptcp=True)
            s.sendall(b"from inside")
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b"from inside"  # relayed to a server outside it
            s.close()
            with socket.socket() as probe:  # nothing listens on that port out here
                assert probe.connect_ex(("127.0.0.1", port)) != 0
