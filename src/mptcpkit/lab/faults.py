"""Faults on a schedule: take links down and up, change their rate, while traffic flows.

A `Fault` is a plain value (when, which link, what) that the command line can parse
("down:1@4s", "rate:0=10mbit@2.5s"); a `Schedule` applies faults from a thread at their
moment, measured from `start()`, and records when each one really happened.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from mptcpkit.lab.link import Link
from mptcpkit.lab.topology import Topology
from mptcpkit.lab.units import format_rate, parse_duration, parse_rate

FAULT_ACTIONS = ("down", "up", "rate", "rst")


@dataclasses.dataclass(frozen=True)
class Fault:
    """At `at` seconds, do `action` to link `link`: "down", "up", "rate" (to `rate`) or
    "rst" (abort the client end's TCP sockets on the link: its subflows get a RST)."""

    at: float
    link: int
    action: str
    rate: str | None = None

    def __post_init__(self) -> None:
        if self.action not in FAULT_ACTIONS:
            raise ValueError(f"fault action {self.action!r}: expected down, up, rate or rst")
        if self.at < 0:
            raise ValueError(f"fault time {self.at!r}: must not be negative")
        if self.link < 0:
            raise ValueError(f"fault link {self.link!r}: must not be negative")
        if self.action == "rate":
            if self.rate is None:
                raise ValueError("a rate fault needs a rate, e.g. rate:0=10mbit@2s")
            parse_rate(self.rate)
        elif self.rate is not None:
            raise ValueError(f"a {self.action} fault takes no rate")

    def __str__(self) -> str:
        what = (
            f"rate:{self.link}={self.rate}"
            if self.action == "rate"
            else f"{self.action}:{self.link}"
        )
        return f"{what}@{self.at:g}s"

    def apply(self, topology: Topology) -> None:
        link = topology.link(self.link)
        if self.action == "down":
            link.down()
        elif self.action == "up":
            link.up()
        elif self.action == "rst":
            link.reset()
        else:
            link.set_rate(self.rate)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"at": self.at, "link": self.link, "action": self.action}
        if self.rate is not None:
            d["rate"] = self.rate
        return d


_FAULT = re.compile(
    r"^\s*(?P<action>down|up|rate|rst)\s*:\s*(?P<link>[0-9]+)\s*(?:=\s*(?P<rate>[^@\s]+))?"
    r"\s*@\s*(?P<at>\S+)\s*$"
)


def parse_fault(text: str) -> Fault:
    """Parse "down:1@4s", "up:1@6s", "rate:0=10mbit@2.5s" or "rst:1@2s" into a Fault."""
    m = _FAULT.match(text)
    if m is None:
        raise ValueError(
            f"fault {text!r}: expected ACTION:LINK@TIME, e.g. down:1@4s, up:1@6s, "
            "rate:0=10mbit@2s, rst:1@2s"
        )
    rate = m.group("rate")
    if rate is not None:
        rate = format_rate(parse_rate(rate))
    return Fault(parse_duration(m.group("at")), int(m.group("link")), m.group("action"), rate)


def flap(link: int, *, start: float, down_for: float, every: float, times: int) -> list[Fault]:
    """`times` outages of `down_for` seconds on `link`, one every `every` seconds."""
    if down_for <= 0 or every <= down_for or times < 1:
        raise ValueError("flap: need 0 < down_for < every and times >= 1")
    faults = []
    for k in range(times):
        t = start + k * every
        faults += [Fault(t, link, "down"), Fault(t + down_for, link, "up")]
    return faults


@dataclasses.dataclass(frozen=True)
class Applied:
    """Something the schedule did: `t` is when it began, in seconds after the schedule
    started; `fault` is None for a plain callable, which `label` then names."""

    t: float
    label: str
    fault: Fault | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = self.fault.as_dict() if self.fault else {"action": self.label}
        d["t"] = round(self.t, 4)
        if self.error:
            d["error"] = self.error
        return d


def _label(fn: Callable[[], None]) -> str:
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__name__", repr(fn))
    if isinstance(owner, Link):
        return f"{name}:{owner.index}"
    return str(name)


class Schedule:
    """Applies faults (or any callable) at their moment, from one background thread.

    Times count from `start()`. `stop()` (also at topology teardown) abandons what has not
    happened yet. `applied` lists what happened, with the real time of each.
    """

    def __init__(self, topology: Topology, faults: Iterable[Fault] = ()) -> None:
        self.topology = topology
        self._items: list[tuple[float, Fault | None, Callable[[], None]]] = []
        self.applied: list[Applied] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        for fault in faults:
            self.add(fault)
        topology.on_close(self.stop)

    def add(self, fault: Fault) -> Schedule:
        """Schedule a fault (its link is checked now, not when it fires)."""
        self.topology.link(fault.link)
        self._add(fault.at, fault, lambda: fault.apply(self.topology))
        return self

    def at(self, when: float | str, fn: Callable[[], None]) -> Schedule:
        """Schedule any callable, e.g. `sched.at("4s", net.link(1).down)`."""
        self._add(parse_duration(when), None, fn)
        return self

    def _add(self, t: float, fault: Fault | None, fn: Callable[[], None]) -> None:
        if self._thread is not None:
            raise RuntimeError("add faults before start()")
        self._items.append((t, fault, fn))
        self._items.sort(key=lambda item: item[0])

    @property
    def faults(self) -> list[Fault]:
        return [f for _, f, _ in self._items if f is not None]

    def start(self, t0: float | None = None) -> Schedule:
        """Start the clock now, or at `t0` (a `time.monotonic()` value, e.g. a shared start)."""
        if self._thread is not None:
            raise RuntimeError("schedule already started")
        self._t0 = time.monotonic() if t0 is None else t0
        self._thread = threading.Thread(target=self._run, name="lab-faults", daemon=True)
        self._thread.start()
        return self

    def elapsed(self) -> float:
        return time.monotonic() - self._t0 if self._t0 else 0.0

    def _run(self) -> None:
        for t, fault, fn in self._items:
            delay = t - self.elapsed()
            if delay > 0 and self._stop.wait(delay):
                return
            if self._stop.is_set():
                return
            error = None
            started = self.elapsed()
            try:
                fn()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            label = str(fault) if fault else _label(fn)
            self.applied.append(Applied(started, label, fault, error))

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every fault happened; False on timeout."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def errors(self) -> list[str]:
        return [f"{a.label}: {a.error}" for a in self.applied if a.error]

    def __enter__(self) -> Schedule:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
