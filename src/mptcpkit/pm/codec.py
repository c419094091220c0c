"""The `mptcp_pm` generic-netlink messages, free of I/O.

Attribute numbers and types follow the kernel's
`Documentation/netlink/specs/mptcp_pm.yaml` (checked on Linux 6.18). pyroute2's own
`mptcp_msg` knows only endpoints and limits (and reads the interface index as
"hex"); these classes add the userspace-PM attributes and the events. Requests are
built as pyroute2 `genlmsg` objects; replies and events are turned into frozen
dataclasses by plain functions taking attribute dicts, so they can be tested
without a kernel.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from typing import Any

from pyroute2.netlink import genlmsg, nla

GENL_NAME = "mptcp_pm"
GENL_VERSION = 1
EVENTS_GROUP = "mptcp_pm_events"
CMDS_GROUP = "mptcp_pm_cmds"


class Cmd(enum.IntEnum):
    ADD_ADDR = 1
    DEL_ADDR = 2
    GET_ADDR = 3
    FLUSH_ADDRS = 4
    SET_LIMITS = 5
    GET_LIMITS = 6
    SET_FLAGS = 7
    ANNOUNCE = 8
    REMOVE = 9
    SUBFLOW_CREATE = 10
    SUBFLOW_DESTROY = 11


class EventType(enum.IntEnum):
    """`enum mptcp_event_type`; `str()` gives the name `ip mptcp monitor` prints."""

    CREATED = 1
    ESTABLISHED = 2
    CLOSED = 3
    ANNOUNCED = 6
    REMOVED = 7
    SUB_ESTABLISHED = 10
    SUB_CLOSED = 11
    SUB_PRIORITY = 13
    LISTENER_CREATED = 15
    LISTENER_CLOSED = 16

    def __str__(self) -> str:
        return self.name


class EndpointFlag(enum.IntFlag):
    """MPTCP_PM_ADDR_FLAG_*: what the in-kernel PM does with an endpoint."""

    SIGNAL = 1 << 0
    SUBFLOW = 1 << 1
    BACKUP = 1 << 2
    FULLMESH = 1 << 3
    IMPLICIT = 1 << 4
    LAMINAR = 1 << 5


# Event FLAGS attribute bits (MPTCP_PM_EV_FLAG_*).
EV_FLAG_DENY_JOIN_ID0 = 1 << 0
EV_FLAG_SERVER_SIDE = 1 << 1

NO_FLAGS = EndpointFlag(0)
FLAG_NAMES: dict[str, EndpointFlag] = {f.name.lower(): f for f in EndpointFlag if f.name}
# Flags `endpoint change` may toggle (the kernel only lets backup/fullmesh change).
CHANGEABLE = EndpointFlag.BACKUP | EndpointFlag.FULLMESH


def flags_from_names(names: Iterable[str]) -> EndpointFlag:
    flags = EndpointFlag(0)
    for name in names:
        try:
            flags |= FLAG_NAMES[name.lower()]
        except KeyError:
            known = ", ".join(FLAG_NAMES)
            raise ValueError(f"unknown endpoint flag {name!r} (known: {known})") from None
    return flags


def flag_names(flags: int) -> list[str]:
    """Names of the known bits, in `ip mptcp`'s order (see `raw_flags` for the rest)."""
    return [f.name.lower() for f in EndpointFlag if f.name and flags & f]


def raw_flags(flags: int) -> int:
    """Bits no name is known for; ip prints them as `rawflags %02x`."""
    return int(flags) & ~sum(EndpointFlag)


def format_ip(address: str | bytes) -> str:
    """An address as ip (inet_ntop) prints it: v4-mapped IPv6 as `::ffff:10.9.0.1`,
    where Python 3.11's ipaddress writes `::ffff:a09:1`."""
    packed = address if isinstance(address, bytes) else ipaddress.ip_address(address).packed
    family = socket.AF_INET if len(packed) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, packed)


# ---------------------------------------------------------------- message classes


class _pm_addr(nla):  # type: ignore[misc]
    """Nested `address` attribute set (endpoints, local and remote addresses)."""

    prefix = "MPTCP_PM_ADDR_ATTR_"
    nla_map = (
        ("MPTCP_PM_ADDR_ATTR_UNSPEC", "none"),
        ("MPTCP_PM_ADDR_ATTR_FAMILY", "uint16"),
        ("MPTCP_PM_ADDR_ATTR_ID", "uint8"),
        ("MPTCP_PM_ADDR_ATTR_ADDR4", "ip4addr"),
        ("MPTCP_PM_ADDR_ATTR_ADDR6", "ip6addr"),
        # The spec says big-endian, but the kernel reads and writes it with
        # nla_get_u16/htons: host order on the wire (checked on 6.18).
        ("MPTCP_PM_ADDR_ATTR_PORT", "uint16"),
        ("MPTCP_PM_ADDR_ATTR_FLAGS", "uint32"),
        ("MPTCP_PM_ADDR_ATTR_IF_IDX", "int32"),
    )


class pm_msg(genlmsg):  # type: ignore[misc]
    """Commands (`attr` set) and their replies."""

    prefix = "MPTCP_PM_ATTR_"
    nla_map = (
        ("MPTCP_PM_ATTR_UNSPEC", "none"),
        ("MPTCP_PM_ATTR_ADDR", "pm_addr"),
        ("MPTCP_PM_ATTR_RCV_ADD_ADDRS", "uint32"),
        ("MPTCP_PM_ATTR_SUBFLOWS", "uint32"),
        ("MPTCP_PM_ATTR_TOKEN", "uint32"),
        ("MPTCP_PM_ATTR_LOC_ID", "uint8"),
        ("MPTCP_PM_ATTR_ADDR_REMOTE", "pm_addr"),
    )
    pm_addr = _pm_addr


class event_msg(genlmsg):  # type: ignore[misc]
    """Multicast events (`event-attr` set), sent on the `mptcp_pm_events` group."""

    prefix = "MPTCP_ATTR_"
    nla_map = (
        ("MPTCP_ATTR_UNSPEC", "none"),
        ("MPTCP_ATTR_TOKEN", "uint32"),
        ("MPTCP_ATTR_FAMILY", "uint16"),
        ("MPTCP_ATTR_LOC_ID", "uint8"),
        ("MPTCP_ATTR_REM_ID", "uint8"),
        ("MPTCP_ATTR_SADDR4", "ip4addr"),
        ("MPTCP_ATTR_SADDR6", "ip6addr"),
        ("MPTCP_ATTR_DADDR4", "ip4addr"),
        ("MPTCP_ATTR_DADDR6", "ip6addr"),
        ("MPTCP_ATTR_SPORT", "be16"),
        ("MPTCP_ATTR_DPORT", "be16"),
        ("MPTCP_ATTR_BACKUP", "uint8"),
        ("MPTCP_ATTR_ERROR", "uint8"),
        ("MPTCP_ATTR_FLAGS", "uint16"),
        ("MPTCP_ATTR_TIMEOUT", "uint32"),
        ("MPTCP_ATTR_IF_IDX", "int32"),
        ("MPTCP_ATTR_RESET_REASON", "uint32"),
        ("MPTCP_ATTR_RESET_FLAGS", "uint32"),
        ("MPTCP_ATTR_SERVER_SIDE", "uint8"),
    )


def attrs_of(msg: Any) -> dict[str, Any]:
    """Decoded nla list -> {short lower-case name: value}; nested sets become dicts."""
    out: dict[str, Any] = {}
    for name, value in msg.get("attrs", []):
        short = name
        for prefix in ("MPTCP_PM_ADDR_ATTR_", "MPTCP_PM_ATTR_", "MPTCP_ATTR_"):
            if short.startswith(prefix):
                short = short[len(prefix) :]
                break
        if hasattr(value, "get") and "attrs" in value:
            value = attrs_of(value)
        out[short.lower()] = value
    return out


# ---------------------------------------------------------------- records


def _family_name(family: int) -> str:
    names = {int(socket.AF_INET): "inet", int(socket.AF_INET6): "inet6"}
    return names.get(family, str(family))


@dataclasses.dataclass(frozen=True, order=True)
class Endpoint:
    """One in-kernel PM endpoint, as `ip mptcp endpoint show` lists it."""

    id: int
    address: str
    port: int = 0
    flags: EndpointFlag = NO_FLAGS
    ifindex: int = 0
    ifname: str | None = dataclasses.field(default=None, compare=False)

    @property
    def flag_names(self) -> list[str]:
        return flag_names(self.flags)

    @property
    def dev(self) -> str | None:
        """The interface's name; `ifN` when it has none (gone), as ip prints it."""
        if not self.ifindex:
            return None
        return self.ifname or f"if{self.ifindex}"

    def to_json(self) -> dict[str, Any]:
        """The object `ip -j mptcp endpoint show` prints (one `true` key per flag)."""
        out: dict[str, Any] = {"address": self.address}
        if self.port:
            out["port"] = self.port
        out["id"] = self.id
        for name in self.flag_names:
            out[name] = True
        if raw_flags(self.flags):
            out["rawflags"] = f"{raw_flags(self.flags):02x}"
        if self.dev:
            out["dev"] = self.dev
        return out

    def ip_line(self) -> str:
        """`ip mptcp endpoint show`'s line, byte for byte: every word is followed by a
        space, the last one too (`10.0.1.1 id 1 subflow dev eth1 `)."""
        return "".join(word + " " for word in self._words())

    def __str__(self) -> str:
        """`ip mptcp endpoint show`'s words: `10.0.1.1 id 1 subflow dev eth1`."""
        return " ".join(self._words())

    def _words(self) -> list[str]:
        parts = [self.address]
        if self.port:
            parts += ["port", str(self.port)]
        parts += ["id", str(self.id), *self.flag_names]
        if raw_flags(self.flags):
            parts += ["rawflags", f"{raw_flags(self.flags):02x}"]
        if self.dev:
            parts += ["dev", self.dev]
        return parts


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-namespace in-kernel PM limits (`ip mptcp limits`)."""

    subflows: int
    add_addr_accepted: int

    def to_json(self) -> dict[str, int]:
        return {"add_addr_accepted": self.add_addr_accepted, "subflows": self.subflows}

    def __str__(self) -> str:
        return f"add_addr_accepted {self.add_addr_accepted} subflows {self.subflows}"

    def ip_line(self) -> str:
        """`ip mptcp limits show`'s line, trailing space included."""
        return f"{self} "


def decode_endpoint(addr: Mapping[str, Any]) -> Endpoint:
    """An `address` attribute dict from GET_ADDR -> Endpoint."""
    raw = addr.get("addr4") or addr.get("addr6")
    # As ip prints it (pyroute2 and ipaddress each write v4-mapped IPv6 their own way).
    address = format_ip(raw) if raw else ""
    return Endpoint(
        id=int(addr.get("id", 0)),
        address=address,
        port=int(addr.get("port", 0)),
        flags=EndpointFlag(int(addr.get("flags", 0))),
        ifindex=int(addr.get("if_idx", 0)),
    )


def decode_limits(attrs: Mapping[str, Any]) -> Limits:
    return Limits(
        subflows=int(attrs.get("subflows", 0)),
        add_addr_accepted=int(attrs.get("rcv_add_addrs", 0)),
    )


@dataclasses.dataclass(frozen=True)
class Event:
    """One `mptcp_pm` event; fields the kernel did not send stay None.

    `type` says which event; connection-level events carry the token and the
    initial subflow's addresses, subflow events add the local/remote address ids,
    backup, the interface index and the socket error.
    """

    type: EventType
    token: int | None = None
    family: int | None = None
    saddr: str | None = None
    daddr: str | None = None
    sport: int | None = None
    dport: int | None = None
    loc_id: int | None = None
    rem_id: int | None = None
    backup: bool | None = None
    error: int | None = None
    flags: int | None = None
    timeout: int | None = None
    ifindex: int | None = None
    reset_reason: int | None = None
    reset_flags: int | None = None
    server_side: bool | None = None

    @property
    def name(self) -> str:
        return self.type.name

    @property
    def local(self) -> tuple[str, int] | None:
        return None if self.saddr is None else (self.saddr, self.sport or 0)

    @property
    def remote(self) -> tuple[str, int] | None:
        return None if self.daddr is None else (self.daddr, self.dport or 0)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type.name}
        for field in dataclasses.fields(self):
            if field.name == "type":
                continue
            value = getattr(self, field.name)
            if value is None:
                continue
            if field.name == "family":
                value = _family_name(value)
            elif field.name == "token":
                value = f"{value:08x}"  # as `ip mptcp monitor` and `pmd status` print it
            out[field.name] = value
        return out

    def __str__(self) -> str:
        """The line `ip mptcp monitor` (iproute2 6.4+) prints for this event."""
        parts = [f"[{IP_MONITOR_NAMES.get(self.type, self.type.name):>16}]"]
        if self.token is not None:
            parts.append(f"token={self.token:08x}")
        if self.rem_id is not None:
            parts.append(f"remid={self.rem_id}")
        if self.loc_id is not None:
            parts.append(f"locid={self.loc_id}")
        for key, value in (("saddr", self.saddr), ("daddr", self.daddr)):
            if value is not None and ":" not in value:
                parts.append(f"{key}4={value}")
        for key, value in (("saddr", self.saddr), ("daddr", self.daddr)):
            if value is not None and ":" in value:
                parts.append(f"{key}6={value}")
        for key, number in (("sport", self.sport), ("dport", self.dport)):
            if number is not None:
                parts.append(f"{key}={number}")
        if self.backup is not None:
            parts.append(f"backup={int(self.backup)}")
        if self.error is not None:
            parts.append(f"error={self.error}")
        if self.flags is not None:
            parts.append(f"flags={self.flags:x}")
        if self.timeout is not None:
            parts.append(f"timeout={self.timeout}")
        if self.ifindex is not None:
            parts.append(f"ifindex={self.ifindex}")
        if self.reset_reason is not None:
            parts.append(f"reset_reason={self.reset_reason}")
        if self.reset_flags is not None:
            parts.append(f"reset_flags={self.reset_flags:#x}")
        return " ".join(parts)


# iproute2's names for the subflow events (ip/ipmptcp.c, event_to_str).
IP_MONITOR_NAMES = {
    EventType.SUB_ESTABLISHED: "SF_ESTABLISHED",
    EventType.SUB_CLOSED: "SF_CLOSED",
    EventType.SUB_PRIORITY: "SF_PRIO",
}


def decode_event(cmd: int, attrs: Mapping[str, Any]) -> Event:
    """Event number + attribute dict (as `attrs_of` returns) -> Event.

    Raises ValueError for an event number this module does not know, so callers
    can skip (and log) events from a newer kernel instead of mislabelling them.
    """
    etype = EventType(cmd)

    def get_int(key: str) -> int | None:
        value = attrs.get(key)
        return None if value is None else int(value)

    saddr = attrs.get("saddr4") or attrs.get("saddr6")
    daddr = attrs.get("daddr4") or attrs.get("daddr6")
    flags = get_int("flags")
    server_side = attrs.get("server_side")
    if server_side is None and flags is not None and flags & EV_FLAG_SERVER_SIDE:
        server_side = 1
    backup = attrs.get("backup")
    return Event(
        type=etype,
        token=get_int("token"),
        family=get_int("family"),
        saddr=None if saddr is None else format_ip(saddr),
        daddr=None if daddr is None else format_ip(daddr),
        sport=get_int("sport"),
        dport=get_int("dport"),
        loc_id=get_int("loc_id"),
        rem_id=get_int("rem_id"),
        backup=None if backup is None else bool(backup),
        error=get_int("error"),
        flags=flags,
        timeout=get_int("timeout"),
        ifindex=get_int("if_idx"),
        reset_reason=get_int("reset_reason"),
        reset_flags=get_int("reset_flags"),
        server_side=None if server_side is None else bool(server_side),
    )


# ---------------------------------------------------------------- requests


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IPv4/IPv6 address, or ValueError saying what was wrong."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"invalid IP address {text!r}") from None


def address_attrs(
    address: str | None = None,
    *,
    id: int | None = None,
    port: int | None = None,
    flags: int | None = None,
    ifindex: int | None = None,
    family: int | None = None,
) -> dict[str, Any]:
    """Build a nested `address` attribute set; validates ranges before the kernel does."""
    attrs: list[tuple[str, Any]] = []
    if address is not None:
        ip = parse_ip(address)
        if ip.version == 4:
            attrs.append(("MPTCP_PM_ADDR_ATTR_FAMILY", socket.AF_INET))
            attrs.append(("MPTCP_PM_ADDR_ATTR_ADDR4", str(ip)))
        else:
            attrs.append(("MPTCP_PM_ADDR_ATTR_FAMILY", socket.AF_INET6))
            attrs.append(("MPTCP_PM_ADDR_ATTR_ADDR6", str(ip)))
    elif family is not None:
        attrs.append(("MPTCP_PM_ADDR_ATTR_FAMILY", family))
    if id is not None:
        if not 0 <= id <= 255:
            raise ValueError(f"endpoint id {id} out of range 0..255")
        attrs.append(("MPTCP_PM_ADDR_ATTR_ID", id))
    if port is not None and port != 0:
        if not 0 < port <= 65535:
            raise ValueError(f"port {port} out of range 1..65535")
        attrs.append(("MPTCP_PM_ADDR_ATTR_PORT", port))
    if flags is not None:
        attrs.append(("MPTCP_PM_ADDR_ATTR_FLAGS", int(flags)))
    if ifindex is not None and ifindex != 0:
        attrs.append(("MPTCP_PM_ADDR_ATTR_IF_IDX", ifindex))
    return {"attrs": attrs}


NLA_F_NESTED = 0x8000


def request(cmd: Cmd, attrs: Iterable[tuple[str, Any]] = ()) -> pm_msg:
    """A `pm_msg` for `cmd` with top-level attributes (nested sets get NLA_F_NESTED)."""
    msg = pm_msg()
    msg["cmd"] = int(cmd)
    msg["version"] = GENL_VERSION
    for name, value in attrs:
        if name in ("MPTCP_PM_ATTR_ADDR", "MPTCP_PM_ATTR_ADDR_REMOTE"):
            msg["attrs"].append((name, value, NLA_F_NESTED))
        else:
            msg["attrs"].append((name, value))
    return msg
