"""The kernel selftests' network conditions, made with what every kernel has.

The MPTCP selftests (tools/testing/selftests/net/mptcp) lean on netem for loss, delay
and reordering. Without netem, packet filters do most of it: random loss per link is an
nftables `numgen random` drop, a middlebox that strips MPTCP is iptables `TCPOPTSTRIP`
of option 30, lost ADD_ADDRs are an nftables drop of the first N MPTCP options of
subtype 3 (ADD_ADDR). Rules live in the lab's namespaces only (table `inet mptcpkit`),
each with a counter the bench reports. Delay, jitter and reordering still need netem:
`netem_available` says whether this kernel has it.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from mptcpkit.lab.host import Host
from mptcpkit.lab.netns import LabError
from mptcpkit.lab.topology import Topology

TABLE = "mptcpkit"
MPTCP_OPTION = 30  # TCP option kind of MPTCP
ADD_ADDR_SUBTYPE = 3
_LOSS_SCALE = 10000  # numgen modulus: loss in steps of 0.01 %


def _nft(host: Host, rules: list[str]) -> None:
    """Add rules to the postrouting chain of table inet mptcpkit in `host` (made on demand)."""
    script = [
        f"table inet {TABLE} {{",
        "  chain post { type filter hook postrouting priority 0; policy accept; }",
        "}",
        *(f"add rule inet {TABLE} post {rule}" for rule in rules),
    ]
    proc = host.run(["nft", "-f", "-"], input="\n".join(script) + "\n", check=False)
    if proc.returncode != 0:
        raise LabError(f"nft in {host.name}: {proc.stderr.strip() or proc.returncode}")


def add_loss(net: Topology, link: int, percent: float) -> None:
    """Drop `percent` % of the packets leaving either end of `link`, at random."""
    if not 0 < percent < 100:
        raise ValueError(f"loss {percent!r}%: expected more than 0 and less than 100")
    threshold = round(percent / 100 * _LOSS_SCALE)
    if threshold < 1:
        raise ValueError(f"loss {percent!r}%: the smallest step is {100 / _LOSS_SCALE:g}%")
    lk = net.link(link)
    for end in lk.ends:
        _nft(
            end.host,
            [
                f'oifname "{end.name}" numgen random mod {_LOSS_SCALE} < {threshold} '
                f'counter drop comment "loss-{link}"'
            ],
        )


def drop_add_addr(host: Host, count: int) -> None:
    """Drop the first `count` packets carrying an ADD_ADDR that leave `host`.

    The sender retransmits an unechoed ADD_ADDR after `net.mptcp.add_addr_timeout`, which
    is set to 1 s here so a bench sees the retransmission.
    """
    if count < 1:
        raise ValueError(f"drop ADD_ADDR {count!r}: expected 1 or more")
    host.sysctl("net.mptcp.add_addr_timeout", 1)
    _nft(
        host,
        [
            f"tcp option mptcp subtype {ADD_ADDR_SUBTYPE} numgen inc mod 1000000000 < {count} "
            'counter drop comment "drop-add-addr"'
        ],
    )


def strip_mptcp(host: Host, dev: str) -> None:
    """A middlebox on `dev` of `host`: remove the MPTCP option from every TCP packet sent.

    The peer sees plain TCP; the connection must fall back to TCP (RFC 8684, 3.7).
    """
    for tool in ("iptables", "ip6tables"):
        argv = [tool, "-t", "mangle", "-A", "POSTROUTING", "-o", dev, "-p", "tcp"]
        argv += ["-j", "TCPOPTSTRIP", "--strip-options", str(MPTCP_OPTION)]
        try:
            proc = host.run(argv, check=False)
        except FileNotFoundError:
            raise LabError(f"{tool} not found: stripping MPTCP options needs iptables") from None
        if proc.returncode != 0:
            raise LabError(f"{' '.join(argv)} in {host.name}: {proc.stderr.strip()}")


def filter_counters(host: Host) -> dict[str, int]:
    """Packets each commented rule of table inet mptcpkit in `host` matched."""
    proc = host.run(["nft", "-j", "list", "table", "inet", TABLE], check=False)
    if proc.returncode != 0:
        return {}
    out: dict[str, int] = {}
    with contextlib.suppress(ValueError, KeyError, TypeError):
        for item in json.loads(proc.stdout)["nftables"]:
            rule = item.get("rule")
            if not rule or "comment" not in rule:
                continue
            for expr in rule["expr"]:
                if "counter" in expr:
                    name = rule["comment"]
                    out[name] = out.get(name, 0) + int(expr["counter"]["packets"])
    return out


def qdisc_drops(host: Host) -> dict[str, int]:
    """Packets each device's qdiscs in `host` dropped (tbf's full queue, netem...), by device."""
    proc = host.run(["tc", "-s", "-j", "qdisc", "show"], check=False)
    if proc.returncode != 0:
        return {}
    out: dict[str, int] = {}
    with contextlib.suppress(ValueError, KeyError, TypeError):
        for q in json.loads(proc.stdout):
            if q.get("kind") not in ("noqueue", None):
                out[q["dev"]] = out.get(q["dev"], 0) + int(q.get("drops", 0))
    return out


def netem_available(host: Host) -> bool:
    """Whether this kernel has the netem qdisc (tried on `lo` inside `host`, then removed)."""
    proc = host.run(
        ["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms"], check=False
    )
    if proc.returncode != 0:
        return False
    host.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False)
    return True


def describe(scenario: dict[str, Any]) -> str:
    """A short human description of a scenario dict (what the bench JSON records)."""
    parts = []
    for link, pct in sorted(scenario.get("loss", {}).items()):
        parts.append(f"{pct:g}% loss on link {link}")
    if scenario.get("strip_mptcp"):
        parts.append("a middlebox strips MPTCP options on link 0")
    if scenario.get("drop_add_addr"):
        parts.append(f"the first {scenario['drop_add_addr']} ADD_ADDR(s) dropped")
    if scenario.get("backup"):
        parts.append(f"backup link(s) {', '.join(map(str, scenario['backup']))}")
    if scenario.get("flows", 1) > 1:
        parts.append(f"{scenario['flows']} simultaneous flows")
    if scenario.get("fastclose"):
        parts.append("the sender ends with MP_FASTCLOSE")
    return "; ".join(parts)


__all__ = [
    "add_loss",
    "describe",
    "drop_add_addr",
    "filter_counters",
    "netem_available",
    "strip_mptcp",
]
