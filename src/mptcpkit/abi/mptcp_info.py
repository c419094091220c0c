"""`struct mptcp_info` (include/uapi/linux/mptcp.h), decoded by the length returned."""

from __future__ import annotations

from mptcpkit.abi._decode import Field, Layout, require_length
from mptcpkit.abi._record import record
from mptcpkit.abi.constants import MPTCP_INFO_FLAG_FALLBACK, MPTCP_INFO_FLAG_REMOTE_KEY_RECEIVED

# The size of the newest layout this module knows (6.10+).
MPTCP_INFO_SIZE = 96
# Fields present since 5.9: everything up to and including rcv_nxt.
MPTCP_INFO_MIN_SIZE = 40

_FIELDS: tuple[Field, ...] = (
    ("subflows", "B", 0),
    ("add_addr_signal", "B", 1),
    ("add_addr_accepted", "B", 2),
    ("subflows_max", "B", 3),
    ("add_addr_signal_max", "B", 4),
    ("add_addr_accepted_max", "B", 5),
    ("flags", "I", 8),
    ("token", "I", 12),
    ("write_seq", "Q", 16),
    ("snd_una", "Q", 24),
    ("rcv_nxt", "Q", 32),
    ("local_addr_used", "B", 40),
    ("local_addr_max", "B", 41),
    ("csum_enabled", "B", 42),
    ("retransmits", "I", 44),
    ("bytes_retrans", "Q", 48),
    ("bytes_sent", "Q", 56),
    ("bytes_received", "Q", 64),
    ("bytes_acked", "Q", 72),
    ("subflows_total", "B", 80),
    ("endp_laminar_max", "B", 81),
    ("endp_fullmesh_max", "B", 82),
    ("last_data_sent", "I", 84),
    ("last_data_recv", "I", 88),
    ("last_ack_recv", "I", 92),
)

_LAYOUT = Layout(_FIELDS)


@record
class MPTCPInfo:
    """One MPTCP connection's counters. Fields the running kernel lacks are None.

    `subflows` counts only the *additional* subflows; `subflows_total` (6.8+) counts all.
    """

    subflows: int
    add_addr_signal: int
    add_addr_accepted: int
    subflows_max: int
    add_addr_signal_max: int
    add_addr_accepted_max: int
    flags: int
    token: int
    write_seq: int
    snd_una: int
    rcv_nxt: int
    local_addr_used: int | None = None
    local_addr_max: int | None = None
    csum_enabled: int | None = None
    retransmits: int | None = None
    bytes_retrans: int | None = None
    bytes_sent: int | None = None
    bytes_received: int | None = None
    bytes_acked: int | None = None
    subflows_total: int | None = None
    endp_laminar_max: int | None = None
    endp_fullmesh_max: int | None = None
    last_data_sent: int | None = None
    last_data_recv: int | None = None
    last_ack_recv: int | None = None

    @property
    def fallback(self) -> bool:
        return bool(self.flags & MPTCP_INFO_FLAG_FALLBACK)

    @property
    def remote_key_received(self) -> bool:
        return bool(self.flags & MPTCP_INFO_FLAG_REMOTE_KEY_RECEIVED)

    @property
    def subflow_count(self) -> int:
        """All subflows, on any kernel: `subflows_total`, else the initial one plus extras."""
        if self.subflows_total is not None:
            return self.subflows_total
        return self.subflows + 1


def decode_mptcp_info(data: bytes) -> MPTCPInfo:
    """Decode what getsockopt(SOL_MPTCP, MPTCP_INFO) returned; ValueError if too short."""
    require_length(data, MPTCP_INFO_MIN_SIZE, "struct mptcp_info")
    return MPTCPInfo(*_LAYOUT.unpack(data, min(len(data), MPTCP_INFO_SIZE)))  # type: ignore[arg-type]
