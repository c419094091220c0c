"""What pmd must not forget when it dies: a small JSON file, rewritten on every change.

A daemon killed with SIGKILL (or crashing under `Restart=on-failure`) cannot clean up.
The next one reads this file to know which endpoints are its own, the values the
sysctls and limits had before any pmd touched them, and the local address ids the
userspace PM handed out. It is written atomically (a temporary file renamed over
it), removed once a clean stop has put everything back, and names the pid that
wrote it, so a second pmd for the same namespace is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

from mptcpkit.pm.codec import Endpoint, EndpointFlag

DEFAULT_DIR = "/run/mptcpkit"


class StateError(OSError):
    """The state file exists but cannot be used (unreadable, not pmd's JSON)."""


@dataclasses.dataclass
class State:
    pid: int = 0
    owned: dict[str, Endpoint] = dataclasses.field(default_factory=dict)
    parked: dict[str, Endpoint] = dataclasses.field(default_factory=dict)
    sysctls: dict[str, str] = dataclasses.field(default_factory=dict)  # key -> original
    limits: tuple[int, int] | None = None  # original (subflows, add_addr_accepted)
    local_ids: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "owned": {a: _ep_json(ep) for a, ep in sorted(self.owned.items())},
            "parked": {a: _ep_json(ep) for a, ep in sorted(self.parked.items())},
            "sysctls": dict(sorted(self.sysctls.items())),
            "limits": list(self.limits) if self.limits is not None else None,
            "local_ids": dict(sorted(self.local_ids.items())),
        }


def _ep_json(ep: Endpoint) -> dict[str, Any]:
    return {
        "id": ep.id,
        "address": ep.address,
        "port": ep.port,
        "flags": int(ep.flags),
        "ifindex": ep.ifindex,
    }


def _ep(data: Any) -> Endpoint:
    return Endpoint(
        id=int(data["id"]),
        address=str(data["address"]),
        port=int(data.get("port", 0)),
        flags=EndpointFlag(int(data.get("flags", 0))),
        ifindex=int(data.get("ifindex", 0)),
    )


def from_json(data: Any) -> State:
    """Parsed JSON -> State; KeyError/TypeError/ValueError when it is not pmd's."""
    limits = data.get("limits")
    return State(
        pid=int(data.get("pid", 0)),
        owned={str(a): _ep(e) for a, e in data.get("owned", {}).items()},
        parked={str(a): _ep(e) for a, e in data.get("parked", {}).items()},
        sysctls={str(k): str(v) for k, v in data.get("sysctls", {}).items()},
        limits=None if limits is None else (int(limits[0]), int(limits[1])),
        local_ids={str(a): int(i) for a, i in data.get("local_ids", {}).items()},
    )


def load(path: str) -> State | None:
    """The state a previous pmd left at `path`; None if there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(exc.errno, f"state file {path}: {exc.strerror}") from None
    try:
        return from_json(json.loads(text))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError):
        raise StateError(
            0, f"state file {path}: not a pmd state file (remove it if no pmd is running)"
        ) from None


def save(path: str, state: State) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state.to_json(), f)
    os.replace(tmp, path)


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def pid_is_pmd(pid: int) -> bool:
    """Is `pid` a live pmd (and not this process)? Read from its command line."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"pmd" in argv and any(b"mptcpkit" in a for a in argv)
