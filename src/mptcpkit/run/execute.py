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

from mptcpkit.run import binary

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import NoReturn

# Python ignores these itself when it starts, and what they were before cannot be
# read back: CMD gets the default unless the parent shows it meant them ignored.
PYTHON_IGNORES = (signal.SIGPIPE, signal.SIGXFSZ)
# A shell's child gets the shell's ignored signals (`trap '' PIPE`); so, when the
# parent is one of these, what the parent ignores is what we were started with.
SHELLS = frozenset({"sh", "ash", "dash", "bash", "zsh", "ksh", "mksh", "busybox", "fish"})


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


def _parent() -> tuple[str, int]:
    """The parent's command name and its mask of ignored signals."""
    try:
        with open(f"/proc/{os.getppid()}/status", "rb") as f:
            status = f.read().decode(errors="replace")
    except OSError:
        return "", 0
    fields = dict(line.partition(":")[::2] for line in status.splitlines())
    try:
        return fields.get("Name", "").strip(), int(fields.get("SigIgn", "0"), 16)
    except ValueError:
        return fields.get("Name", "").strip(), 0


def started_ignoring(env: Mapping[str, str]) -> set[int]:
    """Which of Python's own ignores (SIGPIPE, SIGXFSZ) we were most likely started with.

    A service of systemd (`$INVOCATION_ID`, parent systemd) has SIGPIPE ignored
    (IgnoreSIGPIPE=yes is the default); the child of a shell has what the shell
    ignores; anything else (a Python or Node parent resets them for its children)
    the default.
    """
    name, ignored = _parent()
    if name == "systemd" and "INVOCATION_ID" in env:
        return {signal.SIGPIPE}
    if name in SHELLS:
        return {sig for sig in PYTHON_IGNORES if ignored >> (sig - 1) & 1}
    return set()


def restore_dispositions(env: Mapping[str, str]) -> None:
    """Undo what the Python interpreter changed: SIGPIPE and SIGXFSZ back to what we
    were most likely started with (see started_ignoring); no signal blocked. Handlers
    become the default at exec by themselves; ignored signals stay ignored."""
    keep = started_ignoring(env)
    for sig in PYTHON_IGNORES:
        signal.signal(sig, signal.SIG_IGN if sig in keep else signal.SIG_DFL)
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
