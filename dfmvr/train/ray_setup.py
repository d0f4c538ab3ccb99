"""Set-up Ray runs in every worker process of the training job's own local Ray: kept to the
standard library, because Ray imports it in each of them (the controller and its helpers too)."""

from __future__ import annotations

import logging


def quiet_state_api_warnings() -> None:
    """A ``worker_process_setup_hook``. The job's own local Ray has no dashboard and so no State
    API: Ray Train's placement-group cleaner asks the State API about its controller every second
    and warns each time it cannot (about 700 lines in a 13-minute job). Without the State API the
    cleaner can do nothing anyway; the job shuts its Ray down at the end, placement groups with it."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
