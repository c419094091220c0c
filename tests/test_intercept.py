"""Transparent interception in namespaces: nftables redirect and tproxy on the site gateway."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from mptcpkit import intercept
from mptcpkit.lab import bonding as bonding_lab
from mptcpkit.lab.netns import is_root
from mptcpkit.lab.topology import Topology

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def net() -> Iterator[Topology]:
    if not is_root():
        pytest.skip("needs root (network namespaces)")
    with bonding_lab.bonding(uplinks=1, rate=None, name="icpt") as topo:
        bonding_lab.add_destinations(topo)
        yield topo


def _listen(transparent: bool) -> socket.socket:
    ls = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    if transparent:
        intercept.make_transparent(ls)
    ls.bind(("::", 0))
    ls.listen(8)
    ls.settimeout(10)
    return ls


def _nft_flush(topo: Topology) -> None:
    site = topo.host("site")
    site.run("nft delete table inet mptcpkit_bond 2>/dev/null; true")
    for fam in ("-4", "-6"):
        site.run(f"ip {fam} rule del pref 233 2>/dev/null; ip {fam} route flush table 233; true")


@pytest.mark.parametrize("mode", bonding_lab.MODES)
def test_original_destination(net: Topology, mode: str) -> None:
    site, client = net.host("site"), net.host("client")
    _nft_flush(net)
    ls = site.call(_listen, mode == "tproxy")
    try:
        port = ls.getsockname()[1]
        bonding_lab.intercept(site, mode, port)
        for dest, dport in (("10.200.0.1", 80), ("fd00:200::2", 8443)):
            fam = socket.AF_INET6 if ":" in dest else socket.AF_INET

            def dial(d: str = dest, p: int = dport, f: int = fam) -> socket.socket:
                c = socket.socket(f, socket.SOCK_STREAM)
                c.settimeout(10)
                c.connect((d, p))
                return c

            c = client.call(dial)
            with c:
                conn, _ = ls.accept()
                with conn:
                    got = intercept.destination(conn)
                    nat = intercept.original_dst(conn)
                    conn.sendall(b"hi")
                    assert c.recv(2) == b"hi"
            assert got == (dest, dport)
            # redirect: conntrack knows the original; tproxy: no NAT, the local address is it
            assert (nat == (dest, dport)) if mode == "redirect" else (nat is None)
    finally:
        ls.close()
        _nft_flush(net)


def test_not_intercepted_has_no_original_destination() -> None:
    with socket.create_server(("127.0.0.1", 0)) as ls:
        with socket.create_connection(ls.getsockname()) as c:
            conn, _ = ls.accept()
            with conn:
                assert intercept.original_dst(conn) is None
                assert intercept.destination(conn) == ls.getsockname()
            del c


def _listen_on(host: str, transparent: bool) -> socket.socket:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if transparent:
        intercept.make_transparent(ls)
    ls.bind((host, 0))
    ls.listen(8)
    ls.settimeout(10)
    return ls


@pytest.mark.parametrize(
    ("mode", "bound"),
    [("redirect", "0.0.0.0"), ("tproxy", "0.0.0.0"), ("tproxy", "10.0.0.2")],
    ids=["redirect", "tproxy-any", "tproxy-one-address"],
)
def test_intercepted_on_the_listeners_own_port(net: Topology, mode: str, bound: str) -> None:
    """A destination on the listener's own port number is intercepted; the gateway's own
    address on that port is not (it would loop). Regression: the port alone decided."""
    site, client = net.host("site"), net.host("client")
    _nft_flush(net)
    ls = site.call(_listen_on, bound, mode == "tproxy")
    try:
        port = ls.getsockname()[1]
        binds = [ls.getsockname()[:2]]
        bonding_lab.intercept(site, mode, port)
        own = net.link(0).iface(site).address(4)
        for dest, want in (("10.200.0.1", True), (own, False)):
            c = client.call(socket.create_connection, (dest, port), 10)
            with c:
                conn, _ = ls.accept()
                with conn:
                    got = site.call(intercept.intercepted, conn, mode, binds)
            assert got == ((dest, port), want), (dest, got)
    finally:
        ls.close()
        _nft_flush(net)


def test_is_local_address() -> None:
    assert intercept.is_local_address("127.0.0.1") and intercept.is_local_address("::1")
    assert not intercept.is_local_address("192.0.2.1")  # TEST-NET-1: bound, never sent to
    assert not intercept.is_local_address("2001:db8::1")
