"""Forcing inside the running Python interpreter: `with forced():`.

For Python programs no supervisor is needed: socket.socket's constructor is patched
so that IPv4/IPv6 stream sockets with protocol 0 or TCP are made MPTCP, and plain
TCP when MPTCP cannot be made (policy "prefer"; "require" raises instead). Forced
sockets keep reporting the protocol the program asked for in `sock.proto` (as under
the seccomp strategy), so asyncio's address handling keeps working, and a TCP-only
option set on a forced socket turns it into plain TCP as mptcpkit.setsockopt does.
The patch is process-wide (every thread) while at least one `forced()` is active.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from mptcpkit.abi.constants import IPPROTO_MPTCP
from mptcpkit.downgrade import retry_after_downgrade
from mptcpkit.errors import MPTCPUnavailableError
from mptcpkit.policy import Policy, PolicyLike, as_policy
from mptcpkit.run.stats import Stats
from mptcpkit.sockets import is_tcp_request

_lock = threading.Lock()
_active: list[tuple[Policy, Stats]] = []
_requested: weakref.WeakKeyDictionary[socket.socket, int] = weakref.WeakKeyDictionary()
_original_init = socket.socket.__init__
_original_setsockopt = socket.socket.setsockopt
_c_proto = socket.socket.proto
_bypass = threading.local()
_swappable: weakref.WeakSet[socket.socket] = weakref.WeakSet()


def _init(
    self: socket.socket, family: int = -1, type: int = -1, proto: int = -1, fileno: Any = None
) -> None:
    active = _active[-1] if _active else None
    if active is None or fileno is not None or getattr(_bypass, "on", False):
        _original_init(self, family, type, proto, fileno)
        return
    policy, stats = active
    fam = socket.AF_INET if family == -1 else family
    typ = socket.SOCK_STREAM if type == -1 else type
    pro = 0 if proto == -1 else proto
    if policy is Policy.OFF or not is_tcp_request(fam, typ, pro):
        _original_init(self, family, type, proto, fileno)
        return
    try:
        _original_init(self, fam, typ, IPPROTO_MPTCP)
    except OSError as exc:
        if policy is Policy.REQUIRE:
            raise MPTCPUnavailableError(
                exc.errno, f"MPTCP socket refused ({exc.strerror}) and mptcp='require'"
            ) from exc
        stats.fell_back += 1
        _original_init(self, family, type, proto, fileno)
        return
    stats.forced += 1
    _requested[self] = pro
    _swappable.add(self)


def _setsockopt(self: socket.socket, level: int, optname: int, *args: Any) -> None:
    try:
        _original_setsockopt(self, level, optname, *args)
    except OSError as exc:
        if self not in _swappable:
            raise
        _swappable.discard(self)
        _bypass.on = True  # the replacement socket must really be plain TCP
        try:
            retry_after_downgrade(self, exc, level, optname, args, Policy.PREFER)
        except BaseException:
            _swappable.add(self)
            raise
        finally:
            _bypass.on = False
        if _active:
            _active[-1][1].swapped += 1


def _proto(self: socket.socket) -> int:
    requested = _requested.get(self)
    return _c_proto.__get__(self) if requested is None else requested


@contextlib.contextmanager
def forced(mptcp: PolicyLike = Policy.PREFER) -> Iterator[Stats]:
    """Make this interpreter's TCP sockets MPTCP while the block runs; yields counters."""
    policy = as_policy(mptcp) or Policy.PREFER
    stats = Stats()
    with _lock:
        if not _active:
            socket.socket.__init__ = _init  # type: ignore[method-assign]
            socket.socket.setsockopt = _setsockopt  # type: ignore[method-assign,assignment]
            socket.socket.proto = property(_proto)  # type: ignore[assignment]
        _active.append((policy, stats))
    try:
        yield stats
    finally:
        with _lock:
            _active.remove((policy, stats))
            if not _active:
                socket.socket.__init__ = _original_init  # type: ignore[method-assign]
                socket.socket.setsockopt = _original_setsockopt  # type: ignore[method-assign]
                del socket.socket.proto
