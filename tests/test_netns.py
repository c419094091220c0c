"""The core library inside lab namespaces: MPTCP disabled per namespace, and two paths."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

import mptcpkit
from mptcpkit import MPTCPUnavailableError, State, Unusable, lab
from mptcpkit.lab.pytest_plugin import LabFactory

pytestmark = pytest.mark.root


def test_disabled_namespace(lab_factory: LabFactory, no_fd_leak: None) -> None:
    net = lab_factory(lab.two_paths, paths=1, endpoints=None)
    client, server = net.host("client"), net.host("server")
    client.sysctl("net.mptcp.enabled", 0)
    assert mptcpkit.support().usable  # the root namespace is untouched
    with client.enter():
        state = mptcpkit.support()
        assert not state.usable and state.reason is Unusable.DISABLED
        assert "net.mptcp.enabled=0" in state.detail
        assert not mptcpkit.available()
        with pytest.raises(MPTCPUnavailableError, match=r"ENOPROTOOPT.*net\.mptcp\.enabled=0"):
            mptcpkit.socket(mptcp="require")
        with server.enter():
            listener = mptcpkit.create_server(("0.0.0.0", 0))
        with listener:
            sock = mptcpkit.create_connection((server.address(0), listener.getsockname()[1]))
            accepted, _ = listener.accept()
            with sock, accepted:
                status = mptcpkit.status(sock)
                assert status.state is State.TCP
                assert "net.mptcp.enabled=0" in (status.reason or "")
                assert mptcpkit.status(accepted).state is State.TCP  # TCP client, MPTCP listener
                assert mptcpkit.status(listener).is_mptcp
    assert mptcpkit.available()  # the cache is per namespace: no stale answer here


def test_check_command_in_a_disabled_namespace(lab_factory: LabFactory) -> None:
    net = lab_factory(lab.two_paths, paths=1, endpoints=None)
    client = net.host("client")
    client.sysctl("net.mptcp.enabled", 0)
    done = client.run([sys.executable, "-m", "mptcpkit", "check", "--json"], check=False)
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["usable"] is False and report["reason"] == "disabled"
    assert report["sysctls"]["net.mptcp.enabled"] == "0"
    # No MPTCP socket can be made here: features come from the version and a TCP probe.
    assert report["features"] == {"mptcp_info": True, "mptcp_full_info": True, "tcp_is_mptcp": True}
    ok = net.host("server").run([sys.executable, "-m", "mptcpkit", "check", "--json"])
    assert json.loads(ok.stdout)["usable"] is True


def test_check_command_reports_endpoints_and_limits(lab_factory: LabFactory) -> None:
    net = lab_factory(lab.two_paths, paths=2)  # limits 8/8, a subflow endpoint on link 1
    client = net.host("client")
    report = json.loads(client.run([sys.executable, "-m", "mptcpkit", "check", "--json"]).stdout)
    assert report["limits"] == {"subflows": 8, "add_addr_accepted": 8}
    dev = client.iface(1).name
    assert report["endpoints"] == [
        {"address": client.address(1), "id": 1, "subflow": True, "dev": dev},
        {"address": client.address(1, family=6), "id": 2, "subflow": True, "dev": dev},
    ]


def test_two_subflows_with_the_right_addresses(lab_factory: LabFactory, no_fd_leak: None) -> None:
    net = lab_factory(lab.two_paths, paths=2)  # client has a `subflow` endpoint on link 1
    client, server = net.host("client"), net.host("server")
    with server.enter():
        listener = mptcpkit.create_server(("0.0.0.0", 0))
    port = listener.getsockname()[1]
    with listener, client.enter():
        sock = mptcpkit.create_connection((server.address(0), port), timeout=5)
        accepted, _ = listener.accept()
        with sock, accepted:
            sock.sendall(b"x" * 10_000)
            flows = []
            for _ in range(50):  # the join happens just after the connection is up
                flows = mptcpkit.subflows(sock)
                if len(flows) == 2 and all(f.state == "ESTABLISHED" for f in flows):
                    break
                time.sleep(0.05)
            pairs = sorted((f.local[0], f.remote) for f in flows)
            assert pairs == [
                (client.address(0), (server.address(0), port)),
                (client.address(1), (server.address(0), port)),
            ]
            info = mptcpkit.info(sock)
            assert info is not None and info.subflow_count == 2
            assert {f.local[0] for f in mptcpkit.subflows(accepted)} == {server.address(0)}
            assert {f.remote[0] for f in mptcpkit.subflows(accepted)} == {
                client.address(0),
                client.address(1),
            }


def test_no_fd_leak_over_many_fallbacks_and_downgrades(lab_factory: LabFactory) -> None:
    net = lab_factory(lab.two_paths, paths=1, endpoints=None)
    client = net.host("client")
    client.sysctl("net.mptcp.enabled", 0)
    fds_before = len(os.listdir("/proc/self/fd"))

    def churn() -> None:
        for _ in range(300):
            with mptcpkit.socket() as fallback:  # MPTCP refused here: plain TCP
                assert mptcpkit.status(fallback).state is State.TCP
            with pytest.raises(MPTCPUnavailableError):
                mptcpkit.socket(mptcp="require")

    client.call(churn)
    for _ in range(300):
        with mptcpkit.socket() as sock:  # root namespace: MPTCP, then a downgrade
            sock.setsockopt(6, 18, 1000)  # TCP_USER_TIMEOUT
            assert mptcpkit.status(sock).state is State.TCP
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_support_cache_follows_the_thread(lab_factory: LabFactory) -> None:
    net = lab_factory(lab.two_paths, paths=1, endpoints=None)
    client = net.host("client")
    client.sysctl("net.mptcp.enabled", 0)
    answers: dict[str, bool] = {}

    def inside() -> None:
        answers["inside"] = mptcpkit.available()

    t = client.thread(inside)
    t.join()
    answers["outside"] = mptcpkit.available()
    assert answers == {"inside": False, "outside": True}
