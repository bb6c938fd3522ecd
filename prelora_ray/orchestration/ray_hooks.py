"""Setup hooks run by every Ray worker process of a local Ray we start (keep this module light).

The hook runs in every worker: Tune's trial actors, Train's controller and workers, Ray's helpers.
It imports nothing heavy, so processes that never train do not pay for torch.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

# Ray Train's detached PlacementGroupCleaner asks the state API (served by the dashboard) whether the
# controller still lives; a local Ray started without the dashboard (ray[default] is not installed)
# has none, and the cleaner logs a warning every second for the whole run and never cleans anything.
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
TUNE_CHECKPOINT_LOGGER = "ray.train._internal.storage"


def quiet_without_state_api() -> None:
    """Silence only the cleaner's warnings (errors still show), and tell it which Ray is ours.

    With a second local Ray on the machine (two sweeps, a benchmark) the cleaner's state-API client
    cannot pick one and its thread dies with a 30-line ConnectionError traceback; RAY_ADDRESS names ours.
    """
    logging.getLogger(CLEANER_LOGGER).setLevel(logging.ERROR)
    if not os.environ.get("RAY_ADDRESS"):
        try:
            import ray

            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        except Exception:  # not connected yet: the cleaner finds the cluster itself, as before
            pass


def ray_report_logger() -> str:
    """Name of Ray Train's logger of "Reporting training result N: TrainingReport(...)" (one per report and worker).

    It is named after its source file (`logging.getLogger(__file__)`), outside the `ray` hierarchy, so
    Ray Train's LoggingConfig does not reach it.
    """
    import ray

    return os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")


def apply_console(verbose: bool = False, progress: bool = True) -> None:
    """What one of our Ray processes (a trial's driver, the trunk task, a Train worker) prints.

    `progress`: our INFO lines (a worker's line per epoch, switch and freeze; a trial's fork events).
    `verbose`: also Ray Train's per-report dumps, MLflow's INFO lines, its "View run" links and the progress
    bars of MLflow (artifact downloads) and transformers (model shards). Warnings and errors always show.
    """
    progress_logging()
    exit_quietly_when_terminated()
    logging.getLogger("prelora_ray").setLevel(logging.INFO if verbose or progress else logging.WARNING)
    logging.getLogger(ray_report_logger()).setLevel(logging.NOTSET if verbose else logging.WARNING)
    # a trial that trains in its own process (trial_executor: tune): "Checkpoint successfully created at ..." per epoch
    logging.getLogger(TUNE_CHECKPOINT_LOGGER).setLevel(logging.NOTSET if verbose else logging.WARNING)
    if "mlflow" in sys.modules:  # else MLFLOW_LOGGING_LEVEL below applies when it is imported
        logging.getLogger("mlflow").setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        return
    os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    # with an http:// tracking URI MLflow prints "View run ... at" and "View experiment at" for every run it ends
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers imported later
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def _exit_hook(unraisable: Any) -> None:
    if isinstance(unraisable.exc_value, SystemExit):
        code = unraisable.exc_value.code
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code if isinstance(code, int) else 1)
    sys.__unraisablehook__(unraisable)


def exit_quietly_when_terminated() -> None:
    """A SIGTERM that lands while the garbage collector runs a finalizer exits the process, without a traceback.

    Ray ends a job's worker processes (a trial's process once the sweep is over, a Train worker) with SIGTERM, and its
    handler raises SystemExit. When the signal arrives inside a finalizer (a WeakSet callback, a `__del__`) Python
    cannot raise it there: it prints "Exception ignored in ... SystemExit: 1" (9 lines at the end of a finished sweep's
    console) and the process goes on until Ray kills it. This hook ends the process as the SIGTERM asked (streams
    flushed, the SystemExit's code); every other unraisable exception is printed as before.
    """
    sys.unraisablehook = _exit_hook


def progress_logging() -> None:
    """Our progress lines (the `prelora_ray` logger at INFO, bare messages) in a Ray process.

    Ray's own INFO chatter stays off.
    """
    log = logging.getLogger("prelora_ray")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
