"""The bonding topology: a site reaching the internet over all of its uplinks.

    client ==lan== site ==uplink 1..N== remote ==wan== internet

Link 0 (LAN) joins `client` (10.0.0.1) and the site gateway `site` (10.0.0.2, the
client's default route). Links 1..N are the site's uplinks to the remote gateway
(`site` 10.0.i.1 — `remote` 10.0.i.2), shaped to `rate`; the site has one `subflow`
endpoint per uplink, bound to its device. Link N+1 (WAN) joins `remote` (10.0.N+1.1)
and `internet` (10.0.N+1.2), unshaped. The internet host also answers at
`DESTINATIONS` (on its loopback), reached through the remote gateway; nothing routes
them from the site, so a LAN client gets there only through the converter pair.

`intercept(site, "redirect"|"tproxy", port)` installs the nftables rules (and, for
tproxy, the policy routing) that hand the LAN's TCP connections to a local port.
"""

from __future__ import annotations

from mptcpkit.lab.topologies import _bound_routes
from mptcpkit.lab.topology import Host, Topology

__all__ = ["DESTINATIONS", "MODES", "add_destinations", "bonding", "intercept"]

DESTINATIONS = ("10.200.0.1", "10.200.0.2", "fd00:200::1", "fd00:200::2")
MODES = ("redirect", "tproxy")
_TPROXY_MARK = 0x1B
_TPROXY_TABLE = 233
_TPROXY_PREF = 233


def bonding(
    uplinks: int = 2,
    rate: str | None = "50mbit",
    *,
    rates: list[str] | None = None,
    latency: str = "50ms",
    delay: str | None = None,
    prefix: str | None = None,
    name: str = "bonding",
) -> Topology:
    """client — site ==N uplinks== remote — internet; call `add_destinations` once up."""
    if not 1 <= uplinks <= 7:
        raise ValueError(f"uplinks={uplinks!r}: expected 1 to 7")
    per: list[str | None] = list(rates) if rates else [rate] * uplinks
    if len(per) != uplinks:
        raise ValueError(f"rates: {len(per)} given for {uplinks} uplinks")
    topo = Topology(name, prefix=prefix)
    client = topo.add_host("client")
    site = topo.add_host("site", forwarding=True)
    remote = topo.add_host("remote", forwarding=True)
    internet = topo.add_host("internet")
    lan = topo.add_link(client, site)
    ups = [topo.add_link(site, remote, rate=r, latency=latency, delay=delay) for r in per]
    wan = topo.add_link(remote, internet)
    for fam in (4, 6):
        client.route_add("default", lan.iface(site).address(fam), family=fam)
        internet.route_add("default", wan.iface(remote).address(fam), family=fam)
    remote.route_add("10.200.0.0/24", wan.iface(internet).address(4))
    remote.route_add("fd00:200::/64", wan.iface(internet).address(6), family=6)
    for fam in (4, 6):  # the way back to the LAN (for checks; converted traffic never needs it)
        remote.route_add(
            "10.0.0.0/24" if fam == 4 else "fd00::/64", ups[0].iface(site).address(fam), family=fam
        )
    _bound_routes(site, ups, default_via=False)
    _bound_routes(remote, ups, default_via=False)
    for host in (site, remote):
        host.limits(subflows=8, add_addr_accepted=8)
    for link in ups:
        for fam in (4, 6):
            site.endpoint_add(link.iface(site).address(fam), ["subflow"])
    internet.limits(subflows=8, add_addr_accepted=8)
    return topo


def add_destinations(topo: Topology) -> tuple[str, ...]:
    """Give the internet host its extra addresses (after `up()`); returns them."""
    internet = topo.host("internet")
    for addr in DESTINATIONS:
        plen = 32 if "." in addr else 128
        internet.run(["ip", "addr", "add", f"{addr}/{plen}", "dev", "lo"])
    return DESTINATIONS


def intercept(site: Host, mode: str, port: int, *, lan_dev: str | None = None) -> None:
    """Hand the LAN's TCP connections to local `port`: nftables `redirect` or `tproxy`.

    Rules live in the site's namespace (`table inet mptcpkit_bond`), gone with it.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    dev = lan_dev or site.iface(0).name
    if mode == "redirect":
        chain = (
            "type nat hook prerouting priority dstnat; policy accept;\n"
            f'    iifname "{dev}" meta l4proto tcp redirect to :{port}'
        )
    else:
        chain = (
            "type filter hook prerouting priority mangle; policy accept;\n"
            f'    iifname "{dev}" meta l4proto tcp meta nfproto ipv4 '
            f"tproxy ip to :{port} meta mark set {_TPROXY_MARK} accept\n"
            f'    iifname "{dev}" meta l4proto tcp meta nfproto ipv6 '
            f"tproxy ip6 to :{port} meta mark set {_TPROXY_MARK} accept"
        )
    rules = f"table inet mptcpkit_bond {{\n  chain pre {{\n    {chain}\n  }}\n}}\n"
    site.run(["nft", "-f", "-"], input=rules)
    if mode == "tproxy":
        for fam, default in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
            site.run(
                ["ip", fam, "rule", "add", "fwmark", str(_TPROXY_MARK), "lookup",
                 str(_TPROXY_TABLE), "pref", str(_TPROXY_PREF)]
            )  # fmt: skip
            site.run(
                ["ip", fam, "route", "add", "local", default, "dev", "lo", "table",
                 str(_TPROXY_TABLE)]
            )  # fmt: skip
