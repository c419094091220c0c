"""`mptcpkit run --systemd-dropin UNIT`: wrap a unit's ExecStart in a drop-in.

mptcpize rewrites the unit file itself, which package upgrades then overwrite (or
which breaks them). A drop-in (`/etc/systemd/system/UNIT.d/mptcpkit.conf`) resets
ExecStart and sets it again, wrapped; removing the file undoes everything.
Parsing is pure (`exec_starts`, `render_dropin`); reading prefers `systemctl cat`,
which knows every unit directory and drop-in, and falls back to the unit paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence

# Sorts after `override.conf` (what `systemctl edit` writes) and the usual NN-name.conf:
# systemd applies drop-ins in file-name order, the last ExecStart= winning.
DROPIN_NAME = "zz-mptcpkit.conf"
OLD_DROPIN_NAMES = ("mptcpkit.conf",)  # written by earlier versions; replaced
HEADER = "# Written by `mptcpkit run --systemd-dropin"
CREATED_DIR = "# mptcpkit created this directory: --remove deletes it when empty."
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


def _assignments(texts: Sequence[str], key: str) -> Iterable[str]:
    """Every `key=value` of the [Service] sections, in order (value stripped)."""
    for text in texts:
        section = ""
        for line in _logical_lines(text):
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                continue
            name, sep, value = line.partition("=")
            if section == "Service" and sep and name.strip() == key:
                yield value.strip()


def exec_starts(texts: Sequence[str]) -> list[str]:
    """The effective ExecStart= command lines of unit text(s) applied in order."""
    commands: list[str] = []
    for value in _assignments(texts, "ExecStart"):
        if value:
            commands.append(value)
        else:
            commands.clear()
    return commands


def service_setting(texts: Sequence[str], key: str) -> str | None:
    """The effective value of `key` in [Service] (the last one; an empty one resets)."""
    values = list(_assignments(texts, key))
    return values[-1] or None if values else None


def split_systemctl_cat(output: str) -> list[UnitFile]:
    """`systemctl cat` output as its files, in the order systemd applies them."""
    files: list[UnitFile] = []
    for line in output.splitlines():
        if line.startswith("# /"):
            files.append(UnitFile(line[2:].strip(), ""))
        elif files:
            files[-1].text += line + "\n"
    return files


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
    unit: str,
    commands: Sequence[str],
    runner: Sequence[str],
    options: Sequence[str],
    *,
    created_dir: bool = False,
) -> str:
    lines = [
        f"{HEADER} {unit}`: runs the unit's ExecStart",
        "# with its TCP sockets forced to MPTCP. Remove with",
        f"# `mptcpkit run --systemd-dropin {unit} --remove`; the unit file is untouched.",
        "# The wrapped command is a copy: run the command again after changing ExecStart.",
    ]
    if created_dir:
        lines.append(CREATED_DIR)
    lines += ["[Service]", "ExecStart="]
    lines += [f"ExecStart={wrap(cmd, runner, options)}" for cmd in commands]
    return "\n".join(lines) + "\n"


def runner() -> list[str]:
    """How systemd should start mptcpkit: the installed command, else this interpreter."""
    found = shutil.which("mptcpkit")
    return [found] if found else [sys.executable, "-m", "mptcpkit"]


@dataclasses.dataclass
class UnitFile:
    path: str
    text: str

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def ours(self) -> bool:
        return self.name in (DROPIN_NAME, *OLD_DROPIN_NAMES) and self.text.startswith(HEADER)


def _dropin_dirs(unit: str) -> list[str]:
    """The drop-in directories systemd reads for `unit`, most specific first:
    UNIT.d, the template's, the dash-prefixes' (a-b-.service.d) and the type's."""
    stem, _, suffix = unit.rpartition(".")
    names = [unit + ".d"]
    if "@" in stem:
        names.append(stem[: stem.index("@") + 1] + "." + suffix + ".d")
    parts = stem.split("@")[0].split("-")
    names += ["-".join(parts[:i]) + "-." + suffix + ".d" for i in range(len(parts) - 1, 0, -1)]
    names.append(suffix + ".d")
    return names


def _read_files(unit: str, root: str) -> list[UnitFile]:
    """The unit's fragment and drop-ins in the order systemd applies them."""
    if root == "/" and shutil.which("systemctl"):
        proc = subprocess.run(
            ["systemctl", "cat", "--", unit], capture_output=True, text=True, check=False
        )
        if proc.returncode == 0 and proc.stdout.strip():
            return split_systemctl_cat(proc.stdout)
    for d in UNIT_DIRS:
        path = os.path.join(root, d, unit)
        if os.path.isfile(path):
            break
    else:
        raise UnitError(
            f"unit {unit} not found (looked in {', '.join('/' + d for d in UNIT_DIRS)})"
        )
    files = [UnitFile(path, _read(path))]
    # Drop-ins of every directory, sorted by file name only; a name in a directory of
    # higher priority (UNIT_DIRS order) hides the same name further down.
    dropins: dict[str, str] = {}
    for d in UNIT_DIRS:
        for sub in _dropin_dirs(unit):
            folder = os.path.join(root, d, sub)
            with contextlib.suppress(OSError):
                for name in os.listdir(folder):
                    if name.endswith(".conf"):
                        dropins.setdefault(name, os.path.join(folder, name))
    for name in sorted(dropins):
        path = dropins[name]
        if os.path.realpath(path) != "/dev/null" and os.path.isfile(path):
            files.append(UnitFile(path, _read(path)))
    return files


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def dropin_path(unit: str, root: str = "/") -> str:
    return os.path.join(root, "etc/systemd/system", unit_name(unit) + ".d", DROPIN_NAME)


@dataclasses.dataclass
class Plan:
    """What `write_dropin` writes, and what the user should know about the unit."""

    path: str
    text: str
    notes: list[str]
    created_dir: bool


def plan_dropin(unit: str, options: Sequence[str] = (), *, root: str = "/") -> Plan:
    name = unit_name(unit)
    files = [f for f in _read_files(name, root) if not f.ours()]
    # The fragment comes first, then the drop-ins sorted by name; ours goes in between.
    before = [files[0], *(f for f in files[1:] if f.name < DROPIN_NAME)]
    for later in files[len(before) :]:
        if any(True for _ in _assignments([later.text], "ExecStart")):
            raise UnitError(
                f"{later.path} sets ExecStart= and systemd applies it after {DROPIN_NAME}, "
                "so it would replace the wrapped command: move its ExecStart= into a "
                f"drop-in that sorts before {DROPIN_NAME} (such as override.conf), "
                "then run this again"
            )
    texts = [f.text for f in before]
    commands = exec_starts(texts)
    if not commands:
        raise UnitError(f"unit {name} has no ExecStart= to wrap")
    type_ = service_setting(texts, "Type") or "simple"
    notes = []
    if type_ == "forking" and not service_setting(texts, "PIDFile"):
        notes.append(
            "Type=forking without PIDFile=: systemd cannot tell the daemon from the "
            "supervisor serving it, so $MAINPID stays empty; set PIDFile= to the daemon's"
        )
    stem = name.rpartition(".")[0].split("@")[0]
    socket_unit = any(os.path.isfile(os.path.join(root, d, stem + ".socket")) for d in UNIT_DIRS)
    if socket_unit or service_setting(texts, "Sockets"):
        notes.append(
            "socket activation: the listening sockets are made by systemd, not by the "
            "program, so they stay TCP unless the .socket unit sets SocketProtocol=mptcp "
            "(systemd 257+); the sockets the program makes itself are forced"
        )
    path = dropin_path(name, root)
    created = not os.path.isdir(os.path.dirname(path)) or _created_by_us(path)
    text = render_dropin(name, commands, runner(), options, created_dir=created)
    return Plan(path, text, notes, created)


def _created_by_us(path: str) -> bool:
    """Whether our drop-in (or its earlier name) says we created its directory."""
    folder = os.path.dirname(path)
    for name in (DROPIN_NAME, *OLD_DROPIN_NAMES):
        with contextlib.suppress(OSError):
            text = _read(os.path.join(folder, name))
            if text.startswith(HEADER) and CREATED_DIR in text:
                return True
    return False


def write_dropin(unit: str, options: Sequence[str] = (), *, root: str = "/") -> Plan:
    """Write the drop-in for `unit` (replacing an earlier one of ours)."""
    plan = plan_dropin(unit, options, root=root)
    folder = os.path.dirname(plan.path)
    os.makedirs(folder, exist_ok=True)
    tmp = plan.path + ".tmp"
    with open(tmp, "w") as f:
        f.write(plan.text)
    os.replace(tmp, plan.path)
    for old in OLD_DROPIN_NAMES:  # an earlier name, which sorted before override.conf
        path = os.path.join(folder, old)
        with contextlib.suppress(OSError):
            if _read(path).startswith(HEADER):
                os.unlink(path)
    return plan


def remove_dropin(unit: str, *, root: str = "/") -> str | None:
    """Remove our drop-in; its directory too if we created it and it is now empty.
    Returns the path removed, or None if there was none."""
    path = dropin_path(unit, root)
    folder = os.path.dirname(path)
    removed = None
    created = False
    for candidate in (path, *(os.path.join(folder, n) for n in OLD_DROPIN_NAMES)):
        try:
            text = _read(candidate)
        except OSError:
            continue
        if candidate != path and not text.startswith(HEADER):
            continue  # someone else's file of that name
        os.unlink(candidate)
        removed = removed or candidate
        created = created or CREATED_DIR in text
    if created:
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # only if empty: other drop-ins stay
    return removed
