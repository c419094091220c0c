"""Bonding end to end: LAN client -> site gateway ==2 uplinks== remote gateway -> internet.

Real namespaces, real nftables interception, `mptcpkit proxy` on both gateways (and
HAProxy as a remote gateway), an unmodified TCP client.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bonding_harness import byte_server, fetch, fetch_many, fetch_ok, payload
from mptcpkit.lab import bonding as bl
from mptcpkit.lab import bondsetup
from mptcpkit.lab.netns import is_root
from mptcpkit.lab.topology import Topology
from mptcpkit.lab.wandelay import wan_delay
from mptcpkit.proxy.compiled import ENGINE_ENV
from proxy_harness import recv_all, wait_for

pytestmark = pytest.mark.root

WAN_DEST = "10.0.3.2"  # the internet host's own WAN address: in the remote gateway's networks


@pytest.fixture(scope="module")
def net() -> Iterator[Topology]:
    if not is_root():
        pytest.skip("needs root (network namespaces)")
    with bl.bonding(uplinks=2, rate=None, name="bond") as topo:
        bl.add_destinations(topo)
        with byte_server(topo.host("internet")):
            yield topo


def _clear(topo: Topology) -> None:
    site = topo.host("site")
    site.run("nft delete table inet mptcpkit_bond 2>/dev/null; true")
    for fam in ("-4", "-6"):
        site.run(f"ip {fam} rule del pref 233 2>/dev/null; ip {fam} route flush table 233; true")


@pytest.fixture
def gateways(
    net: Topology, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[bl.Gateways]:
    opts = dict(getattr(request, "param", {}))
    engine = opts.pop("engine", None)  # the default: the C engine where it is built
    with pytest.MonkeyPatch.context() as mp:
        if engine is not None:
            mp.setenv(ENGINE_ENV, engine)
        gw = bl.start_gateways(net, tmp_path, **opts)
    try:
        yield gw
    finally:
        gw.site.stop()
        gw.remote.stop()
        _clear(net)


def _conn_lines(proc_text: str) -> list[str]:
    return [line for line in proc_text.splitlines() if " conn " in line]


# every mode x encoding on the default data path (the engine), two on the Python relay
COMBOS = [{"mode": m, "encoding": e} for m in bl.MODES for e in bl.ENCODINGS] + [
    {"mode": "redirect", "encoding": "convert", "engine": "python"},
    {"mode": "tproxy", "encoding": "proxy-v2", "engine": "python"},
]


def _id(c: dict[str, str]) -> str:
    return "-".join(c.values())


@pytest.mark.parametrize("gateways", COMBOS, indirect=True, ids=[_id(c) for c in COMBOS])
def test_download_every_destination(net: Topology, gateways: bl.Gateways) -> None:
    """Both interception modes x both encodings, IPv4 and IPv6 destinations, verified."""
    client = net.host("client")
    for i, dest in enumerate(bl.DESTINATIONS):
        assert client.call(fetch_ok, dest, 300_000 + i, i), dest
    # each converted connection crossed the uplinks as one MPTCP connection with 2 subflows
    lines = wait_for(
        lambda: len(_conn_lines(gateways.site.stderr)) >= 4 and _conn_lines(gateways.site.stderr),
        what="the site gateway's connection log",
    )
    # a short download may end before the second subflow joins: at least one shows it
    assert all("client=TCP server=MPTCP(" in line for line in lines), lines
    assert any("server=MPTCP(2)" in line for line in lines), lines
    rlines = wait_for(lambda: _conn_lines(gateways.remote.stderr), what="remote log")
    assert all("client=MPTCP(" in line for line in rlines), rlines


@pytest.mark.parametrize(
    "gateways",
    [
        {"encoding": "convert", "deny": ["10.200.0.2/32"]},
        {"encoding": "proxy-v2", "deny": ["10.200.0.2/32"]},
        {"encoding": "convert", "deny": ["10.200.0.2/32"], "engine": "python"},
    ],
    indirect=True,
    ids=["convert", "proxy-v2", "convert-python"],
)
def test_refused_destination(net: Topology, gateways: bl.Gateways) -> None:
    """The remote gateway is no open relay: its own networks and denied ones are refused,
    logged with the reason; the LAN client gets a reset (RFC 8803: error -> RST)."""
    client = net.host("client")
    for dest, why in ((WAN_DEST, "own network"), ("10.200.0.2", "is denied")):
        with pytest.raises(ConnectionResetError):
            client.call(fetch, dest, 1000, 1)
        pattern = f"refused .* -> {re.escape(dest)}:.*{why}"
        wait_for(lambda p=pattern: re.search(p, gateways.remote.stderr),
                 what=f"the refusal of {dest} in the remote log")  # fmt: skip
    if "accept-convert" in (Path(gateways.remote.argv[-1]).read_text()):
        wait_for(lambda: "refused by the remote gateway: not authorized" in gateways.site.stderr,
                 what="the Convert error in the site log")  # fmt: skip
    assert client.call(fetch_ok, "10.200.0.1", 10_000, 3)  # the others still go


@pytest.mark.parametrize(
    "gateways",
    [{"psk": "k3y-k3y-", "site_psk": "wrongkey"}],
    indirect=True,
)
def test_wrong_psk_refused(net: Topology, gateways: bl.Gateways) -> None:
    with pytest.raises(ConnectionResetError):
        net.host("client").call(fetch, "10.200.0.1", 1000, 1)
    wait_for(lambda: "wrong pre-shared key" in gateways.remote.stderr, what="refusal")


@pytest.mark.parametrize(
    "gateways",
    [{"psk": "k3y-k3y-", "encoding": "convert"}, {"psk": "k3y-k3y-", "encoding": "proxy-v2"}],
    indirect=True,
    ids=["convert", "proxy-v2"],
)
def test_psk_accepted(net: Topology, gateways: bl.Gateways) -> None:
    assert net.host("client").call(fetch_ok, "fd00:200::1", 50_000, 7)


def _nstat(host: object, counter: str) -> int:
    out = host.run(["nstat", "-az", counter]).stdout  # type: ignore[attr-defined]
    m = re.search(rf"^{counter}\s+(\d+)", out, re.M)
    return int(m.group(1)) if m else 0


@pytest.mark.parametrize(
    "gateways",
    [{"tfo": True, "encoding": e} for e in bl.ENCODINGS]
    + [{"tfo": True, "encoding": "convert", "engine": "python"}],
    indirect=True,
    ids=[*bl.ENCODINGS, "convert-python"],
)
def test_tfo_puts_the_destination_in_the_syn(net: Topology, gateways: bl.Gateways) -> None:
    """`tfo = true` on both sides: once the site has a cookie, its Convert message (or
    PROXY header) rides the SYN to the remote gateway (TcpExtTCPFastOpenPassive)."""
    remote, client = net.host("remote"), net.host("client")
    before = _nstat(remote, "TcpExtTCPFastOpenPassive")
    for i in range(3):
        assert client.call(fetch_ok, bl.DESTINATIONS[i], 10_000, 50 + i)
    assert _nstat(remote, "TcpExtTCPFastOpenPassive") - before >= 2  # all but the first


# ... and a tproxy listener bound to one address (the Python path's: test_intercept.py)
OWN_PORT: list[dict[str, Any]] = [
    {"mode": m, "engine": e} for m in bl.MODES for e in ("c", "python")
] + [{"mode": "tproxy", "engine": "c", "bind_lan": True}]


@pytest.mark.parametrize(
    "gateways",
    OWN_PORT,
    indirect=True,
    ids=[*(_id(c) for c in OWN_PORT[:4]), "tproxy-c-one-address"],
)
def test_own_port_is_relayed_and_the_gateway_itself_refused(
    net: Topology, gateways: bl.Gateways
) -> None:
    """A LAN client connecting to the site gateway's own address and port is not relayed
    to "itself" over the uplinks (a loop): reset, and logged. Regression: a destination
    on the internet that listens on the SAME port number as the gateway's listener was
    taken for the gateway itself (the test was the port alone) and reset too."""
    client, site = net.host("client"), net.host("site")
    for fam, port in ((4, gateways.site_port), (6, gateways.site_port6)):
        own = net.link(0).iface(site).address(fam)
        with pytest.raises((ConnectionResetError, ConnectionRefusedError)):
            client.call(fetch, own, 10, 1, port=port)
    wait_for(lambda: gateways.site.stderr.count("not an intercepted connection") >= 2,
             what="both refusals in the site log")  # fmt: skip
    assert not _conn_lines(gateways.remote.stderr)  # nothing reached the remote gateway
    internet = net.host("internet")
    ports = sorted({gateways.site_port, gateways.site_port6})
    with contextlib.ExitStack() as stack:
        for port in ports:
            stack.enter_context(byte_server(internet, port))
        for i, (dest, port) in enumerate(
            (("10.200.0.1", gateways.site_port), ("fd00:200::1", gateways.site_port6))
        ):
            got = client.call(fetch, dest, 100_000, 60 + i, port=port)
            assert got == payload(100_000, 60 + i), (dest, port, len(got))


@pytest.mark.parametrize("gateways", [{"mode": "redirect"}], indirect=True)
def test_200_concurrent_connections(net: Topology, gateways: bl.Gateways) -> None:
    jobs = [(bl.DESTINATIONS[i % 4], 20_000 + 37 * i, i) for i in range(200)]
    results = net.host("client").call(fetch_many, jobs, 200)
    assert results == [True] * 200


@pytest.mark.parametrize("gateways", [{"mode": "tproxy"}], indirect=True)
def test_client_closes_half_way(net: Topology, gateways: bl.Gateways) -> None:
    """A client that hangs up mid-download: both gateways end the connection, and serve on."""
    client = net.host("client")
    got = client.call(fetch, "10.200.0.1", 200_000_000, 5, read=100_000)
    assert len(got) >= 100_000
    wait_for(lambda: _conn_lines(gateways.site.stderr), what="site conn end")
    wait_for(lambda: _conn_lines(gateways.remote.stderr), what="remote conn end")
    assert client.call(fetch_ok, "fd00:200::2", 100_000, 6)


HAPROXY_CFG = """global
    maxconn 1000
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend bond
    bind {addr}:{port} accept-proxy
    default_backend out
backend out
    server s 0.0.0.0:0
"""


def test_haproxy_as_remote_gateway(net: Topology, tmp_path: Path) -> None:
    """Interop: our site gateway sends PROXY v2; HAProxy (`accept-proxy`, `server s
    0.0.0.0:0`) connects where the header says. HAProxy 2.6 has no MPTCP: `mptcpize`
    makes its sockets MPTCP, so the uplinks are still bonded."""
    site, remote = net.host("site"), net.host("remote")
    addr = net.link(1).iface(remote).address(4)
    port = 18443  # inside the lab's own namespace
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG.format(addr=addr, port=port))
    hap = remote.popen(["mptcpize", "run", "haproxy", "-db", "-f", str(cfg)])
    try:
        wait_for(lambda: f":{port}" in remote.run(["ss", "-ltnH"]).stdout, what="haproxy")
        scfg = tmp_path / "site.toml"
        scfg.write_text(bl.site_config(addr, port, mode="redirect", encoding="proxy-v2"))
        sproc, (p4, p6) = bl.start_proxy(site, scfg, "lan")
        try:
            bl.intercept(site, "redirect", p4, p6)
            client = net.host("client")
            for i, dest in enumerate(bl.DESTINATIONS):
                assert client.call(fetch_ok, dest, 200_000, 40 + i), dest
            lines = wait_for(
                lambda: len(_conn_lines(sproc.stderr)) >= 4 and _conn_lines(sproc.stderr),
                what="site log",
            )
            assert any("server=MPTCP(2)" in line for line in lines), lines
        finally:
            sproc.stop()
            _clear(net)
    finally:
        hap.stop()


@pytest.fixture
def shaped(tmp_path: Path) -> Iterator[tuple[Topology, bl.Gateways]]:
    if not is_root():
        pytest.skip("needs root (network namespaces)")
    with bl.bonding(uplinks=2, rate="20mbit", name="bondfail") as topo:
        bl.add_destinations(topo)
        with byte_server(topo.host("internet")):
            gw = bl.start_gateways(topo, tmp_path, mode="redirect", encoding="convert")
            try:
                yield topo, gw
            finally:
                gw.site.stop()
                gw.remote.stop()


def test_uplink_fails_and_comes_back(shaped: tuple[Topology, bl.Gateways]) -> None:
    """Uplink 1 (the first subflow's) goes down mid-download and comes back: not a
    byte lost; a new connection afterwards bonds both uplinks again."""
    topo, gw = shaped
    client = topo.host("client")
    result: list[bool] = []
    t = threading.Thread(
        target=lambda: result.append(client.call(fetch_ok, "10.200.0.1", 6_000_000, 11))
    )
    t.start()
    time.sleep(0.5)
    topo.link(1).down()
    time.sleep(1.0)
    topo.link(1).up()
    t.join(60)
    assert result == [True]
    assert client.call(fetch_ok, "fd00:200::1", 2_000_000, 12)
    lines = wait_for(lambda: len(_conn_lines(gw.site.stderr)) >= 2 and _conn_lines(gw.site.stderr),
                     what="site log")  # fmt: skip
    assert "server=MPTCP(2)" in lines[-1], lines


def _uplinks(topo: Topology) -> list[str]:
    site, remote = topo.host("site"), topo.host("remote")
    return [link.iface(site).name for link in topo.links if set(link.hosts) == {site, remote}]


BANNER = b"220 hello from a server that speaks first\r\n"


def _banner_server(ls: socket.socket, stop: threading.Event) -> None:
    """A destination that speaks first (SMTP, SSH): a banner on accept, then FIN."""
    ls.settimeout(0.1)
    while not stop.is_set():
        try:
            c, _ = ls.accept()
        except TimeoutError:
            continue
        with c:
            c.sendall(BANNER)


def _read_banner(dest: str, port: int) -> bytes:
    with socket.create_connection((dest, port), timeout=10) as s:
        return recv_all(s)


@pytest.mark.parametrize(
    "gateways",
    [{"tfo": True}, {"tfo": True, "engine": "python"}],
    indirect=True,
    ids=["default", "python"],
)
def test_tfo_across_a_wan_delay(net: Topology, gateways: bl.Gateways) -> None:
    """Regression: with TFO and a WAN delay, the remote gateway wrote its answer while
    the site's third ACK was still on its way, and Linux never sends what an MPTCP
    socket is given in SYN_RECV until the client sends again: a destination that
    speaks first (the client waits) hung. The answer now waits for that ACK; a client
    that speaks first has its first bytes in the SYN."""
    client, internet = net.host("client"), net.host("internet")
    ls = internet.call(socket.create_server, ("0.0.0.0", 8081))
    stop = threading.Event()
    t = threading.Thread(target=_banner_server, args=(ls, stop), daemon=True)
    t.start()
    try:
        with wan_delay(net.host("site"), _uplinks(net), 0.02) as delayer:
            for i in range(3):  # the first gets the cookie; the others put data in the SYN
                assert client.call(_read_banner, bl.DESTINATIONS[0], 8081) == BANNER
                assert client.call(fetch_ok, bl.DESTINATIONS[i % 2], 20_000, 90 + i)
        assert delayer.held > 0
    finally:
        stop.set()
        t.join(5)
        ls.close()


def test_setup_round_trips_are_measured(net: Topology, tmp_path: Path) -> None:
    """bondsetup.measure runs direct TCP, the pair and the pair with TFO across a WAN
    delay and checks its own numbers (it raises if the delay did not apply); the
    speeds live in `mptcpkit demo bonding` and are not judged here."""
    r = bondsetup.measure(net, tmp_path, tries=2)
    assert r["packets_delayed"] > 0 and r["wan_rtt_ms"] == 50.0
    assert set(r["times_ms"]) == {"direct", "pair", "pair_tfo"}
    assert all(len(ts) == 2 for ts in r["times_ms"].values())
    assert isinstance(r["target_met"], bool)
