"""A lab link: a veth pair between two hosts, shaped with tbf (and netem) both ways.

Taking it down and up (routes restored), resetting its subflows and changing its rate
are the faults the lab applies (faults.py); each is recorded by the topology, which
owns the links (topology.py) and is named here by what a link needs of it.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Protocol

from mptcpkit.lab import netns as _ns
from mptcpkit.lab.host import Host, Interface
from mptcpkit.lab.netns import LabError
from mptcpkit.lab.units import format_rate, parse_duration, parse_rate, parse_size

# The largest packet tbf must pass on a veth: MTU 1500 plus the Ethernet header.
_MAX_FRAME = 1514


class TopologyOfLinks(Protocol):
    """What a link needs of its topology (topology.py's `Topology`)."""

    @property
    def is_up(self) -> bool: ...

    def _require_up(self) -> None: ...

    def _record_event(self, kind: str, link: Link, **detail: Any) -> None: ...


class NetemMissing(LabError):
    """The kernel has no netem qdisc: delay, jitter and reordering cannot be emulated."""


class Link:
    """A veth pair between two hosts, shaped with `tbf` on both ends when it has a rate.

    `rate` shapes both directions unless `rate_back` gives b->a its own. `delay`, `jitter`
    and `reorder` need the kernel's netem qdisc (`NetemMissing` at `up()` without it).
    """

    def __init__(
        self,
        topology: TopologyOfLinks,
        index: int,
        a: Host,
        b: Host,
        *,
        rate: str | None = None,
        burst: str = "32kbit",
        latency: str = "50ms",
        rate_back: str | None = None,
        delay: str | None = None,
        jitter: str | None = None,
        reorder: float | None = None,
    ) -> None:
        if a is b:
            raise ValueError(f"link {index}: both ends on host {a.name!r}")
        if index > 255:
            raise ValueError("a topology holds at most 256 links")
        self.topology = topology
        self.index = index
        self.rate = _check_rate(rate)
        self.rate_back = _check_rate(rate_back)
        if self.rate_back is not None and self.rate is None:
            raise ValueError(f"link {index}: rate_back needs a rate for the other direction")
        self.burst = _check_burst(burst)
        self.latency = _check_latency(latency)
        self.delay = _check_latency(delay) if delay is not None else None
        self.jitter = _check_latency(jitter) if jitter is not None else None
        if reorder is not None and not 0 < reorder <= 100:
            raise ValueError(f"reorder {reorder!r}: a percentage from 0 (excluded) to 100")
        if (jitter is not None or reorder is not None) and delay is None:
            raise ValueError("jitter and reorder need a delay (netem reorders delayed packets)")
        self.reorder = reorder
        net4 = ipaddress.ip_network(f"10.0.{index}.0/24")
        net6 = ipaddress.ip_network(f"fd00:0:0:{index:x}::/64")
        self.subnet4 = str(net4)
        self.subnet6 = str(net6)
        self.a = Interface(a, self, f"eth{len(a.interfaces)}", str(net4[1]), str(net6[1]))
        self.b = Interface(b, self, f"eth{len(b.interfaces)}", str(net4[2]), str(net6[2]))
        a.interfaces.append(self.a)
        b.interfaces.append(self.b)
        self._up = True

    def __repr__(self) -> str:
        state = "up" if self._up else "down"
        return (
            f"<Link {self.index} {self.a.host.name}:{self.a.name} <-> "
            f"{self.b.host.name}:{self.b.name} rate={self.rate} {state}>"
        )

    @property
    def hosts(self) -> tuple[Host, Host]:
        return self.a.host, self.b.host

    @property
    def ends(self) -> tuple[Interface, Interface]:
        return self.a, self.b

    @property
    def is_up(self) -> bool:
        return self._up

    @property
    def rate_bps(self) -> float | None:
        """The shaping rate a->b in bits per second, None when unshaped."""
        return parse_rate(self.rate) if self.rate else None

    @property
    def rate_back_bps(self) -> float | None:
        """The shaping rate b->a in bits per second, None when unshaped."""
        rate = self.rate_back or self.rate
        return parse_rate(rate) if rate else None

    @property
    def netem(self) -> bool:
        """Whether this link asks for netem (delay, jitter, reordering)."""
        return self.delay is not None

    def iface(self, host: Host | str) -> Interface:
        """The end of this link on `host` (a Host or its name)."""
        name = host if isinstance(host, str) else host.name
        for end in (self.a, self.b):
            if end.host.name == name:
                return end
        raise LabError(f"link {self.index} does not reach host {name!r}")

    def down(self) -> None:
        """Take the link down (both ends), as if the cable were pulled."""
        self.topology._require_up()
        for end in (self.a, self.b):
            end.host._ip("link", "set", "dev", end.name, "down")
        self._up = False
        self.topology._record_event("down", self)

    def up(self) -> None:
        """Bring the link back up and restore the routes that went with it."""
        self.topology._require_up()
        for end in (self.a, self.b):
            end.host._ip("link", "set", "dev", end.name, "up")
        self._up = True
        for end in (self.a, self.b):
            end.host._ip_batch([r for r in end.host._routes if r.link is self])
        self.topology._record_event("up", self)

    def reset(self) -> None:
        """Abort every TCP socket (MPTCP subflows included) of end `a` on this link.

        `ss -K` (sock_destroy): each sends a RST (with MP_TCPRST for a subflow); the MPTCP
        connections they belong to carry on over their other subflows.
        """
        self.topology._require_up()
        host = self.a.host
        for addr in (self.a.address4, f"[{self.a.address6}]"):
            host._exec(["ss", "-K", "-t", "-n", "src", addr])
        self.topology._record_event("rst", self)

    def set_rate(
        self,
        rate: str | int | float | None,
        *,
        burst: str | None = None,
        latency: str | None = None,
    ) -> None:
        """Change the shaping of both directions; `None` removes it."""
        new_rate = _check_rate(format_rate(parse_rate(rate)) if rate is not None else None)
        if burst is not None:
            self.burst = _check_burst(burst)
        if latency is not None:
            self.latency = _check_latency(latency)
        self.rate = new_rate
        self.rate_back = None
        if self.topology.is_up:
            self._apply_shaping(initial=False)
            self.topology._record_event("rate", self, rate=new_rate)

    def _apply_shaping(self, *, initial: bool) -> None:
        for end, rate in ((self.a, self.rate), (self.b, self.rate_back or self.rate)):
            tc = ["tc", "-n", end.host.netns, "qdisc"]
            if self.netem:
                netem = ["delay", str(self.delay)]
                if self.jitter is not None:
                    netem.append(str(self.jitter))
                if self.reorder is not None:
                    netem += ["reorder", f"{self.reorder:g}%"]
                proc = _ns.run_tool(
                    [*tc, "replace", "dev", end.name, "root", "handle", "1:", "netem", *netem],
                    check=False,
                )
                if proc.returncode != 0:
                    detail = proc.stderr.strip()
                    if "unknown" in detail.lower():
                        raise NetemMissing(
                            "this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM): delay, "
                            "jitter and reordering cannot be emulated here; rates (tbf), loss "
                            f"(nftables) and link failures work without it (tc: {detail})"
                        )
                    raise LabError(f"netem on link {self.index} failed: {detail}")
                if rate is not None:
                    _ns.run_tool(
                        [
                            *tc, "replace", "dev", end.name, "parent", "1:1", "handle", "10:",
                            "tbf", "rate", rate, "burst", self.burst, "latency", self.latency,
                        ],
                        what=f"shaping link {self.index}",
                    )  # fmt: skip
                continue
            if rate is None:
                if not initial:
                    _ns.run_tool([*tc, "del", "dev", end.name, "root"], check=False)
                continue
            _ns.run_tool(
                [
                    *tc, "replace", "dev", end.name, "root",
                    "tbf", "rate", rate, "burst", self.burst, "latency", self.latency,
                ],
                what=f"shaping link {self.index}",
            )  # fmt: skip


def _check_rate(rate: str | None) -> str | None:
    if rate is None:
        return None
    parse_rate(rate)
    return rate


def _check_size(size: str) -> str:
    parse_size(size)
    return size


def _check_burst(burst: str) -> str:
    size = parse_size(burst)
    if size < _MAX_FRAME:
        raise ValueError(
            f"burst {burst!r} is {size} bytes, less than one full-size packet "
            f"({_MAX_FRAME} bytes: MTU 1500 plus the Ethernet header): tbf would never send it"
        )
    return burst


def _check_latency(latency: str) -> str:
    parse_duration(latency)
    return latency
