"""The engine's RFC 8803 parser (`_convert.h`) against convertproto.py, verdict by verdict.

The compiled data path parses Convert messages in C; the Python one with convertproto.
Both must say the same of any bytes: need more, the message (its length, the Connect's
destination and options, the cookie, an Error's code), or the error to answer with
(code and value; the reasons' wording may differ). Hypothesis drives both with
well-formed messages, mutated ones and noise.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mptcpkit.proxy import compiled
from mptcpkit.proxy import convertproto as cp
from mptcpkit.proxy.convertdecide import options_refused

engine = compiled._engine
pytestmark = pytest.mark.skipif(engine is None, reason="the engine is not built")

_MAPPED = b"\x00" * 10 + b"\xff\xff"


def python_verdict(data: bytes, request: bool) -> Any:
    """convertproto's verdict, in the engine's shape (see _engine.parse_convert)."""
    try:
        parsed = cp.parse_request(data) if request else cp.parse(data)
    except cp.ConvertError as exc:
        return ("error", int(exc.code), exc.value[0])
    if parsed is None:
        return None
    msg, used = parsed
    connects = [t for t in msg.tlvs if isinstance(t, cp.Connect)]
    cookie = msg.find(cp.Cookie)
    error = msg.find(cp.Error)
    port, addr, options = 0, bytes(16), b""
    if connects:
        first = connects[0]
        port, options = first.port, first.options
        a = first.address
        addr = _MAPPED + a.packed if isinstance(a, ipaddress.IPv4Address) else a.packed
    return (
        "ok",
        used,
        len(connects),
        int(msg.find(cp.Info) is not None),
        port,
        addr,
        options,
        cookie.opaque if isinstance(cookie, cp.Cookie) else None,
        error.code if isinstance(error, cp.Error) else -1,
        options_refused(options) or 0,
    )


def engine_verdict(data: bytes, request: bool) -> Any:
    v = engine.parse_convert(data, request)
    if v is not None and v[0] == "error":
        assert v[3], "an error names its reason"
        return v[:3]
    return v


def same(data: bytes) -> None:
    for request in (True, False):
        assert engine_verdict(data, request) == python_verdict(data, request), (data, request)


v4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
v6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)).filter(
    lambda a: a.ipv4_mapped is None
)
words = st.integers(0, 4).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n))
tlvs = st.one_of(
    st.builds(cp.Info),
    st.builds(cp.Connect, st.one_of(v4, v6), st.integers(0, 65535), words),
    st.builds(cp.ExtendedTCPHeader, words),
    st.builds(cp.SupportedTCPExtensions, st.lists(st.integers(1, 255), max_size=6).map(tuple)),
    st.builds(cp.Cookie, words),
    st.builds(cp.Error, st.integers(0, 255), st.binary(max_size=5)),
)
messages = st.lists(tlvs, max_size=5).map(cp.build)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real message, then bytes changed, cut or added: the edges of each check."""
    raw = bytearray(draw(messages))
    for _ in range(draw(st.integers(0, 3))):
        if raw:
            raw[draw(st.integers(0, len(raw) - 1))] = draw(
                st.sampled_from([0, 1, 2, 4, 5, 0x0A, 0x14, 0x15, 0x16, 0x1E, 0xFF])
                | st.integers(0, 255)
            )
    cut = draw(st.integers(0, len(raw)))
    return bytes(raw[: cut if draw(st.booleans()) else len(raw)]) + draw(st.binary(max_size=8))


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(messages, st.binary(max_size=8))
def test_well_formed_messages(raw: bytes, rest: bytes) -> None:
    same(raw + rest)
    for cut in range(0, len(raw), 3):  # every prefix: need more (or the same early error)
        same(raw[:cut])


@FUZZ
@given(mutated())
def test_mutated_messages(data: bytes) -> None:
    same(data)


@FUZZ
@given(st.binary(max_size=40).map(lambda b: b"\x01" + b))
def test_noise(data: bytes) -> None:
    same(data)


def test_edges() -> None:
    """Longest message, zero-length TLV, total length 0, a TLV past the end, a second
    Connect, a short Connect, Connects with options (padding, MSS, EOL first), a message
    of only a Cookie."""
    connect = cp.connect_request("192.0.2.1", 80)[4:]
    for data in (
        b"",
        b"\x01",
        b"\x01\x00\x00\x00",
        b"\x01\x02\x00\x00\x0a\x00\x00\x00",
        b"\x01\x02\x00\x00\x0a\x02\x00\x00",
        b"\x01\x02\x00\x00\x0a\x01\x00\x00",
        bytes([1, 11, 0, 0]) + connect + connect,
        bytes([1, 7, 0, 0, 0x0A, 6]) + connect[2:] + b"\x01\x01\x00\x00",
        bytes([1, 7, 0, 0, 0x0A, 6]) + connect[2:] + b"\x02\x04\x05\xb4",
        bytes([1, 7, 0, 0, 0x0A, 6]) + connect[2:] + b"\x01\x00\x02\x04",
        bytes([1, 2, 0, 0, 0x16, 1, 0, 0]),
        bytes([1, 255, 0, 0, 0x16, 254, 0, 0]) + bytes(1012),
        bytes([1, 255, 0, 0, 0x16, 254, 0, 0]) + bytes(1100),
    ):
        same(data)
