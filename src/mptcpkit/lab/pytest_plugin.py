"""Pytest fixtures that hand a test a running topology and remove it afterwards.

Load with `pytest_plugins = ["mptcpkit.lab.pytest_plugin"]`. Fixtures:

- `two_paths`: `lab.two_paths(paths=2)` up (client, server).
- `gateway`: `lab.gateway(paths=2)` up (client, proxy, server).
- `lab_factory`: `lab_factory(lab.two_paths, paths=3, rate="20mbit")` or
  `lab_factory(topology)` brings a topology up; all are removed after the test.

Arguments for `two_paths`/`gateway` come from `@pytest.mark.lab(paths=3, rate="20mbit")`
or from indirect parametrization (`request.param`, a dict). The plugin registers the
`lab` and `root` markers (`--strict-markers` accepts them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mptcpkit.lab.netns import is_root
from mptcpkit.lab.topologies import gateway as _gateway
from mptcpkit.lab.topologies import two_paths as _two_paths
from mptcpkit.lab.topology import Topology

LabFactory = Callable[..., Topology]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lab(**kwargs): arguments for the two_paths/gateway lab fixtures"
    )
    # The lab's own tests and docs mark root-only tests; registered here so a project
    # that loads the plugin can run with --strict-markers without declaring it.
    config.addinivalue_line("markers", "root: needs root, network namespaces and the real kernel")


def _kwargs(request: pytest.FixtureRequest) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    marker = request.node.get_closest_marker("lab")
    if marker is not None:
        kwargs.update(marker.kwargs)
    param = getattr(request, "param", None)
    if isinstance(param, dict):
        kwargs.update(param)
    return kwargs


def _need_root() -> None:
    if not is_root():
        pytest.skip("the lab needs root (network namespaces)")


@pytest.fixture
def lab_factory() -> Iterator[LabFactory]:
    """Bring topologies up on demand; every one is removed when the test ends."""
    _need_root()
    made: list[Topology] = []

    def make(topology: Topology | Callable[..., Topology], /, **kwargs: Any) -> Topology:
        topo = topology if isinstance(topology, Topology) else topology(**kwargs)
        made.append(topo)
        return topo.up()

    try:
        yield make
    finally:
        errors = []
        for topo in reversed(made):
            try:
                topo.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def two_paths(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """A running `lab.two_paths` topology (hosts `client` and `server`)."""
    _need_root()
    with _two_paths(**_kwargs(request)) as net:
        yield net


@pytest.fixture
def gateway(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """A running `lab.gateway` topology (hosts `client`, `proxy` and `server`)."""
    _need_root()
    with _gateway(**_kwargs(request)) as net:
        yield net


__all__ = ["gateway", "lab_factory", "two_paths"]
