"""Socket options that an MPTCP socket rejects although plain TCP accepts them.

The table comes from the running kernel: `tcp_only_options()` sets every option of
SOL_SOCKET, SOL_IP, SOL_IPV6 and SOL_TCP on MPTCP and on TCP sockets, fresh, bound,
listening and connected, once per process (about 6 ms, on first use), and keeps the
options MPTCP refuses (ENOPROTOOPT, EOPNOTSUPP) where TCP does not. `TCP_ONLY_OPTIONS`
is what that probe found on Linux 6.18; it stands in where the probe cannot run (no
MPTCP socket can be made here), and tests/test_options.py compares it with the live
probe, so a kernel that changes the answer fails a test.

Setting one of these through mptcpkit on an MPTCP socket that can still become plain
TCP downgrades it (see `mptcpkit.downgrade`); otherwise it is an error that names the
option and the way out.
"""

from __future__ import annotations

import _thread
import errno
import socket
from types import MappingProxyType

from mptcpkit.abi._record import record
from mptcpkit.abi.optnames import (
    NAMED_OPTIONS,
    OPTION_NAMES,
    SOL_IP,
    SOL_IPV6,
    SOL_SOCKET,
    SOL_TCP,
    option_name,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping


IPPROTO_MPTCP = 262
OptionKey = tuple[int, int]  # (level, optname)


@record
class OptionInfo:
    name: str
    level: int
    optname: int
    errno: int  # what setsockopt on an MPTCP socket fails with
    why: str  # who needs it: the programs that break when it is missing


# Who needs what, for the messages; options not listed here get a generic line.
_WHY: dict[str, str] = {
    "TCP_MD5SIG": "BGP sessions (RFC 2385)",
    "TCP_MD5SIG_EXT": "BGP with prefix keys",
    "TCP_AO_ADD_KEY": "TCP-AO (RFC 5925)",
    "TCP_AO_DEL_KEY": "TCP-AO (RFC 5925)",
    "TCP_AO_INFO": "TCP-AO (RFC 5925)",
    "TCP_AO_REPAIR": "TCP-AO with CRIU",
    "TCP_REPAIR": "checkpoint/restore (CRIU)",
    "TCP_REPAIR_QUEUE": "CRIU",
    "TCP_QUEUE_SEQ": "CRIU",
    "TCP_REPAIR_OPTIONS": "CRIU",
    "TCP_REPAIR_WINDOW": "CRIU",
    "TCP_TIMESTAMP": "CRIU",
    "TCP_USER_TIMEOUT": "Tailscale, gRPC",
    "TCP_SYNCNT": "connect timeouts (curl, systemd)",
    "TCP_QUICKACK": "latency-sensitive RPC",
    "TCP_LINGER2": "FIN_WAIT2 tuning",
    "TCP_WINDOW_CLAMP": "receive-window caps",
    "TCP_THIN_LINEAR_TIMEOUTS": "games",
    "TCP_THIN_DUPACK": "thin streams",
    "TCP_SAVE_SYN": "SYN fingerprinting",
    "TCP_TX_DELAY": "delay emulation",
    "TCP_ULP": "kernel TLS (kTLS)",
    "TCP_RTO_MAX_MS": "retransmission timer tuning",
    "TCP_RTO_MIN_US": "retransmission timer tuning",
    "TCP_DELACK_MAX_US": "delayed-ACK tuning",
    "SO_ZEROCOPY": "MSG_ZEROCOPY senders",
    "SO_OOBINLINE": "telnet-style urgent data",
    "SO_ATTACH_FILTER": "socket filters",
    "SO_ATTACH_BPF": "socket filters",
    "SO_LOCK_FILTER": "socket filters",
    "SO_ATTACH_REUSEPORT_CBPF": "SO_REUSEPORT load balancing",
    "SO_ATTACH_REUSEPORT_EBPF": "SO_REUSEPORT load balancing",
    "SO_MAX_PACING_RATE": "rate limits",
    "SO_TXTIME": "time-based transmission",
    "SO_PEEK_OFF": "MSG_PEEK readers",
    "IP_TTL": "GTSM, traceroute-style tools",
    "IP_MINTTL": "BGP GTSM (RFC 5082)",
    "IP_RECVERR": "ICMP error reporting",
    "IP_MTU_DISCOVER": "PMTU policy",
    "IPV6_MINHOPCOUNT": "BGP GTSM over IPv6 (RFC 5082)",
    "IPV6_UNICAST_HOPS": "GTSM, traceroute-style tools",
    "IPV6_TCLASS": "DSCP marking over IPv6",
    "IPV6_MTU_DISCOVER": "PMTU policy",
    "IPV6_RECVERR": "ICMP error reporting",
    "IPV6_DONTFRAG": "PMTU policy",
    "IPV6_AUTOFLOWLABEL": "ECMP flow labels",
}

_NOPROTO, _NOTSUP = errno.ENOPROTOOPT, errno.EOPNOTSUPP

# What the probe found on Linux 6.18: {errno: option names}.
_STATIC: dict[int, str] = {
    _NOPROTO: """
IP_OPTIONS IP_ROUTER_ALERT IP_XFRM_POLICY IP_MULTICAST_IF IP_MULTICAST_TTL
IP_MULTICAST_LOOP IP_UNBLOCK_SOURCE IP_BLOCK_SOURCE IP_ADD_SOURCE_MEMBERSHIP
IP_DROP_SOURCE_MEMBERSHIP IP_MSFILTER ip:MCAST_JOIN_GROUP ip:MCAST_BLOCK_SOURCE
ip:MCAST_UNBLOCK_SOURCE ip:MCAST_LEAVE_GROUP ip:MCAST_JOIN_SOURCE_GROUP
ip:MCAST_LEAVE_SOURCE_GROUP ip:MCAST_MSFILTER IP_MULTICAST_ALL IP_UNICAST_IF TCP_SYNCNT
TCP_LINGER2 TCP_WINDOW_CLAMP TCP_QUICKACK TCP_MD5SIG TCP_THIN_LINEAR_TIMEOUTS
TCP_THIN_DUPACK TCP_USER_TIMEOUT TCP_REPAIR TCP_REPAIR_QUEUE TCP_QUEUE_SEQ
TCP_REPAIR_OPTIONS TCP_TIMESTAMP TCP_SAVE_SYN TCP_REPAIR_WINDOW TCP_ULP TCP_MD5SIG_EXT
TCP_TX_DELAY TCP_AO_REPAIR TCP_RTO_MAX_MS TCP_RTO_MIN_US TCP_DELACK_MAX_US IPV6_ADDRFORM
IPV6_MULTICAST_LOOP IPV6_ADD_MEMBERSHIP IPV6_DROP_MEMBERSHIP IPV6_JOIN_ANYCAST
IPV6_LEAVE_ANYCAST IPV6_MULTICAST_ALL IPV6_ROUTER_ALERT_ISOLATE IPV6_XFRM_POLICY
ipv6:MCAST_JOIN_GROUP ipv6:MCAST_BLOCK_SOURCE ipv6:MCAST_UNBLOCK_SOURCE
ipv6:MCAST_LEAVE_GROUP ipv6:MCAST_JOIN_SOURCE_GROUP ipv6:MCAST_LEAVE_SOURCE_GROUP
ipv6:MCAST_MSFILTER IPV6_HOPOPTS IPV6_RTHDRDSTOPTS IPV6_RTHDR IPV6_DSTOPTS
IPV6_ADDR_PREFERENCES IPV6_UNICAST_IF
""",
    _NOTSUP: """
IP_TTL IP_RECVOPTS IP_RETOPTS IP_PKTINFO IP_MTU_DISCOVER IP_RECVERR IP_RECVTTL
IP_RECVTOS IP_PASSSEC IP_RECVORIGDSTADDR IP_MINTTL IP_CHECKSUM IP_RECVFRAGSIZE
IP_RECVERR_RFC4884 SO_OOBINLINE SO_ATTACH_FILTER SO_DETACH_FILTER SO_PEEK_OFF
SO_LOCK_FILTER SO_MAX_PACING_RATE SO_ATTACH_BPF SO_ATTACH_REUSEPORT_CBPF
SO_ATTACH_REUSEPORT_EBPF SO_CNX_ADVICE SO_ZEROCOPY SO_TXTIME SO_DETACH_REUSEPORT_BPF
SO_BUF_LOCK SO_TXREHASH SO_RCVMARK SO_DEVMEM_DONTNEED SO_RCVPRIORITY IPV6_2292PKTINFO
IPV6_2292HOPOPTS IPV6_2292DSTOPTS IPV6_2292RTHDR IPV6_2292PKTOPTIONS IPV6_2292HOPLIMIT
IPV6_FLOWINFO IPV6_UNICAST_HOPS IPV6_MTU_DISCOVER IPV6_MTU IPV6_RECVERR
IPV6_RECVERR_RFC4884 IPV6_FLOWLABEL_MGR IPV6_FLOWINFO_SEND IPV6_RECVPKTINFO IPV6_PKTINFO
IPV6_RECVHOPLIMIT IPV6_RECVHOPOPTS IPV6_RECVRTHDR IPV6_RECVDSTOPTS IPV6_RECVPATHMTU
IPV6_DONTFRAG IPV6_RECVTCLASS IPV6_TCLASS IPV6_AUTOFLOWLABEL IPV6_MINHOPCOUNT
IPV6_RECVORIGDSTADDR IPV6_RECVFRAGSIZE
""",
}


def _info(key: OptionKey, err: int) -> OptionInfo:
    name = option_name(*key)
    return OptionInfo(name, key[0], key[1], err, _WHY.get(name, "programs that set it"))


def _static_table() -> dict[OptionKey, OptionInfo]:
    table = {}
    for err, names in _STATIC.items():
        for word in names.split():
            level_tag, _, name = word.partition(":")
            level = {"ip": SOL_IP, "ipv6": SOL_IPV6}.get(level_tag) if name else None
            key = (level, NAMED_OPTIONS[name][1]) if level is not None else NAMED_OPTIONS[word]
            table[key] = _info(key, err)
    return dict(sorted(table.items()))


_static: dict[OptionKey, OptionInfo] | None = None


def static_table() -> dict[OptionKey, OptionInfo]:
    """`TCP_ONLY_OPTIONS`, built on first use (it costs every import otherwise)."""
    global _static
    if _static is None:
        _static = _static_table()
    return _static


if TYPE_CHECKING:
    TCP_ONLY_OPTIONS: dict[OptionKey, OptionInfo]


def __getattr__(name: str) -> dict[OptionKey, OptionInfo]:
    if name == "TCP_ONLY_OPTIONS":
        return static_table()
    raise AttributeError(f"module 'mptcpkit.options' has no attribute {name!r}")


# MPTCP's refusals; TCP also answers EPROTO to options that need a datagram socket.
_REFUSED = frozenset({_NOPROTO, _NOTSUP})
_TCP_REFUSED = _REFUSED | {errno.EPROTO}


def _candidates() -> list[OptionKey]:
    """Every named option, and each number of the ranges the kernel uses, so that an
    option newer than this table shows up too (named `option N at level L`). Numbers
    64 and up at SOL_IP/SOL_IPV6 that are not named are netfilter's, not socket options."""
    keys = set(OPTION_NAMES)
    for level, numbers in (
        (SOL_SOCKET, range(1, 100)),
        (SOL_TCP, range(1, 100)),
        (SOL_IP, range(1, 64)),
        (SOL_IPV6, range(1, 64)),
    ):
        keys.update((level, n) for n in numbers)
    return sorted(keys)


def _sockets(family: int, proto: int, host: str) -> Iterator[socket.socket]:
    """One socket of `proto` in each state: fresh, bound, listening, connected. A state
    that cannot be reached here (no loopback) is left out."""
    opened: list[socket.socket] = []

    def make() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM, proto)
        opened.append(sock)
        return sock

    try:
        yield make()
        try:
            bound = make()
            bound.bind((host, 0))
        except OSError:
            return
        yield bound
        listener = make()
        listener.bind((host, 0))
        listener.listen(1)
        yield listener
        client = make()
        client.settimeout(1.0)
        try:
            client.connect(listener.getsockname())
        except OSError:
            return
        opened.append(listener.accept()[0])
        yield client
    finally:
        for sock in opened:
            sock.close()


def _probe_family(
    family: int, host: str, before_connect: dict[int, frozenset[OptionKey]] | None = None
) -> dict[OptionKey, int] | None:
    """{option: MPTCP's errno} for the options MPTCP refuses and TCP takes, on sockets
    of `family`; None when MPTCP or TCP sockets of that family cannot be made. Into
    `before_connect[family]`, when given: those MPTCP refuses both fresh and bound."""
    candidates = _candidates()
    refused: list[dict[OptionKey, int]] = []
    try:
        for sock in _sockets(family, IPPROTO_MPTCP, host):
            state: dict[OptionKey, int] = {}
            for level, optname in candidates:
                try:
                    sock.setsockopt(level, optname, 0)
                except OSError as exc:
                    if exc.errno in _REFUSED:
                        state[(level, optname)] = exc.errno
            refused.append(state)
        found: dict[OptionKey, int] = {}
        for sock, state in zip(_sockets(family, socket.IPPROTO_TCP, host), refused, strict=False):
            for key, err in state.items():
                try:
                    sock.setsockopt(key[0], key[1], 0)
                except OSError as exc:
                    if exc.errno in _TCP_REFUSED:
                        continue
                found.setdefault(key, err)
    except OSError:
        return None
    if before_connect is not None and len(refused) >= 2:
        before_connect[family] = frozenset(found.keys() & refused[0].keys() & refused[1].keys())
    if before_connect is not None:
        _states_probed[family] = len(refused)
    return found


def probe_tcp_only_options(
    before_connect: dict[int, frozenset[OptionKey]] | None = None,
) -> dict[OptionKey, OptionInfo] | None:
    """Ask the running kernel (uncached): the options MPTCP sockets refuse and TCP
    sockets take, over IPv4 and IPv6 sockets in four states; None when no MPTCP socket
    can be made here. IPv6-level options come from the static table when this host
    has no IPv6."""
    found = _probe_family(socket.AF_INET, "127.0.0.1", before_connect)
    if found is None:
        return None
    v6 = _probe_family(socket.AF_INET6, "::1", before_connect)
    if v6 is None:
        v6 = {k: v.errno for k, v in static_table().items() if k[0] == SOL_IPV6}
    for key, err in v6.items():
        found.setdefault(key, err)
    return {key: _info(key, found[key]) for key in sorted(found)}


_probed: Mapping[OptionKey, OptionInfo] | None = None
_probed_live = False
# Per family, what a live probe found MPTCP refusing before connect (fresh and bound):
# setting one of these on an unconnected MPTCP socket need not be tried first.
_before_connect: dict[int, frozenset[OptionKey]] = {}
_lock = _thread.allocate_lock()
# Per family, how many of the four socket states the live probe reached.
_states_probed: dict[int, int] = {}


def tcp_only_options() -> Mapping[OptionKey, OptionInfo]:
    """The options an MPTCP socket rejects and plain TCP accepts, keyed by (level,
    optname): probed on the running kernel on first use and cached for the process;
    the static `TCP_ONLY_OPTIONS` where no MPTCP socket can be made. Read-only."""
    global _probed, _probed_live
    table = _probed
    if table is not None:
        return table
    with _lock:
        if _probed is None:
            found = probe_tcp_only_options(_before_connect)
            _probed_live = found is not None
            _probed = MappingProxyType(found if found is not None else dict(static_table()))
        return _probed


def refused_before_connect(family: int) -> frozenset[OptionKey]:
    """The options this kernel's MPTCP sockets of `family` refuse while not connected
    (fresh or bound) and TCP takes: from the live probe of `tcp_only_options()`, empty
    before it ran or where it could not (this never probes)."""
    return _before_connect.get(family, _EMPTY)


_EMPTY: frozenset[OptionKey] = frozenset()


def tcp_only_options_probed() -> bool:
    """True when `tcp_only_options()` came from the running kernel, not the static table."""
    tcp_only_options()
    return _probed_live


def tcp_only_options_complete() -> bool:
    """True when `tcp_only_options()` came from the running kernel with IPv4 and IPv6
    sockets in all four states (fresh, bound, listening, connected): an answer about
    the kernel alone, not about this network namespace (no loopback, no IPv6, MPTCP
    turned off), which is what `mptcpkit run` may keep for later runs."""
    tcp_only_options()
    return _probed_live and all(
        _states_probed.get(family) == 4 for family in (socket.AF_INET, socket.AF_INET6)
    )


__all__ = [
    "TCP_ONLY_OPTIONS",
    "OptionInfo",
    "option_name",
    "probe_tcp_only_options",
    "refused_before_connect",
    "tcp_only_options",
    "tcp_only_options_complete",
    "tcp_only_options_probed",
]
