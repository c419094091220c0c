"""Which socket options make the supervisor swap an MPTCP socket for plain TCP.

The table is the core library's kernel-probed one (`mptcpkit.options.tcp_only_options`,
probed once per process on first use), so forcing and the library's own sockets agree
on what this kernel's MPTCP rejects: IPV6_TCLASS, TCP_SYNCNT, IP_PKTINFO, SO_PEEK_OFF...
as well as TCP_MD5SIG.
"""

from __future__ import annotations

from mptcpkit.options import tcp_only_options as probed


def tcp_only_options() -> dict[tuple[int, int], str]:
    """{(level, optname): name} for options an MPTCP socket refuses on this kernel."""
    return {key: info.name for key, info in probed().items()}
