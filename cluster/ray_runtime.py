"""Connecting to Ray: the cluster at `RAY_ADDRESS` (or `ray.address`), else a local instance.

Ray 2.60 turns token authentication on for local clusters; we keep it on. A client of a
remote cluster needs `RAY_AUTH_MODE=token` and the cluster's token in its environment.
"""

from __future__ import annotations

import logging
import os

from streams.config import PipelineConfig

__all__ = ["connect"]


def connect(config: PipelineConfig, quiet: bool = True) -> None:
    """Initialise Ray once for this process (a no-op if it already is)."""
    import ray

    if ray.is_initialized():
        return
    if quiet:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
    address = config.ray.address or os.environ.get("RAY_ADDRESS") or None
    ray.init(
        address=address,
        include_dashboard=False,
        log_to_driver=not quiet,
        logging_level=logging.WARNING if quiet else logging.INFO,
    )
