"""Counters of what forcing did to a program's sockets, for `--stats`."""

from __future__ import annotations

import collections
import dataclasses
from typing import TextIO


@dataclasses.dataclass
class Stats:
    """What the supervisor did, for `--stats`."""

    forced: int = 0  # made MPTCP at socket()
    fell_back: int = 0  # MPTCP could not be made: plain TCP
    left_alone: int = 0  # trapped but deliberately not forced
    swapped: int = 0  # forced, then rebuilt as plain TCP before use
    repaired: int = 0  # the program's own MPTCP sockets rebuilt as plain TCP (TCP-only option)
    reasons: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    warnings: list[str] = dataclasses.field(default_factory=list)
    # TCP-only options refused on MPTCP sockets already connected or accepted: lost
    lost: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def line(self) -> str:
        mptcp = self.forced - self.swapped
        parts = [
            f"{mptcp} socket{'s' if mptcp != 1 else ''} forced to MPTCP",
            f"{self.fell_back} fell back to TCP",
            f"{self.left_alone + self.swapped} left alone",
        ]
        if self.repaired:
            parts.append(f"{self.repaired} of the program's own MPTCP sockets made plain TCP")
        text = ", ".join(parts)
        if self.reasons:
            detail = "; ".join(f"{why}: {n}" for why, n in sorted(self.reasons.items()))
            text += f" ({detail})"
        if self.lost:
            lost = ", ".join(f"{name} x{n}" for name, n in sorted(self.lost.items()))
            text += f"; options lost on connected MPTCP sockets: {lost}"
        return text

    def as_dict(self) -> dict[str, object]:
        return {
            "forced": self.forced - self.swapped,
            "fell_back": self.fell_back,
            "left_alone": self.left_alone + self.swapped,
            "swapped_to_tcp": self.swapped,
            "repaired": self.repaired,
            "reasons": dict(self.reasons),
            "warnings": list(self.warnings),
            "lost_options": dict(self.lost),
        }


def report(stats: Stats, fmt: str, out: TextIO) -> None:
    """`--stats` (fmt "text") or `--stats=json`, one line on `out`."""
    import json  # only here: the supervisor, not the command's start, pays for it

    line = json.dumps(stats.as_dict()) if fmt == "json" else f"mptcpkit run: {stats.line()}"
    print(line, file=out, flush=True)
