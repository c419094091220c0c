"""What a bench promised, and whether the run kept the promise.

A bench over N links claims N paths: "verified" over one subflow is not a multipath
result. The topology says which links should carry data (endpoints, backup flags, the
scenario); the run says which did (bytes acked by the subflows on each link). When they
differ, the verdict says why, in one line per link, and the bench exits non-zero.
Pure functions over the bench's JSON-ready rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable
from typing import Any

# A link "carried data" when its subflows got at least this share of all bytes acked
# (and at least MIN_BYTES): a subflow that only exchanged its handshake does not count.
MIN_SHARE = 0.01
MIN_BYTES = 64 * 1024


@dataclasses.dataclass
class Promise:
    """The links that should carry data, and why a link is left out or expected."""

    links: list[int]
    fallback: bool = False  # the connection is expected to fall back to TCP
    notes: list[str] = dataclasses.field(default_factory=list)


def promise(
    *,
    protocol: str,
    links: int,
    endpoint_links: Collection[int],
    backup_links: Collection[int] = (),
    faults: Iterable[dict[str, Any]] = (),
    strip_mptcp: bool = False,
) -> Promise:
    """The links a bench over `links` links should use.

    `endpoint_links`: links with an MPTCP endpoint (besides link 0, which the connection
    itself uses). Backup links are expected only once a link that is not a backup went
    down. A link taken down at the start and never brought back is not expected.
    """
    if protocol != "mptcp":
        return Promise([0], notes=["plain TCP uses link 0 only"])
    if strip_mptcp:
        return Promise([0], fallback=True, notes=["MPTCP options stripped: TCP on link 0"])
    expected = {0} | {i for i in endpoint_links if 0 <= i < links}
    notes = []
    faults = list(faults)
    downs = {int(f["link"]) for f in faults if f.get("action") == "down"}
    ups = {int(f["link"]) for f in faults if f.get("action") == "up"}
    backups = set(backup_links) & expected
    if backups:
        if downs - backups:
            notes.append(f"backup link(s) {_fmt(backups)} used once link(s) {_fmt(downs)} failed")
        else:
            expected -= backups
            notes.append(f"backup link(s) {_fmt(backups)} idle while the others work")
    at_start = {
        int(f["link"])
        for f in faults
        if f.get("action") == "down" and float(f.get("at", f.get("t", 1))) <= 0
    }
    for i in sorted(at_start - ups):
        expected.discard(i)
        notes.append(f"link {i} is down from the start")
    return Promise(sorted(expected), notes=notes)


@dataclasses.dataclass
class Verdict:
    ok: bool
    expected_links: list[int]
    used_links: list[int]
    bytes_per_link: dict[int, int]
    reasons: list[str]
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bytes_per_link"] = {str(k): v for k, v in self.bytes_per_link.items()}
        return d


def judge(
    want: Promise,
    subflows: Iterable[dict[str, Any]],
    *,
    mptcp: bool,
    memory_warning: str | None = None,
) -> Verdict:
    """Compare the promise with the subflow rows (`link`, `bytes_acked`) of a run."""
    rows = list(subflows)
    per_link: dict[int, int] = {}
    opened: set[int] = set()
    for row in rows:
        if row.get("link") is None:
            continue
        link = int(row["link"])
        opened.add(link)
        per_link[link] = per_link.get(link, 0) + int(row.get("bytes_acked") or 0)
    total = sum(per_link.values())
    floor = max(MIN_BYTES, total * MIN_SHARE)
    used = sorted(i for i, b in per_link.items() if b >= floor)
    reasons = []
    if want.fallback and mptcp:
        reasons.append("the connection stayed MPTCP although its options were stripped")
    if not want.fallback and not mptcp and len(want.links) > 1:
        reasons.append("the connection fell back to plain TCP: one path only")
    for link in want.links:
        if link in used:
            continue
        if link not in opened:
            why = "no subflow was opened on it"
        else:
            why = f"its subflow(s) carried {per_link[link]:,} of {total:,} bytes"
        if memory_warning:
            why += " (TCP memory pressure: see the warning)"
        reasons.append(f"link {link} carried no data: {why}")
    unexpected = [i for i in used if i not in want.links]
    for link in unexpected:
        reasons.append(f"link {link} carried data although it was not expected to")
    return Verdict(
        ok=not reasons,
        expected_links=list(want.links),
        used_links=used,
        bytes_per_link=dict(sorted(per_link.items())),
        reasons=reasons,
        notes=list(want.notes),
    )


def _fmt(links: Iterable[int]) -> str:
    return ", ".join(str(i) for i in sorted(links))


__all__ = ["MIN_BYTES", "MIN_SHARE", "Promise", "Verdict", "judge", "promise"]
