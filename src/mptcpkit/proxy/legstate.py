"""What a proxied leg is and how it failed, in words: shared beyond the data path.

Both data paths (relay.py, and the engine through compiled.py), the runtime API
(control.py), health checks and the log read a leg's MPTCP state ("MPTCP",
"fallback", "TCP") and subflows, and name a failure ("timeout", "ECONNREFUSED") the
same way; this module is that vocabulary, apart from the Python relay's state machine.
"""

from __future__ import annotations

import errno
from typing import Any

import mptcpkit
from mptcpkit.abi.constants import MPTCP_INFO, SOL_MPTCP

__all__ = ["leg_state", "observe_leg", "oserror", "reason_of", "subflows"]

_MPTCP_INFO_LEN = 96
_SUBFLOWS_TOTAL = 80  # offsetof(struct mptcp_info, mptcpi_subflows_total)


def observe_leg(sock: Any) -> tuple[str | None, int]:
    """(state, subflows) of a leg where MPTCP was asked for; one getsockopt if MPTCP."""
    n = subflows(sock)
    if n:
        return "MPTCP", n
    return leg_state(sock.fileno()), 0


def leg_state(fd: int) -> str | None:
    """The state of a leg without subflows, "fallback" or "TCP"; None if unknown."""
    try:
        return str(mptcpkit.status(fd))
    except (OSError, ValueError):
        return None


def subflows(sock: Any) -> int:
    """All subflows of a live MPTCP socket, 0 if it is not one (fell back, plain TCP).

    One getsockopt(MPTCP_INFO) and two byte reads, not a full `mptcpkit.info()`
    decode: this runs for every MPTCP connection. Layout: REFERENCE §3 (u8 subflows at
    0 counts extra subflows; u8 subflows_total at 80, 6.8+, counts all).
    """
    try:
        raw = sock.getsockopt(SOL_MPTCP, MPTCP_INFO, _MPTCP_INFO_LEN)
    except (OSError, ValueError):
        return 0
    if len(raw) > _SUBFLOWS_TOTAL and raw[_SUBFLOWS_TOTAL]:
        return int(raw[_SUBFLOWS_TOTAL])
    return int(raw[0]) + 1 if raw else 0


def oserror(err: int) -> OSError:
    """The OSError for a socket's error number (SO_ERROR)."""
    return OSError(err, errno.errorcode.get(err, str(err)))


def reason_of(exc: BaseException) -> str:
    """Why a leg failed, in a word: "timeout", or the errno's name."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__
