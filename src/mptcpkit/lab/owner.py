"""Which namespaces belong to which lab, and whether the process that made it still lives.

A namespace name alone proves nothing: anyone can `ip netns add mptk-x`. Every topology
writes a marker file (`/run/mptcpkit-labs/<prefix><name>-<id>.json`) before it creates
its first namespace and removes it after the last one is gone. The marker names the
namespaces and the creator (pid and start time, so a recycled pid is not mistaken for
it). `lab down` removes exactly what markers list: labs left running on purpose
(`lab up`, "detached") and orphans whose creator died without cleaning up; never a
namespace without a marker, never a lab whose creator is still running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

MARK_DIR = "/run/mptcpkit-labs"
DETACHED = "detached"
RUNNING = "running"
ORPHAN = "orphan"


def process_start(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat.rpartition(")")[2].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


@dataclasses.dataclass
class LabRecord:
    """One lab's marker: its id, topology name, hosts and creator."""

    stem: str  # <prefix><topology>-<id>
    prefix: str
    topology: str
    id: str
    hosts: dict[str, str]  # host name -> namespace
    pid: int
    start: int | None
    detached: bool = False

    @property
    def path(self) -> str:
        return os.path.join(MARK_DIR, self.stem + ".json")

    @property
    def state(self) -> str:
        """`detached` (left up on purpose), `running` (its creator lives) or `orphan`."""
        if self.detached:
            return DETACHED
        if self.start is not None and process_start(self.pid) == self.start:
            return RUNNING
        return ORPHAN

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def write(record: LabRecord) -> None:
    """Create or replace the marker (atomically: a reader sees the old or the new one)."""
    tmp = f"{record.path}.{os.getpid()}.tmp"
    for attempt in range(3):
        os.makedirs(MARK_DIR, mode=0o755, exist_ok=True)
        try:
            with open(tmp, "w") as f:
                json.dump(record.as_dict(), f)
            break
        except FileNotFoundError:
            # Another lab's remove() took the empty directory away in between.
            if attempt == 2:
                raise
    os.replace(tmp, record.path)


def remove(record: LabRecord) -> None:
    """Remove the marker, and the marker directory once empty (nothing left in /run)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(record.path)
    with contextlib.suppress(OSError):
        os.rmdir(MARK_DIR)


def read_all(prefix: str) -> list[LabRecord]:
    """The markers of labs whose names start with `prefix` (unreadable ones are skipped)."""
    try:
        names = sorted(os.listdir(MARK_DIR))
    except FileNotFoundError:
        return []
    records = []
    for name in names:
        if not name.endswith(".json") or not name.startswith(prefix):
            continue
        try:
            with open(os.path.join(MARK_DIR, name)) as f:
                data = json.load(f)
            record = LabRecord(**data)
        except (OSError, ValueError, TypeError):
            continue
        if record.prefix == prefix or record.stem.startswith(prefix):
            records.append(record)
    return records


def creator() -> tuple[int, int | None]:
    """This process, as a marker names it."""
    pid = os.getpid()
    return pid, process_start(pid)


__all__ = ["DETACHED", "MARK_DIR", "ORPHAN", "RUNNING", "LabRecord", "read_all"]
