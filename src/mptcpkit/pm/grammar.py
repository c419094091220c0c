"""`ip mptcp`'s word grammar for endpoints and limits, parsed without I/O.

`endpoint add 10.0.1.1 dev eth1 id 3 port 5000 signal backup` becomes an
`EndpointCommand`; `str()` gives the words back, so habits (and scripts) written
for `ip mptcp` carry over unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mptcpkit.pm import codec

ENDPOINT_ACTIONS = {
    "add": "add",
    "del": "del",
    "delete": "del",
    "show": "show",
    "list": "show",
    "flush": "flush",
    "change": "change",
    "set": "change",
}
CHANGE_WORDS = {"backup", "nobackup", "fullmesh", "nofullmesh"}
LIMIT_WORDS = ("subflows", "add_addr_accepted")


class GrammarError(ValueError):
    """The words do not form a valid command; the message names the offending word."""


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


def _int(word: str, value: str | None, lo: int, hi: int) -> int:
    if value is None:
        raise GrammarError(f"{word!r} needs a value")
    try:
        number = int(value, 10)
    except ValueError:
        raise GrammarError(f"{word} {value!r} is not a number") from None
    if not lo <= number <= hi:
        raise GrammarError(f"{word} {number} out of range {lo}..{hi}")
    return number


def parse_endpoint(words: Sequence[str]) -> EndpointCommand:
    """Words after `endpoint` -> EndpointCommand (GrammarError on anything odd)."""
    if not words:
        return EndpointCommand("show")
    action = ENDPOINT_ACTIONS.get(words[0])
    if action is None:
        raise GrammarError(
            f"unknown endpoint command {words[0]!r} (use add, del, show, flush or change)"
        )
    address: str | None = None
    id_: int | None = None
    port: int | None = None
    dev: str | None = None
    flags: list[str] = []
    rest = list(words[1:])
    i = 0
    while i < len(rest):
        word = rest[i]
        value = rest[i + 1] if i + 1 < len(rest) else None
        if word == "id":
            id_ = _int("id", value, 0 if action == "del" else 1, 255)
            i += 2
        elif word == "port":
            port = _int("port", value, 1, 65535)
            i += 2
        elif word == "dev":
            if value is None:
                raise GrammarError("'dev' needs an interface name")
            dev = value
            i += 2
        elif (
            action == "add" and word in codec.FLAG_NAMES and word not in ("implicit", "laminar")
        ) or (action == "change" and word in CHANGE_WORDS):
            flags.append(word)
            i += 1
        elif (
            address is None and action in ("add", "del", "change") and not word[:1].isalpha()
        ) or (address is None and action in ("add", "del", "change") and ":" in word):
            try:
                address = str(codec.parse_ip(word))
            except ValueError as exc:
                raise GrammarError(str(exc)) from None
            i += 1
        else:
            raise GrammarError(f"unexpected word {word!r} in 'endpoint {action}'")
    cmd = EndpointCommand(action, address, id_, port, dev, tuple(flags))
    _check_endpoint(cmd)
    return cmd


def _check_endpoint(cmd: EndpointCommand) -> None:
    a = cmd.action
    if a == "add" and cmd.address is None:
        raise GrammarError("'endpoint add' needs an address")
    if a == "del" and cmd.id is None and cmd.address is None:
        raise GrammarError("'endpoint del' needs 'id ID' or an address")
    if a == "change" and cmd.id is None and cmd.address is None:
        raise GrammarError("'endpoint change' needs 'id ID' or an address")
    if a == "change" and not cmd.flags:
        raise GrammarError("'endpoint change' needs backup, nobackup, fullmesh or nofullmesh")
    if a in ("show", "flush") and (cmd.address or cmd.port or cmd.dev or cmd.flags):
        raise GrammarError(f"'endpoint {a}' takes no address, port, dev or flags")
    if a == "flush" and cmd.id is not None:
        raise GrammarError("'endpoint flush' takes no id")
    if a != "add" and (cmd.port is not None or cmd.dev is not None):
        raise GrammarError(f"'port' and 'dev' only go with 'endpoint add', not {a!r}")
    if a == "change":
        words = set(cmd.flags)
        for on in ("backup", "fullmesh"):
            if on in words and "no" + on in words:
                raise GrammarError(f"'endpoint change' got both {on} and no{on}")
    if a == "add" and "signal" in cmd.flags and "fullmesh" in cmd.flags:
        raise GrammarError("an endpoint cannot be both signal and fullmesh")


def change_flags(current: codec.EndpointFlag, words: Sequence[str]) -> codec.EndpointFlag:
    """Apply `backup`/`nobackup`/`fullmesh`/`nofullmesh` to the changeable bits."""
    flags = current & codec.CHANGEABLE
    for word in words:
        bit = codec.FLAG_NAMES[word.removeprefix("no")]
        flags = flags & ~bit if word.startswith("no") else flags | bit
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
    """Words after `limits`: `show`, or `set [subflows N] [add_addr_accepted N]`."""
    if not words or words[0] in ("show", "list"):
        if len(words) > 1:
            raise GrammarError(f"unexpected word {words[1]!r} in 'limits show'")
        return LimitsCommand("show")
    if words[0] != "set":
        raise GrammarError(f"unknown limits command {words[0]!r} (use show or set)")
    values: dict[str, int] = {}
    rest = list(words[1:])
    for i in range(0, len(rest), 2):
        word = rest[i]
        if word not in LIMIT_WORDS:
            raise GrammarError(f"unexpected word {word!r} in 'limits set'")
        values[word] = _int(word, rest[i + 1] if i + 1 < len(rest) else None, 0, 8)
    if not values:
        raise GrammarError("'limits set' needs subflows N and/or add_addr_accepted N")
    return LimitsCommand("set", values.get("subflows"), values.get("add_addr_accepted"))
