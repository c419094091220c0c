"""What a bench's samples say: intervals and subflow rows, steady goodput, recovery.

Pure functions of the samples (sampler.py), so they are tested without a network.
"""

from __future__ import annotations

import itertools
from typing import Any

from mptcpkit.lab.sampler import Sample

# A link counts as "recovered" once goodput is back to this share of what the surviving
# links carried per link before the fault.
RECOVERY_SHARE = 0.8
# "Steady" goodput leaves out the first second (slow start, joins) and the final drain.
WARMUP_S = 1.0


def series(
    samples: list[Sample], link_of: dict[str, int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    intervals: list[dict[str, Any]] = []
    totals: dict[str, int] = {}
    addrs: dict[str, tuple[str, str]] = {}
    for prev, cur in itertools.pairwise(samples):
        dt = cur.t - prev.t
        if dt <= 0:
            continue
        per_sf = {}
        for key, acked in cur.subflows.items():
            delta = acked - prev.subflows.get(key, 0)
            per_sf[key] = round(max(delta, 0) * 8 / dt / 1e6, 4)
            totals[key] = max(totals.get(key, 0), acked)
            local, _, remote = key.partition("->")
            addrs[key] = (local, remote)
        link_bytes = {
            str(idx): cur.links[idx] - prev.links.get(idx, cur.links[idx]) for idx in cur.links
        }
        intervals.append(
            {
                "t": round(cur.t, 4),
                "dt": round(dt, 4),
                "bytes": cur.received - prev.received,
                "total_mbit": round((cur.received - prev.received) * 8 / dt / 1e6, 4),
                "subflows": per_sf,
                "links": {idx: round(b * 8 / dt / 1e6, 4) for idx, b in link_bytes.items()},
                "link_bytes": link_bytes,
            }
        )
    rows = []
    for key, acked in totals.items():
        local, remote = addrs[key]
        host = local.rsplit(":", 1)[0].strip("[]")
        rows.append(
            {
                "key": key,
                "local": local,
                "remote": remote,
                "link": link_of.get(host),
                "bytes_acked": acked,
            }
        )
    rows.sort(key=lambda r: (r["link"] if r["link"] is not None else 999, r["key"]))
    return intervals, rows


def steady_rate(intervals: list[dict[str, Any]], duration: float) -> float | None:
    """Goodput (bit/s) of the intervals after WARMUP_S and before `duration`, None if none."""
    ivs = [iv for iv in intervals if iv["t"] - iv["dt"] >= WARMUP_S and iv["t"] <= duration]
    seconds = sum(iv["dt"] for iv in ivs)
    return sum(iv["bytes"] for iv in ivs) * 8 / seconds if seconds else None


def recovery_time(
    intervals: list[dict[str, Any]], faults: list[dict[str, Any]], paths: int
) -> float | None:
    """Seconds from the first link-down fault until goodput is back to the surviving share.

    "Back" = an interval (starting after the fault) whose goodput reaches RECOVERY_SHARE
    of the pre-fault goodput scaled to the links still up ((N-1)/N for one link of N).
    Resolution: one interval (the end of the first good interval counts). None when there
    was no down fault, not enough data before it, or no recovery.
    """
    downs = [f for f in faults if f.get("action") == "down" and not f.get("error")]
    if not downs or paths < 2:
        return None
    t_fault = float(downs[0]["t"])
    before = [iv for iv in intervals if iv["t"] <= t_fault and iv["t"] - iv["dt"] >= 0.5]
    if not before:
        before = [iv for iv in intervals if iv["t"] <= t_fault]
    if not before:
        return None
    pre = sum(iv["bytes"] for iv in before) / sum(iv["dt"] for iv in before)
    target = pre * (paths - 1) / paths * RECOVERY_SHARE
    for iv in intervals:
        if iv["t"] - iv["dt"] >= t_fault - 1e-9 and iv["bytes"] / iv["dt"] >= target:
            return round(float(iv["t"]) - t_fault, 4)
    return None
