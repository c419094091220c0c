"""The preload strategy: mptcpize's libmptcpwrap, for parity and comparison.

It wraps libc's socket() in dynamically linked programs only (static and Go
binaries bypass it), and has no fallback: where MPTCP cannot be made, socket()
fails. Debian installs it outside the linker's search path, so look there too.
"""

from __future__ import annotations

import glob
import os
import subprocess
from collections.abc import Mapping

LIBRARY = "libmptcpwrap.so.0"
_KNOWN_DIRS = (
    "/usr/lib/*/mptcpize",
    "/usr/lib/mptcpize",
    "/usr/lib64/mptcpize",
    "/usr/local/lib/mptcpize",
    "/usr/local/lib",
    "/usr/lib64",
    "/usr/lib/*",
)


def parse_ldconfig(text: str, name: str = LIBRARY) -> str | None:
    """The path `ldconfig -p` lists for `name`, or None."""
    for line in text.splitlines():
        left, sep, path = line.partition("=>")
        if sep and left.strip().split(" ", 1)[0] == name:
            return path.strip()
    return None


def find_library() -> str | None:
    """libmptcpwrap.so.0 from the linker cache, else from mptcpize's private directory."""
    try:
        out = subprocess.run(
            ["ldconfig", "-p"], capture_output=True, text=True, check=False, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    found = parse_ldconfig(out)
    if found:
        return found
    for pattern in _KNOWN_DIRS:
        for path in sorted(glob.glob(os.path.join(pattern, LIBRARY))):
            if os.path.isfile(path):
                return path
    return None


def environment(library: str, base: Mapping[str, str]) -> dict[str, str]:
    """base plus LD_PRELOAD=library (first) and, like mptcpize, GODEBUG multipathtcp=1."""
    env = dict(base)
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{library} {preload}".strip() if preload else library
    godebug = env.get("GODEBUG", "")
    if "multipathtcp=" not in godebug:
        env["GODEBUG"] = f"{godebug},multipathtcp=1" if godebug else "multipathtcp=1"
    return env
