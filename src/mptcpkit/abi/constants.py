"""Numbers from the kernel's uapi headers that Python's socket module lacks.

Sources: include/uapi/linux/{in.h,socket.h,tcp.h,mptcp.h}; checked on Linux 6.18.
"""

from __future__ import annotations

import socket as _socket

IPPROTO_MPTCP = 262
IPPROTO_TCP = _socket.IPPROTO_TCP
SOL_MPTCP = 284

# getsockopt(SOL_MPTCP, ...)
MPTCP_INFO = 1  # struct mptcp_info (5.16+)
MPTCP_TCPINFO = 2  # struct mptcp_subflow_data + tcp_info[] (5.16+)
MPTCP_SUBFLOW_ADDRS = 3  # struct mptcp_subflow_data + mptcp_subflow_addrs[] (5.16+)
MPTCP_FULL_INFO = 4  # struct mptcp_full_info (6.5+)

# mptcp_info.mptcpi_flags
MPTCP_INFO_FLAG_FALLBACK = 1 << 0
MPTCP_INFO_FLAG_REMOTE_KEY_RECEIVED = 1 << 1

# socket ioctls (include/uapi/linux/sockios.h, asm-generic/ioctls.h)
SIOCOUTQ = 0x5411  # bytes a socket holds unsent or unacknowledged (TIOCOUTQ); MPTCP too
SIOCGSKNS = 0x894C  # a socket's network namespace, as a new descriptor

# SOL_SOCKET
SOL_SOCKET = _socket.SOL_SOCKET
SO_PROTOCOL = 38
SO_ACCEPTCONN = 30
SO_ZEROCOPY = 60
SO_OOBINLINE = 10
SO_ATTACH_FILTER = 26
SO_MAX_PACING_RATE = 47
SO_ATTACH_REUSEPORT_CBPF = 51
SO_ATTACH_REUSEPORT_EBPF = 52
SO_TXTIME = 61
SO_MARK = 36
SO_PRIORITY = 12
SO_BINDTODEVICE = 25

# SOL_IP / SOL_IPV6
SOL_IP = 0
SOL_IPV6 = 41
IP_TOS = 1
IP_TTL = 2
IP_MTU_DISCOVER = 10
IP_RECVERR = 11
IP_FREEBIND = 15
IP_TRANSPARENT = 19
IP_MINTTL = 21
IP_BIND_ADDRESS_NO_PORT = 24
IPV6_V6ONLY = 26
IPV6_TCLASS = 67
IPV6_FREEBIND = 78
IPV6_TRANSPARENT = 75

# SOL_TCP (include/uapi/linux/tcp.h)
SOL_TCP = 6
TCP_NODELAY = 1
TCP_MAXSEG = 2
TCP_CORK = 3
TCP_KEEPIDLE = 4
TCP_KEEPINTVL = 5
TCP_KEEPCNT = 6
TCP_SYNCNT = 7
TCP_LINGER2 = 8
TCP_DEFER_ACCEPT = 9
TCP_WINDOW_CLAMP = 10
TCP_INFO = 11
TCP_QUICKACK = 12
TCP_CONGESTION = 13
TCP_MD5SIG = 14
TCP_THIN_LINEAR_TIMEOUTS = 16
TCP_THIN_DUPACK = 17
TCP_USER_TIMEOUT = 18
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_FASTOPEN = 23
TCP_TIMESTAMP = 24
TCP_NOTSENT_LOWAT = 25
TCP_CC_INFO = 26
TCP_SAVE_SYN = 27
TCP_SAVED_SYN = 28
TCP_REPAIR_WINDOW = 29
TCP_FASTOPEN_CONNECT = 30
TCP_ULP = 31
TCP_MD5SIG_EXT = 32
TCP_FASTOPEN_KEY = 33
TCP_FASTOPEN_NO_COOKIE = 34
TCP_ZEROCOPY_RECEIVE = 35
TCP_INQ = 36
TCP_TX_DELAY = 37
TCP_AO_ADD_KEY = 38
TCP_AO_DEL_KEY = 39
TCP_AO_INFO = 40
TCP_AO_GET_KEYS = 41
TCP_AO_REPAIR = 42
TCP_IS_MPTCP = 43

# TCP states (include/net/tcp_states.h), as tcp_info.tcpi_state reports them.
TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
    12: "NEW_SYN_RECV",
}
TCP_ESTABLISHED = 1
TCP_CLOSE = 7
TCP_LISTEN = 10
