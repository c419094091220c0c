"""Throughput over time as a PNG: one line per subflow, the total, faults marked.

Uses matplotlib's object API with the Agg canvas, never pyplot, so drawing a plot does
not touch the process-wide backend of a program that imports the lab.
"""

from __future__ import annotations

import os
from typing import Any

from mptcpkit.lab.bench import BenchResult

_FAULT_COLOURS = {"down": "tab:red", "up": "tab:green", "rate": "tab:orange"}


def plot_series(result: BenchResult | dict[str, Any]) -> dict[str, Any]:
    """The series a plot of `result` draws (x = middle of each interval, Mbit/s)."""
    data = result.as_dict() if isinstance(result, BenchResult) else result
    intervals = data["intervals"]
    t = [iv["t"] - iv["dt"] / 2 for iv in intervals]
    lines: dict[str, list[float]] = {}
    for sf in data["subflows"]:
        link = sf.get("link")
        label = f"link {link}: {sf['key']}" if link is not None else sf["key"]
        lines[label] = [iv["subflows"].get(sf["key"], 0.0) for iv in intervals]
    return {
        "t": t,
        "total": [iv["total_mbit"] for iv in intervals],
        "subflows": lines,
        "faults": [(f["t"], f.get("action", "?"), f.get("link")) for f in data.get("faults", [])],
    }


def plot(result: BenchResult | dict[str, Any], path: str | os.PathLike[str]) -> dict[str, Any]:
    """Draw `result` into a PNG at `path`; returns the series drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = result.as_dict() if isinstance(result, BenchResult) else result
    series = plot_series(data)
    fig = Figure(figsize=(9, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, values in series["subflows"].items():
        ax.plot(series["t"], values, linewidth=1.2, label=label)
    ax.plot(series["t"], series["total"], color="black", linewidth=2.2, label="total (goodput)")
    top = max([*series["total"], *(v for vs in series["subflows"].values() for v in vs), 1.0])
    for t, action, link in series["faults"]:
        colour = _FAULT_COLOURS.get(action, "tab:gray")
        ax.axvline(t, color=colour, linestyle="--", linewidth=2.0)
        ax.text(t, top * 1.02, f" {action} {link}", color=colour, fontsize=8, va="bottom")
    rate = data.get("rate_mbit")
    title = f"{data['protocol'].upper()} over {data['paths']} path(s)"
    if rate:
        title += f" of {rate:g} Mbit/s"
    title += f": {data['goodput_mbit']:.1f} Mbit/s, verified={data['verified']}"
    ax.set_title(title)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("throughput (Mbit/s)")
    ax.set_ylim(0, top * 1.12)
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
    return series
