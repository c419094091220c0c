"""Hosts, links and the topology that brings them up and removes them again.

A host is a network namespace, a link a veth pair with an IPv4 and an IPv6 address on each
end and optional `tbf` shaping in both directions. `Topology` is a context manager: leaving
the block, an exception, SIGINT, SIGTERM or interpreter exit all remove every namespace,
device and process it made. Nothing is ever created in the root namespace: veth ends are
born inside their namespaces, so a crash can leave at most named namespaces behind, which
`remove_all(prefix)` (`mptcpkit lab down`) finds by their prefix.

This module is the topology: building, bringing up, tearing down, its events. A host is
host.py (with its programs, process.py), a link link.py.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

from mptcpkit.lab import netns as _ns
from mptcpkit.lab import owner as _owner
from mptcpkit.lab.host import NAME, Host
from mptcpkit.lab.link import Link
from mptcpkit.lab.netns import LabError

# Routing tables and rule priorities the lab uses for device-bound sockets (subflows).
_TABLE_BASE = 100
_RULE_PREF_BASE = 33000

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
        if not NAME.match(name):
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
