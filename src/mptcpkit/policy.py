"""When to use MPTCP: per call, or process-wide from the environment.

`MPTCPKIT=off|on|listen|dial` is Go's `GODEBUG=multipathtcp=0|1|2|3` in words: `on`
uses MPTCP for listeners and dialers, `listen` only for listeners, `dial` only for
dialers. Unset means `on`. An explicit `mptcp=` argument always wins. A socket made by
`mptcpkit.socket()` has no role yet: under `listen` or `dial` it is MPTCP until its
`connect()` or `listen()`, which makes it plain TCP if that role is not MPTCP's
(`mptcpkit.sockets.RoleSocket`).
"""

from __future__ import annotations

import enum
import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from typing import Literal


ENV_VAR = "MPTCPKIT"


class Policy(enum.Enum):
    PREFER = "prefer"  # MPTCP; plain TCP only if the MPTCP socket cannot be created
    REQUIRE = "require"  # MPTCP or a clear error
    OFF = "off"  # plain TCP


if TYPE_CHECKING:
    PolicyLike = Policy | Literal["prefer", "require", "off"] | bool | None
    Role = Literal["listen", "dial", "socket"]
else:  # names for annotations only; spelt out above for type checkers
    PolicyLike = Role = object

_ENV_ROLES: dict[str, frozenset[str]] = {
    "on": frozenset({"listen", "dial", "socket"}),
    "1": frozenset({"listen", "dial", "socket"}),
    "off": frozenset(),
    "0": frozenset(),
    "listen": frozenset({"listen", "socket"}),
    "2": frozenset({"listen", "socket"}),
    "dial": frozenset({"dial", "socket"}),
    "3": frozenset({"dial", "socket"}),
}


def as_policy(value: PolicyLike) -> Policy | None:
    """Normalise a user's `mptcp=` argument; None means 'not given'."""
    if value is None or isinstance(value, Policy):
        return value
    if value is True:
        return Policy.PREFER
    if value is False:
        return Policy.OFF
    try:
        return Policy(value)
    except ValueError:
        raise ValueError(
            f"mptcp={value!r} is not a policy: use 'prefer', 'require' or 'off'"
        ) from None


# os.environ keeps its values in a dict (os._Environ._data, bytes on POSIX); reading that
# dict directly follows every change made through os.environ, and a missing key raises no
# KeyError inside a Mapping.get: measured, os.environ.get() cost 6-9 us of every connect.
ENV_DATA: dict[bytes, bytes] = os.environ._data  # type: ignore[attr-defined]
ENV_KEY = os.fsencode(ENV_VAR)


def _env_value() -> str | None:
    raw = ENV_DATA.get(ENV_KEY)
    return None if raw is None else os.fsdecode(raw)


def env_setting() -> str:
    """$MPTCPKIT as given ("" when unset)."""
    return _env_value() or ""


def env_policy(role: Role) -> Policy:
    """The process-wide default for sockets of this role, from $MPTCPKIT."""
    raw = _env_value()
    if not raw:
        return Policy.PREFER
    roles = _ENV_ROLES.get(raw.strip().lower())
    if roles is None:
        raise ValueError(f"{ENV_VAR}={raw!r} is not understood: use off, on, listen or dial")
    return Policy.PREFER if role in roles else Policy.OFF


def resolve(value: PolicyLike, role: Role) -> Policy:
    """The policy for one call: the explicit argument, else the environment."""
    if value is None:
        if ENV_KEY not in ENV_DATA:
            return Policy.PREFER  # the common case, kept short: it runs on every connect
        return env_policy(role)
    if value.__class__ is Policy:
        return value
    explicit = as_policy(value)
    return explicit if explicit is not None else env_policy(role)
