"""A lab host: a network namespace with its interfaces, routes, MPTCP settings and
programs, and the interfaces (one end of a link each) it holds.

Links (link.py) and the topology (topology.py) build hosts up; what a host needs of
them is named here as protocols (`LinkLike`, `TopologyLike`), so this module sits below
both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import re
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from mptcpkit.lab import netns as _ns
from mptcpkit.lab.netns import LabError
from mptcpkit.lab.process import Process
from mptcpkit.lab.units import parse_rate

T = TypeVar("T")

ENDPOINT_FLAGS = frozenset({"subflow", "signal", "backup", "fullmesh"})
NAME = re.compile(r"^[a-z][a-z0-9]{0,15}$")


class LinkLike(Protocol):
    """What a host and its interfaces need of a link (link.py's `Link`)."""

    index: int
    subnet4: str
    subnet6: str
    a: Interface
    b: Interface
    rate: str | None
    rate_back: str | None


class TopologyLike(Protocol):
    """What a host needs of its topology (topology.py's `Topology`)."""

    name: str
    prefix: str
    id: str

    @property
    def is_up(self) -> bool: ...

    def link(self, index: int) -> LinkLike: ...


def _family_of(address: str) -> int:
    return 6 if ":" in address else 4


@dataclasses.dataclass(eq=False)
class Interface:
    """One end of a link: a veth device inside `host`, with one IPv4 and one IPv6 address."""

    host: Host
    link: LinkLike
    name: str
    address4: str
    address6: str
    prefixlen4: int = 24
    prefixlen6: int = 64

    def address(self, family: int = 4) -> str:
        """The address of this end, IPv4 (`family=4`) or IPv6 (`family=6`)."""
        if family == 4:
            return self.address4
        if family == 6:
            return self.address6
        raise ValueError(f"family {family!r}: expected 4 or 6")

    @property
    def peer(self) -> Interface:
        """The other end of the same link."""
        return self.link.b if self is self.link.a else self.link.a

    @property
    def rate(self) -> str | None:
        """The shaping rate of what leaves this end (tc syntax), None when unshaped."""
        if self is self.link.a:
            return self.link.rate
        return self.link.rate_back or self.link.rate

    @property
    def rate_bps(self) -> float | None:
        """The shaping rate of what leaves this end, in bits per second."""
        return parse_rate(self.rate) if self.rate else None

    def counters(self) -> dict[str, int]:
        """The device's byte and packet counters (`/sys/class/net/DEV/statistics`)."""
        return self.host.counters(self.name)

    def __repr__(self) -> str:
        return f"<Interface {self.host.name}:{self.name} {self.address4} {self.address6}>"


@dataclasses.dataclass(frozen=True)
class Route:
    """An `ip` command (route or rule) that belongs to a link and is re-applied on link up."""

    family: int
    args: tuple[str, ...]
    link: LinkLike | None


class Host:
    """A network namespace with its interfaces, routes, MPTCP settings and programs."""

    def __init__(
        self,
        topology: TopologyLike,
        name: str,
        *,
        forwarding: bool = False,
        sysctls: dict[str, str | int] | None = None,
    ) -> None:
        if not NAME.match(name):
            raise ValueError(
                f"host name {name!r}: use 1-16 lowercase letters and digits, starting with a letter"
            )
        self.topology = topology
        self.name = name
        self.forwarding = forwarding
        self.netns = f"{topology.prefix}{topology.name}-{topology.id}-{name}"
        self.interfaces: list[Interface] = []
        self._sysctls: dict[str, str] = {k: str(v) for k, v in (sysctls or {}).items()}
        self._routes: list[Route] = []
        self._limits: dict[str, int] = {}
        self._endpoints: list[tuple[str, tuple[str, ...], str | None, int | None, int | None]] = []
        self._processes: list[Process] = []

    def __repr__(self) -> str:
        return f"<Host {self.name} netns={self.netns}>"

    # -- addressing ---------------------------------------------------------------------

    def iface(self, link: LinkLike | int) -> Interface:
        """This host's end of `link` (a Link or its index in the topology)."""
        if isinstance(link, int):
            link = self.topology.link(link)
        for i in self.interfaces:
            if i.link is link:
                return i
        raise LabError(f"host {self.name!r} is not on link {link.index}")

    def addresses(self, family: int = 4) -> list[str]:
        """This host's addresses of one family, one per interface, in link order."""
        return [i.address(family) for i in self.interfaces]

    def address(self, link: LinkLike | int | None = None, family: int = 4) -> str:
        """This host's address on `link` (a Link or a topology link index; default: first)."""
        if link is None:
            if not self.interfaces:
                raise LabError(f"host {self.name!r} has no interfaces")
            return self.interfaces[0].address(family)
        return self.iface(link).address(family)

    # -- routes -------------------------------------------------------------------------

    def route_add(
        self,
        dst: str,
        via: str | None = None,
        *,
        dev: str | None = None,
        metric: int | None = None,
        table: int | None = None,
        onlink: bool = False,
        family: int | None = None,
    ) -> None:
        """Add (or replace) a route; kept and re-applied when its link comes back up."""
        fam = family or _family_of(via or dst)
        args = ["route", "replace", dst]
        if via:
            args += ["via", via]
        if dev:
            args += ["dev", dev]
        if metric is not None:
            args += ["metric", str(metric)]
        if table is not None:
            args += ["table", str(table)]
        if onlink:
            args.append("onlink")
        link = self._link_of_dev(dev) if dev else (self._link_of_gateway(via) if via else None)
        route = Route(fam, tuple(args), link)
        self._routes.append(route)
        if self.topology.is_up:
            self._ip_batch([route])

    def rule_add(self, *selector: str, table: int, pref: int, family: int = 4) -> None:
        """Add a policy routing rule (`ip rule add SELECTOR... lookup TABLE pref PREF`)."""
        args = ("rule", "add", *selector, "lookup", str(table), "pref", str(pref))
        route = Route(family, args, None)
        self._routes.append(route)
        if self.topology.is_up:
            self._ip_batch([route])

    def routes(self, family: int = 4, table: str = "main") -> list[dict[str, Any]]:
        """The routes of one table, as `ip -j route show` prints them."""
        import json

        out = self._ip(f"-{family}", "-j", "route", "show", "table", table).stdout
        result: list[dict[str, Any]] = json.loads(out or "[]")
        return result

    def route_get(self, dst: str, *, dev: str | None = None) -> dict[str, Any]:
        """How this host would reach `dst` (`ip route get`), optionally bound to `dev`."""
        import json

        args = [f"-{_family_of(dst)}", "-j", "route", "get", dst]
        if dev:
            args += ["oif", dev]
        out: list[dict[str, Any]] = json.loads(self._ip(*args).stdout)
        return out[0]

    def _link_of_gateway(self, via: str) -> LinkLike | None:
        gw = ipaddress.ip_address(via)
        for i in self.interfaces:
            for net in (i.link.subnet4, i.link.subnet6):
                if gw.version == ipaddress.ip_network(net).version and gw in ipaddress.ip_network(
                    net
                ):
                    return i.link
        return None

    def _link_of_dev(self, dev: str) -> LinkLike | None:
        for i in self.interfaces:
            if i.name == dev:
                return i.link
        return None

    # -- MPTCP ---------------------------------------------------------------------------

    def limits(
        self, subflows: int | None = None, add_addr_accepted: int | None = None
    ) -> dict[str, int]:
        """Set the in-kernel path manager limits given, return the limits now in force."""
        if subflows is not None:
            self._limits["subflows"] = subflows
        if add_addr_accepted is not None:
            self._limits["add_addr_accepted"] = add_addr_accepted
        if not self.topology.is_up:
            return dict(self._limits)
        if subflows is not None or add_addr_accepted is not None:
            self._apply_limits()
        out = self._ip("mptcp", "limits", "show").stdout.split()
        return {out[k]: int(out[k + 1]) for k in range(0, len(out) - 1, 2)}

    def _apply_limits(self) -> None:
        if self._limits:
            args = [x for k, v in self._limits.items() for x in (k, str(v))]
            self._ip("mptcp", "limits", "set", *args)

    def endpoint_add(
        self,
        address: str,
        flags: Sequence[str] = ("subflow",),
        *,
        dev: str | None = None,
        id: int | None = None,
        port: int | None = None,
    ) -> None:
        """Add an MPTCP endpoint (`ip mptcp endpoint add`); `dev` defaults to the address's.

        Binding the endpoint to its device makes its subflows leave by that link.
        """
        bad = [f for f in flags if f not in ENDPOINT_FLAGS]
        if bad:
            raise ValueError(
                f"endpoint flags {bad}: expected some of {', '.join(sorted(ENDPOINT_FLAGS))}"
            )
        if dev is None:
            for i in self.interfaces:
                if address in (i.address4, i.address6):
                    dev = i.name
        spec = (address, tuple(flags), dev, id, port)
        self._endpoints.append(spec)
        if self.topology.is_up:
            self._add_endpoint(*spec)

    def _add_endpoint(
        self,
        address: str,
        flags: tuple[str, ...],
        dev: str | None,
        id: int | None,
        port: int | None = None,
    ) -> None:
        args = ["mptcp", "endpoint", "add", address]
        if id is not None:
            args += ["id", str(id)]
        if port is not None:
            args += ["port", str(port)]
        if dev:
            args += ["dev", dev]
        args += list(flags)
        self._ip(*args)

    def endpoint_del(self, id: int) -> None:
        """Delete the MPTCP endpoint with this id."""
        self._ip("mptcp", "endpoint", "delete", "id", str(id))

    def endpoint_flush(self) -> None:
        """Delete every MPTCP endpoint of this host."""
        self._endpoints.clear()
        self._ip("mptcp", "endpoint", "flush")

    def endpoints(self) -> list[dict[str, Any]]:
        """The MPTCP endpoints, as `ip -j mptcp endpoint show` prints them."""
        import json

        result: list[dict[str, Any]] = json.loads(
            self._ip("-j", "mptcp", "endpoint", "show").stdout or "[]"
        )
        return result

    # -- sysctls -------------------------------------------------------------------------

    def sysctl(self, name: str, value: str | int | None = None) -> str:
        """Read a sysctl of this namespace, or set it first when `value` is given."""
        if value is not None:
            self._sysctls[name] = str(value)
            if self.topology.is_up:
                self._set_sysctls({name: str(value)})
        if not self.topology.is_up:
            return self._sysctls.get(name, "")
        return self._exec(["sysctl", "-n", name]).stdout.strip()

    def _set_sysctls(self, values: dict[str, str]) -> None:
        if values:
            self._exec(["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())])

    # -- running things ------------------------------------------------------------------

    def run(
        self,
        cmd: Sequence[str] | str,
        *,
        check: bool = True,
        timeout: float | None = 60.0,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside this host (a string goes to `sh -c`); output captured as text.

        With `check`, a non-zero exit raises `subprocess.CalledProcessError` like `subprocess.run`.
        """
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        self._require_up()
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            env=env,
        )

    def popen(self, cmd: Sequence[str] | str, *, env: dict[str, str] | None = None) -> Process:
        """Start a background program inside this host; it is stopped at teardown."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        self._require_up()
        proc = Process(self, argv, env)
        self._processes.append(proc)
        return proc

    def enter(self) -> contextlib.AbstractContextManager[None]:
        """Move the calling thread into this host for the `with` block.

        Sockets created inside belong to this host for their whole life; other threads are
        not affected.
        """
        self._require_up()
        return _ns.entered(self.netns)

    def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` in a fresh thread inside this host; return its result."""
        self._require_up()
        result: list[T] = []
        error: list[BaseException] = []

        def target() -> None:
            try:
                with _ns.entered(self.netns):
                    result.append(fn(*args, **kwargs))
            except BaseException as exc:
                error.append(exc)

        t = threading.Thread(target=target, name=f"lab-call-{self.name}", daemon=True)
        t.start()
        t.join()
        if error:
            raise error[0]
        return result[0]

    def thread(
        self, fn: Callable[..., Any], /, *args: Any, name: str | None = None, **kwargs: Any
    ) -> threading.Thread:
        """Start `fn` in a daemon thread inside this host and return the (started) thread."""
        self._require_up()

        def target() -> None:
            with _ns.entered(self.netns):
                fn(*args, **kwargs)

        t = threading.Thread(target=target, name=name or f"lab-{self.name}", daemon=True)
        t.start()
        return t

    def counters(self, dev: str) -> dict[str, int]:
        """Byte/packet counters of `dev` in this host, read through rtnetlink stats."""
        import json

        out = json.loads(self._ip("-j", "-s", "link", "show", "dev", dev).stdout)
        stats = out[0]["stats64"]
        return {
            "rx_bytes": int(stats["rx"]["bytes"]),
            "tx_bytes": int(stats["tx"]["bytes"]),
            "rx_packets": int(stats["rx"]["packets"]),
            "tx_packets": int(stats["tx"]["packets"]),
            "rx_dropped": int(stats["rx"]["dropped"]),
            "tx_dropped": int(stats["tx"]["dropped"]),
        }

    # -- plumbing ------------------------------------------------------------------------

    def _require_up(self) -> None:
        if not self.topology.is_up:
            raise LabError(
                f"host {self.name!r}: topology {self.topology.name!r} is not up "
                "(use it inside `with topology:` or call topology.up())"
            )

    def _ip(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _ns.run_tool(["ip", "-n", self.netns, *args], what=f"host {self.name}")

    def _exec(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return _ns.run_tool(["ip", "netns", "exec", self.netns, *argv], what=f"host {self.name}")

    def _ip_batch(self, routes: Sequence[Route]) -> None:
        for fam in (4, 6):
            lines = [" ".join(r.args) for r in routes if r.family == fam]
            if lines:
                _ns.run_tool(
                    ["ip", f"-{fam}", "-n", self.netns, "-batch", "-"],
                    input="\n".join(lines) + "\n",
                    what=f"host {self.name} routes",
                )

    def _stop_processes(self) -> list[str]:
        errors = []
        for proc in self._processes:
            try:
                proc.close()
            except Exception as exc:
                errors.append(f"stopping {proc!r}: {exc}")
        self._processes.clear()
        return errors
