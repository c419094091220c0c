"""Socket options that an MPTCP socket rejects although plain TCP accepts them.

Checked on Linux 6.18 (tests/test_options.py checks every entry against the running
kernel). Setting one of these through mptcpkit on an MPTCP socket that can still
become plain TCP downgrades it (see `mptcpkit.downgrade`); otherwise it is an error
that names the option and the way out.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from mptcpkit.abi import constants as c


@dataclass(frozen=True, slots=True)
class OptionInfo:
    name: str
    level: int
    optname: int
    errno: int  # what setsockopt on an MPTCP socket fails with
    why: str  # who needs it: the programs that break when it is missing


def _opt(name: str, level: int, optname: int, err: int, why: str) -> OptionInfo:
    return OptionInfo(name, level, optname, err, why)


_NOPROTO = errno.ENOPROTOOPT
_NOTSUP = errno.EOPNOTSUPP

_TABLE: tuple[OptionInfo, ...] = (
    _opt("TCP_MD5SIG", c.SOL_TCP, c.TCP_MD5SIG, _NOPROTO, "BGP sessions (RFC 2385)"),
    _opt("TCP_MD5SIG_EXT", c.SOL_TCP, c.TCP_MD5SIG_EXT, _NOPROTO, "BGP with prefix keys"),
    _opt("TCP_AO_ADD_KEY", c.SOL_TCP, c.TCP_AO_ADD_KEY, _NOPROTO, "TCP-AO (RFC 5925)"),
    _opt("TCP_AO_DEL_KEY", c.SOL_TCP, c.TCP_AO_DEL_KEY, _NOPROTO, "TCP-AO (RFC 5925)"),
    _opt("TCP_AO_INFO", c.SOL_TCP, c.TCP_AO_INFO, _NOPROTO, "TCP-AO (RFC 5925)"),
    _opt("TCP_REPAIR", c.SOL_TCP, c.TCP_REPAIR, _NOPROTO, "checkpoint/restore (CRIU)"),
    _opt("TCP_REPAIR_QUEUE", c.SOL_TCP, c.TCP_REPAIR_QUEUE, _NOPROTO, "CRIU"),
    _opt("TCP_QUEUE_SEQ", c.SOL_TCP, c.TCP_QUEUE_SEQ, _NOPROTO, "CRIU"),
    _opt("TCP_REPAIR_OPTIONS", c.SOL_TCP, c.TCP_REPAIR_OPTIONS, _NOPROTO, "CRIU"),
    _opt("TCP_REPAIR_WINDOW", c.SOL_TCP, c.TCP_REPAIR_WINDOW, _NOPROTO, "CRIU"),
    _opt("TCP_USER_TIMEOUT", c.SOL_TCP, c.TCP_USER_TIMEOUT, _NOPROTO, "Tailscale, gRPC"),
    _opt("TCP_QUICKACK", c.SOL_TCP, c.TCP_QUICKACK, _NOPROTO, "latency-sensitive RPC"),
    _opt("TCP_LINGER2", c.SOL_TCP, c.TCP_LINGER2, _NOPROTO, "FIN_WAIT2 tuning"),
    _opt("TCP_WINDOW_CLAMP", c.SOL_TCP, c.TCP_WINDOW_CLAMP, _NOPROTO, "receive-window caps"),
    _opt("TCP_THIN_LINEAR_TIMEOUTS", c.SOL_TCP, c.TCP_THIN_LINEAR_TIMEOUTS, _NOPROTO, "games"),
    _opt("TCP_THIN_DUPACK", c.SOL_TCP, c.TCP_THIN_DUPACK, _NOPROTO, "thin streams"),
    _opt("TCP_SAVE_SYN", c.SOL_TCP, c.TCP_SAVE_SYN, _NOPROTO, "SYN fingerprinting"),
    _opt("TCP_TX_DELAY", c.SOL_TCP, c.TCP_TX_DELAY, _NOPROTO, "delay emulation"),
    _opt("TCP_ULP", c.SOL_TCP, c.TCP_ULP, _NOPROTO, "kernel TLS (kTLS)"),
    _opt("SO_ZEROCOPY", c.SOL_SOCKET, c.SO_ZEROCOPY, _NOTSUP, "MSG_ZEROCOPY senders"),
    _opt("SO_OOBINLINE", c.SOL_SOCKET, c.SO_OOBINLINE, _NOTSUP, "telnet-style urgent data"),
    _opt("SO_ATTACH_FILTER", c.SOL_SOCKET, c.SO_ATTACH_FILTER, _NOTSUP, "socket filters"),
    _opt("SO_ATTACH_REUSEPORT_CBPF", c.SOL_SOCKET, c.SO_ATTACH_REUSEPORT_CBPF, _NOTSUP, "LB"),
    _opt("SO_ATTACH_REUSEPORT_EBPF", c.SOL_SOCKET, c.SO_ATTACH_REUSEPORT_EBPF, _NOTSUP, "LB"),
    _opt("SO_MAX_PACING_RATE", c.SOL_SOCKET, c.SO_MAX_PACING_RATE, _NOTSUP, "rate limits"),
    _opt("SO_TXTIME", c.SOL_SOCKET, c.SO_TXTIME, _NOTSUP, "time-based transmission"),
    _opt("IP_TTL", c.SOL_IP, c.IP_TTL, _NOTSUP, "GTSM, traceroute-style tools"),
    _opt("IP_MINTTL", c.SOL_IP, c.IP_MINTTL, _NOTSUP, "BGP GTSM (RFC 5082)"),
    _opt("IP_RECVERR", c.SOL_IP, c.IP_RECVERR, _NOTSUP, "ICMP error reporting"),
    _opt("IP_MTU_DISCOVER", c.SOL_IP, c.IP_MTU_DISCOVER, _NOTSUP, "PMTU policy"),
)

TCP_ONLY_OPTIONS: dict[tuple[int, int], OptionInfo] = {(o.level, o.optname): o for o in _TABLE}


def option_name(level: int, optname: int) -> str:
    """A readable name for an option, known or not."""
    info = TCP_ONLY_OPTIONS.get((level, optname))
    return info.name if info else f"option {optname} at level {level}"
