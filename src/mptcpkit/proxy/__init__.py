"""`mptcpkit proxy`: an MPTCP gateway with HAProxy-style per-address protocols.

`config` (TOML model), `proxyproto` (PROXY v1/v2 codec), `balance` (server choice and
health state) are pure; `relay` and `runtime` are a worker's event loop; `master`
binds, forks workers, reloads and drains.
"""

from mptcpkit.proxy.config import Config, ConfigError, load, quick

__all__ = ["Config", "ConfigError", "load", "quick"]
