"""Can this host, in this network namespace, make MPTCP sockets, and which features?

`net.mptcp.enabled` is per network namespace, so the answer is cached per namespace,
keyed by the calling thread's namespace cookie (SO_NETNS_COOKIE, 5.14+; unlike a
namespace's inode number, which the kernel hands out again as soon as a namespace is
gone, a cookie is never reused). A thread that moves into another namespace gets a fresh
answer. Kernel features (MPTCP_INFO, MPTCP_FULL_INFO, TCP_IS_MPTCP) belong to the kernel,
not the namespace, and are probed once per process.
"""

from __future__ import annotations

import _thread
import enum
import errno
import os
import socket

from mptcpkit._libc import getsockopt_inout
from mptcpkit.abi import constants as c
from mptcpkit.abi._record import record
from mptcpkit.abi.constants import SOL_SOCKET


class Unusable(enum.Enum):
    """Why MPTCP sockets cannot be created."""

    NOT_COMPILED = "the kernel was built without MPTCP (CONFIG_MPTCP)"
    DISABLED = "disabled by net.mptcp.enabled=0 in this network namespace"
    KERNEL_TOO_OLD = "the kernel is too old (MPTCP needs Linux 5.6)"
    BLOCKED = "refused by a security policy (SELinux, seccomp or a BPF LSM)"


def classify_creation_error(err: int) -> Unusable:
    """What an errno from socket(..., IPPROTO_MPTCP) means (REFERENCE §1)."""
    if err == errno.EPROTONOSUPPORT:
        return Unusable.NOT_COMPILED
    if err == errno.EINVAL:
        return Unusable.KERNEL_TOO_OLD
    if err == errno.ENOPROTOOPT:
        return Unusable.DISABLED
    return Unusable.BLOCKED


def describe_creation_error(err: int) -> str:
    name = errno.errorcode.get(err, str(err))
    return f"MPTCP socket could not be created ({name}): {classify_creation_error(err).value}"


@record
class Support:
    """What MPTCP can do here. `usable` is the answer; the rest says why and how much."""

    usable: bool
    reason: Unusable | None
    errno: int | None
    kernel: str
    enabled_sysctl: int | None  # net.mptcp.enabled of this namespace, None if unreadable
    sol_mptcp: bool  # getsockopt(SOL_MPTCP, MPTCP_INFO): 5.16+
    full_info: bool  # MPTCP_FULL_INFO: 6.5+
    tcp_is_mptcp: bool  # getsockopt(SOL_TCP, TCP_IS_MPTCP)
    netns: int | None  # the probed network namespace's cookie

    @property
    def detail(self) -> str:
        if self.usable:
            return "MPTCP sockets can be created"
        assert self.reason is not None
        name = errno.errorcode.get(self.errno or 0, str(self.errno))
        return f"{self.reason.value} ({name})"


SO_NETNS_COOKIE = 71

_cache: dict[int | None, Support] = {}
_lock = _thread.allocate_lock()


@record
class KernelFeatures:
    sol_mptcp: bool
    full_info: bool
    tcp_is_mptcp: bool


_features: KernelFeatures | None = None


def current_netns() -> int | None:
    """The cookie of the calling thread's network namespace (setns is per thread)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            return int.from_bytes(probe.getsockopt(SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")
    except OSError:
        return None


def read_sysctl(name: str) -> str | None:
    """A sysctl of the caller's network namespace, or None when it does not exist."""
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return None


def _probe_option(probe: socket.socket, level: int, optname: int, size: int) -> bool:
    try:
        probe.getsockopt(level, optname, size)
    except OSError:
        return False
    return True


def _probe_full_info(probe: socket.socket) -> bool:
    from mptcpkit.abi.mptcp_info import MPTCP_INFO_SIZE
    from mptcpkit.abi.subflow import FULL_INFO_HEADER_SIZE, encode_full_info

    request = encode_full_info(0, 0, 0, 0, 0)
    try:
        getsockopt_inout(
            probe.fileno(),
            c.SOL_MPTCP,
            c.MPTCP_FULL_INFO,
            request,
            FULL_INFO_HEADER_SIZE + MPTCP_INFO_SIZE,
        )
    except OSError:
        return False
    return True


def kernel_version() -> tuple[int, int]:
    try:
        major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    except ValueError:
        return (0, 0)
    return major, minor


def kernel_features() -> KernelFeatures:
    """What the running kernel offers, probed on an MPTCP socket once per process.

    While no MPTCP socket can be made (e.g. MPTCP disabled here), MPTCP_INFO and
    MPTCP_FULL_INFO are judged by kernel version (5.16, 6.5); TCP_IS_MPTCP is still
    probed, on a plain TCP socket, which answers it on every kernel that knows it.
    """
    global _features
    if _features is not None:
        return _features
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM, c.IPPROTO_MPTCP)
    except OSError:
        version = kernel_version()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM, c.IPPROTO_TCP) as tcp:
            is_mptcp = _probe_option(tcp, c.SOL_TCP, c.TCP_IS_MPTCP, 4)
        return KernelFeatures(version >= (5, 16), version >= (6, 5), is_mptcp)
    # (the structures' modules only here: `import mptcpkit` is part of every command's
    # start, `mptcpkit run`'s included, and needs no layout of MPTCP_INFO)
    from mptcpkit.abi.mptcp_info import MPTCP_INFO_SIZE

    with probe:
        _features = KernelFeatures(
            sol_mptcp=_probe_option(probe, c.SOL_MPTCP, c.MPTCP_INFO, MPTCP_INFO_SIZE),
            full_info=_probe_full_info(probe),
            tcp_is_mptcp=_probe_option(probe, c.SOL_TCP, c.TCP_IS_MPTCP, 4),
        )
    return _features


def _probe(netns: int | None) -> Support:
    enabled = read_sysctl("net.mptcp.enabled")
    enabled_value = int(enabled) if enabled is not None and enabled.isdigit() else None
    kernel = os.uname().release
    family = socket.AF_INET if _has_ipv4() else socket.AF_INET6
    try:
        socket.socket(family, socket.SOCK_STREAM, c.IPPROTO_MPTCP).close()
    except OSError as exc:
        err: int | None = exc.errno or 0
        reason: Unusable | None = classify_creation_error(exc.errno or 0)
    else:
        err = reason = None
    features = kernel_features()
    return Support(
        usable=reason is None,
        reason=reason,
        errno=err,
        kernel=kernel,
        enabled_sysctl=enabled_value,
        sol_mptcp=features.sol_mptcp,
        full_info=features.full_info,
        tcp_is_mptcp=features.tcp_is_mptcp,
        netns=netns,
    )


def _has_ipv4() -> bool:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def support(*, refresh: bool = False) -> Support:
    """The probe's answer for the calling thread's network namespace (cached)."""
    netns = current_netns()
    if not refresh:
        found = _cache.get(netns)
        if found is not None:
            return found
    result = _probe(netns)
    with _lock:
        _cache[netns] = result
    return result


def available() -> bool:
    """True when MPTCP sockets can be created in the caller's network namespace."""
    return support().usable


def tcp_md5sig_available() -> bool:
    """Can sockets made by mptcpkit use TCP_MD5SIG? (Go issue 74643's probe, answered
    right: it asks a plain TCP socket, which is what mptcpkit turns a socket into when
    the option is set, so the MPTCP default does not change the answer.)"""
    from mptcpkit.abi.md5sig import encode_tcp_md5sig

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, c.IPPROTO_TCP) as probe:
        try:
            probe.setsockopt(c.SOL_TCP, c.TCP_MD5SIG, encode_tcp_md5sig("127.0.0.1", b"probe"))
        except OSError as exc:
            if exc.errno in (errno.ENOPROTOOPT, errno.ENOENT, errno.EOPNOTSUPP):
                return False
            raise
    return True
