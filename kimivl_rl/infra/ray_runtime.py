"""Connecting to (or starting) the Ray cluster, with the project's safe defaults."""
from __future__ import annotations

import logging
import os

from kimivl_rl.config import Config

log = logging.getLogger(__name__)


def init_ray(cfg: Config) -> None:
    """Join the cluster of a ``ray job submit`` (RAY_ADDRESS) or ``cluster.address``; otherwise
    start a local one whose dashboard binds to ``cluster.bind_host`` (localhost by default)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=cfg.cluster.dashboard, dashboard_host=cfg.cluster.bind_host,
                 dashboard_port=cfg.cluster.dashboard_port)
    log.info("Ray: %s", ray.get_runtime_context().gcs_address)


def shutdown_ray() -> None:
    """Disconnect from Ray, which also flushes the actors' log lines still streaming to this
    driver, so that a message printed afterwards is the last thing the user sees."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
