"""The bonding topology: a site reaching the internet over all of its uplinks.

    client ==lan== site ==uplink 1..N== remote ==wan== internet

Link 0 (LAN) joins `client` (10.0.0.1) and the site gateway `site` (10.0.0.2, the
client's default route). Links 1..N are the site's uplinks to the remote gateway
(`site` 10.0.i.1 — `remote` 10.0.i.2), shaped to `rate`; the site has one `subflow`
endpoint per uplink, bound to its device. Link N+1 (WAN) joins `remote` (10.0.N+1.1)
and `internet` (10.0.N+1.2), unshaped. The internet host also answers at
`DESTINATIONS` (on its loopback), reached through the remote gateway; nothing routes
them from the site, so a LAN client gets there only through the converter pair.

`intercept(site, "redirect"|"tproxy", port)` installs the nftables rules (and, for
tproxy, the policy routing) that hand the LAN's TCP connections to a local port.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mptcpkit.lab.host import Host
from mptcpkit.lab.netns import LabError
from mptcpkit.lab.process import Process
from mptcpkit.lab.topologies import _bound_routes
from mptcpkit.lab.topology import Topology

__all__ = [
    "DESTINATIONS",
    "ENCODINGS",
    "MODES",
    "Gateways",
    "add_destinations",
    "bonding",
    "intercept",
    "remote_config",
    "site_config",
    "start_gateways",
    "start_proxy",
]

ENCODINGS = ("convert", "proxy-v2")

DESTINATIONS = ("10.200.0.1", "10.200.0.2", "fd00:200::1", "fd00:200::2")
MODES = ("redirect", "tproxy")
_TPROXY_MARK = 0x1B
_TPROXY_TABLE = 233
_TPROXY_PREF = 233


def bonding(
    uplinks: int = 2,
    rate: str | None = "50mbit",
    *,
    rates: list[str] | None = None,
    latency: str = "50ms",
    delay: str | None = None,
    prefix: str | None = None,
    name: str = "bonding",
) -> Topology:
    """client — site ==N uplinks== remote — internet; call `add_destinations` once up."""
    if not 1 <= uplinks <= 7:
        raise ValueError(f"uplinks={uplinks!r}: expected 1 to 7")
    per: list[str | None] = list(rates) if rates else [rate] * uplinks
    if len(per) != uplinks:
        raise ValueError(f"rates: {len(per)} given for {uplinks} uplinks")
    topo = Topology(name, prefix=prefix)
    client = topo.add_host("client")
    site = topo.add_host("site", forwarding=True)
    remote = topo.add_host("remote", forwarding=True)
    internet = topo.add_host("internet")
    lan = topo.add_link(client, site)
    ups = [topo.add_link(site, remote, rate=r, latency=latency, delay=delay) for r in per]
    wan = topo.add_link(remote, internet)
    for fam in (4, 6):
        client.route_add("default", lan.iface(site).address(fam), family=fam)
        internet.route_add("default", wan.iface(remote).address(fam), family=fam)
    remote.route_add("10.200.0.0/24", wan.iface(internet).address(4))
    remote.route_add("fd00:200::/64", wan.iface(internet).address(6), family=6)
    for fam in (4, 6):  # the way back to the LAN (for checks; converted traffic never needs it)
        remote.route_add(
            "10.0.0.0/24" if fam == 4 else "fd00::/64", ups[0].iface(site).address(fam), family=fam
        )
    _bound_routes(site, ups, default_via=False)
    _bound_routes(remote, ups, default_via=False)
    for host in (site, remote):
        host.limits(subflows=8, add_addr_accepted=8)
    for link in ups:
        for fam in (4, 6):
            site.endpoint_add(link.iface(site).address(fam), ["subflow"])
    internet.limits(subflows=8, add_addr_accepted=8)
    return topo


def add_destinations(topo: Topology, timeout: float = 5.0) -> tuple[str, ...]:
    """Give the internet host its extra addresses (after `up()`), and wait until every
    veth has its carrier (the kernel reports it up to a second late); returns them."""
    end = time.monotonic() + timeout
    for host in topo.hosts:
        while "NO-CARRIER" in host.run(["ip", "-br", "link"]).stdout:
            if time.monotonic() > end:
                raise LabError(f"host {host.name}: links without carrier after {timeout:g}s")
            time.sleep(0.05)
    internet = topo.host("internet")
    for addr in DESTINATIONS:
        plen = 32 if "." in addr else 128
        internet.run(["ip", "addr", "add", f"{addr}/{plen}", "dev", "lo"])
    return DESTINATIONS


def intercept(
    site: Host,
    mode: str,
    port: int,
    port6: int | None = None,
    *,
    lan_dev: str | None = None,
    to: tuple[str, str] = ("", ""),
) -> None:
    """Hand the LAN's TCP connections to local `port` (IPv6: `port6`, default the same):
    nftables `redirect` or `tproxy` (to the addresses `to`, IPv4 and IPv6, for listeners
    bound to one; default the incoming interface's).

    Rules live in the site's namespace (`table inet mptcpkit_bond`), gone with it.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    dev = lan_dev or site.iface(0).name
    p6 = port if port6 is None else port6
    to4, to6 = to[0], f"[{to[1]}]" if to[1] else ""
    if mode == "redirect":
        chain = (
            "type nat hook prerouting priority dstnat; policy accept;\n"
            f'    iifname "{dev}" meta l4proto tcp meta nfproto ipv4 redirect to :{port}\n'
            f'    iifname "{dev}" meta l4proto tcp meta nfproto ipv6 redirect to :{p6}'
        )
    else:
        chain = (
            "type filter hook prerouting priority mangle; policy accept;\n"
            f'    iifname "{dev}" meta l4proto tcp meta nfproto ipv4 '
            f"tproxy ip to {to4}:{port} meta mark set {_TPROXY_MARK} accept\n"
            f'    iifname "{dev}" meta l4proto tcp meta nfproto ipv6 '
            f"tproxy ip6 to {to6}:{p6} meta mark set {_TPROXY_MARK} accept"
        )
    rules = f"table inet mptcpkit_bond {{\n  chain pre {{\n    {chain}\n  }}\n}}\n"
    site.run(["nft", "-f", "-"], input=rules)
    if mode == "tproxy":
        for fam, default in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
            site.run(
                ["ip", fam, "rule", "add", "fwmark", str(_TPROXY_MARK), "lookup",
                 str(_TPROXY_TABLE), "pref", str(_TPROXY_PREF)]
            )  # fmt: skip
            site.run(
                ["ip", fam, "route", "add", "local", default, "dev", "lo", "table",
                 str(_TPROXY_TABLE)]
            )  # fmt: skip


def site_config(
    remote: str,
    remote_port: int,
    *,
    mode: str,
    encoding: str,
    psk: str = "",
    tfo: bool = False,
    lan: tuple[str, str] = ("0.0.0.0", "::"),
) -> str:
    """The site gateway's `mptcpkit proxy` configuration (TOML); its listeners are bound
    to the addresses `lan` (IPv4, IPv6: any by default)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding={encoding!r}: expected one of {', '.join(ENCODINGS)}")
    carry = "send-convert = true" if encoding == "convert" else 'send-proxy = "v2"'
    key = f', psk = "{psk}"' if psk else ""
    key += ", tfo = true" if tfo else ""
    host = f"[{remote}]" if ":" in remote else remote
    return f"""[global]
workers = 1
metrics = ""
log = "stderr"

[frontend.lan]
bind = ["tcp@{lan[0]}:0", "tcp@[{lan[1]}]:0"]
backend = "bond"
intercept = "{mode}"

[backend.bond]
server.remote = {{ address = "mptcp@{host}:{remote_port}", mptcp = "require", {carry}{key} }}
"""


def remote_config(
    clients: Sequence[str],
    own: Sequence[str],
    *,
    encoding: str,
    psk: str = "",
    deny: Sequence[str] = (),
    tfo: bool = False,
) -> str:
    """The remote gateway's `mptcpkit proxy` configuration (TOML)."""
    accept = "accept-convert = true" if encoding == "convert" else "accept-proxy = true"

    def q(xs: Sequence[str]) -> str:
        return ", ".join(f'"{x}"' for x in xs)

    key = f', psk = "{psk}"' if psk else ""
    return f"""[global]
workers = 1
metrics = ""
log = "stderr"

[frontend.bond]
bind = "mptcp@0.0.0.0:0"
backend = "out"
{accept}
tfo = {"true" if tfo else "false"}
destinations = {{ clients = [{q(clients)}], own = [{q(own)}], deny = [{q(deny)}]{key} }}

[backend.out]
server.dest = "mptcp@0.0.0.0:0"
"""


@dataclass
class Gateways:
    site: Process
    remote: Process
    site_port: int
    site_port6: int
    remote_port: int

    def logs(self) -> str:
        return (
            f"--- site ---\n{self.site.stderr}{self.site.stdout}"
            f"--- remote ---\n{self.remote.stderr}{self.remote.stdout}"
        )


def start_proxy(
    host: Host, cfg: Path, frontend: str, timeout: float = 20.0
) -> tuple[Process, list[int]]:
    """Run `mptcpkit proxy -c cfg` (this source tree's) in `host`; its ports of `frontend`."""
    env = {**os.environ}
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = host.popen([sys.executable, "-m", "mptcpkit", "proxy", "-c", str(cfg)], env=env)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = proc.stderr + proc.stdout
        ports = re.findall(rf"frontend {frontend} listening on \S+:(\d+)", out)
        if ports and "ready:" in out:
            return proc, [int(p) for p in ports]
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.stop()
    raise LabError(f"mptcpkit proxy in {host.name} did not start:\n{proc.stderr}{proc.stdout}")


def start_gateways(
    topo: Topology,
    workdir: Path,
    *,
    mode: str = "redirect",
    encoding: str = "convert",
    psk: str = "",
    site_psk: str | None = None,
    deny: Sequence[str] = (),
    tfo: bool = False,
    bind_lan: bool = False,
) -> Gateways:
    """Run the remote gateway, then the site gateway, then intercept the LAN into it;
    `bind_lan`: the site's listeners are bound to its LAN addresses, not to any."""
    site, remote = topo.host("site"), topo.host("remote")
    ups = [link for link in topo.links if set(link.hosts) == {site, remote}]
    clients = [f"10.0.{link.index}.0/24" for link in ups] + [
        f"fd00:0:0:{link.index}::/64" for link in ups
    ]
    own = [*clients, f"10.0.{topo.links[-1].index}.0/24"]
    rcfg = workdir / "remote.toml"
    if tfo:  # the server side of TCP Fast Open (bit 2) is off by default
        remote.sysctl("net.ipv4.tcp_fastopen", 3)
    rcfg.write_text(
        remote_config(clients, own, encoding=encoding, psk=psk, deny=list(deny), tfo=tfo)
    )
    rproc, (rport, *_) = start_proxy(remote, rcfg, "bond")
    lan_addrs = (site.iface(0).address(4), site.iface(0).address(6)) if bind_lan else ("", "")
    try:
        scfg = workdir / "site.toml"
        scfg.write_text(
            site_config(
                ups[0].iface(remote).address(4),
                rport,
                mode=mode,
                encoding=encoding,
                psk=psk if site_psk is None else site_psk,
                tfo=tfo,
                lan=lan_addrs if bind_lan else ("0.0.0.0", "::"),
            )
        )
        sproc, (sport, sport6) = start_proxy(site, scfg, "lan")
    except BaseException:
        rproc.stop()
        raise
    intercept(site, mode, sport, sport6, to=lan_addrs)
    return Gateways(sproc, rproc, sport, sport6, rport)
