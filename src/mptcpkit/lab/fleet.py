"""The `fleet` topology: MPTCP gateway instances behind a stateless L4 balancer.

    clients (2 links each) -- lb --(1 link each)-- gw1..gwN --(1 link each)-- srv

The balancer `lb` is a plain router with nftables: a packet to the virtual address (VIP)
gets a firewall mark from a bucket map indexed by `jhash(saddr . sport . daddr . dport)`,
and the mark selects a routing table whose only route sends the VIP to one instance. No
NAT and no conntrack: every packet is hashed again, as an ECMP router, IPVS-DR or Katran
would. Each instance holds the VIP on `lo` (direct server return: the instance answers
from the VIP, back through `lb` which only routes), and its own unicast address on its
link to `lb`, which `lb` routes like any other address.

An MP_JOIN is a new 5-tuple: joined through the VIP it lands on the instance its hash
picks, which is the connection's owner one time in N. The recipe (`recipe=True`) makes
every instance announce its unicast address (a `signal` endpoint) and set the "C" flag
(`net.mptcp.allow_join_initial_addr_port=0`), so clients never join the VIP and their
joins reach the owner directly. `recipe=False` is the naive fleet, where they do not.

`drain(i)` moves instance i's buckets to the others in one nftables transaction: new
connections avoid it, and the packets of its connections' VIP subflows now reach an
instance that resets them, so those connections carry on over their unicast subflows
(with the recipe) or stall (without it).
"""

from __future__ import annotations

import dataclasses

from mptcpkit.lab import netns as _ns
from mptcpkit.lab.host import Host
from mptcpkit.lab.link import Link
from mptcpkit.lab.topologies import _bound_routes, _check_paths
from mptcpkit.lab.topology import Event, Topology

VIP = "10.99.0.1"
BUCKETS = 64  # hash buckets of the balancer's map (as Katran/Maglev tables, much smaller)
_NFT_TABLE = "fleet"
_MARK_TABLE_BASE = 200  # routing table of instance i (1-based): 200 + i
_MARK_PREF_BASE = 32000
_MAX_LIMIT = 8
JHASH_SEED = 0x6D707463  # fixed: the same flow always lands on the same instance


@dataclasses.dataclass(frozen=True)
class Instance:
    """One gateway instance: its host, its unicast address (announced with the recipe),
    its mark on the balancer and the address it uses towards the backend."""

    index: int  # 1-based
    host: Host
    unicast: str
    uplink: Link  # lb <-> instance
    backlink: Link  # instance <-> srv

    @property
    def backend_source(self) -> str:
        """The instance's address on its link to the backend (what `srv` sees)."""
        return self.backlink.iface(self.host).address4


class Fleet(Topology):
    """A `Topology` with the balancer's state: which buckets go to which instance."""

    def __init__(self, name: str, *, prefix: str | None, recipe: bool) -> None:
        super().__init__(name, prefix=prefix)
        self.recipe = recipe
        self.vip = VIP
        self.clients: list[Host] = []
        self.client_links: dict[str, list[Link]] = {}
        self.instances: list[Instance] = []
        self.balancer: Host | None = None
        self.server: Host | None = None
        self.buckets: list[int] = []  # bucket -> instance index (1-based)

    def __enter__(self) -> Fleet:
        self.up()
        return self

    # -- the balancer ---------------------------------------------------------------------

    def _nft(self, script: str) -> None:
        assert self.balancer is not None
        _ns.run_tool(
            ["ip", "netns", "exec", self.balancer.netns, "nft", "-f", "-"],
            input=script,
            what="balancer nftables",
        )

    def _map_elements(self) -> str:
        return ", ".join(f"{b} : {i}" for b, i in enumerate(self.buckets))

    def _create(self) -> None:
        super()._create()
        for inst in self.instances:
            inst.host._ip("address", "add", f"{self.vip}/32", "dev", "lo")
        self.buckets = [self.instances[b % len(self.instances)].index for b in range(BUCKETS)]
        self._nft(
            f"table ip {_NFT_TABLE} {{\n"
            # The key is an integer 0..BUCKETS-1 (nft wants a typeof; numgen is such an integer).
            f"  map buckets {{ typeof numgen inc mod {BUCKETS} : meta mark; }}\n"
            "  chain balance {\n"
            "    type filter hook prerouting priority mangle; policy accept;\n"
            f"    ip daddr {self.vip} meta l4proto tcp meta mark set jhash ip saddr . "
            f"tcp sport . ip daddr . tcp dport mod {BUCKETS} seed {JHASH_SEED:#x} "
            "map @buckets counter\n"
            "  }\n"
            "}\n"
            f"add element ip {_NFT_TABLE} buckets {{ {self._map_elements()} }}\n"
        )

    def live(self) -> list[int]:
        """Instances (1-based indexes) that own at least one bucket."""
        return sorted(set(self.buckets))

    def drain(self, index: int) -> None:
        """Take instance `index` out of the balancer: its buckets go to the others, the
        other buckets stay where they are (only its flows move), in one transaction."""
        self._require_up()
        if index not in self.live():
            raise ValueError(f"instance {index} is not in the balancer (live: {self.live()})")
        rest = [i for i in self.live() if i != index]
        if not rest:
            raise ValueError("cannot drain the last instance")
        moved = 0
        for b, owner in enumerate(self.buckets):
            if owner == index:
                self.buckets[b] = rest[moved % len(rest)]
                moved += 1
        self._apply_buckets(f"drain gw{index}")

    def restore(self) -> None:
        """Every instance back in the balancer, with the initial bucket layout."""
        self._require_up()
        self.buckets = [self.instances[b % len(self.instances)].index for b in range(BUCKETS)]
        self._apply_buckets("restore")

    def _apply_buckets(self, what: str) -> None:
        self._nft(
            f"flush map ip {_NFT_TABLE} buckets\n"
            f"add element ip {_NFT_TABLE} buckets {{ {self._map_elements()} }}\n"
        )
        with self._events_lock:
            self.events.append(Event(self.elapsed(), what, -1, {"live": self.live()}))

    def instance_of(self, address: str) -> Instance | None:
        """The instance with this unicast or backend-side address."""
        for inst in self.instances:
            if address in (inst.unicast, inst.backend_source):
                return inst
        return None


def fleet(
    instances: int = 2,
    *,
    clients: int = 1,
    paths: int = 2,
    rate: str | None = None,
    recipe: bool = True,
    burst: str = "32kbit",
    latency: str = "50ms",
    prefix: str | None = None,
    name: str = "fleet",
) -> Fleet:
    """`clients` hosts (`c1`...) with `paths` links each to the balancer `lb`, which
    balances the VIP (10.99.0.1) over `instances` hosts `gw1`..., each with a link to the
    backend `srv`.

    Client links are shaped to `rate`; the rest is not. Every client has a `subflow
    fullmesh` endpoint on each extra link (bound to its device), so it opens one extra
    subflow per extra link: to the VIP in the naive fleet, to the announced unicast
    address of the connection's instance with the recipe (with `subflow` endpoints
    alone, 6.18 joined announced addresses from the first link only, and not always).
    """
    _check_paths(paths)
    for what, n, hi in (("instances", instances, 8), ("clients", clients, 8)):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= hi:
            raise ValueError(f"{what}={n!r}: expected an integer from 1 to {hi}")
    topo = Fleet(name, prefix=prefix, recipe=recipe)
    lb = topo.add_host("lb", forwarding=True)
    topo.balancer = lb
    for c in range(1, clients + 1):
        host = topo.add_host(f"c{c}")
        topo.clients.append(host)
        topo.client_links[host.name] = [
            topo.add_link(host, lb, rate=rate, burst=burst, latency=latency) for _ in range(paths)
        ]
    gws = [topo.add_host(f"gw{i}") for i in range(1, instances + 1)]
    srv = topo.add_host("srv")
    topo.server = srv
    uplinks = [topo.add_link(lb, gw) for gw in gws]
    backlinks = [topo.add_link(gw, srv) for gw in gws]
    for i, (gw, up, back) in enumerate(zip(gws, uplinks, backlinks, strict=True), start=1):
        unicast = up.iface(gw).address4
        topo.instances.append(Instance(i, gw, unicast, up, back))
        gw.route_add("default", up.iface(lb).address4, dev=up.iface(gw).name)
        gw.limits(subflows=_MAX_LIMIT, add_addr_accepted=_MAX_LIMIT)
        if recipe:
            gw.sysctl("net.mptcp.allow_join_initial_addr_port", 0)
            gw.endpoint_add(unicast, ["signal"])
        # The VIP goes to this instance for packets the balancer marked with its index.
        lb.route_add(f"{VIP}/32", unicast, table=_MARK_TABLE_BASE + i)
        lb.rule_add("fwmark", str(i), table=_MARK_TABLE_BASE + i, pref=_MARK_PREF_BASE + i)
    for host in topo.clients:
        links = topo.client_links[host.name]
        _bound_routes(host, links, default_via=True)
        host.limits(subflows=_MAX_LIMIT, add_addr_accepted=_MAX_LIMIT)
        for link in links[1:]:
            host.endpoint_add(link.iface(host).address4, ["subflow", "fullmesh"])
    return topo


__all__ = ["BUCKETS", "VIP", "Fleet", "Instance", "fleet"]
