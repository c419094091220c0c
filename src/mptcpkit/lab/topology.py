"""Hosts, links and the topology that brings them up and removes them again.

A host is a network namespace, a link a veth pair with an IPv4 and an IPv6 address on each
end and optional `tbf` shaping in both directions. `Topology` is a context manager: leaving
the block, an exception, SIGINT, SIGTERM or interpreter exit all remove every namespace,
device and process it made. Nothing is ever created in the root namespace: veth ends are
born inside their namespaces, so a crash can leave at most named namespaces behind, which
`remove_all(prefix)` (`mptcpkit lab down`) finds by their prefix.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import ipaddress
import os
import re
import secrets
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType, TracebackType
from typing import IO, Any, TypeVar

from mptcpkit.lab import netns as _ns
from mptcpkit.lab import owner as _owner
from mptcpkit.lab.netns import LabError
from mptcpkit.lab.units import format_rate, parse_duration, parse_rate, parse_size

T = TypeVar("T")

ENDPOINT_FLAGS = frozenset({"subflow", "signal", "backup", "fullmesh"})
_NAME = re.compile(r"^[a-z][a-z0-9]{0,15}$")
# Routing tables and rule priorities the lab uses for device-bound sockets (subflows).
_TABLE_BASE = 100
_RULE_PREF_BASE = 33000
# The largest packet tbf must pass on a veth: MTU 1500 plus the Ethernet header.
_MAX_FRAME = 1514

# Set in every namespace before its devices exist, so `default` applies to each veth:
# v6 addresses usable at once (no DAD), kept across link down/up, no reverse-path drops
# for subflows that leave by one link and are answered through another.
_BASE_SYSCTLS: dict[str, str] = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
    "net.ipv6.conf.all.keep_addr_on_down": "1",
    "net.ipv6.conf.default.keep_addr_on_down": "1",
    "net.ipv6.conf.default.accept_ra": "0",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}
_FORWARDING_SYSCTLS: dict[str, str] = {
    "net.ipv4.ip_forward": "1",
    "net.ipv6.conf.all.forwarding": "1",
}


def _family_of(address: str) -> int:
    return 6 if ":" in address else 4


@dataclasses.dataclass(eq=False)
class Interface:
    """One end of a link: a veth device inside `host`, with one IPv4 and one IPv6 address."""

    host: Host
    link: Link
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
class _Route:
    """An `ip` command (route or rule) that belongs to a link and is re-applied on link up."""

    family: int
    args: tuple[str, ...]
    link: Link | None


class Process:
    """A background program in a host's namespace; its output goes to unnamed temp files.

    Files instead of pipes: a chatty program can never block on a full pipe nobody reads.
    """

    def __init__(self, host: Host, argv: Sequence[str], env: dict[str, str] | None) -> None:
        self.host = host
        self.argv = list(argv)
        self._out: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self.popen = subprocess.Popen(
                ["ip", "netns", "exec", host.netns, *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=self._err,
                env=env,
                start_new_session=True,
            )
        except BaseException:
            self._out.close()
            self._err.close()
            raise

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    @staticmethod
    def _read(f: IO[bytes]) -> str:
        if f.closed:
            return ""
        fd = f.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    @property
    def stdout(self) -> str:
        """Everything the program wrote to stdout so far."""
        return self._read(self._out)

    @property
    def stderr(self) -> str:
        """Everything the program wrote to stderr so far."""
        return self._read(self._err)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM the program's process group, SIGKILL it after `timeout`; its exit code."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        else:
            # The leader is gone; children it left in its group must go too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        return self.popen.returncode

    def close(self) -> None:
        """Stop the program and release the output files (output is lost after this)."""
        self.stop()
        self._out.close()
        self._err.close()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Process {self.pid} in {self.host.name}: {' '.join(self.argv)}>"


class Host:
    """A network namespace with its interfaces, routes, MPTCP settings and programs."""

    def __init__(
        self,
        topology: Topology,
        name: str,
        *,
        forwarding: bool = False,
        sysctls: dict[str, str | int] | None = None,
    ) -> None:
        if not _NAME.match(name):
            raise ValueError(
                f"host name {name!r}: use 1-16 lowercase letters and digits, starting with a letter"
            )
        self.topology = topology
        self.name = name
        self.forwarding = forwarding
        self.netns = f"{topology.prefix}{topology.name}-{topology.id}-{name}"
        self.interfaces: list[Interface] = []
        self._sysctls: dict[str, str] = {k: str(v) for k, v in (sysctls or {}).items()}
        self._routes: list[_Route] = []
        self._limits: dict[str, int] = {}
        self._endpoints: list[tuple[str, tuple[str, ...], str | None, int | None, int | None]] = []
        self._processes: list[Process] = []

    def __repr__(self) -> str:
        return f"<Host {self.name} netns={self.netns}>"

    # -- addressing ---------------------------------------------------------------------

    def iface(self, link: Link | int) -> Interface:
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

    def address(self, link: Link | int | None = None, family: int = 4) -> str:
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
        route = _Route(fam, tuple(args), link)
        self._routes.append(route)
        if self.topology.is_up:
            self._ip_batch([route])

    def rule_add(self, *selector: str, table: int, pref: int, family: int = 4) -> None:
        """Add a policy routing rule (`ip rule add SELECTOR... lookup TABLE pref PREF`)."""
        args = ("rule", "add", *selector, "lookup", str(table), "pref", str(pref))
        route = _Route(family, args, None)
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

    def _link_of_gateway(self, via: str) -> Link | None:
        gw = ipaddress.ip_address(via)
        for i in self.interfaces:
            for net in (i.link.subnet4, i.link.subnet6):
                if gw.version == ipaddress.ip_network(net).version and gw in ipaddress.ip_network(
                    net
                ):
                    return i.link
        return None

    def _link_of_dev(self, dev: str) -> Link | None:
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

    def _ip_batch(self, routes: Sequence[_Route]) -> None:
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


class NetemMissing(LabError):
    """The kernel has no netem qdisc: delay, jitter and reordering cannot be emulated."""


class Link:
    """A veth pair between two hosts, shaped with `tbf` on both ends when it has a rate.

    `rate` shapes both directions unless `rate_back` gives b->a its own. `delay`, `jitter`
    and `reorder` need the kernel's netem qdisc (`NetemMissing` at `up()` without it).
    """

    def __init__(
        self,
        topology: Topology,
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


@dataclasses.dataclass(frozen=True)
class Event:
    """Something that happened to the topology (a fault), with its time since `up()`."""

    t: float
    kind: str
    link: int
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"t": round(self.t, 4), "kind": self.kind, "link": self.link, **self.detail}


_live: set[Topology] = set()
_live_lock = threading.Lock()
_saved_handlers: dict[int, Any] = {}


def _cleanup_live() -> None:
    """atexit: remove what a program forgot (or could not) remove."""
    with _live_lock:
        live = list(_live)
    for topo in live:
        with contextlib.suppress(Exception):
            topo.close()


atexit.register(_cleanup_live)


def _on_terminate(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM/SIGHUP into an exception in the main thread: `with` blocks unwind and
    # every topology is removed on the way out, as for Ctrl-C.
    raise SystemExit(128 + signum)


def _install_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if sig in _saved_handlers:
            continue
        current = signal.getsignal(sig)
        if current is signal.SIG_DFL:
            _saved_handlers[sig] = current
            signal.signal(sig, _on_terminate)


def _restore_signal_handlers() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in list(_saved_handlers.items()):
        if signal.getsignal(sig) is _on_terminate:
            signal.signal(sig, handler)
        del _saved_handlers[sig]


class Topology:
    """Hosts and links, brought up together and removed together.

    Use it as a context manager (`with topology as net:`), or call `up()` and `close()`.
    Names: every namespace is `<prefix><name>-<id>-<host>`, with `prefix` from the argument,
    `$MPTCPKIT_LAB_PREFIX`, or `mptk-`.
    """

    def __init__(self, name: str = "lab", *, prefix: str | None = None) -> None:
        if not _NAME.match(name):
            raise ValueError(
                f"topology name {name!r}: use 1-16 lowercase letters and digits, "
                "starting with a letter"
            )
        if prefix is None:
            prefix = _ns.default_prefix()
        _ns.check_prefix(prefix)
        self.name = name
        self.prefix = prefix
        self.id = secrets.token_hex(3)
        self._hosts: dict[str, Host] = {}
        self._links: list[Link] = []
        self._is_up = False
        self._closed = False
        self._t0 = 0.0
        self.events: list[Event] = []
        self._events_lock = threading.Lock()
        self._on_close: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        state = "up" if self._is_up else ("closed" if self._closed else "down")
        return f"<Topology {self.prefix}{self.name}-{self.id} {state} hosts={list(self._hosts)}>"

    # -- building ------------------------------------------------------------------------

    def add_host(
        self,
        name: str,
        *,
        forwarding: bool = False,
        sysctls: dict[str, str | int] | None = None,
    ) -> Host:
        """Add a host (a namespace); `forwarding` makes it a router for IPv4 and IPv6."""
        self._require_building()
        if name in self._hosts:
            raise ValueError(f"host {name!r} already exists in topology {self.name!r}")
        host = Host(self, name, forwarding=forwarding, sysctls=sysctls)
        self._hosts[name] = host
        return host

    def add_link(
        self,
        a: Host | str,
        b: Host | str,
        *,
        rate: str | None = None,
        burst: str = "32kbit",
        latency: str = "50ms",
        rate_back: str | None = None,
        delay: str | None = None,
        jitter: str | None = None,
        reorder: float | None = None,
    ) -> Link:
        """Join two hosts with a veth pair; link `i` gets 10.0.i.0/24 and fd00:0:0:i::/64.

        End `a` is `.1`/`::1`, end `b` is `.2`/`::2`. `rate` ("50mbit") shapes both
        directions with `tbf rate RATE burst BURST latency LATENCY` (b->a gets `rate_back`
        when given). `delay`/`jitter`/`reorder` (a percentage) add netem where the kernel
        has it.
        """
        self._require_building()
        ha = self.host(a) if isinstance(a, str) else a
        hb = self.host(b) if isinstance(b, str) else b
        link = Link(
            self, len(self._links), ha, hb, rate=rate, burst=burst, latency=latency,
            rate_back=rate_back, delay=delay, jitter=jitter, reorder=reorder,
        )  # fmt: skip
        self._links.append(link)
        return link

    def _require_building(self) -> None:
        if self._is_up or self._closed:
            raise LabError(f"topology {self.name!r}: add hosts and links before up()")

    def _require_up(self) -> None:
        if not self._is_up:
            raise LabError(f"topology {self.name!r} is not up")

    # -- lookup --------------------------------------------------------------------------

    def host(self, name: str) -> Host:
        """The host called `name`."""
        try:
            return self._hosts[name]
        except KeyError:
            raise LabError(
                f"no host {name!r} in topology {self.name!r} (hosts: {', '.join(self._hosts)})"
            ) from None

    def link(self, index: int) -> Link:
        """Link number `index` (0-based, in the order they were added)."""
        if not 0 <= index < len(self._links):
            raise LabError(
                f"no link {index} in topology {self.name!r} (links 0..{len(self._links) - 1})"
            )
        return self._links[index]

    @property
    def hosts(self) -> list[Host]:
        return list(self._hosts.values())

    @property
    def links(self) -> list[Link]:
        return list(self._links)

    @property
    def is_up(self) -> bool:
        return self._is_up

    @property
    def namespaces(self) -> list[str]:
        return [h.netns for h in self._hosts.values()]

    def elapsed(self) -> float:
        """Seconds since the topology came up (the time base of `events`)."""
        return time.monotonic() - self._t0 if self._t0 else 0.0

    def _record_event(self, kind: str, link: Link, **detail: Any) -> None:
        with self._events_lock:
            self.events.append(Event(self.elapsed(), kind, link.index, detail))

    def on_close(self, fn: Callable[[], None]) -> None:
        """Call `fn` first thing at teardown (stop helpers that use the namespaces)."""
        self._on_close.append(fn)

    # -- life cycle ----------------------------------------------------------------------

    def up(self) -> Topology:
        """Create everything; on any failure remove what was made and raise LabError."""
        if self._is_up:
            return self
        if self._closed:
            raise LabError(f"topology {self.name!r} was closed; make a new one")
        if not _ns.is_root():
            raise LabError("the lab needs root (network namespaces, veth devices, tc)")
        if not self._hosts:
            raise LabError(f"topology {self.name!r} has no hosts")
        with _live_lock:
            _live.add(self)
        _install_signal_handlers()
        try:
            _ns.reap_orphans(self.prefix)
            _owner.write(self.record())
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self) -> None:
        for host in self._hosts.values():
            if os.path.exists(os.path.join(_ns.NETNS_RUN_DIR, host.netns)):
                raise LabError(f"network namespace {host.netns} already exists")
            _ns.run_tool(["ip", "netns", "add", host.netns], what=f"host {host.name}")
        self._is_up = True
        for host in self._hosts.values():
            values = dict(_BASE_SYSCTLS)
            if host.forwarding:
                values.update(_FORWARDING_SYSCTLS)
            host._set_sysctls(values)
        for link in self._links:
            _ns.run_tool(
                [
                    "ip", "link", "add", link.a.name, "netns", link.a.host.netns,
                    "type", "veth", "peer", "name", link.b.name, "netns", link.b.host.netns,
                ],
                what=f"link {link.index}",
            )  # fmt: skip
        for host in self._hosts.values():
            lines = ["link set dev lo up"]
            for i in host.interfaces:
                lines += [
                    f"address add {i.address4}/{i.prefixlen4} dev {i.name}",
                    f"address add {i.address6}/{i.prefixlen6} dev {i.name} nodad",
                    f"link set dev {i.name} up",
                ]
            _ns.run_tool(
                ["ip", "-n", host.netns, "-batch", "-"],
                input="\n".join(lines) + "\n",
                what=f"host {host.name} addresses",
            )
        for link in self._links:
            link._apply_shaping(initial=True)
        for host in self._hosts.values():
            host._ip_batch(host._routes)
            user = {k: v for k, v in host._sysctls.items() if k not in _BASE_SYSCTLS}
            host._set_sysctls(user)
            host._apply_limits()
            for spec in host._endpoints:
                host._add_endpoint(*spec)
        self._t0 = time.monotonic()

    def close(self) -> None:
        """Stop programs and remove every namespace and device; safe to call twice.

        SIGINT/SIGTERM are held back while this runs so a second Ctrl-C cannot cut the
        cleanup short.
        """
        if self._closed:
            return
        main = threading.current_thread() is threading.main_thread()
        held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        if main:
            signal.pthread_sigmask(signal.SIG_BLOCK, held)
        errors: list[str] = []
        try:
            self._closed = True
            self._is_up = False
            for fn in reversed(self._on_close):
                try:
                    fn()
                except Exception as exc:
                    errors.append(f"on_close {fn!r}: {exc}")
            for host in self._hosts.values():
                errors += host._stop_processes()
            for host in self._hosts.values():
                try:
                    _ns.delete_netns(host.netns)
                except LabError as exc:
                    errors.append(str(exc))
            if not errors:
                # Kept on failure: `lab down` finds the rest through it once we are gone.
                _owner.remove(self.record())
            with _live_lock:
                _live.discard(self)
                last = not _live
            if last:
                _restore_signal_handlers()
        finally:
            if main:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
        if errors:
            raise LabError(f"removing topology {self.name!r}: " + "; ".join(errors))

    def detach(self) -> None:
        """Leave the topology running after this process ends (`mptcpkit lab up`).

        Only `remove_all(prefix)` (`mptcpkit lab down`) removes it afterwards.
        """
        self._require_up()
        for host in self._hosts.values():
            for proc in host._processes:
                proc._out.close()
                proc._err.close()
            host._processes.clear()
        self._closed = True
        record = self.record()
        record.detached = True
        _owner.write(record)
        with _live_lock:
            _live.discard(self)
            if not _live:
                _restore_signal_handlers()

    def record(self) -> _owner.LabRecord:
        """This lab's ownership marker (see `mptcpkit.lab.owner`)."""
        pid, start = _owner.creator()
        return _owner.LabRecord(
            stem=f"{self.prefix}{self.name}-{self.id}",
            prefix=self.prefix,
            topology=self.name,
            id=self.id,
            hosts={h.name: h.netns for h in self._hosts.values()},
            pid=pid,
            start=start,
        )

    def __enter__(self) -> Topology:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except LabError:
            if exc is None:
                raise

    # -- views ---------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description: hosts with namespaces and addresses, links with rates."""
        return {
            "name": self.name,
            "id": self.id,
            "prefix": self.prefix,
            "hosts": {
                h.name: {
                    "netns": h.netns,
                    "interfaces": [
                        {
                            "name": i.name,
                            "link": i.link.index,
                            "ipv4": i.address4,
                            "ipv6": i.address6,
                        }
                        for i in h.interfaces
                    ],
                }
                for h in self._hosts.values()
            },
            "links": [
                {
                    "index": link.index,
                    "a": f"{link.a.host.name}:{link.a.name}",
                    "b": f"{link.b.host.name}:{link.b.name}",
                    "rate": link.rate,
                    "rate_back": link.rate_back or link.rate,
                    "burst": link.burst,
                    "latency": link.latency,
                    "up": link.is_up,
                }
                for link in self._links
            ],
        }
