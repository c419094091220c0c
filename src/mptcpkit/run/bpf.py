"""The classic-BPF seccomp filter that decides which calls the supervisor sees.

Only the calls forcing needs reach user space: socket() for IPv4/IPv6 stream sockets
with protocol 0 or TCP, setsockopt() of options MPTCP rejects, and (for `--only`)
connect() or listen(); everything else is allowed in the kernel at no extra cost.
Pure: `build_filter` returns bytes, and `run_filter` interprets them so tests can
check the program against the rule it encodes.
"""

from __future__ import annotations

import enum
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence

from mptcpkit.abi._record import record
from mptcpkit.run import abi

# BPF opcodes (include/uapi/linux/filter.h)
BPF_LD, BPF_ALU, BPF_JMP, BPF_RET = 0x00, 0x04, 0x05, 0x06
BPF_W, BPF_ABS = 0x00, 0x20
BPF_AND = 0x50
BPF_JEQ, BPF_JGE, BPF_JA = 0x10, 0x30, 0x00
BPF_K = 0x00

LD_ABS = BPF_LD | BPF_W | BPF_ABS
AND_K = BPF_ALU | BPF_AND | BPF_K
JEQ_K = BPF_JMP | BPF_JEQ | BPF_K
JGE_K = BPF_JMP | BPF_JGE | BPF_K
RET_K = BPF_RET | BPF_K
JA_K = BPF_JMP | BPF_JA | BPF_K

INSN = struct.Struct("=HBBI")  # struct sock_filter
BPF_MAXINSNS = 4096

# offsets in struct seccomp_data (little-endian: an argument's low half comes first)
OFF_NR = 0
OFF_ARCH = 4


def arg_low(i: int) -> int:
    return 16 + 8 * i


_NO_SOCKOPTS: Mapping[int, frozenset[int]] = {}


@record
class FilterSpec:
    """What to trap. `sockopts` maps a level to the option names worth a look."""

    arch: abi.Arch
    sockopts: Mapping[int, frozenset[int]] = _NO_SOCKOPTS
    trap_socket: bool = True  # False: repair only, nothing is forced
    trap_connect: bool = False
    trap_listen: bool = False
    # Report, not fix: io_uring can make sockets behind seccomp's back, and a
    # second seccomp listener is refused by the kernel (EBUSY).
    trap_io_uring: bool = True
    trap_seccomp_listener: bool = True
    # Report, not fix: a setuid or file-capability program starts without its
    # privileges under no_new_privs.
    trap_exec: bool = True
    # Report, not fix: setns() and unshare() may move a thread to another network
    # namespace, after which the supervisor reads its namespace again.
    trap_namespace: bool = True


class _Asm:
    """Forward-only jumps to named labels, resolved at the end."""

    def __init__(self) -> None:
        self.insns: list[tuple[int, str | int, str | int, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def op(self, code: int, k: int, jt: str | int = 0, jf: str | int = 0) -> None:
        self.insns.append((code, jt, jf, k & 0xFFFFFFFF))

    def assemble(self) -> bytes:
        out = bytearray()
        for pc, (code, jt, jf, k) in enumerate(self.insns):
            out += INSN.pack(code, self._rel(pc, jt), self._rel(pc, jf), k)
        return bytes(out)

    def _rel(self, pc: int, target: str | int) -> int:
        if isinstance(target, int):
            return target
        offset = self.labels[target] - pc - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"BPF jump from {pc} to {target!r} out of range ({offset})")
        return offset


def build_filter(spec: FilterSpec) -> bytes:
    """The filter program as an array of `struct sock_filter`."""
    a = _Asm()
    arch = spec.arch
    a.op(LD_ABS, OFF_ARCH)
    if arch.compat is not None:
        a.op(JEQ_K, arch.compat[0], "compat", 0)
    a.op(JEQ_K, arch.audit_arch, 0, "allow")
    a.op(LD_ABS, OFF_NR)
    if arch.has_x32:
        if spec.trap_namespace:  # x32's own numbers: the 64-bit ones with the x32 bit
            for nr in (arch.setns, arch.unshare):
                if nr >= 0:
                    a.op(JEQ_K, abi.X32_SYSCALL_BIT | nr, "notify", 0)
        a.op(JGE_K, abi.X32_SYSCALL_BIT, "allow", 0)
    if spec.trap_socket:
        a.op(JEQ_K, arch.socket, "socket", 0)
    if spec.sockopts:
        a.op(JEQ_K, arch.setsockopt, "setsockopt", 0)
    if spec.trap_connect:
        a.op(JEQ_K, arch.connect, "notify", 0)
    if spec.trap_listen:
        a.op(JEQ_K, arch.listen, "notify", 0)
    if spec.trap_io_uring:
        a.op(JEQ_K, arch.io_uring_setup, "notify", 0)
    if spec.trap_seccomp_listener:
        a.op(JEQ_K, arch.seccomp, "seccomp", 0)
    if spec.trap_exec:
        for nr in (arch.execve, arch.execveat):
            if nr >= 0:
                a.op(JEQ_K, nr, "notify", 0)
    if spec.trap_namespace:
        for nr in (arch.setns, arch.unshare):
            if nr >= 0:
                a.op(JEQ_K, nr, "notify", 0)
    a.label("allow")
    a.op(RET_K, abi.SECCOMP_RET_ALLOW)
    a.label("notify")
    a.op(RET_K, abi.SECCOMP_RET_USER_NOTIF)

    # 32-bit programs: report their socket()/socketcall() (once), do not force
    if arch.compat is not None:
        a.label("compat")
        a.op(LD_ABS, OFF_NR)
        a.op(JEQ_K, arch.compat[1], "notify2", 0)
        if arch.compat[2] >= 0:
            a.op(JEQ_K, arch.compat[2], "notify2", 0)
        if spec.trap_namespace and arch.compat_ns is not None:
            for nr in arch.compat_ns:
                a.op(JEQ_K, nr, "notify2", 0)
        a.op(RET_K, abi.SECCOMP_RET_ALLOW)

    # socket(family, type, protocol)
    a.label("socket")
    a.op(LD_ABS, arg_low(0))
    a.op(JEQ_K, socket.AF_INET, "socket_type", 0)
    a.op(JEQ_K, socket.AF_INET6, "socket_type", "allow2")
    a.label("socket_type")
    a.op(LD_ABS, arg_low(1))
    a.op(AND_K, 0xF)
    a.op(JEQ_K, socket.SOCK_STREAM, 0, "allow2")
    a.op(LD_ABS, arg_low(2))
    a.op(JEQ_K, 0, "notify2", 0)
    a.op(JEQ_K, socket.IPPROTO_TCP, "notify2", "allow2")

    # seccomp(SECCOMP_SET_MODE_FILTER, flags & NEW_LISTENER, ...)
    if spec.trap_seccomp_listener:
        a.label("seccomp")
        a.op(LD_ABS, arg_low(0))
        a.op(JEQ_K, abi.SECCOMP_SET_MODE_FILTER, 0, "allow2")
        a.op(LD_ABS, arg_low(1))
        a.op(AND_K, abi.SECCOMP_FILTER_FLAG_NEW_LISTENER)
        a.op(JEQ_K, 0, "allow2", "notify2")

    # setsockopt(fd, level, optname, ...)
    if spec.sockopts:
        a.label("setsockopt")
        a.op(LD_ABS, arg_low(1))
        levels = sorted(spec.sockopts)
        for i, level in enumerate(levels):
            a.op(JEQ_K, level, f"level{i}", 0)
        a.op(RET_K, abi.SECCOMP_RET_ALLOW)
        for i, level in enumerate(levels):
            a.label(f"level{i}")
            a.op(LD_ABS, arg_low(2))
            for opt in sorted(spec.sockopts[level]):
                a.op(JEQ_K, opt, "notify2", 0)
            a.op(RET_K, abi.SECCOMP_RET_ALLOW)

    a.label("allow2")
    a.op(RET_K, abi.SECCOMP_RET_ALLOW)
    a.label("notify2")
    a.op(RET_K, abi.SECCOMP_RET_USER_NOTIF)
    prog = a.assemble()
    if len(prog) // INSN.size > BPF_MAXINSNS:
        raise ValueError("seccomp filter longer than BPF_MAXINSNS")
    return prog


def sockopt_table(pairs: Iterable[tuple[int, int]]) -> dict[int, frozenset[int]]:
    """{(level, optname)} to {level: {optname}} for FilterSpec.sockopts."""
    table: dict[int, set[int]] = {}
    for level, opt in pairs:
        table.setdefault(level, set()).add(opt)
    return {level: frozenset(opts) for level, opts in table.items()}


def seccomp_data(nr: int, arch: int, args: Sequence[int] = (), ip: int = 0) -> bytes:
    """A `struct seccomp_data` as the kernel hands it to the filter."""
    full = [*args, 0, 0, 0, 0, 0, 0][:6]
    return abi.DATA.pack(abi.signed32(nr), arch, ip, *(x & 0xFFFFFFFFFFFFFFFF for x in full))


def run_filter(prog: bytes, data: bytes) -> int:
    """Interpret a classic-BPF seccomp program (the subset build_filter emits)."""
    insns = [INSN.unpack_from(prog, off) for off in range(0, len(prog), INSN.size)]
    acc = 0
    pc = 0
    for _ in range(len(insns) + 1):
        code, jt, jf, k = (int(x) for x in insns[pc])
        if code == LD_ABS:
            acc = int.from_bytes(data[k : k + 4], "little")
        elif code == AND_K:
            acc &= k
        elif code == JEQ_K:
            pc += jt if acc == k else jf
        elif code == JGE_K:
            pc += jt if acc >= k else jf
        elif code == JA_K:
            pc += k
        elif code == RET_K:
            return k
        else:
            raise ValueError(f"unsupported BPF opcode {code:#x} at {pc}")
        pc += 1
    raise ValueError("BPF program did not return")


class Only(enum.Enum):
    """`--only`: which sockets stay MPTCP once the program shows what they are for."""

    LISTEN = "listen"
    CONNECT = "connect"
    REPAIR = "repair"  # force nothing: only rescue TCP-only options on MPTCP sockets


def filter_spec(
    arch: abi.Arch, only: Only | None, tcp_only: Mapping[tuple[int, int], str]
) -> FilterSpec:
    """The filter for these settings: trap only what the supervisor acts on."""
    forcing = only is not Only.REPAIR
    return FilterSpec(
        arch=arch,
        sockopts=sockopt_table(tcp_only),
        trap_socket=forcing,
        trap_connect=only is Only.LISTEN,
        trap_listen=only is Only.CONNECT,
        trap_io_uring=forcing,
    )


def filter_program(
    arch: abi.Arch, only: Only | None, tcp_only: Mapping[tuple[int, int], str]
) -> bytes:
    return build_filter(filter_spec(arch, only, tcp_only))
