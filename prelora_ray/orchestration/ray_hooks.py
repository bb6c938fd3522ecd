"""Setup hooks run by every Ray worker process of a local Ray we start (keep this module light).

The hook runs in every worker: Tune's trial actors, Train's controller and workers, Ray's helpers.
It imports nothing heavy, so processes that never train do not pay for torch.
"""

from __future__ import annotations

import logging

# Ray Train's detached PlacementGroupCleaner asks the state API (served by the dashboard) whether the
# controller still lives; a local Ray started without the dashboard (ray[default] is not installed)
# has none, and the cleaner logs a warning every second for the whole run and never cleans anything.
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_without_state_api() -> None:
    """Silence only the cleaner's warnings (errors still show)."""
    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)


def progress_logging() -> None:
    """Our progress lines (the `prelora_ray` logger at INFO, bare messages) in a Ray process; Ray's own INFO chatter stays off."""
    log = logging.getLogger("prelora_ray")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
