"""Kernel counters around a bench: MIB deltas per namespace and TCP memory pressure.

`nstat` reads the same files (`/proc/net/netstat`, `/proc/net/snmp`), but keeps a history
file; reading them directly from a thread inside a namespace leaves nothing behind. TCP
memory is different: `tcp_mem` and the pages TCP holds (`/proc/net/sockstat` "mem") are
machine-wide, so a bench can be starved by sockets that are not its own. Only the
`TCPMemoryPressures` counter is per namespace. Parsers and the verdict are pure functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# The MIB groups a bench reports, as nstat names them (TcpExtTCPMemoryPressures ...).
GROUPS = ("TcpExt", "MPTcpExt", "Tcp")


def parse_mib(text: str) -> dict[str, int]:
    """`/proc/net/netstat` or `/proc/net/snmp` text as nstat's flat names -> values."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        group, _, names = head.partition(":")
        vgroup, _, nums = values.partition(":")
        if group != vgroup:
            continue
        for name, num in zip(names.split(), nums.split(), strict=False):
            try:
                out[group + name] = int(num)
            except ValueError:
                continue
    return out


def read_mib() -> dict[str, int]:
    """The calling thread's namespace's counters of GROUPS (call it from inside a host)."""
    counters: dict[str, int] = {}
    for path in ("/proc/thread-self/net/netstat", "/proc/thread-self/net/snmp"):
        try:
            with open(path) as f:
                counters.update(parse_mib(f.read()))
        except OSError:
            continue
    return {k: v for k, v in counters.items() if k.startswith(GROUPS)}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The counters that changed (gauges such as TcpCurrEstab included), sorted by name."""
    return {
        k: after[k] - before.get(k, 0)
        for k in sorted(after)
        if after[k] != before.get(k, 0) and not k.startswith(("TcpRtoAlgorithm", "TcpMaxConn"))
    }


def parse_sockstat(text: str) -> dict[str, dict[str, int]]:
    """`/proc/net/sockstat`: {"TCP": {"inuse": 5, "mem": 2, ...}, "sockets": {"used": 9}}."""
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        proto, _, rest = line.partition(":")
        fields = rest.split()
        out[proto.strip()] = {
            k: int(v) for k, v in zip(fields[::2], fields[1::2], strict=False) if v.isdigit()
        }
    return out


def read_sockstat() -> dict[str, dict[str, int]]:
    with open("/proc/thread-self/net/sockstat") as f:
        return parse_sockstat(f.read())


def read_tcp_mem() -> list[int]:
    """Machine-wide `net.ipv4.tcp_mem` (low, pressure, high), in pages."""
    with open("/proc/sys/net/ipv4/tcp_mem") as f:
        return [int(x) for x in f.read().split()]


@dataclasses.dataclass
class Memory:
    """TCP memory over a run: pressure entries per namespace, peak pages against tcp_mem."""

    tcp_mem: list[int]
    peak_pages: int
    pressures: dict[str, int]  # host -> TCPMemoryPressures delta
    sockstat_before: dict[str, dict[str, int]]
    sockstat_after: dict[str, dict[str, int]]

    @property
    def under_pressure(self) -> bool:
        return any(self.pressures.values()) or (
            len(self.tcp_mem) == 3 and self.peak_pages >= self.tcp_mem[1]
        )

    def warning(self) -> str | None:
        """One line saying why the run's numbers cannot be trusted, or None."""
        if not self.under_pressure:
            return None
        entered = ", ".join(f"{h} +{n}" for h, n in self.pressures.items() if n)
        low, pressure, high = [*self.tcp_mem, 0, 0, 0][:3]
        return (
            "TCP memory pressure during the run"
            + (f" (TCPMemoryPressures {entered})" if entered else "")
            + f": TCP held up to {self.peak_pages} pages, tcp_mem is {low} {pressure} {high}"
            " (machine-wide, shared with every other socket on this machine); the kernel "
            "shrinks buffers under pressure, so extra subflows may carry little: "
            "the numbers are not representative"
        )

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["under_pressure"] = self.under_pressure
        return d


__all__ = [
    "Memory",
    "delta",
    "parse_mib",
    "parse_sockstat",
    "read_mib",
    "read_sockstat",
    "read_tcp_mem",
]
