"""The bench's pure parts: recovery time from interval series, the stream, series building."""

from __future__ import annotations

import hashlib
import itertools

from hypothesis import given
from hypothesis import strategies as st

from mptcpkit.lab.sampler import Sample
from mptcpkit.lab.series import recovery_time, series
from mptcpkit.lab.transfer import stream


def intervals(rates: list[float], dt: float = 0.1) -> list[dict[str, float]]:
    """Intervals of `dt` seconds carrying `rate` Mbit/s each."""
    return [
        {"t": round((i + 1) * dt, 6), "dt": dt, "bytes": rate * 1e6 / 8 * dt}
        for i, rate in enumerate(rates)
    ]


def test_recovery_time() -> None:
    # 100 Mbit/s on 2 paths, link down at 2.0 s, nothing for 0.3 s, then 50 Mbit/s.
    ivs = intervals([100] * 20 + [0, 0, 0] + [50] * 10)
    down = [{"action": "down", "link": 1, "t": 2.0}]
    assert recovery_time(ivs, down, paths=2) == 0.4
    # No fault, one path, or a failed fault: no recovery to speak of.
    assert recovery_time(ivs, [], paths=2) is None
    assert recovery_time(ivs, down, paths=1) is None
    assert recovery_time(ivs, [{**down[0], "error": "x"}], paths=2) is None
    # Never recovered.
    assert recovery_time(intervals([100] * 20 + [0] * 10), down, paths=2) is None


@given(
    st.integers(min_value=2, max_value=8),
    st.integers(min_value=0, max_value=30),
    st.integers(min_value=10, max_value=30),
)
def test_recovery_time_is_the_gap(paths: int, gap: int, before: int) -> None:
    per_link = 40.0
    rates = [per_link * paths] * before + [0.0] * gap + [per_link * (paths - 1)] * 10
    t_fault = round(before * 0.1, 6)
    got = recovery_time(intervals(rates), [{"action": "down", "t": t_fault}], paths)
    assert got is not None
    assert abs(got - (gap + 1) * 0.1) < 1e-6


def test_stream_is_deterministic_and_seeded() -> None:
    a = b"".join(bytes(c) for c in itertools.islice(stream(7), 20))
    b = b"".join(bytes(c) for c in itertools.islice(stream(7), 20))
    c = b"".join(bytes(c) for c in itertools.islice(stream(8), 20))
    assert a == b and a != c
    assert len(a) == 20 * 128 * 1024
    assert hashlib.sha256(a).digest() != hashlib.sha256(a[1:] + a[:1]).digest()


def test_series_from_samples() -> None:
    key0, key1 = "10.0.0.1:1->10.0.0.2:9", "10.0.1.1:2->10.0.0.2:9"
    samples = [
        Sample(0.0, 0, {}, {0: 1000, 1: 500}),
        Sample(0.5, 6_250_000, {key0: 3_125_000}, {0: 3_200_000, 1: 500}),
        Sample(1.0, 12_500_000, {key0: 6_250_000, key1: 3_125_000}, {0: 6_400_000, 1: 3_300_000}),
    ]
    ivs, rows = series(samples, {"10.0.0.1": 0, "10.0.1.1": 1})
    assert [iv["total_mbit"] for iv in ivs] == [100.0, 100.0]
    assert ivs[0]["subflows"] == {key0: 50.0}
    assert ivs[1]["subflows"] == {key0: 50.0, key1: 50.0}  # a new subflow starts from 0
    assert ivs[0]["link_bytes"] == {"0": 3_199_000, "1": 0}
    assert sum(iv["bytes"] for iv in ivs) == 12_500_000
    assert [(r["link"], r["bytes_acked"]) for r in rows] == [(0, 6_250_000), (1, 3_125_000)]
