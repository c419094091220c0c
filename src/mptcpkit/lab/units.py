"""Rates and durations as people write them for `tc` ("50mbit", "4s"), parsed once.

Pure functions: the lab passes rate strings straight to `tc`, but measurements and the
command line need them as numbers, and both must agree with tc's reading.
"""

from __future__ import annotations

import re

# tc(8) units: bit-based and byte-based ("Bps" = bytes per second), decimal and binary.
_RATE_UNITS: dict[str, float] = {
    "": 1,  # a bare number is bits per second, as in tc
    "bit": 1,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
    "kibit": 1024,
    "mibit": 1024**2,
    "gibit": 1024**3,
    "tibit": 1024**4,
    "bps": 8,
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
    "tbps": 8e12,
    "kibps": 8 * 1024,
    "mibps": 8 * 1024**2,
    "gibps": 8 * 1024**3,
    "tibps": 8 * 1024**4,
}

_SIZE_UNITS: dict[str, float] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "kbit": 1024 / 8,
    "mbit": 1024**2 / 8,
    "gbit": 1024**3 / 8,
}

_TIME_UNITS: dict[str, float] = {
    "": 1.0,
    "s": 1.0,
    "sec": 1.0,
    "secs": 1.0,
    "ms": 1e-3,
    "msec": 1e-3,
    "msecs": 1e-3,
    "us": 1e-6,
    "usec": 1e-6,
    "usecs": 1e-6,
}

_NUMBER = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def _split(text: str, what: str) -> tuple[float, str]:
    m = _NUMBER.match(text)
    if m is None:
        raise ValueError(f"{what} {text!r}: expected a number with a unit, e.g. '50mbit'")
    return float(m.group(1)), m.group(2).lower()


def _scaled(
    value: str | int | float, what: str, units: dict[str, float], example: str, hint: str
) -> float:
    """`value` in base units: a number as it is, or a string of a number and a unit."""
    if isinstance(value, bool):
        raise ValueError(f"{what} {value!r}: expected a number or a string such as {example!r}")
    if isinstance(value, int | float):
        return float(value)
    number, unit = _split(value, what)
    if unit not in units:
        raise ValueError(f"{what} {value!r}: unknown unit {unit!r} ({hint})")
    return number * units[unit]


def parse_rate(rate: str | int | float) -> float:
    """Return `rate` in bits per second; numbers pass through, strings use tc's units.

    A bare number in a string is bits per second, as in tc ("50mbit", "6Mbps", "1gbit").
    """
    value = _scaled(
        rate, "rate", _RATE_UNITS, "50mbit", "use bit, kbit, mbit, gbit or kbps, mbps..."
    )
    if value <= 0:
        raise ValueError(f"rate {rate!r}: must be more than 0")
    return value


def parse_size(size: str | int) -> int:
    """Return `size` in bytes, using tc's size units ("32kbit" = 4096 bytes, "64k")."""
    value = _scaled(size, "size", _SIZE_UNITS, "32kbit", "use b, k, m, kbit, mbit")
    if value <= 0:
        raise ValueError(f"size {size!r}: must be more than 0")
    return round(value)


def parse_duration(text: str | int | float) -> float:
    """Return a duration in seconds: "4s", "250ms", "1.5" (seconds), or a number."""
    value = _scaled(text, "duration", _TIME_UNITS, "4s", "use s, ms or us")
    if value < 0:
        raise ValueError(f"duration {text!r}: must not be negative")
    return value


def format_rate(bits_per_second: float) -> str:
    """Format a rate for tc and for people: the largest unit that keeps an integer."""
    if bits_per_second <= 0:
        raise ValueError(f"rate {bits_per_second!r}: must be more than 0")
    for unit, factor in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)):
        if bits_per_second >= factor and float(bits_per_second / factor).is_integer():
            return f"{int(bits_per_second / factor)}{unit}"
    return f"{round(bits_per_second)}bit"
