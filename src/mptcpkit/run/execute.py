"""Replace this process by the program, as a shell's `exec` would.

`mptcpkit run` ends by exec'ing CMD in its own process, so CMD keeps the process id
the shell or supervisor started, every inherited descriptor, the terminal and the
signal dispositions, and its death (by exit or by signal) is what the caller sees.
Errors are a shell's: 127 for a command that is not there, 126 for one that cannot
run ("Is a directory", "bad interpreter", "Permission denied"), and a file without
`#!` that the kernel refuses (ENOEXEC) runs with /bin/sh, as bash, env and execvp do.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Mapping, Sequence
from typing import NoReturn

from mptcpkit.run import binary

# Python ignores these itself when it starts; the ones we were started with cannot be
# read back, so CMD gets the default unless its service manager ignores SIGPIPE.
PYTHON_IGNORES = (signal.SIGPIPE, signal.SIGXFSZ)


class ExecError(Exception):
    """CMD cannot be run: the shell's message (without a prefix) and exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def resolve(name: str, env: Mapping[str, str]) -> str:
    """The file a shell would run for `name` (PATH search for names without a slash)."""
    if "/" in name:
        if os.path.isdir(name):
            raise ExecError(f"{name}: Is a directory", 126)
        if not os.path.lexists(name):
            raise ExecError(f"{name}: No such file or directory", 127)
        return name
    found_unrunnable = None
    for folder in env.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(folder or ".", name)
        if os.path.isfile(path):
            if os.access(path, os.X_OK):
                return path
            found_unrunnable = found_unrunnable or path
    if found_unrunnable is not None:
        raise ExecError(f"{found_unrunnable}: Permission denied", 126)
    raise ExecError(f"{name}: command not found", 127)


def started_by_systemd(env: Mapping[str, str]) -> bool:
    """A service started by systemd (which ignores SIGPIPE for it by default)."""
    if "INVOCATION_ID" not in env:
        return False
    try:
        with open(f"/proc/{os.getppid()}/comm", "rb") as f:
            return f.read().strip() == b"systemd"
    except OSError:
        return False


def restore_dispositions(env: Mapping[str, str]) -> None:
    """Undo what the Python interpreter changed: SIGPIPE and SIGXFSZ back to default
    (ignored SIGPIPE kept for systemd services); no signal blocked. Handlers become
    the default at exec by themselves; ignored signals stay ignored."""
    keep_pipe = started_by_systemd(env)
    for sig in PYTHON_IGNORES:
        if sig == signal.SIGPIPE and keep_pipe:
            continue
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def exec_program(path: str, argv: Sequence[str], env: Mapping[str, str]) -> NoReturn:
    """execve `path` (then /bin/sh for a script without `#!`); raises ExecError."""
    args = list(argv)
    try:
        os.execve(path, args, env)
    except OSError as exc:
        err = exc
    if err.errno == errno.ENOEXEC:
        try:
            os.execve("/bin/sh", ["/bin/sh", path, *args[1:]], env)
        except OSError as exc:
            err = exc
    name = args[0]
    if err.errno == errno.ENOENT:
        interpreter = binary.shebang(path)
        if interpreter is not None:
            raise ExecError(f"{name}: {interpreter}: bad interpreter: {err.strerror}", 126)
        raise ExecError(f"{name}: {err.strerror}", 127)
    if os.path.isdir(path):
        raise ExecError(f"{name}: Is a directory", 126)
    raise ExecError(f"{name}: {err.strerror}", 126)
