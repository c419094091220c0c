"""The SNI reader (proxy/clienthello.py): real ClientHellos from OpenSSL (Python's ssl
module through a memory BIO, and the `openssl s_client` binary), hand-built ones with
GREASE and an ECH extension, every cut across TCP segments and TLS records, garbage."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mptcpkit.proxy.clienthello import LIMIT, Hello, NotTLS, parse


def openssl_hello(name: str | None, *, tls13: bool = True) -> bytes:
    """The ClientHello Python's ssl module (OpenSSL) sends for `name`, read from a BIO."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if not tls13:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def s_client_hello(name: str) -> bytes:
    """What `openssl s_client -servername NAME` sends first, captured on a socket."""
    ls = socket.create_server(("127.0.0.1", 0))
    got = bytearray()

    def serve() -> None:
        c, _ = ls.accept()
        with c:
            c.settimeout(10)
            while True:
                try:
                    chunk = c.recv(65536)
                except TimeoutError:
                    return
                if not chunk:
                    return
                got.extend(chunk)
                if isinstance(parse(got), Hello):
                    return

    t = threading.Thread(target=serve)
    t.start()
    port = ls.getsockname()[1]
    subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", name],
        input=b"",
        capture_output=True,
        timeout=20,
        check=False,
    )
    t.join(20)
    ls.close()
    return bytes(got)


def records(handshake: bytes, sizes: list[int]) -> bytes:
    """`handshake` cut into TLS handshake records of the given sizes (the last takes
    the rest)."""
    out = bytearray()
    pos = 0
    for n in [*sizes, len(handshake)]:
        chunk = handshake[pos : pos + max(1, n)]
        if not chunk:
            break
        out += b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk
        pos += len(chunk)
    return bytes(out)


def _vec(n: int, data: bytes) -> bytes:
    return len(data).to_bytes(n, "big") + data


def _ext(kind: int, body: bytes) -> bytes:
    return kind.to_bytes(2, "big") + _vec(2, body)


def sni_ext(*names: bytes, kind: int = 0) -> bytes:
    return _ext(0, _vec(2, b"".join(bytes([kind]) + _vec(2, n) for n in names)))


GREASE = [0x0A0A + 0x1010 * i for i in range(16)]
ECH = 0xFE0D


def hello_message(extensions: bytes | None) -> bytes:
    body = b"\x03\x03" + os.urandom(32) + _vec(1, os.urandom(32))
    body += _vec(2, b"\x13\x01\x13\x02\xc0\x2f") + _vec(1, b"\x00")
    if extensions is not None:
        body += _vec(2, extensions)
    return b"\x01" + _vec(3, body)


# --- real hellos ---------------------------------------------------------------------


@pytest.mark.parametrize("tls13", [True, False])
def test_openssl_hello_names_its_server(tls13: bool) -> None:
    assert parse(openssl_hello("api.example.com", tls13=tls13)) == Hello("api.example.com")


def test_openssl_hello_without_a_name() -> None:
    assert parse(openssl_hello(None)) == Hello(None)


def test_s_client_hello() -> None:
    data = s_client_hello("www.example.org")
    assert parse(data) == Hello("www.example.org")


def test_real_hello_cut_at_every_byte_needs_more() -> None:
    data = openssl_hello("a.example.net")
    for i in range(len(data)):
        assert parse(data[:i]) is None, i
    assert parse(data) == Hello("a.example.net")
    assert parse(data + b"GET / HTTP/1.1\r\n") == Hello("a.example.net")  # what follows


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 300), max_size=8), st.data())
def test_real_hello_in_many_records_and_segments(sizes: list[int], data: st.DataObject) -> None:
    wire = openssl_hello("shop.example.com")
    handshake = wire[5 : 5 + int.from_bytes(wire[3:5], "big")]
    again = records(handshake, sizes)
    assert parse(again) == Hello("shop.example.com")
    cut = data.draw(st.integers(0, len(again) - 1))
    assert parse(again[:cut]) is None


# --- hand-built: GREASE, ECH, odd shapes ------------------------------------------------


hostnames = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}\Z")


@settings(max_examples=200, deadline=None)
@given(
    name=hostnames,
    before=st.lists(st.sampled_from([*GREASE, ECH, 10, 13, 43, 51]), max_size=5),
    after=st.lists(st.sampled_from([*GREASE, ECH, 16]), max_size=3),
    sizes=st.lists(st.integers(1, 64), max_size=6),
    data=st.data(),
)
def test_sni_among_grease_and_ech(
    name: str, before: list[int], after: list[int], sizes: list[int], data: st.DataObject
) -> None:
    exts = b"".join(_ext(k, os.urandom(k % 7)) for k in before)
    exts += sni_ext(name.encode())
    exts += b"".join(_ext(k, os.urandom(3)) for k in after)
    wire = records(hello_message(exts), sizes)
    assert parse(wire) == Hello(name)
    cut = data.draw(st.integers(0, len(wire) - 1))
    assert parse(wire[:cut]) is None


def test_ech_outer_hello_gives_the_public_name() -> None:
    # ECH: the real name is encrypted; the outer hello names the client-facing server.
    exts = _ext(0x0A0A, b"") + sni_ext(b"public.example.com") + _ext(ECH, os.urandom(200))
    assert parse(records(hello_message(exts), [])) == Hello("public.example.com")


def test_hello_without_extensions_or_sni() -> None:
    assert parse(records(hello_message(None), [])) == Hello(None)
    assert parse(records(hello_message(_ext(10, b"\x00\x02\x00\x17")), [])) == Hello(None)
    # a server_name list with no host_name entry
    assert parse(records(hello_message(sni_ext(b"x", kind=7)), [])) == Hello(None)


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (b"GET / HTTP/1.1\r\n", "record type 71"),
        (b"\x80\x2e\x01\x03\x01", "record type 128"),  # SSLv2 hello
        (b"GET", "not a TLS handshake record"),
        (b"\x16\x02\x00\x00\x10", "record version 2.0 is not TLS"),
        (b"\x15\x03\x03\x00\x02\x02\x28", "record type 21"),  # an alert
        (b"\x16\x03\x01\x00\x00", "handshake record of 0 bytes"),
        (b"\x16\x03\x01\x48\x01", "handshake record of 18433 bytes"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "handshake message type 2"),
        (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "more than"),
    ],
)
def test_not_tls(wire: bytes, why: str) -> None:
    got = parse(wire)
    assert isinstance(got, NotTLS) and why in got.why, got


def test_a_different_record_before_the_hello_is_whole() -> None:
    msg = hello_message(sni_ext(b"a.example"))
    wire = records(msg[:10], []) + b"\x17\x03\x03\x00\x01\x00"
    got = parse(wire)
    assert isinstance(got, NotTLS) and "record type 23" in got.why


def test_malformed_names_and_lengths() -> None:
    for bad in (b"", b"a\x00b", b"caf\xc3\xa9", b"a b"):
        got = parse(records(hello_message(sni_ext(bad)), []))
        assert isinstance(got, NotTLS), bad
    msg = bytearray(hello_message(sni_ext(b"ok.example")))
    msg[-11] ^= 0x40  # the name's length no longer fits its list
    assert isinstance(parse(records(bytes(msg), [])), NotTLS)


def test_gives_up_after_the_limit() -> None:
    wire = b"\x16\x03\x01\x40\x00" + b"\x01\x00\xff\xff" + bytes(16380)
    wire = wire * 5  # a hello of 64 KiB announced, records keep coming
    assert isinstance(parse(wire[: LIMIT + 10]), NotTLS)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_never_raises(blob: bytes) -> None:
    assert parse(blob) is None or isinstance(parse(blob), (Hello, NotTLS))
    tls_like = b"\x16\x03\x01" + blob
    assert parse(tls_like) is None or isinstance(parse(tls_like), (Hello, NotTLS))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_real_hello_never_raises(data: st.DataObject) -> None:
    wire = bytearray(_REAL)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(wire) - 1))
        wire[i] = data.draw(st.integers(0, 255))
    got = parse(bytes(wire))
    assert got is None or isinstance(got, (Hello, NotTLS))


_REAL = openssl_hello("mutate.example.com")
