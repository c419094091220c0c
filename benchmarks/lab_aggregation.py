"""MPTCP bandwidth aggregation and failover in the lab, against single-path TCP.

For N in (2, 4) equal links of RATE: single-path TCP goodput, MPTCP goodput, their ratio
(target: MPTCP >= 0.97 x N x TCP; tbf counts link-layer bytes, so 1.0 is the physical
limit), and a failover run: one link goes down half-way through an MPTCP transfer;
bytes lost (must be 0) and seconds until goodput is back on the surviving links (target:
within 1 s). All in one run, on the same topology per N.

    python3 benchmarks/lab_aggregation.py [--rate 50mbit] [--duration 8] [--paths 2 4] [--json]
    python3 benchmarks/lab_aggregation.py --rates 50mbit,10mbit [--duration 12]

`--rates`: links of different rates instead; TCP alone on each link, then MPTCP over all,
against the sum of the rates and the sum of the TCP goodputs (target: >= 0.9 x the sum).

Needs root. Goodput is reported two ways: over the whole transfer (first to last byte,
slow start included) and "steady" (intervals after the first second).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from mptcpkit import lab
from mptcpkit.lab.bench import BenchResult, run_bench
from mptcpkit.lab.faults import Fault

WARMUP_S = 1.0


def steady_mbit(result: BenchResult) -> float:
    ivs = [iv for iv in result.intervals if iv["t"] - iv["dt"] >= WARMUP_S]
    end = result.requested_duration_s
    ivs = [iv for iv in ivs if iv["t"] <= end] or ivs
    seconds = sum(iv["dt"] for iv in ivs)
    return sum(iv["bytes"] for iv in ivs) * 8 / seconds / 1e6 if seconds else 0.0


def measure(paths: int, rate: str, duration: float, repeat: int) -> dict[str, Any]:
    rate_mbit = lab.parse_rate(rate) / 1e6
    out: dict[str, Any] = {"paths": paths, "rate_mbit": rate_mbit}
    runs: dict[str, list[BenchResult]] = {"tcp": [], "mptcp": []}
    with lab.two_paths(paths=paths, rate=rate) as net:
        for _ in range(repeat):
            for protocol in ("tcp", "mptcp"):
                r = run_bench(net, duration=duration, protocol=protocol, interval=0.25)
                if not r.ok:
                    raise SystemExit(
                        f"{protocol} x{paths}: not verified or not as promised: "
                        f"{r.error or r.claim['reasons']} {r.warnings}"
                    )
                runs[protocol].append(r)
                print(
                    f"  {paths} paths {protocol:5}: {r.goodput_mbit:6.1f} Mbit/s "
                    f"(steady {steady_mbit(r):6.1f})",
                    file=sys.stderr,
                )
        fail_at = duration / 2
        fo = run_bench(
            net,
            duration=duration,
            protocol="mptcp",
            interval=0.1,
            faults=[Fault(fail_at, paths - 1, "down")],
        )
    for protocol, rs in runs.items():
        out[protocol] = {
            "goodput_mbit": statistics.median(r.goodput_mbit for r in rs),
            "steady_mbit": statistics.median(steady_mbit(r) for r in rs),
            "subflows": len(rs[-1].subflows),
        }
    tcp, mptcp = out["tcp"], out["mptcp"]
    out["ratio_vs_n_tcp"] = mptcp["goodput_mbit"] / (paths * tcp["goodput_mbit"])
    out["steady_ratio_vs_n_tcp"] = mptcp["steady_mbit"] / (paths * tcp["steady_mbit"])
    out["ratio_vs_sum_of_rates"] = mptcp["goodput_mbit"] / (paths * rate_mbit)
    out["steady_ratio_vs_sum_of_rates"] = mptcp["steady_mbit"] / (paths * rate_mbit)
    out["tcp_vs_rate"] = tcp["steady_mbit"] / rate_mbit
    after = [iv for iv in fo.intervals if iv["t"] - iv["dt"] >= fo.faults[0]["t"] + 1.0]
    after_s = sum(iv["dt"] for iv in after)
    out["failover"] = {
        "link": paths - 1,
        "at_s": fo.faults[0]["t"],
        "verified": fo.verified,
        "bytes_lost": fo.lost_bytes,
        "recovery_s": fo.recovery_s,
        "goodput_after_mbit": sum(iv["bytes"] for iv in after) * 8 / after_s / 1e6
        if after_s
        else None,
        "goodput_mbit": fo.goodput_mbit,
    }
    return out


def measure_rates(rates: list[str], duration: float, repeat: int) -> dict[str, Any]:
    """TCP alone on each link, MPTCP over all of them, on links of different rates."""
    total = sum(lab.parse_rate(r) for r in rates) / 1e6
    tcp: list[list[BenchResult]] = [[] for _ in rates]
    mptcp: list[BenchResult] = []
    with lab.two_paths(paths=len(rates), rates=rates) as net:
        server = net.host("server")
        for _ in range(repeat):
            for i in range(len(rates)):
                r = run_bench(
                    net, duration=duration, protocol="tcp", interval=0.25, address=server.address(i)
                )
                tcp[i].append(r)
            r = run_bench(net, duration=duration, protocol="mptcp", interval=0.25)
            if not (r.verified and r.claim["ok"]):
                raise SystemExit(f"mptcp over {rates}: not verified or not as promised: {r.claim}")
            mptcp.append(r)
            print(
                f"  {'+'.join(rates)}: TCP {[round(t[-1].goodput_mbit, 1) for t in tcp]} "
                f"MPTCP {r.goodput_mbit:.1f} (steady {steady_mbit(r):.1f}) Mbit/s",
                file=sys.stderr,
            )
    tcp_sum = sum(statistics.median(steady_mbit(r) for r in rs) for rs in tcp)
    whole = statistics.median(r.goodput_mbit for r in mptcp)
    steady = statistics.median(steady_mbit(r) for r in mptcp)
    per_link = [
        statistics.median(
            sum(
                iv["subflows"].get(sf["key"], 0) * iv["dt"]
                for iv in r.intervals
                if iv["t"] - iv["dt"] >= WARMUP_S and iv["t"] <= duration
            )
            / sum(
                iv["dt"]
                for iv in r.intervals
                if iv["t"] - iv["dt"] >= WARMUP_S and iv["t"] <= duration
            )
            for r in mptcp
            for sf in r.subflows
            if sf["link"] == i
        )
        for i in range(len(rates))
    ]
    return {
        "rates": rates,
        "sum_of_rates_mbit": total,
        "tcp_steady_mbit": [statistics.median(steady_mbit(r) for r in rs) for rs in tcp],
        "mptcp_mbit": whole,
        "mptcp_steady_mbit": steady,
        "mptcp_steady_per_link_mbit": per_link,
        "ratio_vs_sum_of_rates": whole / total,
        "steady_ratio_vs_sum_of_rates": steady / total,
        "steady_ratio_vs_sum_of_tcp": steady / tcp_sum,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", default="50mbit")
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--paths", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--rates", default=None, help="links of different rates: 50mbit,10mbit")
    parser.add_argument("--repeat", type=int, default=3, help="runs per protocol (median)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.rates:
        res = measure_rates(args.rates.split(","), args.duration, args.repeat)
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        print(f"links {args.rates}, {args.duration:g} s per transfer (shared CPU!)")
        print(f"  TCP alone per link (steady): {[round(x, 1) for x in res['tcp_steady_mbit']]}")
        print(
            f"  MPTCP: {res['mptcp_mbit']:.1f} Mbit/s = {res['ratio_vs_sum_of_rates']:.3f} of "
            f"the sum of rates; steady {res['mptcp_steady_mbit']:.1f} = "
            f"{res['steady_ratio_vs_sum_of_rates']:.3f} of the sum, "
            f"{res['steady_ratio_vs_sum_of_tcp']:.3f} of the sum of TCP; per link "
            f"{[round(x, 1) for x in res['mptcp_steady_per_link_mbit']]}"
        )
        return 0
    results = [measure(n, args.rate, args.duration, args.repeat) for n in args.paths]
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"rate per link {args.rate}, {args.duration:g} s per transfer (shared CPU!)")
    header = (
        f"{'N':>2} {'TCP':>7} {'MPTCP':>7} {'MPTCP/(N*TCP)':>14} {'steady':>7} "
        f"{'MPTCP/sum(rates)':>16} {'steady':>7} {'lost':>5} {'recovery':>9}"
    )
    print(header)
    ok = True
    for r in results:
        fo = r["failover"]
        rec = f"{fo['recovery_s']:.2f} s" if fo["recovery_s"] is not None else "never"
        print(
            f"{r['paths']:>2} {r['tcp']['goodput_mbit']:7.1f} {r['mptcp']['goodput_mbit']:7.1f} "
            f"{r['ratio_vs_n_tcp']:14.3f} {r['steady_ratio_vs_n_tcp']:7.3f} "
            f"{r['ratio_vs_sum_of_rates']:16.3f} {r['steady_ratio_vs_sum_of_rates']:7.3f} "
            f"{fo['bytes_lost']:>5} {rec:>9}"
        )
        ok &= r["steady_ratio_vs_n_tcp"] >= 0.97 and fo["bytes_lost"] == 0
        ok &= fo["recovery_s"] is not None and fo["recovery_s"] <= 1.0
    print(
        "targets (>= 0.97 x N x TCP steady, 0 bytes lost, recovery <= 1 s):",
        "met" if ok else "NOT met",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
