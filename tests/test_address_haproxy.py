"""`parse_address` against HAProxy's own parser, `haproxy` from apt as the oracle.

Every corpus string goes into one config as `bind <string>` in a frontend of its own
(the `mptcp*@` prefixes written as HAProxy 2.6's `tcp@`/`ipv4@`/`ipv6@`). One
`haproxy -c` run says which lines HAProxy rejects (its alerts carry the line); one
run of the accepted lines with a Lua init hook prints every listener HAProxy made
(family, address, one per port) and exits before anything is bound. So two processes
answer for the whole corpus.

Strings on which mptcpkit deliberately differs (docs/addresses.md) are recognised
by their class and checked for exactly that difference: anything else must agree.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from mptcpkit import Address, parse_address

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

pytestmark = pytest.mark.skipif(not os.path.exists(HAPROXY), reason="haproxy is not installed")

_PREFIXES = ["", "tcp@", "tcp4@", "tcp6@", "ipv4@", "ipv6@", "mptcp@", "mptcp4@", "mptcp6@"]
_HOSTS = [
    "",
    "*",
    "127.0.0.1",
    "0.0.0.0",
    "999.1.1.1",
    "1.2.3.4.5",
    "127.1",
    "010.0.0.1",
    "0x7f.0.0.1",
    "[127.0.0.1]",
    "::1",
    "::",
    "[::1]",
    "[::]",
    "[2001:db8::1]",
    "[::ffff:127.0.0.1]",
    "::ffff:127.0.0.1",
    "[fe80::1%lo]",
    "[]",
    "localhost",
    "LocalHost",
]
_PORTS = [":80", ":0", ":8000-8003", ""]
_MORE = [
    # ports
    "127.0.0.1:65535",
    "127.0.0.1:65536",
    "127.0.0.1:70000",
    "127.0.0.1:041018",
    "127.0.0.1:00080",
    "127.0.0.1:99999999999",
    "127.0.0.1:1-3",
    "127.0.0.1:65534-65535",
    "127.0.0.1:80-80",
    "127.0.0.1:80-70",
    "127.0.0.1:0-5",
    "127.0.0.1:80-",
    "127.0.0.1:-80",
    "127.0.0.1:+80",
    "127.0.0.1:",
    "127.0.0.1:8a",
    "127.0.0.1:80+",
    "127.0.0.1:80-90x",
    "127.0.0.1::80",
    ":::80",
    "::::80",
    "ipv6@::1:80",
    "ipv6@::1",
    "ipv6@:80",
    "ipv6@*:80",
    "ipv4@:::80",
    "2001:db8::1",
    "2001:db8::1:443",
    "[2001:db8::1]:443-444",
    "[0:0:0:0:0:0:0:1]:80",
    "[::ffff:7f00:1]:80",
    "[1:2:3:4:5:6:7:8]:80",
    "[1:2:3:4:5:6:7:8:9]:80",
    "[" + "0" * 44 + "::1]:80",
    # brackets
    "[::1]x80",
    "[::1]]:80",
    "[[::1]]:80",
    "[::1:80",
    "::1]:80",
    "[::1]:",
    "[*]:80",
    "[]",
    "tcp4@[127.0.0.1]:80",
    "tcp6@[127.0.0.1]:80",
    # IPv4 spellings (gethostbyname reads inet_aton numbers)
    "1.2.3:80",
    "123:80",
    "0xdeadbeef:80",
    "0x7f.1:80",
    "1.2.3.4.:80",
    "256.0.0.1:80",
    "1.2.3.-4:80",
    "ipv6@1.2.3:80",
    # names
    "localhost:80",
    "LOCALHOST:8000-8001",
    "ipv4@localhost:80",
    "ipv6@localhost:80",
    "mptcp6@localhost:80",
    "name.invalid:80",
    "a..b:80",
    ".localhost:80",
    "local_host.invalid:80",
    "bad!host:80",
    "x" * 64 + ".invalid:80",
    # unix
    "/tmp/mptcpkit-test.sock",
    "unix@/tmp/mptcpkit-test.sock",
    "unix@relative.sock",
    "unix@",
    "unix@tcp@1.2.3.4:80",
    "tcp@/tmp/x.sock",
    "mptcp@/tmp/x.sock",
    "/" + "x" * 96,
    "/" + "x" * 97,
    "/" + "x" * 106,
    "/" + "x" * 107,
    # prefixes
    "TCP@127.0.0.1:80",
    "Mptcp@127.0.0.1:80",
    "udp@127.0.0.1:80",
    "ip@127.0.0.1:80",
    "abns@name",
    "fd@3",
    "sockpair@3",
    "mptpc@127.0.0.1:80",
    "@127.0.0.1:80",
    "tcp@",
    "mptcp@",
    "*",
    ":",
]
CORPUS = list(
    dict.fromkeys(
        [p + h + port for p, h, port in itertools.product(_PREFIXES, _HOSTS, _PORTS)] + _MORE
    )
)

# prefixes HAProxy knows and mptcpkit does not serve (datagrams, fds, abstract sockets)
_HAPROXY_ONLY = ("ip@", "udp@", "udp4@", "udp6@", "abns@", "fd@", "sockpair@", "uxst@", "uxdg@")


def _haproxy_form(text: str) -> str:
    for ours, theirs in (("mptcp4@", "ipv4@"), ("mptcp6@", "ipv6@"), ("mptcp@", "tcp@")):
        if text.startswith(ours):
            return theirs + text[len(ours) :]
    return text


@dataclass
class Verdict:
    error: str | None  # HAProxy's alert, None when it accepted the line
    listeners: list[tuple[int, str, int]]  # (family, host, port) per listener


_DUMP_LUA = """
core.register_init(function()
  for fname, fe in pairs(core.frontends) do
    for lname, li in pairs(fe.listeners) do
      print("LISTENER " .. fname .. " " .. tostring(li:get_stats().addr))
    end
  end
  os.exit(0)
end)
"""


def _config(strings: dict[int, str], lua: Path | None) -> tuple[str, dict[int, int]]:
    lines = ["global"]
    if lua is not None:
        lines.append(f"  lua-load {lua}")
    lines += ["defaults", "  mode tcp", "  timeout connect 1s", "  timeout client 1s"]
    lines += ["  timeout server 1s", "backend b", "  server s 127.0.0.1:9"]
    where: dict[int, int] = {}  # config line -> corpus index
    for index, text in strings.items():
        assert not re.search(r"[\s#\"'\\$]", text), f"cannot write {text!r} in a config"
        lines += [f"frontend f{index}", "  option socket-stats", "  default_backend b"]
        lines.append(f"  bind {_haproxy_form(text)}")
        where[len(lines)] = index
    return "\n".join(lines) + "\n", where


def _listener(addr: str) -> tuple[int, str, int]:
    if addr == "unix":
        return socket.AF_UNIX, "", 0
    host, _, port = addr.rpartition(":")
    if host.startswith("["):
        return socket.AF_INET6, host[1:-1], int(port)
    return socket.AF_INET, host, int(port)


def _haproxy(tmp: Path) -> list[str]:
    """haproxy, without DNS: names not in /etc/hosts fail at once instead of waiting on
    a resolver (root: a private mount namespace with an empty resolv.conf)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return [HAPROXY]
    (tmp / "resolv.conf").write_text("options attempts:1 timeout:1\n")
    mount = 'mount --bind "$0" /etc/resolv.conf 2>/dev/null; exec "$@"'  # else: with DNS
    return ["unshare", "--mount", "sh", "-c", mount, str(tmp / "resolv.conf"), HAPROXY]


def haproxy_verdicts(strings: list[str], tmp: Path) -> list[Verdict]:
    """HAProxy's reading of each string as a `bind` address: two haproxy runs."""
    haproxy = _haproxy(tmp)
    verdicts = [Verdict(None, []) for _ in strings]
    # haproxy stops after 50 errors: configs of 40 lines, checked side by side
    runs = []
    for start in range(0, len(strings), 40):
        text, where = _config(
            {i: strings[i] for i in range(start, start + 40) if i < len(strings)}, None
        )
        path = tmp / f"check{start}.cfg"
        path.write_text(text)
        runs.append(
            (
                where,
                subprocess.Popen(
                    [*haproxy, "-c", "-f", str(path)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                ),
            )
        )
    for where, run in runs:
        output, _ = run.communicate(timeout=60)
        for line in output.splitlines():
            found = re.search(r"check\d+\.cfg:(\d+)\] : (?:'bind' : )?(.*)", line)
            if found:
                assert int(found[1]) in where, f"alert on a line that is not a bind: {line}"
                verdicts[where[int(found[1])]].error = found[2]
            else:
                assert "ALERT" not in line or "rror(s) found" in line or "Fatal errors" in line, (
                    line
                )
    accepted = {i: s for i, s in enumerate(strings) if verdicts[i].error is None}
    (tmp / "dump.lua").write_text(_DUMP_LUA)
    text, _ = _config(accepted, tmp / "dump.lua")
    (tmp / "dump.cfg").write_text(text)
    dumped = subprocess.run(
        [*haproxy, "-f", str(tmp / "dump.cfg")], capture_output=True, text=True, timeout=60
    )
    assert dumped.returncode == 0, dumped.stderr
    for line in dumped.stdout.splitlines():
        if line.startswith("LISTENER "):
            _, frontend, addr = line.split(" ", 2)
            verdicts[int(frontend[1:])].listeners.append(_listener(addr))
    for i in accepted:
        verdicts[i].listeners.sort()
        assert verdicts[i].listeners, f"haproxy accepted {strings[i]!r} but made no listener"
    return verdicts


def _ours(text: str) -> Address | str:
    try:
        return parse_address(text)
    except ValueError as exc:
        return str(exc)


def _resolves_to(addr: Address, host: str) -> bool:
    family = addr.family if addr.family != socket.AF_UNSPEC else socket.AF_INET
    try:
        infos = socket.getaddrinfo(addr.host, None, family, socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return any(info[4][0] == host for info in infos)


def _agrees(addr: Address, listeners: list[tuple[int, str, int]], port: int | None) -> bool:
    """Our reading gives HAProxy's listeners (`port` stands in for a 0 or missing one)."""
    if addr.protocol == "unix":
        return listeners == [(socket.AF_UNIX, "", 0)]
    ports = list(addr.ports) if port is None else [port]
    if [p for _, _, p in listeners] != ports:
        return False
    families = {f for f, _, _ in listeners}
    hosts = {h for _, h, _ in listeners}
    if len(families) != 1 or len(hosts) != 1:
        return False
    family, host = families.pop(), hosts.pop()
    if addr.family == socket.AF_UNSPEC or (
        addr.host and addr.host not in ("::",) and not _ip(addr.host)
    ):
        return _resolves_to(addr, host) and (addr.family in (socket.AF_UNSPEC, family))
    return (addr.family, addr.bind_host()) == (family, host)


def _is_name(addr: Address) -> bool:
    return addr.protocol != "unix" and addr.host not in ("", "::") and not _ip(addr.host)


def _ip(host: str) -> bool:
    for af in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(af, host)
            return True
        except OSError:
            pass
    return False


def _port_text(text: str) -> str | None:
    rest = text.partition("@")[2] if "@" in text else text
    cut = max(rest.rfind(":"), rest.rfind("]"))
    return rest[cut + 1 :] if cut >= 0 and rest[cut] == ":" else None


def _with_port(text: str, port: str) -> str:
    if _port_text(text) is None:
        return f"{text}:{port}"
    return text[: text.rfind(":") + 1] + port


def compare(strings: list[str], tmp: Path) -> tuple[int, dict[str, list[str]], list[str]]:
    """(strings agreeing exactly, deliberate differences by class, disagreements)."""
    ours = [_ours(s) for s in strings]
    # a port HAProxy needs where we take 0 or none: ask it about the same string with port 1
    companions = {
        i: _with_port(s, "1")
        for i, (s, o) in enumerate(zip(strings, ours, strict=True))
        if isinstance(o, Address) and o.protocol != "unix" and o.port in (None, 0)
    }
    both = strings + list(companions.values())
    verdicts = haproxy_verdicts(both, tmp)
    companion_of = {i: verdicts[len(strings) + k] for k, i in enumerate(companions)}
    same = 0
    differences: dict[str, list[str]] = {}
    wrong: list[str] = []
    for i, (text, mine, theirs) in enumerate(zip(strings, ours, verdicts, strict=False)):
        why = None
        if isinstance(mine, str) and theirs.error is not None:
            same += 1
            continue
        if (
            isinstance(mine, Address)
            and theirs.error is None
            and _agrees(mine, theirs.listeners, None)
        ):
            same += 1
            continue
        # the deliberate differences
        port = _port_text(text)
        if isinstance(mine, Address) and mine.protocol == "unix":
            if "too long (max 97)" in (theirs.error or ""):
                why = "unix paths: up to 107 bytes"
        elif isinstance(mine, Address) and i in companion_of:
            twin = companion_of[i]
            kind = "port 0" if mine.port == 0 else "no port"
            expect = "invalid port" if mine.port == 0 else "missing port specification"
            if (theirs.error or "").startswith(expect) and (
                twin.error is None and _agrees(mine, twin.listeners, 1)
            ):
                why = f"{kind}: mptcpkit accepts"
            elif _is_name(mine) and "invalid address" in (twin.error or ""):
                why = "names: resolved when used"
        elif isinstance(mine, Address):
            if _is_name(mine) and "invalid address" in (theirs.error or ""):
                why = "names: resolved when used"
        elif theirs.error is None:
            if text.startswith(_HAPROXY_ONLY):
                why = "prefixes mptcpkit does not serve"
            elif text == "unix@":
                why = "unix@ needs a path"
            elif port is not None and not re.fullmatch(r"[0-9]+(-[0-9]+)?", port):
                why = "ports: digits only"
        if why is None:
            shown = mine if isinstance(mine, str) else (mine.family, mine.host, list(mine.ports))
            wrong.append(f"{text!r}: mptcpkit {shown}; haproxy {theirs.error or theirs.listeners}")
        else:
            differences.setdefault(why, []).append(text)
    return same, differences, wrong


def test_corpus_agrees_with_haproxy(tmp_path: Path) -> None:
    assert len(CORPUS) >= 200
    same, differences, wrong = compare(CORPUS, tmp_path)
    assert not wrong, "\n".join(wrong)
    print(f"{same} of {len(CORPUS)} agree exactly; deliberate differences:")
    for why, texts in differences.items():
        print(f"  {why}: {len(texts)}, e.g. {texts[:3]}")
    assert same >= 200
    # every documented class is exercised, and no other one appears
    assert set(differences) == {
        "port 0: mptcpkit accepts",
        "no port: mptcpkit accepts",
        "names: resolved when used",
        "unix paths: up to 107 bytes",
        "prefixes mptcpkit does not serve",
        "unix@ needs a path",
        "ports: digits only",
    }
