"""`mptcpkit run --systemd-dropin UNIT`: wrap a unit's ExecStart in a drop-in.

mptcpize rewrites the unit file itself, which package upgrades then overwrite (or
which breaks them). A drop-in (`/etc/systemd/system/UNIT.d/mptcpkit.conf`) resets
ExecStart and sets it again, wrapped; removing the file undoes everything.
Parsing is pure (`exec_starts`, `render_dropin`); reading prefers `systemctl cat`,
which knows every unit directory and drop-in, and falls back to the unit paths.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence

DROPIN_NAME = "mptcpkit.conf"
UNIT_DIRS = (
    "etc/systemd/system",
    "run/systemd/system",
    "usr/local/lib/systemd/system",
    "usr/lib/systemd/system",
    "lib/systemd/system",
)
UNIT_SUFFIXES = (".service", ".socket", ".target", ".timer", ".mount", ".path", ".slice")
# ExecStart= prefixes (systemd.service(5)): kept in front of the wrapped command.
_PREFIX_CHARS = "-:+!"


class UnitError(Exception):
    """The unit cannot be wrapped: one line saying why."""


def unit_name(unit: str) -> str:
    if not unit or "/" in unit or unit.startswith("."):
        raise UnitError(f"{unit!r} is not a unit name")
    return unit if unit.endswith(UNIT_SUFFIXES) else unit + ".service"


def _logical_lines(text: str) -> Iterable[str]:
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending


def exec_starts(texts: Sequence[str]) -> list[str]:
    """The effective ExecStart= command lines of unit text(s) applied in order."""
    commands: list[str] = []
    for text in texts:
        section = ""
        for line in _logical_lines(text):
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                continue
            key, sep, value = line.partition("=")
            if section == "Service" and sep and key.strip() == "ExecStart":
                value = value.strip()
                if value:
                    commands.append(value)
                else:
                    commands.clear()
    return commands


def split_systemctl_cat(output: str, skip_dropin: str = DROPIN_NAME) -> list[str]:
    """`systemctl cat` output as one text per file, without our own drop-in."""
    texts: list[str] = []
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith("# /"):
            path = line[2:].strip()
            current = None if os.path.basename(path) == skip_dropin else []
            if current is not None:
                texts.append("")
            continue
        if current is not None:
            texts[-1] += line + "\n"
    return texts


def wrap(command: str, runner: Sequence[str], options: Sequence[str]) -> str:
    """One ExecStart value run under `runner run OPTIONS --`, prefixes kept in front."""
    prefix = ""
    while command and command[0] in _PREFIX_CHARS + "@":
        prefix += command[0]
        command = command[1:]
    if "@" in prefix:
        raise UnitError("ExecStart uses the '@' prefix (a custom argv[0]), which cannot be wrapped")
    wrapped = shlex.join([*runner, "run", *options, "--"])
    return f"{prefix}{wrapped} {command.strip()}"


def render_dropin(
    unit: str, commands: Sequence[str], runner: Sequence[str], options: Sequence[str]
) -> str:
    lines = [
        f"# Written by `mptcpkit run --systemd-dropin {unit}`: runs the unit's ExecStart",
        "# with its TCP sockets forced to MPTCP. Remove with",
        f"# `mptcpkit run --systemd-dropin {unit} --remove`; the unit file is untouched.",
        "[Service]",
        "ExecStart=",
    ]
    lines += [f"ExecStart={wrap(cmd, runner, options)}" for cmd in commands]
    return "\n".join(lines) + "\n"


def runner() -> list[str]:
    """How systemd should start mptcpkit: the installed command, else this interpreter."""
    found = shutil.which("mptcpkit")
    return [found] if found else [sys.executable, "-m", "mptcpkit"]


def _read_unit(unit: str, root: str) -> list[str]:
    if root == "/" and shutil.which("systemctl"):
        proc = subprocess.run(
            ["systemctl", "cat", "--", unit], capture_output=True, text=True, check=False
        )
        if proc.returncode == 0 and proc.stdout.strip():
            return split_systemctl_cat(proc.stdout)
    texts = []
    for d in UNIT_DIRS:
        path = os.path.join(root, d, unit)
        if os.path.isfile(path):
            with open(path) as f:
                texts.append(f.read())
            break
    else:
        raise UnitError(
            f"unit {unit} not found (looked in {', '.join('/' + d for d in UNIT_DIRS)})"
        )
    for d in reversed(UNIT_DIRS):
        dropins = os.path.join(root, d, unit + ".d")
        if os.path.isdir(dropins):
            for name in sorted(os.listdir(dropins)):
                if name.endswith(".conf") and name != DROPIN_NAME:
                    with open(os.path.join(dropins, name)) as f:
                        texts.append(f.read())
    return texts


def dropin_path(unit: str, root: str = "/") -> str:
    return os.path.join(root, "etc/systemd/system", unit_name(unit) + ".d", DROPIN_NAME)


def write_dropin(unit: str, options: Sequence[str] = (), *, root: str = "/") -> str:
    """Write the drop-in for `unit`; returns its path."""
    name = unit_name(unit)
    commands = exec_starts(_read_unit(name, root))
    if not commands:
        raise UnitError(f"unit {name} has no ExecStart= to wrap")
    text = render_dropin(name, commands, runner(), options)
    path = dropin_path(name, root)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def remove_dropin(unit: str, *, root: str = "/") -> str | None:
    """Remove the drop-in (and its directory if now empty); the path, or None if absent."""
    path = dropin_path(unit, root)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(path))  # only if empty: other drop-ins stay
    return path
