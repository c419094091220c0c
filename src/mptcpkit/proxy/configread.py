"""Reading one TOML table of the configuration: its keys, durations and addresses.

Every section of the file (config.py, configfrontend.py, configbackend.py) reads its
table through a `Reader`, which knows the key path, so that each error names the file,
the key and the reason, worded the same way everywhere.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from mptcpkit.address import Address, parse_address
from mptcpkit.proxy.configmodel import ConfigError

__all__ = ["NAME", "Reader", "kind", "parse_duration", "read_address"]

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")  # frontends, backends, servers


def parse_duration(value: object) -> float:
    """Seconds from a number or "500ms", "5s", "2m", "1h"; raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
        if not m:
            raise ValueError(f"expected a duration like 500ms, 5s, 2m, got {value!r}")
        unit = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2) or "s"]
        seconds = float(m.group(1)) * unit
    else:
        raise ValueError(f"expected a duration, got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"duration must be finite and >= 0, got {value!r}")
    return seconds


class Reader:
    """Reads one table, remembering the key path for error messages."""

    def __init__(self, source: str, path: str, table: object) -> None:
        self.source = source
        self.path = path
        if not isinstance(table, dict):
            raise ConfigError(source, path, f"expected a table, got {kind(table)}")
        self.table: dict[str, Any] = table

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, reason: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), reason)

    def only(self, allowed: Iterable[str]) -> None:
        allowed = set(allowed)
        for name in self.table:
            if name not in allowed:
                hint = _suggest(name, allowed)
                raise self.error(name, f"unknown key{hint} (allowed: {', '.join(sorted(allowed))})")

    def has(self, name: str) -> bool:
        return name in self.table

    def get_int(self, name: str, default: int, lo: int = 0, hi: int = 1 << 31) -> int:
        v = self.table.get(name, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(name, f"expected an integer, got {kind(v)}")
        if not lo <= v <= hi:
            raise self.error(name, f"must be between {lo} and {hi}, got {v}")
        return v

    def get_bool(self, name: str, default: bool) -> bool:
        v = self.table.get(name, default)
        if not isinstance(v, bool):
            raise self.error(name, f"expected true or false, got {kind(v)}")
        return v

    def get_str(self, name: str, default: str | None) -> str | None:
        v = self.table.get(name, default)
        if v is not None and not isinstance(v, str):
            raise self.error(name, f"expected a string, got {kind(v)}")
        return v

    def choice(self, name: str, default: str, choices: Sequence[str]) -> str:
        v = self.get_str(name, default)
        if v is None or v not in choices:
            raise self.error(name, f"must be one of {', '.join(choices)}, got {v!r}")
        return v

    def duration(self, name: str, default: float | None, allow_none: bool = False) -> float | None:
        v = self.table.get(name, default)
        if v is None or (allow_none and v in ("none", "off", 0)):
            return None if allow_none else default
        try:
            return parse_duration(v)
        except ValueError as exc:
            raise self.error(name, str(exc)) from None

    def sub(self, name: str) -> Reader:
        return Reader(self.source, self.key(name), self.table.get(name, {}))


def kind(v: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(v), type(v).__name__) + f" ({v!r})"


def _suggest(name: str, allowed: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_address(r: Reader, key: str, text: object, *, server: bool) -> Address:
    if not isinstance(text, str):
        raise r.error(key, f"expected an address string like 'mptcp@:8443', got {kind(text)}")
    try:
        addr = parse_address(text)
    except ValueError as exc:
        raise r.error(key, f"bad address {text!r}: {exc}") from None
    if addr.protocol not in ("tcp", "mptcp", "unix"):
        raise r.error(
            key, f"bad address {text!r}: protocol {addr.protocol!r} cannot carry a stream"
        )
    if addr.protocol != "unix":
        if addr.port is None:
            raise r.error(key, f"bad address {text!r}: a port is needed, as in {text}:8443")
        if server and addr.port_end != addr.port:
            raise r.error(key, f"bad address {text!r}: a server takes one port, not a range")
        if server and addr.port == 0 and addr.host in ("0.0.0.0", "::"):
            return addr  # the original destination (HAProxy's `server s 0.0.0.0:0`)
        if server and (not addr.host or addr.port == 0):
            raise r.error(key, f"bad address {text!r}: a server needs a host and a port")
    return addr
