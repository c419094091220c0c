"""mptcpkit: Multipath TCP (RFC 8684) on Linux, from Python.

    import mptcpkit
    sock = mptcpkit.create_connection(("example.net", 443))   # MPTCP, TCP if it must
    mptcpkit.status(sock)        # MPTCP / fallback / TCP
    mptcpkit.subflows(sock)      # per-subflow addresses, RTT, cwnd, bytes

See README.md for the whole API.
"""

from __future__ import annotations

from mptcpkit.abi.constants import IPPROTO_MPTCP, SOL_MPTCP, TCP_MD5SIG, TCP_MD5SIG_EXT
from mptcpkit.abi.md5sig import encode_tcp_md5sig as tcp_md5sig
from mptcpkit.abi.mptcp_info import MPTCPInfo
from mptcpkit.abi.tcp_info import TCPInfo
from mptcpkit.downgrade import setsockopt
from mptcpkit.errors import MPTCPUnavailableError, TCPOnlyOptionError
from mptcpkit.introspect import Subflow, info, subflows
from mptcpkit.policy import Policy
from mptcpkit.sockets import Socket, create_connection, create_server, socket
from mptcpkit.status import SocketStatus, State, status
from mptcpkit.support import Support, Unusable, available, support, tcp_md5sig_available

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Any

    from mptcpkit.address import Address, parse_address
    from mptcpkit.run.inprocess import forced


__version__ = "0.1.0"

# Imported when first used (PEP 562): the address parser and `forced` (the layer of
# `mptcpkit run`) cost every `import mptcpkit` time that socket users do not need.
_LAZY = {
    "Address": "mptcpkit.address",
    "parse_address": "mptcpkit.address",
    "forced": "mptcpkit.run.inprocess",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mptcpkit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
