"""Rate, size and duration parsing (pure): tc's units, round trips, clear errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mptcpkit.lab.units import format_rate, parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("50mbit", 50e6),
        ("50Mbit", 50e6),
        ("1gbit", 1e9),
        ("20kbit", 20e3),
        ("6mbps", 48e6),
        ("1.5mbit", 1.5e6),
        ("1mibit", 1024**2),
        ("1000", 1000),
        (" 10 mbit ", 10e6),
    ],
)
def test_parse_rate(text: str, bps: float) -> None:
    assert parse_rate(text) == bps


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("fast", "expected a number with a unit"),
        ("50mbits", "unknown unit 'mbits'"),
        ("0mbit", "must be more than 0"),
        ("-5mbit", "expected a number"),
    ],
)
def test_parse_rate_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rate(text)


def test_sizes_and_durations() -> None:
    assert parse_size("32kbit") == 4096
    assert parse_size("64k") == 65536
    assert parse_size(1500) == 1500
    assert parse_duration("4s") == 4.0
    assert parse_duration("250ms") == 0.25
    assert parse_duration("1.5") == 1.5
    assert parse_duration(2) == 2.0
    with pytest.raises(ValueError, match="unknown unit 'h'"):
        parse_duration("1h")
    with pytest.raises(ValueError):
        parse_rate(True)


@given(st.integers(min_value=1, max_value=10**12))
def test_format_rate_round_trips(bps: int) -> None:
    text = format_rate(bps)
    assert parse_rate(text) == bps
    assert text[0].isdigit()


@given(st.integers(min_value=1, max_value=100_000), st.sampled_from(["kbit", "mbit", "gbit"]))
def test_format_rate_picks_the_largest_exact_unit(n: int, unit: str) -> None:
    text = format_rate(parse_rate(f"{n}{unit}"))
    assert parse_rate(text) == parse_rate(f"{n}{unit}")
    number = int(text.rstrip("bitkmg"))
    assert number % 1000 != 0 or text.endswith("gbit")


@given(st.floats(min_value=0.001, max_value=1e6, allow_nan=False))
def test_durations_in_ms_and_s_agree(seconds: float) -> None:
    assert parse_duration(f"{seconds * 1000!r}ms") == pytest.approx(seconds)
    assert parse_duration(f"{seconds!r}s") == pytest.approx(seconds)
