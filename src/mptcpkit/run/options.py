"""Which socket options make the supervisor swap a forced socket back to plain TCP.

The table is the core library's (`mptcpkit.options.TCP_ONLY_OPTIONS`), so forcing and
the library's own sockets agree on what MPTCP rejects.
"""

from __future__ import annotations

from mptcpkit.abi import constants as c

# Used only while the core table is missing (a checkout without mptcpkit.options).
_FALLBACK = {
    (c.SOL_TCP, c.TCP_MD5SIG): "TCP_MD5SIG",
    (c.SOL_TCP, c.TCP_MD5SIG_EXT): "TCP_MD5SIG_EXT",
    (c.SOL_TCP, c.TCP_REPAIR): "TCP_REPAIR",
    (c.SOL_TCP, c.TCP_REPAIR_QUEUE): "TCP_REPAIR_QUEUE",
    (c.SOL_TCP, c.TCP_REPAIR_OPTIONS): "TCP_REPAIR_OPTIONS",
    (c.SOL_TCP, c.TCP_REPAIR_WINDOW): "TCP_REPAIR_WINDOW",
    (c.SOL_TCP, c.TCP_AO_ADD_KEY): "TCP_AO_ADD_KEY",
    (c.SOL_TCP, c.TCP_USER_TIMEOUT): "TCP_USER_TIMEOUT",
    (c.SOL_TCP, c.TCP_QUICKACK): "TCP_QUICKACK",
    (c.SOL_TCP, c.TCP_LINGER2): "TCP_LINGER2",
    (c.SOL_TCP, c.TCP_WINDOW_CLAMP): "TCP_WINDOW_CLAMP",
    (c.SOL_TCP, c.TCP_ULP): "TCP_ULP",
}


def tcp_only_options() -> dict[tuple[int, int], str]:
    """{(level, optname): name} for options an MPTCP socket refuses."""
    try:
        from mptcpkit.options import TCP_ONLY_OPTIONS
    except ImportError:
        return dict(_FALLBACK)
    return {key: str(getattr(info, "name", info)) for key, info in TCP_ONLY_OPTIONS.items()}
