"""Which socket options make the supervisor swap a forced socket back to plain TCP.

The table is the core library's (`mptcpkit.options.TCP_ONLY_OPTIONS`), so forcing and
the library's own sockets agree on what MPTCP rejects.
"""

from __future__ import annotations

from mptcpkit.options import TCP_ONLY_OPTIONS


def tcp_only_options() -> dict[tuple[int, int], str]:
    """{(level, optname): name} for options an MPTCP socket refuses."""
    return {key: info.name for key, info in TCP_ONLY_OPTIONS.items()}
