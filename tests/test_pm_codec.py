"""mptcp_pm codecs and ip-mptcp grammar: pure logic, property-tested."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.marshal import Marshal

from mptcpkit.pm import codec, grammar
from mptcpkit.pm.api import to_flags, userspace_pm_problem

FAMILY_ID = 0x1C

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
u8 = st.integers(0, 255)
u16 = st.integers(0, 65535)
u32 = st.integers(0, 2**32 - 1)


def wire_roundtrip(msg: object, msg_class: type) -> dict:
    """Encode like the kernel would send it, parse back with pyroute2's Marshal."""
    msg["header"]["type"] = FAMILY_ID  # type: ignore[index]
    msg.encode()  # type: ignore[attr-defined]
    marshal = Marshal()
    marshal.msg_map[FAMILY_ID] = msg_class
    (parsed,) = list(marshal.parse(msg.data))  # type: ignore[attr-defined]
    return {"cmd": parsed["cmd"], "attrs": codec.attrs_of(parsed)}


@st.composite
def event_fields(draw: st.DrawFn) -> tuple[codec.EventType, dict]:
    etype = draw(st.sampled_from(list(codec.EventType)))
    v6 = draw(st.booleans())
    addr = ipv6 if v6 else ipv4
    fields: dict = {}
    optional = {
        "token": u32,
        "loc_id": u8,
        "rem_id": u8,
        "saddr": addr,
        "daddr": addr,
        "sport": u16,
        "dport": u16,
        "backup": st.booleans(),
        "error": u8,
        "timeout": u32,
        "ifindex": st.integers(0, 2**31 - 1),
        "reset_reason": u32,
        "reset_flags": u32,
        "server_side": st.booleans(),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            fields[name] = draw(strategy)
    fields["family"] = socket.AF_INET6 if v6 else socket.AF_INET
    return etype, fields


ATTR = {
    "token": "MPTCP_ATTR_TOKEN",
    "family": "MPTCP_ATTR_FAMILY",
    "loc_id": "MPTCP_ATTR_LOC_ID",
    "rem_id": "MPTCP_ATTR_REM_ID",
    "sport": "MPTCP_ATTR_SPORT",
    "dport": "MPTCP_ATTR_DPORT",
    "backup": "MPTCP_ATTR_BACKUP",
    "error": "MPTCP_ATTR_ERROR",
    "timeout": "MPTCP_ATTR_TIMEOUT",
    "ifindex": "MPTCP_ATTR_IF_IDX",
    "reset_reason": "MPTCP_ATTR_RESET_REASON",
    "reset_flags": "MPTCP_ATTR_RESET_FLAGS",
    "server_side": "MPTCP_ATTR_SERVER_SIDE",
}


@given(event_fields())
def test_event_wire_roundtrip(case: tuple[codec.EventType, dict]) -> None:
    etype, fields = case
    msg = codec.event_msg()
    msg["cmd"] = int(etype)
    msg["version"] = 1
    for name, value in fields.items():
        if name in ("saddr", "daddr"):
            v = "6" if ":" in value else "4"
            msg["attrs"].append((f"MPTCP_ATTR_{name.upper()}{v}", value))
        else:
            msg["attrs"].append((ATTR[name], int(value)))
    parsed = wire_roundtrip(msg, codec.event_msg)
    event = codec.decode_event(parsed["cmd"], parsed["attrs"])
    assert event.type is etype
    for name, value in fields.items():
        got = getattr(event, name)
        if name in ("saddr", "daddr"):
            assert got == codec.format_ip(value)  # as ip monitor prints it (inet_ntop)
        else:
            assert got == value, name
    for name in set(ATTR) - set(fields) - {"family"}:
        assert getattr(event, name) is None, name
    # Every record renders both ways without losing the type.
    assert event.to_json()["type"] == etype.name
    line = str(event)
    assert line.startswith(f"[{codec.IP_MONITOR_NAMES.get(etype, etype.name):>16}]")
    if "token" in fields:
        assert f"token={fields['token']:08x}" in line


def test_event_known_numbers() -> None:
    # include/uapi/linux/mptcp_pm.h, enum mptcp_event_type
    assert {e.name: e.value for e in codec.EventType} == {
        "CREATED": 1,
        "ESTABLISHED": 2,
        "CLOSED": 3,
        "ANNOUNCED": 6,
        "REMOVED": 7,
        "SUB_ESTABLISHED": 10,
        "SUB_CLOSED": 11,
        "SUB_PRIORITY": 13,
        "LISTENER_CREATED": 15,
        "LISTENER_CLOSED": 16,
    }
    with pytest.raises(ValueError):
        codec.decode_event(99, {})


def test_monitor_line_like_iproute2() -> None:
    # The line iproute2's `ip mptcp monitor` prints (ip/ipmptcp.c, mptcp_monitor_msg).
    event = codec.decode_event(
        10,
        {
            "token": 0x1F2E3D4C, "family": 2, "loc_id": 1, "rem_id": 0,
            "saddr4": "10.0.1.1", "daddr4": "10.0.0.2", "sport": 40000, "dport": 8000,
            "backup": 0, "if_idx": 3, "error": 111,
        },
    )  # fmt: skip
    assert str(event) == (
        "[  SF_ESTABLISHED] token=1f2e3d4c remid=0 locid=1 saddr4=10.0.1.1 daddr4=10.0.0.2"
        " sport=40000 dport=8000 backup=0 error=111 ifindex=3"
    )


def test_server_side_from_flags() -> None:
    event = codec.decode_event(1, {"token": 1, "flags": codec.EV_FLAG_SERVER_SIDE})
    assert event.server_side is True


@given(
    address=st.one_of(ipv4, ipv6),
    id=st.integers(1, 255),
    port=st.integers(0, 65535),
    flags=st.integers(0, 0x3F),
    ifindex=st.integers(0, 2**31 - 1),
)
def test_endpoint_wire_roundtrip(
    address: str, id: int, port: int, flags: int, ifindex: int
) -> None:
    attrs = codec.address_attrs(address, id=id, port=port, flags=flags, ifindex=ifindex)
    msg = codec.request(codec.Cmd.ADD_ADDR, [("MPTCP_PM_ATTR_ADDR", attrs)])
    parsed = wire_roundtrip(msg, codec.pm_msg)
    assert parsed["cmd"] == codec.Cmd.ADD_ADDR
    ep = codec.decode_endpoint(parsed["attrs"]["addr"])
    packed = ipaddress.ip_address(address).packed
    text = socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)
    assert ep == codec.Endpoint(id, text, port, codec.EndpointFlag(flags), ifindex)
    # `ip mptcp endpoint show` line: address first, then the words it knows, each
    # followed by a space; an interface without a name is `ifN`.
    assert ep.ip_line() == str(ep) + " "
    assert ep.ip_line().endswith(f"dev if{ifindex} " if ifindex else " ")
    words = str(ep).split()
    assert words[0] == ep.address
    assert words[words.index("id") + 1] == str(id)
    assert ("port" in words) == bool(port)


@given(st.lists(st.sampled_from(["signal", "subflow", "backup", "fullmesh"]), unique=True))
def test_flag_names_roundtrip(names: list[str]) -> None:
    flags = codec.flags_from_names(names)
    assert set(codec.flag_names(flags)) == set(names)
    assert to_flags(" ".join(names)) == flags
    assert to_flags(names) == flags


def test_bad_values_refused_before_sending() -> None:
    with pytest.raises(ValueError, match=r"invalid IP address '10\.0\.0\.300'"):
        codec.address_attrs("10.0.0.300")
    with pytest.raises(ValueError, match="unknown endpoint flag 'signall'"):
        codec.flags_from_names(["signall"])
    with pytest.raises(ValueError, match="out of range"):
        codec.address_attrs("10.0.0.1", id=256)
    with pytest.raises(ValueError, match="out of range"):
        codec.address_attrs("10.0.0.1", port=70000)


@st.composite
def endpoint_commands(draw: st.DrawFn) -> grammar.EndpointCommand:
    action = draw(st.sampled_from(["add", "del", "show", "flush", "change"]))
    address = codec.format_ip(draw(st.one_of(ipv4, ipv6)))
    if action == "add":
        flags = draw(
            st.lists(st.sampled_from(["signal", "subflow", "backup", "fullmesh"]), unique=True)
        )
        port = draw(st.none() | st.integers(1, 65535))
        if port is not None and "signal" not in flags:
            flags.append("signal")  # ip: a port needs signal
        if "signal" in flags and "fullmesh" in flags:
            flags.remove("fullmesh")
        return grammar.EndpointCommand(
            "add",
            address,
            draw(st.none() | st.integers(1, 255)),
            port,
            draw(st.none() | st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True)),
            tuple(flags),
        )
    if action == "del":
        return grammar.EndpointCommand("del", None, draw(st.integers(1, 255)))
    if action == "change":
        words = draw(
            st.lists(
                st.sampled_from(["backup", "nobackup", "fullmesh", "nofullmesh"]),
                min_size=1,
                max_size=2,
                unique=True,
            )
        )
        if len({w.removeprefix("no") for w in words}) < len(words):
            words = words[:1]
        return grammar.EndpointCommand(
            "change", None, draw(st.integers(1, 255)), flags=tuple(words)
        )
    if action == "show":
        return grammar.EndpointCommand("show", None, draw(st.none() | st.integers(1, 255)))
    return grammar.EndpointCommand("flush")


@given(endpoint_commands())
def test_endpoint_grammar_roundtrip(cmd: grammar.EndpointCommand) -> None:
    assert grammar.parse_endpoint(str(cmd).split()) == cmd


@pytest.mark.parametrize(
    ("words", "message", "exit_code"),
    [
        (["add"], 'argument "ADDRESS" is required', 255),
        (["add", "10.0.0.300"], 'any valid address is expected rather than "10.0.0.300"', 1),
        (["add", "10.0.0.1", "signall"], 'expected rather than "signall"', 1),
        (["add", "10.0.0.1", "id"], "command line is incomplete", 255),
        (["add", "10.0.0.1", "id", "x"], 'argument "x" is wrong: invalid ID', 255),
        (["add", "10.0.0.1", "id", "256"], 'argument "256" is wrong: invalid ID', 255),
        (["add", "10.0.0.1", "port", "65536", "signal"], "expected port", 255),
        (["add", "10.0.0.1", "port", "80"], "flags must have signal when using port", 255),
        (["add", "10.0.0.1", "signal", "fullmesh"], "mustn't have both signal and fullmesh", 255),
        (["add", "10.0.0.1", "dev", "a/b"], "invalid interface name", 255),
        (["del"], 'argument "ID" is required', 255),
        (["del", "id", "0"], "address is needed for deleting id 0 address", 255),
        (["del", "id", "3", "10.0.0.1"], "invalid for non-zero id address", 255),
        (["change", "id", "1", "signal"], "invalid flags, backup and fullmesh only", 255),
        (["frob"], 'command "frob" is unknown', 255),
    ],
)
def test_endpoint_grammar_errors(words: list[str], message: str, exit_code: int) -> None:
    with pytest.raises(grammar.GrammarError, match=message) as caught:
        grammar.parse_endpoint(words)
    assert caught.value.exit_code == exit_code


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        # ip's abbreviations, C numbers and IPv4 forms.
        (["a", "10.9", "i", "0x10", "subflow"], grammar.EndpointCommand("add", "10.9.0.0", 16)),
        (["sh"], grammar.EndpointCommand("show")),
        (["d", "id", "010"], grammar.EndpointCommand("del", None, 8)),
        (["ch", "id", "3", "backup"], grammar.EndpointCommand("change", None, 3)),
        (["flush", "10.0.0.1"], grammar.EndpointCommand("flush")),  # ip ignores the rest
        (["add", "10.0.0.1", "port", "0"], grammar.EndpointCommand("add", "10.0.0.1")),
        (["add", "::ffff:10.9.0.1"], grammar.EndpointCommand("add", "::ffff:10.9.0.1")),
        (["add", "10.0.0.1", "laminar"], grammar.EndpointCommand("add", "10.0.0.1")),
    ],
)
def test_endpoint_grammar_like_ip(words: list[str], expected: grammar.EndpointCommand) -> None:
    cmd = grammar.parse_endpoint(words)
    assert (cmd.action, cmd.address, cmd.id) == (expected.action, expected.address, expected.id)


@given(
    current=st.integers(0, 0x3F).map(codec.EndpointFlag),
    words=st.lists(st.sampled_from(["backup", "nobackup", "fullmesh", "nofullmesh"]), max_size=4),
)
def test_change_flags(current: codec.EndpointFlag, words: list[str]) -> None:
    # As ip and the kernel: exactly the flags named, whatever the endpoint had.
    new = grammar.change_flags(current, words)
    assert not new & ~codec.CHANGEABLE
    for bit in ("backup", "fullmesh"):
        assert bool(new & codec.FLAG_NAMES[bit]) == (bit in words)


@given(st.none() | st.integers(0, 8), st.none() | st.integers(0, 8))
def test_limits_grammar_roundtrip(subflows: int | None, accepted: int | None) -> None:
    if subflows is None and accepted is None:
        return
    cmd = grammar.LimitsCommand("set", subflows, accepted)
    assert grammar.parse_limits(str(cmd).split()) == cmd


def test_limits_grammar_errors() -> None:
    # The range is the kernel's (and the API's) to check; the grammar takes a u32, as ip.
    assert grammar.parse_limits(["s", "su", "9"]) == grammar.LimitsCommand("set", 9)
    assert grammar.parse_limits(["set"]) == grammar.LimitsCommand("set")
    with pytest.raises(grammar.GrammarError, match='argument "foo" is wrong: unknown limit'):
        grammar.parse_limits(["set", "foo", "1"])
    with pytest.raises(grammar.GrammarError, match='argument "x" is wrong: invalid subflows'):
        grammar.parse_limits(["set", "subflows", "x"])


def test_userspace_pm_problem() -> None:
    assert userspace_pm_problem("0", "kernel userspace") is None
    assert userspace_pm_problem("1", None) is None
    assert "5.19" in (userspace_pm_problem(None, None) or "")
    assert "not available" in (userspace_pm_problem("0", "kernel") or "")


# ------------------------------------------------------------------ sock_diag (pm.diag)


def _rta(kind: int, payload: bytes) -> bytes:
    import struct

    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _diag_msg(family: int, local: tuple[str, int], remote: tuple[str, int], attrs: bytes) -> bytes:
    import struct

    def addr(text: str) -> bytes:
        return socket.inet_pton(family, text).ljust(16, b"\0")

    body = struct.pack(
        "=BBBB2s2s16s16sI8sIIIII",
        family,
        1,
        0,
        0,
        local[1].to_bytes(2, "big"),
        remote[1].to_bytes(2, "big"),
        addr(local[0]),
        addr(remote[0]),
        0,
        b"\0" * 8,
        0,
        0,
        0,
        0,
        0,
    )
    body += attrs
    return struct.pack("=IHHII", 16 + len(body), 20, 2, 1, 0) + body


@given(token=u32, sport=st.integers(1, 65535), local_id=u8, v4=ipv4)
def test_diag_subflow_entry(token: int, sport: int, local_id: int, v4: str) -> None:
    import struct

    from mptcpkit.pm import diag

    mp = (
        _rta(diag.MPTCP_SUBFLOW_ATTR_TOKEN_LOC, struct.pack("=I", token))
        + _rta(diag.MPTCP_SUBFLOW_ATTR_ID_LOC, bytes([local_id]))
        + _rta(diag.MPTCP_SUBFLOW_ATTR_ID_REM, b"\0")
    )
    ulp = _rta(diag.INET_ULP_INFO_NAME, b"mptcp\0") + _rta(diag.INET_ULP_INFO_MPTCP | 0x8000, mp)
    data = _diag_msg(socket.AF_INET, (v4, sport), ("10.0.0.2", 80), _rta(19 | 0x8000, ulp))
    data += struct.pack("=IHHIIi", 20, diag.NLMSG_DONE, 2, 1, 0, 0)
    first, end = list(diag.parse_messages(data))
    assert end is None and first is not None
    assert first.local == (v4, sport) and first.remote == ("10.0.0.2", 80)
    assert diag.subflow_entry(first) == diag.SubflowEntry(
        token, (v4, sport), ("10.0.0.2", 80), local_id, 0
    )
    # A plain TCP socket is no subflow; a v4-mapped address reads as IPv4, as events name it.
    plain = _diag_msg(socket.AF_INET6, (f"::ffff:{v4}", sport), ("::1", 80), b"")
    (entry,) = diag.parse_messages(plain)
    assert entry is not None and diag.subflow_entry(entry) is None
    assert entry.local == (v4, sport)
