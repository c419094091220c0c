"""Pure parts of `mptcpkit run`: seccomp ABI codecs, the BPF filter, BTF, drop-ins."""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mptcpkit.options import TCP_ONLY_OPTIONS
from mptcpkit.run import abi, bpf, bpfload, preload
from mptcpkit.run.supervisor import Only, filter_program

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)


def test_ioctl_numbers_match_the_uapi_header() -> None:
    # values of the kernel's SECCOMP_IOWR/SECCOMP_IOW macros on x86-64 and arm64
    assert abi.SECCOMP_IOCTL_NOTIF_RECV == 0xC0502100
    assert abi.SECCOMP_IOCTL_NOTIF_SEND == 0xC0182101
    assert abi.SECCOMP_IOCTL_NOTIF_ID_VALID == 0x40082102
    assert abi.SECCOMP_IOCTL_NOTIF_ADDFD == 0x40182103
    assert (abi.NOTIF_SIZE, abi.RESP.size, abi.ADDFD.size, abi.DATA.size) == (80, 24, 24, 64)


@given(u64, u32, u32, st.integers(-(2**31), 2**31 - 1), u32, u64, st.tuples(*[u64] * 6))
def test_notification_round_trips(id_, pid, flags, nr, arch, ip, args) -> None:  # type: ignore[no-untyped-def]
    n = abi.Notification(id_, pid, flags, nr, arch, ip, args)
    assert abi.decode_notif(abi.encode_notif(n)) == n
    assert abi.decode_notif(abi.encode_notif(n) + b"\xff" * 16) == n  # newer, longer struct


def test_short_notification_is_refused() -> None:
    with pytest.raises(ValueError, match="80 bytes"):
        abi.decode_notif(b"\0" * 79)


@given(u64, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1), u32, u32)
def test_addfd_and_resp_layouts(id_, src, newfd, flags, nfl) -> None:  # type: ignore[no-untyped-def]
    raw = abi.encode_addfd(id_, src, flags=flags, newfd=newfd, newfd_flags=nfl)
    assert struct.unpack("=QIIII", raw) == (id_, flags, src, newfd, nfl)
    assert struct.unpack("=QqiI", abi.encode_resp(id_, 0, -1, 1)) == (id_, 0, -1, 1)


@given(st.integers(0, 2**64 - 1))
def test_signed32_is_the_c_int_of_the_low_half(value: int) -> None:
    low = value & 0xFFFFFFFF
    assert abi.signed32(value) == struct.unpack("=i", struct.pack("=I", low))[0]


# --- the filter --------------------------------------------------------------

ARCH = abi.X86_64
TCP_ONLY = {k: v.name for k, v in TCP_ONLY_OPTIONS.items()}


def expected(arch: abi.Arch, nr: int, args: list[int], only: Only | None, audit: int) -> int:
    """The rule the filter must encode, written plainly."""
    notify, allow = abi.SECCOMP_RET_USER_NOTIF, abi.SECCOMP_RET_ALLOW
    low = [a & 0xFFFFFFFF for a in args]
    if arch.compat is not None and audit == arch.compat[0]:
        return notify if nr & 0xFFFFFFFF in arch.compat[1:] else allow
    if audit != arch.audit_arch or (arch.has_x32 and nr & 0xFFFFFFFF >= abi.X32_SYSCALL_BIT):
        return allow
    nr &= 0xFFFFFFFF
    if nr == arch.socket and only is Only.REPAIR:
        return allow  # repair only: nothing is forced
    if nr == arch.socket:
        inet = low[0] in (socket.AF_INET, socket.AF_INET6)
        stream = low[1] & 0xF == socket.SOCK_STREAM
        return notify if inet and stream and low[2] in (0, socket.IPPROTO_TCP) else allow
    if nr == arch.setsockopt:
        return notify if (low[1], low[2]) in TCP_ONLY else allow
    if nr == arch.connect:
        return notify if only is Only.LISTEN else allow
    if nr == arch.listen:
        return notify if only is Only.CONNECT else allow
    if nr == arch.io_uring_setup:
        return allow if only is Only.REPAIR else notify
    if nr in (arch.execve, arch.execveat):
        return notify
    if nr == arch.seccomp:
        return notify if low[0] == 1 and low[1] & abi.SECCOMP_FILTER_FLAG_NEW_LISTENER else allow
    return allow


interesting_nr = st.sampled_from(
    [41, 42, 50, 54, 59, 102, 221, 281, 322, 359, 317, 425, 0, 1, 0x40000029, 198, 2**32 - 1]
)
interesting_arg = st.one_of(
    st.sampled_from([0, 1, 2, 6, 10, 14, 17, 262, 0x80001, 0x800 | 1, 2**32 + 2, 1 << 3, 0xF]),
    st.sampled_from(sorted({lvl for lvl, _ in TCP_ONLY} | {opt for _, opt in TCP_ONLY})),
    u64,
)


@given(
    st.sampled_from([abi.X86_64, abi.AARCH64]),
    st.one_of(interesting_nr, st.sampled_from([198, 201, 203, 208, 277])),
    st.lists(interesting_arg, min_size=6, max_size=6),
    st.sampled_from([None, Only.LISTEN, Only.CONNECT, Only.REPAIR]),
    st.sampled_from(
        [abi.AUDIT_ARCH_X86_64, abi.AUDIT_ARCH_AARCH64, abi.AUDIT_ARCH_I386, abi.AUDIT_ARCH_ARM, 0]
    ),
)
def test_filter_traps_exactly_what_the_supervisor_handles(arch, nr, args, only, audit) -> None:  # type: ignore[no-untyped-def]
    prog = filter_program(arch, only, TCP_ONLY)
    data = bpf.seccomp_data(nr, audit, args)
    assert bpf.run_filter(prog, data) == expected(arch, nr, args, only, audit)


def test_filter_for_the_common_calls() -> None:
    prog = filter_program(ARCH, None, TCP_ONLY)
    run = lambda *a: bpf.run_filter(prog, bpf.seccomp_data(a[0], ARCH.audit_arch, a[1:]))  # noqa: E731
    notify, allow = abi.SECCOMP_RET_USER_NOTIF, abi.SECCOMP_RET_ALLOW
    cloexec_stream = socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
    assert run(41, socket.AF_INET, cloexec_stream, 0) == notify  # Python's socket()
    assert run(41, socket.AF_INET6, socket.SOCK_STREAM, 6) == notify
    assert run(41, socket.AF_INET, socket.SOCK_STREAM, 262) == allow  # asks for MPTCP itself
    assert run(41, socket.AF_INET, socket.SOCK_DGRAM, 0) == allow
    assert run(41, socket.AF_UNIX, socket.SOCK_STREAM, 0) == allow
    assert run(54, 5, socket.SOL_TCP, 14) == notify  # TCP_MD5SIG
    assert run(54, 5, socket.SOL_TCP, 1) == allow  # TCP_NODELAY: MPTCP takes it
    assert run(42, 5, 0, 0) == allow  # connect() only with --only listen
    assert len(prog) % 8 == 0 and len(prog) // 8 < bpf.BPF_MAXINSNS


def test_jump_out_of_range_is_refused() -> None:
    many = {6: frozenset(range(300))}
    with pytest.raises(ValueError, match="out of range"):
        bpf.build_filter(bpf.FilterSpec(ARCH, sockopts=many))


# --- BTF and the BPF program -------------------------------------------------


def _btf(types: list[tuple[str, int, int, bytes]]) -> bytes:
    """A BTF blob from (name, kind, vlen, extra bytes) entries."""
    strings = b"\0"
    body = b""
    for name, kind, vlen, extra in types:
        off = len(strings)
        strings += name.encode() + b"\0"
        body += bpfload.BTF_TYPE.pack(off, (kind << 24) | vlen, 0) + extra
    hdr = bpfload.BTF_HEADER.pack(
        bpfload.BTF_MAGIC, 1, 0, 24, 0, len(body), len(body), len(strings)
    )
    return hdr + body + strings


@given(
    st.lists(
        st.sampled_from([(1, 0, 4), (4, 2, 24), (13, 3, 24), (6, 1, 8), (2, 0, 0)]), max_size=20
    )
)
def test_btf_find_skips_every_kind_correctly(before) -> None:  # type: ignore[no-untyped-def]
    types = [(f"t{i}", k, v, b"\0" * n) for i, (k, v, n) in enumerate(before)]
    types.append(("update_socket_protocol_x", 12, 0, b""))  # a prefix is not the name
    types.append(("update_socket_protocol", 12, 0, b""))
    assert bpfload.btf_find(_btf(types), "update_socket_protocol") == len(types)


def test_btf_find_errors() -> None:
    with pytest.raises(bpfload.BTFError, match="magic"):
        bpfload.btf_find(b"\0" * 32, "x")
    with pytest.raises(bpfload.BTFError, match="not found"):
        bpfload.btf_find(_btf([("other", 12, 0, b"")]), "update_socket_protocol")


@pytest.mark.skipif(not os.path.exists(bpfload.BTF_PATH), reason="no kernel BTF")
def test_hook_is_found_in_the_running_kernels_btf() -> None:
    with open(bpfload.BTF_PATH, "rb") as f:
        blob = f.read()
    type_id = bpfload.hook_btf_id()
    # independent check: walk to that id and read its name and kind
    hdr = bpfload.BTF_HEADER.unpack_from(blob)
    hdr_len, type_off, str_off = hdr[3], hdr[4], hdr[6]
    pos = hdr_len + type_off
    for _ in range(type_id - 1):
        _n, info, _s = bpfload.BTF_TYPE.unpack_from(blob, pos)
        fixed, per = bpfload._KIND_EXTRA.get((info >> 24) & 0x1F, (0, 0))
        pos += 12 + fixed + per * (info & 0xFFFF)
    name_off, info, _ = bpfload.BTF_TYPE.unpack_from(blob, pos)
    start = hdr_len + str_off + name_off
    assert blob[start : blob.index(b"\0", start)] == b"update_socket_protocol"
    assert (info >> 24) & 0x1F == bpfload.BTF_KIND_FUNC


def test_program_bytes() -> None:
    prog = bpfload.program(0x1122334455667788)
    assert len(prog) == 17 * 8
    insns = [bpfload.INSN.unpack_from(prog, i) for i in range(0, len(prog), 8)]
    assert insns[-1][0] == 0x95  # exit
    assert insns[2][3] == 0x55667788 and insns[3][3] == 0x11223344  # ld_imm64 halves
    assert (insns[10][0], insns[10][3]) == (0x54, 0xF)  # type & 0xf
    assert (insns[14][0], insns[14][3]) == (0xB4, 262)  # IPPROTO_MPTCP
    for pc, (code, _regs, off, _imm) in enumerate(insns):
        if code & 0x07 in (0x05, 0x06) and code not in (0x85, 0x95):  # conditional jumps
            assert 0 <= pc + 1 + off < len(insns) - 1 + 1
    assert prog.hex().startswith("bf1600000000000085000000500000001801")


# --- preload -----------------------------------------------------


def test_parse_ldconfig() -> None:
    text = (
        "5 libs found in cache `/etc/ld.so.cache'\n"
        "\tlibmptcpwrap.so.0 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libmptcpwrap.so.0\n"
        "\tlibmptcpd.so.3 (libc6,x86-64) => /lib/x86_64-linux-gnu/libmptcpd.so.3\n"
    )
    assert preload.parse_ldconfig(text) == "/usr/lib/x86_64-linux-gnu/libmptcpwrap.so.0"
    assert preload.parse_ldconfig(text.replace("libmptcpwrap", "libother")) is None


def test_preload_environment_keeps_existing_values() -> None:
    env = preload.environment("/x/libmptcpwrap.so.0", {"LD_PRELOAD": "/y.so", "GODEBUG": "a=1"})
    assert env["LD_PRELOAD"] == "/x/libmptcpwrap.so.0 /y.so"
    assert env["GODEBUG"] == "a=1,multipathtcp=1"
    assert preload.environment("/x", {"GODEBUG": "multipathtcp=0"})["GODEBUG"] == "multipathtcp=0"


def test_preload_without_the_library_is_a_clear_error(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from mptcpkit.cli import main

    monkeypatch.setattr(preload, "find_library", lambda: None)
    assert main(["run", "--strategy", "preload", "--", "true"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "libmptcpwrap.so.0" in err[0] and "--strategy seccomp" in err[0]


def test_bpf_run_refused_leaves_nothing_behind(tmp_path) -> None:  # type: ignore[no-untyped-def]
    if bpfload.probe() is None:
        pytest.skip("this kernel accepts tracing BPF programs")
    with pytest.raises(OSError, match="BPF_PROG_LOAD"):
        bpfload.run(["true"], cgroup_root=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # the command's cgroup is removed again
