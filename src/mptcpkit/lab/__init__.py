"""mptcpkit.lab: small multipath networks in network namespaces, for tests and benchmarks.

    from mptcpkit import lab
    with lab.two_paths(paths=2, rate="50mbit") as net:
        client, server = net.host("client"), net.host("server")
        with server.enter():
            listener = mptcpkit.create_server(("0.0.0.0", 0))
        ...

Everything the lab makes is named `<prefix><topology>-<id>-<host>` (prefix `mptk-`, or
`$MPTCPKIT_LAB_PREFIX`) and removed when the `with` block ends, however it ends.
"""

from __future__ import annotations

from mptcpkit.lab.bench import BenchResult, run_bench
from mptcpkit.lab.faults import Fault, Schedule, flap, parse_fault
from mptcpkit.lab.host import Host, Interface
from mptcpkit.lab.link import Link
from mptcpkit.lab.netns import (
    DEFAULT_PREFIX,
    PREFIX_ENV,
    LabError,
    default_prefix,
    list_netns,
    remove_all,
)
from mptcpkit.lab.process import Process
from mptcpkit.lab.topologies import gateway, two_paths
from mptcpkit.lab.topology import Event, Topology
from mptcpkit.lab.units import format_rate, parse_duration, parse_rate, parse_size

__all__ = [
    "DEFAULT_PREFIX",
    "PREFIX_ENV",
    "BenchResult",
    "Event",
    "Fault",
    "Host",
    "Interface",
    "LabError",
    "Link",
    "Process",
    "Schedule",
    "Topology",
    "default_prefix",
    "flap",
    "format_rate",
    "gateway",
    "list_netns",
    "parse_duration",
    "parse_fault",
    "parse_rate",
    "parse_size",
    "remove_all",
    "run_bench",
    "two_paths",
]
