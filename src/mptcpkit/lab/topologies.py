"""The ready-made topologies: `two_paths` (N parallel links) and `gateway` (via a proxy).

Both come configured for MPTCP out of the box: limits raised on every host and, by
default, a `subflow` endpoint on the client for every extra link (IPv4 and IPv6), bound to
its device, so an MPTCP connection to the server's first address, of either family, opens
one subflow per link.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from mptcpkit.lab.host import ENDPOINT_FLAGS, Host
from mptcpkit.lab.link import Link
from mptcpkit.lab.topology import _RULE_PREF_BASE, _TABLE_BASE, Topology

ENDPOINT_MODES = ("subflow", "fullmesh", "signal", "none")
_MAX_LIMIT = 8  # the kernel's MPTCP_PM_ADDR_MAX for both limits
_MAX_ENDPOINTS = 8  # MPTCP_PM_ADDR_MAX again: endpoints per namespace
# The port of the server's signal endpoints with a port (`signal_port=True`): the kernel
# listens on it inside the server's namespace, where nothing else runs.
SIGNAL_PORT_BASE = 10100


def _check_paths(paths: int) -> None:
    if isinstance(paths, bool) or not isinstance(paths, int) or not 1 <= paths <= 8:
        raise ValueError(f"paths={paths!r}: expected an integer from 1 to 8")


def _check_endpoints(endpoints: str | None) -> str:
    mode = endpoints or "none"
    if mode not in ENDPOINT_MODES:
        raise ValueError(f"endpoints={endpoints!r}: expected one of {', '.join(ENDPOINT_MODES)}")
    return mode


def _bound_routes(host: Host, links: Sequence[Link], *, default_via: bool) -> None:
    """Let sockets bound to one device (subflows of `dev` endpoints) leave by that device.

    Each link gets a routing table holding `default via <peer> dev <dev> onlink`, looked up
    only for flows with that output device (`ip rule oif DEV`), after the main table: plain
    sockets keep using the main table, so taking a link down never reroutes them.
    """
    for link in links:
        end = link.iface(host)
        table = _TABLE_BASE + link.index
        pref = _RULE_PREF_BASE + link.index
        for fam in (4, 6):
            host.route_add(
                "default", end.peer.address(fam), dev=end.name, table=table, onlink=True,
                family=fam,
            )  # fmt: skip
            host.rule_add("oif", end.name, table=table, pref=pref, family=fam)
    if default_via and links:
        first = links[0].iface(host)
        for fam in (4, 6):
            host.route_add("default", first.peer.address(fam), dev=first.name, family=fam)


def _mptcp_setup(
    client: Host,
    server: Host,
    links: Sequence[Link],
    mode: str,
    *,
    backup: Collection[int] = (),
    signal_port: bool = False,
    family: int | None = None,
) -> None:
    families = _endpoint_families(family, len(links))
    for host in (client, server):
        host.limits(subflows=_MAX_LIMIT, add_addr_accepted=_MAX_LIMIT)
    bad = sorted(i for i in backup if not 1 <= i < len(links))
    if bad:
        raise ValueError(
            f"backup links {bad}: only extra links (1..{len(links) - 1}) can be backups; "
            "link 0 carries the connection's first subflow"
        )
    if signal_port and mode != "signal":
        raise ValueError("signal_port needs endpoints='signal'")
    if mode == "none":
        if backup:
            raise ValueError("backup links need endpoints (subflow, fullmesh or signal)")
        return
    for link in links[1:]:
        extra = ["backup"] if link.index in backup else []
        for fam in families:
            if mode == "signal":
                end = link.iface(server)
                port = SIGNAL_PORT_BASE + link.index if signal_port else None
                server.endpoint_add(end.address(fam), ["signal", *extra], port=port)
            else:
                flags = ["subflow"] if mode == "subflow" else ["subflow", "fullmesh"]
                client.endpoint_add(link.iface(client).address(fam), [*flags, *extra])
    assert all(f in ENDPOINT_FLAGS for f in ("subflow", "fullmesh", "signal", "backup"))


def _endpoint_families(family: int | None, paths: int) -> tuple[int, ...]:
    """The families to make endpoints for: both while they fit in the kernel's 8 endpoints
    per namespace (up to 5 paths), else IPv4 only; `family` 4 or 6 asks for one."""
    if family is None:
        return (4, 6) if 2 * (paths - 1) <= _MAX_ENDPOINTS else (4,)
    if family not in (4, 6):
        raise ValueError(f"family={family!r}: expected 4, 6 or None (both, when they fit)")
    return (family,)


def _link_rates(
    paths: int, rate: str | None, rates: Sequence[str] | None
) -> list[tuple[str | None, str | None]]:
    """(a->b, b->a) per link: `rates` entries are "RATE" or "UP/DOWN"; else `rate` for all."""
    if rates is None:
        return [(rate, None)] * paths
    if rate is not None:
        raise ValueError("give rate or rates, not both")
    if len(rates) != paths:
        raise ValueError(f"rates: {len(rates)} given for {paths} path(s); give one per link")
    out: list[tuple[str | None, str | None]] = []
    for text in rates:
        up, sep, down = str(text).partition("/")
        if not up or (sep and not down):
            raise ValueError(f"rates entry {text!r}: expected RATE or UP/DOWN, e.g. 50mbit/10mbit")
        out.append((up, down or None))
    return out


def two_paths(
    paths: int = 2,
    rate: str | None = None,
    *,
    burst: str = "32kbit",
    latency: str = "50ms",
    endpoints: str | None = "subflow",
    prefix: str | None = None,
    name: str = "twopaths",
    rates: Sequence[str] | None = None,
    backup: Collection[int] = (),
    signal_port: bool = False,
    delay: str | None = None,
    jitter: str | None = None,
    reorder: float | None = None,
    family: int | None = None,
) -> Topology:
    """Client and server joined by `paths` parallel links, each shaped to `rate`.

    Link i: client `eth<i>` 10.0.i.1 / fd00:0:0:i::1 <-> server `eth<i>` 10.0.i.2 /
    fd00:0:0:i::2. `endpoints`: "subflow" (client endpoint per extra link), "fullmesh",
    "signal" (the server announces its extra addresses, on port 10100+i with
    `signal_port`) or None (limits only); every endpoint exists for IPv4 and IPv6.
    `rates`: one per link instead of `rate`, "RATE" or "UP/DOWN" (client->server /
    server->client). `backup`: extra links whose endpoints carry the backup flag.
    `delay`, `jitter`, `reorder` (%): netem on every link, where the kernel has it.
    `family`: endpoints of IPv4 (4) or IPv6 (6) only; by default both, while they fit in
    the kernel's 8 endpoints per namespace (up to 5 paths), else IPv4 only.
    """
    _check_paths(paths)
    mode = _check_endpoints(endpoints)
    per_link = _link_rates(paths, rate, rates)
    topo = Topology(name, prefix=prefix)
    client = topo.add_host("client")
    server = topo.add_host("server")
    links = [
        topo.add_link(
            client,
            server,
            rate=up,
            rate_back=down,
            burst=burst,
            latency=latency,
            delay=delay,
            jitter=jitter,
            reorder=reorder,
        )
        for up, down in per_link
    ]
    _bound_routes(client, links, default_via=False)
    _bound_routes(server, links, default_via=False)
    _mptcp_setup(client, server, links, mode, backup=backup, signal_port=signal_port, family=family)
    return topo


def gateway(
    paths: int = 2,
    rate: str | None = None,
    *,
    server_rate: str | None = None,
    burst: str = "32kbit",
    latency: str = "50ms",
    endpoints: str | None = "subflow",
    prefix: str | None = None,
    name: str = "gateway",
) -> Topology:
    """Client — proxy — server: `paths` links client-proxy, one link proxy-server.

    Links 0..N-1 join client `eth<i>` (10.0.i.1) and proxy `eth<i>` (10.0.i.2); link N joins
    proxy `eth<N>` (10.0.N.1) and server `eth0` (10.0.N.2). The proxy forwards IPv4 and
    IPv6, so client and server also reach each other through it. MPTCP endpoints are set
    up between client and proxy (where an MPTCP-to-TCP proxy would terminate MPTCP).
    """
    _check_paths(paths)
    mode = _check_endpoints(endpoints)
    topo = Topology(name, prefix=prefix)
    client = topo.add_host("client")
    proxy = topo.add_host("proxy", forwarding=True)
    server = topo.add_host("server")
    links = [
        topo.add_link(client, proxy, rate=rate, burst=burst, latency=latency) for _ in range(paths)
    ]
    uplink = topo.add_link(proxy, server, rate=server_rate, burst=burst, latency=latency)
    _bound_routes(client, links, default_via=True)
    _bound_routes(server, [uplink], default_via=True)
    _mptcp_setup(client, proxy, links, mode)
    server.limits(subflows=_MAX_LIMIT, add_addr_accepted=_MAX_LIMIT)
    return topo
