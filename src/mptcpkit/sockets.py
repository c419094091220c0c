"""MPTCP-first sockets with the stdlib's names and signatures.

`socket()`, `create_connection()` and `create_server()` behave like the `socket`
module's, but make MPTCP sockets according to a policy (see `mptcpkit.policy`).
Unlike Go, a connect error is never retried over TCP: TCP would get the same error.
Only a failure to *create* the MPTCP socket falls back.
"""

from __future__ import annotations

import _socket as _c_socket
import errno
import socket as _socket

from mptcpkit.abi.constants import IPPROTO_MPTCP, IPPROTO_TCP
from mptcpkit.downgrade import become_plain_tcp, downgrade_before_connect, retry_after_downgrade
from mptcpkit.errors import MPTCPUnavailableError
from mptcpkit.options import refused_before_connect
from mptcpkit.policy import (
    ENV_DATA,
    ENV_KEY,
    Policy,
    PolicyLike,
    as_policy,
    env_policy,
    env_setting,
    resolve,
)
from mptcpkit.status import protocol, record_note, status
from mptcpkit.support import describe_creation_error

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Any


_GLOBAL_DEFAULT_TIMEOUT: Any = _socket._GLOBAL_DEFAULT_TIMEOUT  # type: ignore[attr-defined]
_AF_INET, _AF_INET6, _SOCK_STREAM = _socket.AF_INET, _socket.AF_INET6, _socket.SOCK_STREAM
_inet_pton = _socket.inet_pton  # module globals: the connect path looks these up every time
_INET = (_AF_INET, _AF_INET6)
_STREAM_PROTOCOLS = (0, IPPROTO_TCP)
_PREFER = Policy.PREFER
_FAMILY = _c_socket.socket.family  # the C member: an int, without the enum conversion
_ENV_DATA, _ENV_KEY = ENV_DATA, ENV_KEY


class Socket(_socket.socket):
    """A `socket.socket` that remembers its MPTCP policy.

    `setsockopt()` turns the socket into plain TCP, in place, when an option MPTCP
    rejects (TCP_MD5SIG, TCP_REPAIR, ...) is set while that is still possible; see
    `mptcpkit.downgrade`. `accept()` returns `Socket`s too.
    """

    __slots__ = ("mptcp_policy",)
    mptcp_policy: Policy

    def setsockopt(self, level: int, optname: int, *args: Any) -> None:
        # An option this kernel's MPTCP refuses before connect goes straight to the
        # downgrade on an unconnected socket, saving the refused call (once probed).
        if (level, optname) in refused_before_connect(
            _FAMILY.__get__(self)
        ) and downgrade_before_connect(
            self, level, optname, args, getattr(self, "mptcp_policy", Policy.PREFER)
        ):
            return
        try:
            super().setsockopt(level, optname, *args)
        except OSError as exc:
            policy = getattr(self, "mptcp_policy", Policy.PREFER)
            retry_after_downgrade(self, exc, level, optname, args, policy)

    def dup(self) -> Socket:
        sock = super().dup()
        sock.mptcp_policy = getattr(self, "mptcp_policy", Policy.PREFER)
        return sock

    def accept(self) -> tuple[Socket, Any]:
        fd, addr = self._accept()  # type: ignore[attr-defined]
        sock = _make(
            self.family, self.type, self.proto, fd, getattr(self, "mptcp_policy", Policy.PREFER)
        )
        if _socket.getdefaulttimeout() is None and self.gettimeout():
            sock.setblocking(True)
        return sock, addr


def _peer_refused_mptcp(sock: Socket, address: Any) -> MPTCPUnavailableError:
    peer = f"{address[0]} port {address[1]}" if isinstance(address, tuple) else repr(address)
    return MPTCPUnavailableError(
        errno.EPROTONOSUPPORT,
        f"the peer {peer} did not agree to MPTCP (the connection fell back to TCP), and "
        "mptcp='require' forbids plain TCP; use mptcp='prefer' to accept it",
    )


class RequireSocket(Socket):
    """What mptcp="require" makes: MPTCP on the wire, so a blocking `connect()` to a
    peer that answers in plain TCP raises MPTCPUnavailableError (the caller closes the
    socket, as after any failed connect). After a non-blocking connect, check
    `status()` once connected."""

    __slots__ = ()

    def connect(self, address: Any) -> None:
        super().connect(address)
        if not status(self).is_mptcp:
            raise _peer_refused_mptcp(self, address)

    def connect_ex(self, address: Any) -> int:
        err = super().connect_ex(address)
        if err == 0 and not status(self).is_mptcp:
            return errno.EPROTONOSUPPORT
        return err


class RoleSocket(Socket):
    """What `socket()` makes while $MPTCPKIT gives MPTCP to one role only (`listen` or
    `dial`): MPTCP until it takes a role, then, at `connect()` or `listen()`, plain TCP
    (in place, still fresh) if that role is not MPTCP's. `create_connection()` and
    `create_server()` know their role and never make one."""

    __slots__ = ("plain_role",)
    plain_role: str | None  # "listen" or "dial": the role that gets plain TCP

    def _take_role(self, role: str) -> None:
        plain_role = getattr(self, "plain_role", None)
        if plain_role is None:
            return
        self.plain_role = None
        if role == plain_role and protocol(self) == IPPROTO_MPTCP:
            become_plain_tcp(
                self, f"MPTCPKIT={env_setting()}", f"MPTCP only for sockets that {plain_role}"
            )
            self.mptcp_policy = Policy.OFF

    def connect(self, address: Any) -> None:
        self._take_role("dial")
        super().connect(address)

    def connect_ex(self, address: Any) -> int:
        self._take_role("dial")
        return super().connect_ex(address)

    def listen(self, *backlog: int) -> None:
        self._take_role("listen")
        super().listen(*backlog)


def _make(family: int, type: int, proto: int, fileno: int | None, policy: Policy) -> Socket:
    sock = Socket(family, type, proto, fileno)
    sock.mptcp_policy = policy
    return sock


def is_tcp_request(family: int, type: int, proto: int) -> bool:
    """Is this a socket() call that MPTCP can stand in for?"""
    return family in _INET and (type & 0xF) == _socket.SOCK_STREAM and proto in _STREAM_PROTOCOLS


def open_stream(family: int, type: int, policy: Policy, cls: type[Socket] = Socket) -> Socket:
    """A stream socket of `family` made by `policy`: the one place policies act."""
    if policy is Policy.OFF:
        return _make(family, type, IPPROTO_TCP, None, policy)
    try:
        # _make() inlined: every connect runs this
        sock = (RequireSocket if policy is Policy.REQUIRE else cls)(family, type, IPPROTO_MPTCP)
    except OSError as exc:
        err = exc.errno or 0
        if policy is Policy.REQUIRE:
            raise MPTCPUnavailableError(
                err, describe_creation_error(err) + "; use mptcp='prefer' to fall back to TCP"
            ) from exc
        sock = _make(family, type, IPPROTO_TCP, None, policy)
        record_note(sock, describe_creation_error(err))
        return sock
    sock.mptcp_policy = policy
    return sock


def _not_mptcp(family: int, type: int, proto: int, what: str) -> ValueError:
    kind = "stream" if (type & 0xF) == _SOCK_STREAM else f"type {type & 0xF}"
    names = {int(_AF_INET): "AF_INET", int(_AF_INET6): "AF_INET6", int(_socket.AF_UNIX): "AF_UNIX"}
    fam = names.get(family, f"family {family}")
    return ValueError(
        f"{what}, but MPTCP exists only for AF_INET/AF_INET6 stream sockets and this is "
        f"a {fam} {kind} socket (proto {proto}); drop mptcp='require' for it"
    )


def socket(
    family: int = -1,
    type: int = -1,
    proto: int = -1,
    fileno: int | None = None,
    *,
    mptcp: PolicyLike = None,
) -> Socket:
    """Like `socket.socket()`, but TCP requests become MPTCP by policy.

    `proto=IPPROTO_MPTCP` asks for MPTCP explicitly and means mptcp="require" unless
    `mptcp=` says otherwise. Non-TCP sockets are made as asked; mptcp="require" for
    one is a ValueError. With `fileno`, family, type and proto left out are read from
    the descriptor, as the stdlib does.
    """
    if fileno is not None:
        return _make(family, type, proto, fileno, resolve(mptcp, "socket"))
    if family == -1:
        family = _AF_INET
    if type == -1:
        type = _SOCK_STREAM
    if proto == -1:
        proto = 0
    if proto == IPPROTO_MPTCP:
        if family not in _INET or (type & 0xF) != _SOCK_STREAM:
            raise _not_mptcp(family, type, proto, "proto=IPPROTO_MPTCP asks for MPTCP")
        return open_stream(
            family, type, resolve(mptcp if mptcp is not None else "require", "socket")
        )
    if not is_tcp_request(family, type, proto):
        if mptcp is not None and as_policy(mptcp) is Policy.REQUIRE:
            raise _not_mptcp(family, type, proto, "mptcp='require' asks for MPTCP")
        return _make(family, type, proto, None, Policy.OFF)
    if mptcp is None and _ENV_KEY in _ENV_DATA:
        listen, dial = env_policy("listen"), env_policy("dial")
        if listen is not dial:  # MPTCP for one role only: decided when it takes one
            sock = open_stream(family, type, Policy.PREFER, RoleSocket)
            sock.plain_role = "listen" if listen is Policy.OFF else "dial"  # type: ignore[attr-defined]
            return sock
    return open_stream(family, type, resolve(mptcp, "socket"))


def _numeric(host: str, port: int) -> list[tuple[int, tuple[Any, ...]]] | None:
    """getaddrinfo's answer for an IP literal, without calling it."""
    for family in _INET:
        try:
            _socket.inet_pton(family, host)
        except OSError:
            continue
        return [(family, (host, port) if family == _socket.AF_INET else (host, port, 0, 0))]
    return None


def resolve_stream(
    host: str | None, port: int | str | None, family: int = 0, flags: int = 0
) -> list[tuple[int, tuple[Any, ...]]]:
    """(family, sockaddr) pairs for a TCP endpoint; IP literals skip getaddrinfo."""
    if host and isinstance(port, int) and not flags:
        found = _numeric(host, port)
        if found is not None and (not family or found[0][0] == family):
            return found
    infos = _socket.getaddrinfo(host, port, family, _socket.SOCK_STREAM, 0, flags)
    return [(info[0], info[4]) for info in infos]


def _dial(
    family: int,
    sockaddr: tuple[Any, ...],
    policy: Policy,
    timeout: float | None,
    source_address: tuple[str, int] | None,
) -> Socket:
    """One connect attempt; the socket is closed if it fails. Under mptcp="require"
    a connection the peer did not take as MPTCP (fallback) is a failure too."""
    sock = open_stream(family, _SOCK_STREAM, policy)
    try:
        if timeout is not _GLOBAL_DEFAULT_TIMEOUT:
            sock.settimeout(timeout)
        if source_address:
            sock.bind(source_address)
        sock.connect(sockaddr)  # a RequireSocket's raises if the peer did not take MPTCP
    except BaseException:
        sock.close()
        raise
    return sock


def create_connection(
    address: tuple[str, int],
    timeout: float | None = _GLOBAL_DEFAULT_TIMEOUT,
    source_address: tuple[str, int] | None = None,
    *,
    all_errors: bool = False,
    mptcp: PolicyLike = None,
    family: int = 0,
) -> Socket:
    """Like `socket.create_connection()`, over MPTCP by policy ("dial" role)."""
    host, port = address
    if (
        mptcp is None
        and timeout is _GLOBAL_DEFAULT_TIMEOUT
        and source_address is None
        and not family
        and port.__class__ is int
        and host.__class__ is str
        and _ENV_KEY not in _ENV_DATA
    ):
        # The common case, kept to the fewest steps: each one runs with the CPU's caches
        # cold after the connect syscall, and costs ~1 us there (measured; see core_bench).
        try:
            _inet_pton(_AF_INET, host)
            sock = Socket(_AF_INET, _SOCK_STREAM, IPPROTO_MPTCP)
        except OSError:
            pass  # not an IPv4 literal, or no MPTCP socket: the general path decides
        else:
            sock.mptcp_policy = _PREFER
            try:
                sock.connect((host, port))
            except BaseException:
                sock.close()
                raise
            return sock
    return _connect_any(host, port, timeout, source_address, all_errors, mptcp, family)


def _connect_any(
    host: str,
    port: int,
    timeout: float | None,
    source_address: tuple[str, int] | None,
    all_errors: bool,
    mptcp: PolicyLike,
    family: int,
) -> Socket:
    """create_connection() for every case: any policy, name lookup, each address tried."""
    policy = resolve(mptcp, "dial")
    errors: list[OSError] = []
    for af, sockaddr in resolve_stream(host, port, family):
        try:
            return _dial(af, sockaddr, policy, timeout, source_address)
        except MPTCPUnavailableError:
            raise
        except OSError as exc:
            if not all_errors:
                errors.clear()
            errors.append(exc)
    if not errors:
        raise OSError(f"getaddrinfo returned no addresses for {host!r}")
    if all_errors:
        raise ExceptionGroup("create_connection failed", errors)
    try:
        raise errors[0]
    finally:
        errors.clear()


def create_server(
    address: tuple[str, int] | tuple[str, int, int, int],
    *,
    family: int = _socket.AF_INET,
    backlog: int | None = None,
    reuse_port: bool = False,
    dualstack_ipv6: bool = False,
    mptcp: PolicyLike = None,
) -> Socket:
    """Like `socket.create_server()`, over MPTCP by policy ("listen" role)."""
    if reuse_port and not hasattr(_socket, "SO_REUSEPORT"):
        raise ValueError("SO_REUSEPORT not supported on this platform")
    if dualstack_ipv6:
        if not _socket.has_dualstack_ipv6():
            raise ValueError("dualstack_ipv6 not supported on this platform")
        if family != _socket.AF_INET6:
            raise ValueError("dualstack_ipv6 requires AF_INET6 family")
    if family in _INET:
        sock = open_stream(family, _socket.SOCK_STREAM, resolve(mptcp, "listen"))
    elif mptcp is not None and as_policy(mptcp) is Policy.REQUIRE:
        raise _not_mptcp(family, _SOCK_STREAM, 0, "mptcp='require' asks for MPTCP")
    else:  # AF_UNIX and the like: what the stdlib makes
        sock = _make(family, _socket.SOCK_STREAM, 0, None, Policy.OFF)
    try:
        try:  # noqa: SIM105 - importing contextlib would cost every import mptcpkit
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        except OSError:
            pass  # as the stdlib: bind() will say what is wrong
        if reuse_port:
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEPORT, 1)
        if family == _socket.AF_INET6:
            sock.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 0 if dualstack_ipv6 else 1)
        try:
            sock.bind(address)
        except OSError as err:
            raise OSError(
                err.errno, f"{err.strerror} (while attempting to bind on address {address!r})"
            ) from None
        if backlog is None:
            sock.listen()
        else:
            sock.listen(backlog)
        return sock
    except BaseException:
        sock.close()
        raise


__all__ = [
    "RequireSocket",
    "RoleSocket",
    "Socket",
    "create_connection",
    "create_server",
    "open_stream",
    "socket",
]
