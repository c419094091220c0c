"""Exec of a privileged program under forcing: say so, since it starts unprivileged.

The seccomp filter needs no_new_privs, which every descendant inherits: a setuid,
setgid or file-capability program that CMD (or a script it runs) execs starts without
its privileges (sudo refuses to run, ping cannot open its raw socket). The filter
traps execve() and execveat(); the supervisor reads the path from the caller's memory
(/proc/PID/mem, the same ptrace-level access pidfd_getfd needs), resolves it against
the caller's working directory or descriptor, and warns once per program. The call
itself always goes ahead unchanged.
"""

from __future__ import annotations

import os
import stat

from mptcpkit.run import abi

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
PATH_MAX = 4096
_PAGE = 4096


def read_string(pid: int, address: int, limit: int = PATH_MAX) -> bytes | None:
    """A NUL-terminated string from the memory of process `pid`, or None."""
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        out = b""
        while len(out) < limit:
            chunk = _PAGE - (address + len(out)) % _PAGE  # never cross into an unmapped page
            data = os.pread(fd, chunk, address + len(out))
            if not data:
                return None
            end = data.find(b"\0")
            if end >= 0:
                return out + data[:end]
            out += data
        return None
    except (OSError, OverflowError):
        return None
    finally:
        os.close(fd)


def exec_path(n: abi.Notification, arch: abi.Arch) -> str | None:
    """The file an execve()/execveat() notification asks for, as a path we can stat."""
    if n.nr == arch.execve:
        dirfd, address, flags = AT_FDCWD, n.args[0], 0
    else:
        dirfd, address, flags = abi.signed32(n.args[0]), n.args[1], abi.signed32(n.args[4])
    raw = read_string(n.pid, address)
    if raw is None:
        return None
    path = os.fsdecode(raw)
    if not path and flags & AT_EMPTY_PATH and dirfd >= 0:
        return f"/proc/{n.pid}/fd/{dirfd}"  # fexecve()
    if path.startswith("/"):
        return path
    base = f"/proc/{n.pid}/cwd" if dirfd == AT_FDCWD else f"/proc/{n.pid}/fd/{dirfd}"
    return os.path.join(base, path)


def privileged_exec(n: abi.Notification, arch: abi.Arch) -> tuple[str, str] | None:
    """(path as the program named it, path to stat) when the file carries a setuid or
    setgid bit or file capabilities; the caller's credentials then decide."""
    path = exec_path(n, arch)
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
        return None
    if not st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        try:
            os.getxattr(path, "security.capability")
        except OSError:
            return None  # the common case: two system calls and no /proc/PID/status
    shown = path.split("/", 4)[-1] if path.startswith(f"/proc/{n.pid}/") else path
    return shown, path
