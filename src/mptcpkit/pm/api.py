"""Endpoints, limits and the userspace PM's commands, for one network namespace.

`PathManager(netns=...)` holds one netlink socket opened inside that namespace;
the module-level functions in `mptcpkit.pm` open one per call. Arguments are
checked (addresses parsed, interfaces resolved, ranges) before anything is sent,
so a bad call changes nothing.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import threading
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar

from mptcpkit.pm import codec
from mptcpkit.pm import netns as _netns
from mptcpkit.pm.codec import Cmd, Endpoint, EndpointFlag, Limits
from mptcpkit.pm.transport import GenlSocket, PMError

FlagsArg = EndpointFlag | int | Iterable[str] | str | None
Address = tuple[str, int]

P = ParamSpec("P")
R = TypeVar("R")


class UnknownInterface(PMError):
    """`dev IFNAME` names no interface in the target namespace."""


class UserspacePMUnavailable(PMError):
    """The kernel cannot run a userspace path manager here."""


def to_flags(flags: FlagsArg) -> EndpointFlag:
    if flags is None:
        return EndpointFlag(0)
    if isinstance(flags, str):
        return codec.flags_from_names(flags.replace(",", " ").split())
    if isinstance(flags, int):
        return EndpointFlag(flags)
    return codec.flags_from_names(flags)


def userspace_pm_problem(pm_type: str | None, available: str | None) -> str | None:
    """Why the userspace PM can't be used, from the two sysctls; None if it can.

    `net.mptcp.pm_type` appeared with the userspace PM (5.19); 6.15 added
    `available_path_managers`, which lists "userspace" when it is built in.
    """
    if pm_type is None:
        return (
            "this kernel has no userspace MPTCP path manager "
            "(net.mptcp.pm_type is missing; needs Linux 5.19+)"
        )
    if available is not None and "userspace" not in available.split():
        return (
            "the userspace MPTCP path manager is not available "
            f"(net.mptcp.available_path_managers: {available})"
        )
    return None


class PathManager:
    """The `mptcp_pm` family of one namespace (None: this thread's)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._sock = GenlSocket(codec.GENL_NAME, codec.pm_msg, netns=netns)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> PathManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(
        self, cmd: Cmd, attrs: Iterable[tuple[str, Any]] = (), *, dump: bool = False, what: str
    ) -> list[dict[str, Any]]:
        msg = codec.request(cmd, attrs)
        with self._lock:
            replies = self._sock.request(msg, dump=dump, what=what)
        return [codec.attrs_of(r) for r in replies]

    def ifindex(self, dev: str) -> int:
        try:
            return _netns.if_nametoindex(self.netns, dev)
        except OSError:
            where = f" in network namespace {self.netns!r}" if self.netns else ""
            raise UnknownInterface(errno.ENODEV, f"unknown interface {dev!r}{where}") from None

    def _named(self, ep: Endpoint) -> Endpoint:
        if ep.ifindex:
            name = _netns.if_indextoname(self.netns, ep.ifindex)
            if name:
                return Endpoint(ep.id, ep.address, ep.port, ep.flags, ep.ifindex, name)
        return ep

    # -- endpoints (in-kernel PM)

    def endpoints(self) -> list[Endpoint]:
        """All endpoints, sorted by id (`ip mptcp endpoint show`)."""
        eps = [
            codec.decode_endpoint(r["addr"])
            for r in self._call(Cmd.GET_ADDR, dump=True, what="endpoint show")
            if "addr" in r
        ]
        return sorted(self._named(ep) for ep in eps)

    def endpoint(self, id: int, *, what: str | None = None) -> Endpoint:
        """The endpoint with `id`; PMError if there is none (`what`: the error's words)."""
        replies = self._call(
            Cmd.GET_ADDR,
            [("MPTCP_PM_ATTR_ADDR", codec.address_attrs(id=id))],
            what=what or f"endpoint show id {id}",
        )
        for r in replies:
            if "addr" in r:
                return self._named(codec.decode_endpoint(r["addr"]))
        raise PMError(errno.ENOENT, f"no endpoint with id {id}")

    def add_endpoint(
        self,
        address: str,
        *,
        id: int | None = None,
        port: int | None = None,
        flags: FlagsArg = None,
        dev: str | None = None,
    ) -> Endpoint:
        """Add an endpoint (`ip mptcp endpoint add`); returns it as the kernel stored it."""
        ifindex = self.ifindex(dev) if dev else None
        fl = to_flags(flags)
        addr = codec.address_attrs(address, id=id, port=port, flags=int(fl), ifindex=ifindex)
        before = {ep.id for ep in self.endpoints()} if id is None else set()
        what = f"endpoint add {address}"
        self._call(Cmd.ADD_ADDR, [("MPTCP_PM_ATTR_ADDR", addr)], what=what)
        if id is not None:
            return self.endpoint(id)
        ip = codec.format_ip(address)
        for ep in self.endpoints():
            if ep.id not in before and ep.address == ip:
                return ep
        raise PMError(errno.EIO, f"{what}: the kernel accepted it but does not list it")

    def delete_endpoint(self, id: int | None = None, *, address: str | None = None) -> None:
        """Delete by id (`endpoint del id ID`) or by address (id 0 is the initial subflow's)."""
        if id is None and address is None:
            raise ValueError("delete_endpoint needs an id or an address")
        if id is None:
            ip = codec.format_ip(codec.parse_ip(address or "").packed)
            matches = [ep for ep in self.endpoints() if ep.address == ip]
            if not matches:
                raise PMError(errno.ENOENT, f"endpoint del: no endpoint with address {ip}")
            id = matches[0].id
        what = f"endpoint del id {id}" + (f" {address}" if address else "")
        self._call(
            Cmd.DEL_ADDR, [("MPTCP_PM_ATTR_ADDR", codec.address_attrs(address, id=id))], what=what
        )

    def flush_endpoints(self) -> None:
        self._call(
            Cmd.FLUSH_ADDRS, [("MPTCP_PM_ATTR_ADDR", codec.address_attrs())], what="endpoint flush"
        )

    def set_endpoint_flags(self, id: int, flags: FlagsArg) -> Endpoint:
        """Set backup/fullmesh of endpoint `id` to exactly `flags` (`endpoint change`).

        Only backup and fullmesh can change. `flags` may repeat the endpoint's other
        flags (`"subflow backup"` for a subflow endpoint); a flag it does not have
        besides backup/fullmesh is refused (ValueError), as nothing could add it.
        """
        fl = to_flags(flags)
        current = self.endpoint(id, what=f"endpoint change id {id}")
        extra = fl & ~codec.CHANGEABLE & ~current.flags
        if extra:
            bad = " ".join(codec.flag_names(extra))
            raise ValueError(
                f"endpoint id {id} is not {bad}, and only backup and fullmesh can be changed"
            )
        fl = codec.EndpointFlag(fl & codec.CHANGEABLE)
        addr = codec.address_attrs(current.address, id=id, flags=int(fl))
        self._call(Cmd.SET_FLAGS, [("MPTCP_PM_ATTR_ADDR", addr)], what=f"endpoint change id {id}")
        return self.endpoint(id)

    # -- limits

    def limits(self) -> Limits:
        (reply,) = self._call(Cmd.GET_LIMITS, what="limits show")
        return codec.decode_limits(reply)

    def set_limits(
        self, *, subflows: int | None = None, add_addr_accepted: int | None = None
    ) -> Limits:
        """Set either or both limits (the other keeps its value); returns the new ones."""
        attrs: list[tuple[str, Any]] = []
        for name, value, key in (
            ("subflows", subflows, "MPTCP_PM_ATTR_SUBFLOWS"),
            ("add_addr_accepted", add_addr_accepted, "MPTCP_PM_ATTR_RCV_ADD_ADDRS"),
        ):
            if value is None:
                continue
            if not 0 <= value <= 8:
                raise ValueError(
                    f"{name} {value} out of range 0..8 (the kernel's MPTCP_PM_ADDR_MAX)"
                )
            attrs.append((key, value))
        if not attrs:
            return self.limits()
        self._call(Cmd.SET_LIMITS, attrs, what="limits set")
        return self.limits()

    # -- userspace PM (net.mptcp.pm_type=1), per connection token

    def check_userspace(self) -> None:
        """Raise UserspacePMUnavailable unless this kernel has the userspace PM."""
        problem = userspace_pm_problem(
            _netns.read_sysctl(self.netns, "net.mptcp.pm_type"),
            _netns.read_sysctl(self.netns, "net.mptcp.available_path_managers"),
        )
        if problem:
            raise UserspacePMUnavailable(errno.EOPNOTSUPP, problem)

    def announce(
        self, token: int, address: str, *, id: int, port: int | None = None, dev: str | None = None
    ) -> None:
        """Send ADD_ADDR for `address` (local id `id`) on connection `token`."""
        ifindex = self.ifindex(dev) if dev else None
        addr = codec.address_attrs(
            address, id=id, port=port, ifindex=ifindex, flags=int(EndpointFlag.SIGNAL)
        )
        self._userspace(
            Cmd.ANNOUNCE,
            [("MPTCP_PM_ATTR_ADDR", addr), ("MPTCP_PM_ATTR_TOKEN", token)],
            f"announce {address} id {id} token {token:08x}",
        )

    def remove(self, token: int, id: int) -> None:
        """Send RM_ADDR for local address id `id` on connection `token`."""
        self._userspace(
            Cmd.REMOVE,
            [("MPTCP_PM_ATTR_TOKEN", token), ("MPTCP_PM_ATTR_LOC_ID", id)],
            f"remove id {id} token {token:08x}",
        )

    def create_subflow(
        self,
        token: int,
        local: str,
        remote: Address,
        *,
        id: int | None = None,
        dev: str | None = None,
        backup: bool = False,
    ) -> None:
        """Open a subflow from `local` to `remote` (host, port) on connection `token`."""
        ifindex = self.ifindex(dev) if dev else None
        loc = codec.address_attrs(
            local, id=id, ifindex=ifindex, flags=int(EndpointFlag.BACKUP) if backup else None
        )
        rem = codec.address_attrs(remote[0], port=remote[1])
        self._userspace(
            Cmd.SUBFLOW_CREATE,
            [
                ("MPTCP_PM_ATTR_TOKEN", token),
                ("MPTCP_PM_ATTR_ADDR", loc),
                ("MPTCP_PM_ATTR_ADDR_REMOTE", rem),
            ],
            f"subflow create {local} -> {remote[0]}:{remote[1]} token {token:08x}",
        )

    def destroy_subflow(self, token: int, local: Address, remote: Address) -> None:
        """Close the subflow `local` (host, port) -> `remote` (host, port)."""
        loc = codec.address_attrs(local[0], port=local[1])
        rem = codec.address_attrs(remote[0], port=remote[1])
        self._userspace(
            Cmd.SUBFLOW_DESTROY,
            [
                ("MPTCP_PM_ATTR_TOKEN", token),
                ("MPTCP_PM_ATTR_ADDR", loc),
                ("MPTCP_PM_ATTR_ADDR_REMOTE", rem),
            ],
            f"subflow destroy {local[0]}:{local[1]} -> {remote[0]}:{remote[1]} token {token:08x}",
        )

    def set_subflow_backup(self, token: int, local: Address, remote: Address, backup: bool) -> None:
        """Change a subflow's backup bit (MP_PRIO) on a userspace-PM connection."""
        loc = codec.address_attrs(
            local[0], port=local[1], flags=int(EndpointFlag.BACKUP) if backup else 0
        )
        rem = codec.address_attrs(remote[0], port=remote[1])
        self._userspace(
            Cmd.SET_FLAGS,
            [
                ("MPTCP_PM_ATTR_TOKEN", token),
                ("MPTCP_PM_ATTR_ADDR", loc),
                ("MPTCP_PM_ATTR_ADDR_REMOTE", rem),
            ],
            f"set backup={int(backup)} token {token:08x}",
        )

    def _userspace(self, cmd: Cmd, attrs: list[tuple[str, Any]], what: str) -> None:
        try:
            self._call(cmd, attrs, what=what)
        except PMError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self.check_userspace()
            raise


class AsyncPathManager:
    """`PathManager` for asyncio: each call runs in the default executor, one at a time."""

    def __init__(self, netns: str | None = None) -> None:
        self._pm = PathManager(netns)
        self.netns = netns

    async def __aenter__(self) -> AsyncPathManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pm.close()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._pm, name)
        if not callable(method) or name.startswith("_"):
            raise AttributeError(name)

        @functools.wraps(method)
        async def call(*args: Any, **kwargs: Any) -> Any:
            return await asyncio.to_thread(method, *args, **kwargs)

        return call


def _once(name: str) -> Callable[..., Any]:
    def call(*args: Any, netns: str | None = None, **kwargs: Any) -> Any:
        with PathManager(netns) as pm:
            return getattr(pm, name)(*args, **kwargs)

    call.__name__ = name
    call.__doc__ = f"`PathManager(netns).{name}(...)` with a socket opened for this call."
    return call


endpoints = _once("endpoints")
add_endpoint = _once("add_endpoint")
delete_endpoint = _once("delete_endpoint")
flush_endpoints = _once("flush_endpoints")
set_endpoint_flags = _once("set_endpoint_flags")
limits = _once("limits")
set_limits = _once("set_limits")
announce = _once("announce")
remove = _once("remove")
create_subflow = _once("create_subflow")
destroy_subflow = _once("destroy_subflow")
