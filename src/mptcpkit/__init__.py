"""mptcpkit: Multipath TCP (RFC 8684) on Linux, from Python.

    import mptcpkit
    sock = mptcpkit.create_connection(("example.net", 443))   # MPTCP, TCP if it must
    mptcpkit.status(sock)        # MPTCP / fallback / TCP
    mptcpkit.subflows(sock)      # per-subflow addresses, RTT, cwnd, bytes

See README.md for the whole API.
"""

from __future__ import annotations

# `status` and `support` are also submodules: imported here, so that the functions, not
# the modules, stay the package's attributes whoever imports the submodules later.
from mptcpkit.status import SocketStatus, State, status
from mptcpkit.support import Support, Unusable, available, support, tcp_md5sig_available

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Any

    from mptcpkit.abi.constants import IPPROTO_MPTCP, SOL_MPTCP, TCP_MD5SIG, TCP_MD5SIG_EXT
    from mptcpkit.abi.md5sig import encode_tcp_md5sig as tcp_md5sig
    from mptcpkit.abi.mptcp_info import MPTCPInfo
    from mptcpkit.abi.tcp_info import TCPInfo
    from mptcpkit.address import Address, parse_address
    from mptcpkit.downgrade import setsockopt
    from mptcpkit.errors import MPTCPUnavailableError, TCPOnlyOptionError
    from mptcpkit.introspect import Subflow, info, subflows
    from mptcpkit.policy import Policy
    from mptcpkit.run.inprocess import forced
    from mptcpkit.sockets import Socket, create_connection, create_server, socket


# The rest is loaded on first use (PEP 562): `mptcpkit run` and the other commands,
# which need only a part, no longer pay for importing the whole library at start-up.
_EXPORTS = {
    "IPPROTO_MPTCP": ("mptcpkit.abi.constants", "IPPROTO_MPTCP"),
    "SOL_MPTCP": ("mptcpkit.abi.constants", "SOL_MPTCP"),
    "TCP_MD5SIG": ("mptcpkit.abi.constants", "TCP_MD5SIG"),
    "TCP_MD5SIG_EXT": ("mptcpkit.abi.constants", "TCP_MD5SIG_EXT"),
    "tcp_md5sig": ("mptcpkit.abi.md5sig", "encode_tcp_md5sig"),
    "MPTCPInfo": ("mptcpkit.abi.mptcp_info", "MPTCPInfo"),
    "TCPInfo": ("mptcpkit.abi.tcp_info", "TCPInfo"),
    "Address": ("mptcpkit.address", "Address"),
    "parse_address": ("mptcpkit.address", "parse_address"),
    "setsockopt": ("mptcpkit.downgrade", "setsockopt"),
    "MPTCPUnavailableError": ("mptcpkit.errors", "MPTCPUnavailableError"),
    "TCPOnlyOptionError": ("mptcpkit.errors", "TCPOnlyOptionError"),
    "Subflow": ("mptcpkit.introspect", "Subflow"),
    "info": ("mptcpkit.introspect", "info"),
    "subflows": ("mptcpkit.introspect", "subflows"),
    "Policy": ("mptcpkit.policy", "Policy"),
    "forced": ("mptcpkit.run.inprocess", "forced"),
    "Socket": ("mptcpkit.sockets", "Socket"),
    "create_connection": ("mptcpkit.sockets", "create_connection"),
    "create_server": ("mptcpkit.sockets", "create_server"),
    "socket": ("mptcpkit.sockets", "socket"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'mptcpkit' has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__version__ = "0.1.0"

__all__ = [
    "IPPROTO_MPTCP",
    "SOL_MPTCP",
    "TCP_MD5SIG",
    "TCP_MD5SIG_EXT",
    "Address",
    "MPTCPInfo",
    "MPTCPUnavailableError",
    "Policy",
    "Socket",
    "SocketStatus",
    "State",
    "Subflow",
    "Support",
    "TCPInfo",
    "TCPOnlyOptionError",
    "Unusable",
    "available",
    "create_connection",
    "create_server",
    "forced",
    "info",
    "parse_address",
    "setsockopt",
    "socket",
    "status",
    "subflows",
    "support",
    "tcp_md5sig",
    "tcp_md5sig_available",
]
