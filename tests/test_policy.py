"""MPTCPKIT=off|on|listen|dial, and the explicit argument that always wins."""

from __future__ import annotations

import pytest

from mptcpkit.policy import ENV_VAR, Policy, as_policy, resolve


@pytest.mark.parametrize(
    ("env", "listen", "dial"),
    [
        (None, Policy.PREFER, Policy.PREFER),
        ("on", Policy.PREFER, Policy.PREFER),
        ("off", Policy.OFF, Policy.OFF),
        ("listen", Policy.PREFER, Policy.OFF),
        ("dial", Policy.OFF, Policy.PREFER),
        ("2", Policy.PREFER, Policy.OFF),  # GODEBUG=multipathtcp's numbers
        ("3", Policy.OFF, Policy.PREFER),
    ],
)
def test_environment(
    monkeypatch: pytest.MonkeyPatch, env: str | None, listen: Policy, dial: Policy
) -> None:
    if env is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, env)
    assert resolve(None, "listen") is listen
    assert resolve(None, "dial") is dial
    assert resolve("require", "dial") is Policy.REQUIRE  # explicit wins
    assert resolve(False, "listen") is Policy.OFF


def test_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="'maybe' is not a policy"):
        as_policy("maybe")  # type: ignore[arg-type]
    monkeypatch.setenv(ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="MPTCPKIT='sometimes'"):
        resolve(None, "dial")
