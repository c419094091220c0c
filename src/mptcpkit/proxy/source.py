"""HAProxy's `source`: the local address a server leg leaves from.

The port stays the kernel's choice, made at connect() time (IP_BIND_ADDRESS_NO_PORT,
as HAProxy does), so binding the address does not reserve a port per connection and
the usual 4-tuple reuse applies. An MPTCP socket binds its first subflow; further
subflows follow the path manager's endpoints. The engine does the same in C.
"""

from __future__ import annotations

import socket
from typing import Any

__all__ = ["IP_BIND_ADDRESS_NO_PORT", "bind_source"]

IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h


def bind_source(sock: Any, ip: str) -> int:
    """Bind `sock` to `ip` (any port): 0, or the errno of the failure."""
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((ip, 0))
    except OSError as exc:
        return exc.errno or 0
    return 0
