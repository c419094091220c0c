"""The useful part of `struct tcp_info` (include/uapi/linux/tcp.h), decoded by length."""

from __future__ import annotations

from mptcpkit.abi._decode import Field, Layout, require_length
from mptcpkit.abi._record import record
from mptcpkit.abi.constants import TCP_STATES

# What we ask the kernel for: up to tcpi_snd_wnd (5.19+); older kernels return less.
TCP_INFO_SIZE = 232
# Up to and including tcpi_total_retrans: present on every kernel with MPTCP.
TCP_INFO_MIN_SIZE = 104

_FIELDS: tuple[Field, ...] = (
    ("state", "B", 0),
    ("ca_state", "B", 1),
    ("retransmits", "B", 2),
    ("rto_us", "I", 8),
    ("snd_mss", "I", 16),
    ("rcv_mss", "I", 20),
    ("unacked", "I", 24),
    ("sacked", "I", 28),
    ("lost", "I", 32),
    ("retrans", "I", 36),
    ("pmtu", "I", 60),
    ("rtt_us", "I", 68),
    ("rttvar_us", "I", 72),
    ("snd_ssthresh", "I", 76),
    ("cwnd", "I", 80),
    ("total_retrans", "I", 100),
    ("pacing_rate", "Q", 104),
    ("bytes_acked", "Q", 120),
    ("bytes_received", "Q", 128),
    ("segs_out", "I", 136),
    ("segs_in", "I", 140),
    ("notsent_bytes", "I", 144),
    ("min_rtt_us", "I", 148),
    ("delivery_rate", "Q", 160),
    ("busy_time_us", "Q", 168),
    ("delivered", "I", 192),
    ("bytes_sent", "Q", 200),
    ("bytes_retrans", "Q", 208),
    ("snd_wnd", "I", 228),
)

_LAYOUT = Layout(_FIELDS)


@record
class TCPInfo:
    """A TCP (sub)flow's state and counters; fields a kernel lacks are None.

    `delivery_rate` and `pacing_rate` are in bytes per second, times in microseconds.
    For a listener, `unacked` is the accept-queue length and `sacked` the backlog.
    """

    state: int
    ca_state: int
    retransmits: int
    rto_us: int
    snd_mss: int
    rcv_mss: int
    unacked: int
    sacked: int
    lost: int
    retrans: int
    pmtu: int
    rtt_us: int
    rttvar_us: int
    snd_ssthresh: int
    cwnd: int
    total_retrans: int
    pacing_rate: int | None = None
    bytes_acked: int | None = None
    bytes_received: int | None = None
    segs_out: int | None = None
    segs_in: int | None = None
    notsent_bytes: int | None = None
    min_rtt_us: int | None = None
    delivery_rate: int | None = None
    busy_time_us: int | None = None
    delivered: int | None = None
    bytes_sent: int | None = None
    bytes_retrans: int | None = None
    snd_wnd: int | None = None

    @property
    def state_name(self) -> str:
        return TCP_STATES.get(self.state, f"UNKNOWN({self.state})")


def decode_tcp_info(data: bytes) -> TCPInfo:
    """Decode a `struct tcp_info`; ValueError if shorter than the oldest layout."""
    require_length(data, TCP_INFO_MIN_SIZE, "struct tcp_info")
    return TCPInfo(*_LAYOUT.unpack(data, min(len(data), TCP_INFO_SIZE)))  # type: ignore[arg-type]
