"""A frontend's `acl` and `use_backend` rules (HAProxy's content switching), checked.

acl.py parses and evaluates the rules; this reads them from a frontend's table and
refuses rules that could never be met: shadowed by an earlier one, on a port the
frontend does not listen on, on a frontend whose connections are not routed, or
reading the SNI without saying how long to wait for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mptcpkit.proxy import acl
from mptcpkit.proxy.configmodel import Backend, Frontend
from mptcpkit.proxy.configread import Reader, kind

__all__ = ["check_routing", "read_inspect_delay", "read_rules"]


def read_rules(r: Reader) -> tuple[acl.Rule, ...]:
    """`acl.NAME = "fetch [flags] patterns"` (or an array: OR-ed) and `use_backend =
    ["BACKEND if CONDITION", ...]`, as HAProxy's `acl` and `use_backend` lines."""
    acls: dict[str, tuple[acl.Test, ...]] = {}
    table = r.table.get("acl", {})
    if not isinstance(table, dict):
        raise r.error("acl", f'expected a table of NAME = "fetch patterns", got {kind(table)}')
    for name, raw in table.items():
        texts = [raw] if isinstance(raw, str) else raw
        if not acl.acl_name_ok(name):
            raise r.error(f"acl.{name}", "ACL names are letters, digits and _.:-")
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise r.error(
                f"acl.{name}", f'expected "fetch [flags] patterns" or an array, got {kind(raw)}'
            )
        try:
            acls[name] = tuple(acl.parse_acl(t.split()) for t in texts)
        except acl.AclError as exc:
            raise r.error(f"acl.{name}", str(exc)) from None
    raw_rules = r.table.get("use_backend", [])
    if isinstance(raw_rules, str):
        raw_rules = [raw_rules]
    if not isinstance(raw_rules, list) or not all(isinstance(t, str) for t in raw_rules):
        raise r.error(
            "use_backend", f'expected an array of "BACKEND if CONDITION", got {kind(raw_rules)}'
        )
    rules = []
    for i, text in enumerate(raw_rules):
        try:
            rules.append(acl.parse_rule(text, acls))
        except acl.AclError as exc:
            raise r.error(f"use_backend[{i}]", f"{text!r}: {exc}") from None
    shadow = acl.shadowing(rules)
    if shadow is not None:
        j, i = shadow
        raise r.error(
            f"use_backend[{j}]",
            f"{rules[j].text!r} is never met: use_backend[{i}] ({rules[i].text!r}) takes every"
            " connection it would (the first rule met wins, as in HAProxy); drop or reorder it",
        )
    return tuple(rules)


def read_inspect_delay(r: Reader, rules: Sequence[acl.Rule]) -> float | None:
    sni = [i for i, rule in enumerate(rules) if "req.ssl_sni" in rule.fetches]
    tcp = r.sub("tcp-request")
    tcp.only(("inspect-delay",))
    delay = tcp.duration("inspect-delay", None, allow_none=True)
    if delay is None and sni:
        raise r.error(
            f"use_backend[{sni[0]}]",
            f"{rules[sni[0]].text!r} reads req.ssl_sni, but tcp-request.inspect-delay is not set:"
            ' say how long to wait for the ClientHello (tcp-request.inspect-delay = "5s")',
        )
    if delay is not None and not sni:
        raise tcp.error(
            "inspect-delay",
            "no use_backend rule reads req.ssl_sni: nothing waits for the client's"
            " first bytes (drop it, or add a rule on req.ssl_sni)",
        )
    return delay


def check_routing(r: Reader, f: Frontend, backends: Mapping[str, Backend]) -> None:
    """use_backend rules: on frontends the data paths route (not the converter's), and
    none that no connection could meet."""
    if not f.rules:
        return
    why = ""
    if f.intercept or f.accept_convert:
        why = "an intercepting or accept-convert frontend"
    elif any(nb is not None and nb.transparent for nb in f.net):
        why = "a frontend with transparent binds"
    else:
        for name in f.backends_used:
            if any(s.original_destination for s in backends[name].servers):
                why = f"backend {name!r} (a server 0.0.0.0:0)"
    if why:
        raise r.error("use_backend", f"routing is not offered with {why}: one backend there")
    if f.accept_proxy or any(b.protocol != "unix" and not b.port for b in f.binds):
        return  # dst_port comes from a PROXY header, or a port the kernel picks
    ports = [(b.port or 0, b.port_end or b.port or 0) for b in f.binds if b.protocol != "unix"]
    for i, rule in enumerate(f.rules):
        for alt in rule.condition:
            for neg, tests in alt:
                for t in tests:
                    if t.fetch != "dst_port" or neg:
                        continue
                    if not any(lo <= bhi and blo <= hi for lo, hi in t.ports for blo, bhi in ports):
                        raise r.error(
                            f"use_backend[{i}]",
                            f"{rule.text!r}: dst_port matches none of this frontend's binds"
                            f" ({', '.join(str(b) for b in f.binds)})",
                        )
