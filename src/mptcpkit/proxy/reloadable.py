"""What a reload may change: the settings only a restart changes are kept as running.

The master binds `global.metrics` and `global.stats-socket` once, at start (and drops
nothing it would need to bind them again), so a reloaded configuration that changes
them runs with the old ones, and the operator is told. Apart from the master's reload
so that the list of such settings is in one place.
"""

from __future__ import annotations

import dataclasses

from mptcpkit.proxy.configmodel import Config

__all__ = ["keep_restart_only"]


def keep_restart_only(running: Config, cfg: Config) -> tuple[Config, list[str]]:
    """`cfg` with the running configuration's restart-only settings; a line for the
    log for each one it changed."""
    notes: list[str] = []
    if cfg.global_.metrics != running.global_.metrics:
        cfg = dataclasses.replace(
            cfg, global_=dataclasses.replace(cfg.global_, metrics=running.global_.metrics)
        )
        notes.append("reload: global.metrics changes need a restart; keeping the old address")
    old_g = running.global_
    if (cfg.global_.stats_socket, cfg.global_.stats_perms) != (
        old_g.stats_socket,
        old_g.stats_perms,
    ):
        cfg = dataclasses.replace(
            cfg,
            global_=dataclasses.replace(
                cfg.global_, stats_socket=old_g.stats_socket, stats_perms=old_g.stats_perms
            ),
        )
        notes.append("reload: global.stats-socket changes need a restart; kept")
    return cfg, notes
