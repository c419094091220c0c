"""`ip mptcp`'s word grammar for endpoints and limits, parsed without I/O.

`endpoint add 10.0.1.1 dev eth1 id 3 port 5000 signal backup` becomes an
`EndpointCommand`; `str()` gives the words back, so habits (and scripts) written
for `ip mptcp` carry over unchanged. The parse follows iproute2's (`ip/ipmptcp.c`)
word by word: keywords may be abbreviated (`endpoint a`, `sh`, `i 3`), numbers are C's
(`0x10`, `010`), IPv4 addresses are iproute2's (`10.1` is 10.1.0.0), and a word that
is nothing else is taken for an address. Errors carry ip's exit code: 1 for a word
that is not an address, 255 for the rest of the grammar.

Beyond ip: `laminar` (Linux 6.18), `del ADDRESS` without an id, `list` for `show` and
`set` for `change`.
"""

from __future__ import annotations

import dataclasses
import re
import socket
from collections.abc import Sequence

from mptcpkit.pm import codec

# ip's order: an abbreviation means the first of these it starts.
ENDPOINT_ACTIONS = ("add", "change", "delete", "show", "flush")
ACTION_NAMES = {"delete": "del"}
ALIASES = {"list": "show", "set": "change"}
CHANGE_WORDS = {"backup", "nobackup", "fullmesh", "nofullmesh"}
FLAG_WORDS = {**{name: int(flag) for name, flag in codec.FLAG_NAMES.items()}, "nobackup": 0}
FLAG_WORDS["nofullmesh"] = 0
LIMIT_WORDS = ("subflows", "add_addr_accepted")
SIGNAL_AND_FULLMESH = codec.EndpointFlag.SIGNAL | codec.EndpointFlag.FULLMESH


class GrammarError(ValueError):
    """The words do not form a valid command; the message names the offending word.

    `exit_code` is what `ip mptcp` exits with for the same mistake."""

    exit_code = 255


class BadAddress(GrammarError):
    """A word that should have been an address is not one (ip exits 1)."""

    exit_code = 1


def matches(word: str, keyword: str) -> bool:
    """iproute2's `matches()`: `word` is a non-empty prefix of `keyword`."""
    return bool(word) and keyword.startswith(word)


def _wrong(value: str, why: str) -> GrammarError:
    return GrammarError(f'argument "{value}" is wrong: {why}')


_C_NUMBER = re.compile(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def _c_int(digits: str) -> int:
    if digits[:2].lower() == "0x":
        return int(digits, 16)
    return int(digits, 8) if digits.startswith("0") else int(digits, 10)


def c_number(text: str, maximum: int) -> int | None:
    """strtoul(text, base 0) as iproute2's get_u8/get_u16/get_u32 take it; None if not."""
    m = _C_NUMBER.fullmatch(text)
    if m is None:
        return None
    value = _c_int(m.group(2))
    if m.group(1) == "-" and value:
        return None  # wraps to a huge number: out of range
    return value if value <= maximum else None


def _ipv4(text: str) -> bytes | None:
    """iproute2's get_addr_ipv4: up to 4 C numbers joined by dots, missing ones 0."""
    out = [0, 0, 0, 0]
    parts = text.split(".")
    if len(parts) > 4:
        return None
    for i, part in enumerate(parts):
        m = _C_NUMBER.fullmatch(part)
        if m is None or m.group(1) == "-":
            return None
        value = _c_int(m.group(2))
        if value > 255:
            return None
        out[i] = value
    return bytes(out)


def parse_address(word: str) -> str:
    """An address the way ip reads one (AF_UNSPEC), as text; BadAddress if not one."""
    if ":" in word:
        try:
            packed = socket.inet_pton(socket.AF_INET6, word)
        except OSError:
            packed = None
        if packed is not None:
            return codec.format_ip(packed)
    else:
        raw = _ipv4(word)
        if raw is not None:
            return socket.inet_ntop(socket.AF_INET, raw)
    raise BadAddress(f'any valid address is expected rather than "{word}".')


def check_ifname(name: str) -> bool:
    """iproute2's check_ifname: what the kernel accepts as an interface name."""
    if not name or len(name) >= 16 or name in (".", ".."):
        return False
    return not any(c == "/" or c == ":" or c.isspace() for c in name)


@dataclasses.dataclass(frozen=True)
class EndpointCommand:
    action: str
    address: str | None = None
    id: int | None = None
    port: int | None = None
    dev: str | None = None
    flags: tuple[str, ...] = ()

    def __str__(self) -> str:
        words = [self.action]
        if self.address is not None:
            words.append(self.address)
        if self.dev is not None:
            words += ["dev", self.dev]
        if self.id is not None:
            words += ["id", str(self.id)]
        if self.port is not None:
            words += ["port", str(self.port)]
        words += list(self.flags)
        return " ".join(words)


def _action(word: str) -> str:
    if word in ALIASES:
        return ALIASES[word]
    for action in ENDPOINT_ACTIONS:
        if matches(word, action):
            return ACTION_NAMES.get(action, action)
    raise GrammarError(
        f'command "{word}" is unknown (use add, change, delete, show or flush; '
        "ip mptcp's words, which may be abbreviated)"
    )


def _value(words: Sequence[str], i: int) -> str:
    if i + 1 >= len(words):
        raise GrammarError(f"command line is incomplete: {words[i]!r} needs a value")
    return words[i + 1]


def parse_endpoint(words: Sequence[str]) -> EndpointCommand:
    """Words after `endpoint` -> EndpointCommand (GrammarError on what ip refuses)."""
    if not words:
        return EndpointCommand("show")
    action = _action(words[0])
    if action == "flush":
        return EndpointCommand("flush")  # ip ignores whatever follows
    address: str | None = None
    id_: int | None = None
    port: int | None = None
    dev: str | None = None
    flags: list[str] = []
    bits = 0
    rest = list(words[1:])
    i = 0
    while i < len(rest):
        word = rest[i]
        if word in FLAG_WORDS:
            flags.append(word)
            bits |= FLAG_WORDS[word]
            if action == "add" and bits & SIGNAL_AND_FULLMESH == SIGNAL_AND_FULLMESH:
                raise _wrong(word, "flags mustn't have both signal and fullmesh")
            if action == "change" and bits & ~codec.CHANGEABLE:
                raise _wrong(word, "invalid flags, backup and fullmesh only")
            i += 1
            continue
        if matches(word, "id"):
            value = _value(rest, i)
            id_ = c_number(value, 255)
            if id_ is None:
                raise _wrong(value, "invalid ID")
        elif matches(word, "dev"):
            dev = _value(rest, i)
            if not check_ifname(dev):
                raise _wrong(dev, "invalid interface name")
        elif matches(word, "port"):
            value = _value(rest, i)
            number = c_number(value, 65535)
            if number is None:
                raise _wrong(value, "expected port")
            port = number or None  # ip sends no port for 0
        else:
            address = parse_address(word)
            i += 1
            continue
        i += 2
    cmd = EndpointCommand(action, address, id_, port, dev, tuple(flags))
    _check_endpoint(cmd, bits)
    return cmd


def _check_endpoint(cmd: EndpointCommand, bits: int) -> None:
    """ip's checks once all words are read, in ip's order."""
    a = cmd.action
    if a == "add" and cmd.address is None:
        raise GrammarError('argument "ADDRESS" is required')
    if a == "del":
        if cmd.id is None and cmd.address is None:
            raise GrammarError('argument "ID" is required')
        if cmd.id and cmd.address is not None:
            raise _wrong("ADDRESS", "invalid for non-zero id address")
        if cmd.id == 0 and cmd.address is None:
            raise _wrong("ID", "address is needed for deleting id 0 address")
    if a == "add" and cmd.port and not bits & codec.EndpointFlag.SIGNAL:
        raise _wrong("port", "flags must have signal when using port")
    if a == "change" and cmd.id is not None and cmd.port:
        raise _wrong("port", "port can't be used with id")
    if a == "change" and cmd.id is None and cmd.address is None:
        raise GrammarError("'endpoint change' needs 'id ID' or an address")


def change_flags(current: codec.EndpointFlag, words: Sequence[str]) -> codec.EndpointFlag:
    """The changeable bits `endpoint change` sets, as ip and the kernel do: exactly the
    flags named (`backup`, `fullmesh`); one not named is cleared, `noX` only says so.

    `current` is not consulted: `change id 7 fullmesh` on a backup endpoint leaves it
    fullmesh and no longer backup, as `ip mptcp endpoint change` does."""
    del current
    flags = codec.EndpointFlag(0)
    for name in ("backup", "fullmesh"):
        if name in words:
            flags |= codec.FLAG_NAMES[name]
    return codec.EndpointFlag(flags)


@dataclasses.dataclass(frozen=True)
class LimitsCommand:
    action: str
    subflows: int | None = None
    add_addr_accepted: int | None = None

    def __str__(self) -> str:
        words = [self.action]
        if self.subflows is not None:
            words += ["subflows", str(self.subflows)]
        if self.add_addr_accepted is not None:
            words += ["add_addr_accepted", str(self.add_addr_accepted)]
        return " ".join(words)


def parse_limits(words: Sequence[str]) -> LimitsCommand:
    """Words after `limits`: `show`, or `set [subflows N] [add_addr_accepted N]`.

    Numbers are only parsed here (0..2**32-1, as ip); the range the kernel accepts
    (0..8) is the path manager's to check."""
    if not words:
        return LimitsCommand("show")
    if matches(words[0], "set"):
        action = "set"
    elif matches(words[0], "show"):
        action = "show"
    else:
        raise GrammarError(f'command "{words[0]}" is unknown (use show or set)')
    values: dict[str, int] = {}
    rest = list(words[1:])
    for i in range(0, len(rest), 2):
        word = rest[i]
        key = next((k for k in LIMIT_WORDS if matches(word, k)), None)
        if key is None:
            raise _wrong(word, "unknown limit")
        value = _value(rest, i)
        number = c_number(value, 0xFFFFFFFF)
        if number is None:
            raise _wrong(value, f"invalid {key}")
        values[key] = number
    if action == "show":
        return LimitsCommand("show")  # ip sends them along; the kernel ignores them
    return LimitsCommand("set", values.get("subflows"), values.get("add_addr_accepted"))
