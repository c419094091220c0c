"""The BPF strategy: an `fmod_ret/update_socket_protocol` program, loaded from Python.

Kernel 6.6+ calls update_socket_protocol(family, type, protocol) in socket() so that
a BPF program may change the protocol ("bpf: Force to MPTCP"). This module finds the
function's BTF id in /sys/kernel/btf/vmlinux, assembles the program by hand (no
clang at run time), scopes it to a fresh cgroup v2 the command runs in, and detaches
it on exit. Many hosts refuse tracing programs (EPERM): `probe()` says why, so the
caller can name the seccomp strategy instead.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import struct
from collections.abc import Sequence

from mptcpkit.abi._record import record
from mptcpkit.abi.constants import IPPROTO_MPTCP
from mptcpkit.run import abi, syscalls
from mptcpkit.run.activation import Activation

BTF_PATH = "/sys/kernel/btf/vmlinux"
HOOK = "update_socket_protocol"
SYS_BPF = {"x86_64": 321, "aarch64": 280}
BPF_PROG_LOAD = 5
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_PROG_TYPE_TRACING = 26
BPF_MODIFY_RETURN = 26
BPF_FUNC_GET_CURRENT_CGROUP_ID = 80

# --- BTF ---------------------------------------------------------------------

BTF_MAGIC = 0xEB9F
BTF_HEADER = struct.Struct("<HBBIIIII")  # magic version flags hdr_len type_off/len str_off/len
BTF_TYPE = struct.Struct("<III")  # name_off, info, size/type
BTF_KIND_FUNC = 12
# Bytes following struct btf_type, per kind: (fixed, per vlen item).
_KIND_EXTRA = {
    1: (4, 0),  # INT
    3: (12, 0),  # ARRAY
    4: (0, 12),  # STRUCT
    5: (0, 12),  # UNION
    6: (0, 8),  # ENUM
    13: (0, 8),  # FUNC_PROTO
    14: (4, 0),  # VAR
    15: (0, 12),  # DATASEC
    17: (4, 0),  # DECL_TAG
    19: (0, 12),  # ENUM64
}


class BTFError(ValueError):
    """The BTF blob is malformed or lacks what we look for."""


def btf_find(blob: bytes, name: str, kind: int = BTF_KIND_FUNC) -> int:
    """The type id of the BTF type `name` of `kind` in a raw BTF blob."""
    if len(blob) < BTF_HEADER.size:
        raise BTFError("BTF blob shorter than its header")
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = BTF_HEADER.unpack_from(
        blob
    )
    if magic != BTF_MAGIC:
        raise BTFError(f"not BTF (magic {magic:#x})")
    strings = blob[hdr_len + str_off : hdr_len + str_off + str_len]
    # The name's offsets in the string section (usually one); types refer to them.
    wanted = b"\0" + name.encode() + b"\0"
    offsets = set()
    at = strings.find(wanted)
    while at >= 0:
        offsets.add(at + 1)
        at = strings.find(wanted, at + 1)
    if strings.startswith(wanted[1:]):
        offsets.add(0)
    if not offsets:
        raise BTFError(f"{name} not found in BTF")
    pos, end = hdr_len + type_off, hdr_len + type_off + type_len
    unpack = BTF_TYPE.unpack_from
    extra = _KIND_EXTRA
    type_id = 1
    while pos < end:
        name_off, info, _size = unpack(blob, pos)
        k = (info >> 24) & 0x1F
        if name_off in offsets and k == kind:
            return type_id
        fixed, per = extra.get(k, (0, 0))
        pos += 12 + fixed + per * (info & 0xFFFF)
        type_id += 1
    raise BTFError(f"{name} not found in BTF")


@functools.cache
def hook_btf_id(path: str = BTF_PATH) -> int:
    """The hook's BTF id; read once per process (vmlinux BTF is megabytes to parse)."""
    with open(path, "rb") as f:
        return btf_find(f.read(), HOOK)


# --- the program --------------------------------------------------------------

INSN = struct.Struct("<BBhi")  # code, dst|src<<4, off, imm


def _i(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return INSN.pack(code, dst | (src << 4), off, imm)


def _s32(v: int) -> int:
    return v - (1 << 32) if v & 0x80000000 else v


def program(cgroup_id: int) -> bytes:
    """`return (cgroup matches && inet && (type & 0xf) == STREAM && proto in {0, TCP})
    ? IPPROTO_MPTCP : protocol` — the protocol the kernel then uses."""
    lo, hi = cgroup_id & 0xFFFFFFFF, cgroup_id >> 32
    return b"".join(
        (
            _i(0xBF, 6, 1),  # 0: r6 = r1 (ctx: u64 args[])
            _i(0x85, imm=BPF_FUNC_GET_CURRENT_CGROUP_ID),  # 1: call
            _i(0x18, 1, imm=_s32(lo)),  # 2: r1 = cgroup id (ld_imm64, 2 slots)
            _i(0x00, imm=_s32(hi)),  # 3
            _i(0x79, 2, 6, 0),  # 4: r2 = family
            _i(0x79, 3, 6, 8),  # 5: r3 = type
            _i(0x79, 4, 6, 16),  # 6: r4 = protocol
            _i(0x5D, 0, 1, 7),  # 7: if r0 != r1 goto 15
            _i(0x16, 2, off=1, imm=2),  # 8: if w2 == AF_INET goto 10
            _i(0x56, 2, off=5, imm=10),  # 9: if w2 != AF_INET6 goto 15
            _i(0x54, 3, imm=0xF),  # 10: w3 &= 0xf
            _i(0x56, 3, off=3, imm=1),  # 11: if w3 != SOCK_STREAM goto 15
            _i(0x16, 4, off=1, imm=0),  # 12: if w4 == 0 goto 14
            _i(0x56, 4, off=1, imm=6),  # 13: if w4 != IPPROTO_TCP goto 15
            _i(0xB4, 4, imm=IPPROTO_MPTCP),  # 14: w4 = IPPROTO_MPTCP
            _i(0xBF, 0, 4),  # 15: r0 = r4
            _i(0x95),  # 16: exit
        )
    )


@record
class _Attr:
    buf: ctypes.Array[ctypes.c_char]
    keep: list[object]


def _prog_load_attr(prog: bytes, btf_id: int, log: ctypes.Array[ctypes.c_char] | None) -> _Attr:
    insns = ctypes.create_string_buffer(prog, len(prog))
    license_ = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into(
        "<IIQQ",
        attr,
        0,
        BPF_PROG_TYPE_TRACING,
        len(prog) // 8,
        ctypes.addressof(insns),
        ctypes.addressof(license_),
    )
    if log is not None:
        struct.pack_into("<IIQ", attr, 24, 1, len(log), ctypes.addressof(log))
    struct.pack_into("16s", attr, 48, b"mptcpkit_force")
    struct.pack_into("<I", attr, 68, BPF_MODIFY_RETURN)
    struct.pack_into("<I", attr, 108, btf_id)
    return _Attr(attr, [insns, license_, log])


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    nr = SYS_BPF[abi.native_arch().name]
    return syscalls.syscall(nr, cmd, attr, len(attr), what=what)


def load(cgroup_id: int) -> int:
    """Load the program; returns its fd. OSError names the refusal."""
    attr = _prog_load_attr(program(cgroup_id), hook_btf_id(), None)
    return _bpf(BPF_PROG_LOAD, attr.buf, "bpf(BPF_PROG_LOAD)")


def attach(prog_fd: int) -> int:
    """Attach the fmod_ret program; closing the returned link fd detaches it."""
    attr = ctypes.create_string_buffer(16)
    struct.pack_into("<QI", attr, 0, 0, prog_fd)
    return _bpf(BPF_RAW_TRACEPOINT_OPEN, attr, "bpf(BPF_RAW_TRACEPOINT_OPEN)")


@functools.cache
def probe() -> str | None:
    """None when the program loads here, else one line saying why not (asked once per
    process: `--strategy auto` and the bpf strategy both ask)."""
    try:
        abi.native_arch()
    except LookupError as exc:
        return f"no BPF strategy on this architecture ({exc})"
    # The kernel checks the right to load tracing programs before their attach target:
    # ask that first, so hosts that refuse them never pay for parsing vmlinux BTF
    # (megabytes, tens of milliseconds on every `mptcpkit run`).
    try:
        os.close(_bpf(BPF_PROG_LOAD, _prog_load_attr(program(0), 0, None).buf, "load"))
    except OSError as exc:
        if exc.errno == errno.EPERM:
            return "the kernel refuses tracing BPF programs (BPF_PROG_LOAD: EPERM)"
    try:
        btf_id = hook_btf_id()
    except (OSError, BTFError) as exc:
        return f"no {HOOK} hook in the kernel's BTF ({exc}; needs Linux 6.6+ with BTF)"
    try:
        fd = _bpf(BPF_PROG_LOAD, _prog_load_attr(program(0), btf_id, None).buf, "load")
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        if exc.errno == errno.EPERM:
            return f"the kernel refuses tracing BPF programs (BPF_PROG_LOAD: {name})"
        return f"the kernel rejected the {HOOK} program (BPF_PROG_LOAD: {name})"
    os.close(fd)
    return None


def run(argv: Sequence[str], cgroup_root: str = "/sys/fs/cgroup") -> int:
    """Run argv in a fresh cgroup with the program attached; detach and clean up after."""
    cgroup = os.path.join(cgroup_root, f"mptcpkit-run-{os.getpid()}")
    os.mkdir(cgroup)
    try:
        prog_fd = load(os.stat(cgroup).st_ino)  # a cgroup v2 id is its directory's inode
        try:
            link_fd = attach(prog_fd)
        finally:
            os.close(prog_fd)
        try:
            procs = os.path.join(cgroup, "cgroup.procs")
            activation = Activation.inherited()

            def enter() -> None:
                activation.in_child()
                with open(procs, "w") as f:
                    f.write("0")

            import subprocess  # here: `auto` probes on every run, and rarely runs this

            with subprocess.Popen(list(argv), preexec_fn=enter, pass_fds=activation.fds) as proc:
                activation.close_in_parent()
                status = proc.wait()
        finally:
            os.close(link_fd)
    finally:
        os.rmdir(cgroup)
    return 128 - status if status < 0 else status
