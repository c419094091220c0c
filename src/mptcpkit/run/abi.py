"""seccomp user-notification ABI: numbers, ioctl codes and struct codecs.

Pure functions over bytes, so the supervisor's I/O can stay thin and the layouts
can be checked by tests without a kernel. Sources: include/uapi/linux/seccomp.h,
include/uapi/linux/audit.h, arch/*/include/uapi/asm/unistd*.h.
"""

from __future__ import annotations

import os
import struct

from mptcpkit.abi._record import record

# seccomp(2) operations and flags
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_NOTIF_SIZES = 3
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
# 5.19+: once the supervisor has received a call, only fatal signals interrupt it.
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5

# filter return values
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ALLOW = 0x7FFF0000

# seccomp_notif_resp.flags / seccomp_notif_addfd.flags
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1 << 0
SECCOMP_ADDFD_FLAG_SETFD = 1 << 0
SECCOMP_ADDFD_FLAG_SEND = 1 << 1

PR_SET_NO_NEW_PRIVS = 38

AUDIT_ARCH_X86_64 = 0xC000003E  # EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
AUDIT_ARCH_AARCH64 = 0xC00000B7  # EM_AARCH64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE
AUDIT_ARCH_I386 = 0x40000003  # EM_386 | __AUDIT_ARCH_LE
AUDIT_ARCH_ARM = 0x40000028  # EM_ARM | __AUDIT_ARCH_LE
X32_SYSCALL_BIT = 0x40000000


@record
class Arch:
    """Syscall numbers of one architecture (only the ones the supervisor traps or calls)."""

    name: str
    audit_arch: int
    socket: int
    connect: int
    listen: int
    setsockopt: int
    seccomp: int
    io_uring_setup: int
    setresuid: int
    setresgid: int
    setgroups: int
    # x86-64 shares its audit arch with x32, whose numbers carry X32_SYSCALL_BIT.
    has_x32: bool
    # 32-bit programs run through the compat layer: their socket() calls are reported
    # (not forced). (audit arch, socket nr, socketcall nr or -1)
    compat: tuple[int, int, int] | None = None
    # exec of a setuid or file-capability program is reported (no_new_privs)
    execve: int = -1
    execveat: int = -1
    # setns() and unshare() are reported: a thread that may have moved to another
    # network namespace has its namespace read again (the compiled path caches it).
    # (native numbers, then the compat layer's (setns, unshare) or None)
    setns: int = -1
    unshare: int = -1
    compat_ns: tuple[int, int] | None = None


X86_64 = Arch(
    "x86_64",
    AUDIT_ARCH_X86_64,
    41,
    42,
    50,
    54,
    317,
    425,
    117,
    119,
    116,
    True,
    (AUDIT_ARCH_I386, 359, 102),
    execve=59,
    execveat=322,
    setns=308,
    unshare=272,
    compat_ns=(346, 310),
)
AARCH64 = Arch(
    "aarch64",
    AUDIT_ARCH_AARCH64,
    198,
    203,
    201,
    208,
    277,
    425,
    147,
    149,
    159,
    False,
    (AUDIT_ARCH_ARM, 281, -1),
    execve=221,
    execveat=281,
    setns=268,
    unshare=97,
    compat_ns=(375, 337),
)
ARCHES = {"x86_64": X86_64, "amd64": X86_64, "aarch64": AARCH64, "arm64": AARCH64}

# Unified numbers (same on every architecture since 5.x).
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438


def native_arch() -> Arch:
    """The running machine's architecture, or LookupError naming what is supported."""
    machine = os.uname().machine.lower()
    try:
        return ARCHES[machine]
    except KeyError:
        raise LookupError(f"seccomp forcing supports x86_64 and aarch64, not {machine!r}") from None


# ioctl numbers: _IOC(dir, type, nr, size), asm-generic layout (x86-64 and arm64).
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


SECCOMP_IOC_MAGIC = ord("!")

NOTIF = struct.Struct("=QII")  # id, pid, flags; then seccomp_data
DATA = struct.Struct("=iIQ6Q")  # nr, arch, instruction_pointer, args[6]
NOTIF_SIZE = NOTIF.size + DATA.size  # 80
RESP = struct.Struct("=QqiI")  # id, val, error, flags: 24
ADDFD = struct.Struct("=QIIII")  # id, flags, srcfd, newfd, newfd_flags: 24
NOTIF_SIZES = struct.Struct("=HHH")  # seccomp_notif, seccomp_notif_resp, seccomp_data

SECCOMP_IOCTL_NOTIF_RECV = _ioc(_IOC_READ | _IOC_WRITE, SECCOMP_IOC_MAGIC, 0, NOTIF_SIZE)
SECCOMP_IOCTL_NOTIF_SEND = _ioc(_IOC_READ | _IOC_WRITE, SECCOMP_IOC_MAGIC, 1, RESP.size)
SECCOMP_IOCTL_NOTIF_ID_VALID = _ioc(_IOC_WRITE, SECCOMP_IOC_MAGIC, 2, 8)
SECCOMP_IOCTL_NOTIF_ADDFD = _ioc(_IOC_WRITE, SECCOMP_IOC_MAGIC, 3, ADDFD.size)


@record
class Notification:
    """One decoded `struct seccomp_notif`: the trapped call of thread `pid`."""

    id: int
    pid: int
    flags: int
    nr: int
    arch: int
    instruction_pointer: int
    args: tuple[int, int, int, int, int, int]


def decode_notif(buf: bytes) -> Notification:
    """Decode the first NOTIF_SIZE bytes of a `struct seccomp_notif`."""
    if len(buf) < NOTIF_SIZE:
        raise ValueError(f"struct seccomp_notif needs {NOTIF_SIZE} bytes, got {len(buf)}")
    id_, pid, flags = NOTIF.unpack_from(buf, 0)
    nr, arch, ip, *args = DATA.unpack_from(buf, NOTIF.size)
    return Notification(id_, pid, flags, nr, arch, ip, tuple(args))


def encode_notif(n: Notification) -> bytes:
    """Inverse of decode_notif, for tests."""
    return NOTIF.pack(n.id, n.pid, n.flags) + DATA.pack(
        n.nr, n.arch, n.instruction_pointer, *n.args
    )


def encode_resp(id_: int, val: int = 0, error: int = 0, flags: int = 0) -> bytes:
    """`struct seccomp_notif_resp`; error is a negative errno, or 0."""
    return RESP.pack(id_, val, error, flags)


def encode_addfd(
    id_: int, srcfd: int, *, flags: int = 0, newfd: int = 0, newfd_flags: int = 0
) -> bytes:
    """`struct seccomp_notif_addfd`."""
    return ADDFD.pack(id_, flags, srcfd, newfd, newfd_flags)


def decode_notif_sizes(buf: bytes) -> tuple[int, int, int]:
    """`struct seccomp_notif_sizes` as (notif, resp, data)."""
    notif, resp, data = NOTIF_SIZES.unpack_from(buf)
    return notif, resp, data


def signed32(value: int) -> int:
    """A syscall argument's low 32 bits as a C int (socket()'s arguments are ints)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value
