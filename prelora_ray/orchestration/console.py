"""The sweep's console on the driver: a line per trial event, the trunk's progress (Ray Tune callbacks, threads).

Without `--verbose` this is all a sweep prints besides warnings, errors and the front; the trial
processes add their own fork, reuse and never-switches lines (forking.py).
"""

from __future__ import annotations

import logging
import math
import threading
from typing import TYPE_CHECKING, Any

from prelora_ray import metrics as M

if TYPE_CHECKING:
    from prelora_ray.orchestration.sweep import Sweep

log = logging.getLogger("prelora_ray")


class SweepConsole:
    """The sweep's console on the driver: one line per trial event, as a Ray Tune Callback (`console_callback`).

    Sampled (its parameters), finished (its objectives, switch epoch, epochs trained), failed (the
    reason). A trial's fork, reuse or never-switches line comes from its own process (forking.py),
    the trunk's progress from `TrunkProgress`. A plain class, so it is importable and testable without Ray.
    """

    def __init__(self, sweep: Sweep) -> None:
        self.sweep_name = sweep.name
        self.space = sweep.space
        self.started: set[str] = set()

    def run_name(self, trial: Any) -> str:
        """The trial's MLflow run and TorchTrainer name."""
        return f"{self.sweep_name}_{trial.trial_id}"

    def sampled_text(self, config: dict[str, Any]) -> str:
        """`tau=1.23 zeta=4.56 ...`, and what the trial's config repaired."""
        sampled = {p.key: config[p.key] for p in self.space.parameters if p.key in config}
        text = " ".join(f"{k.removeprefix('prelora.')}={_short(v)}" for k, v in sampled.items())
        try:
            flat = self.space.trial_config(sampled).flat()
        except Exception:  # the trial itself reports a config it cannot build
            return text
        repaired = {k: flat[k] for k in sampled if k in flat and flat[k] != sampled[k]}
        if repaired:
            text += (
                " (repaired: "
                + " ".join(f"{k.removeprefix('prelora.')}={_short(v)}" for k, v in repaired.items())
                + ")"
            )
        return text

    def result_text(self, result: dict[str, Any]) -> str:
        """`final_val_acc 0.9361, mean_epoch_time_s 0.8123; switch epoch 7, 23 epochs trained`."""
        return objectives_text(result, [o.metric for o in self.space.objectives]) + "; " + _switch_text(result)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Once per trial (not again when it is retried)."""
        if trial.trial_id not in self.started:
            self.started.add(trial.trial_id)
            log.info("trial %s: sampled %s", self.run_name(trial), self.sampled_text(trial.config))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Its objectives."""
        log.info("trial %s: finished: %s", self.run_name(trial), self.result_text(trial.last_result or {}))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A failure Tune retries (cluster.max_failures)."""
        log.warning("trial %s: failed (%s); retrying it", self.run_name(trial), trial_error(trial))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """A failure for good: the reason, and where the whole trace is."""
        where = f" (trace: {trial.error_file})" if getattr(trial, "error_file", None) else ""
        log.error("trial %s: FAILED: %s%s", self.run_name(trial), trial_error(trial), where)


def console_callback(sweep: Sweep) -> Any:
    """`SweepConsole` as a Ray Tune Callback (built here, since this module does not import Ray when imported)."""
    from ray.tune import Callback

    class TuneSweepConsole(SweepConsole, Callback):
        pass

    return TuneSweepConsole(sweep)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def objectives_text(values: dict[str, Any], metrics: list[str]) -> str:
    """`final_val_acc 0.9361, mean_epoch_time_s 0.8123` (n/a where a value is missing)."""
    return ", ".join(
        f"{m} {_short(float(values[m])) if isinstance(values.get(m), (int, float)) else 'n/a'}" for m in metrics
    )


def _switch_text(result: dict[str, Any]) -> str:
    switch = result.get(M.SWITCH_EPOCH)
    text = f"switch epoch {int(switch)}" if isinstance(switch, (int, float)) and switch >= 0 else "no switch"
    if isinstance(result.get("epochs_trained"), (int, float)):
        text += f", {int(result['epochs_trained'])} epochs trained"
    return text


def trial_error(trial: Any) -> str:
    """One line: the exception a trial failed with (`Type: message`), from the error Tune stored."""
    text = ""
    try:
        err = trial.get_pickled_error()
        cause = getattr(err, "cause", None) or err
        if cause is not None:
            text = f"{type(cause).__name__}: {cause}"
    except Exception:  # cannot be unpickled here: the text trace below
        pass
    if not text:
        try:
            lines = [line.strip() for line in (trial.get_error() or "").splitlines() if line.strip()]
            text = lines[-1] if lines else ""
        except Exception:
            pass
    first = next((line.strip() for line in text.splitlines() if line.strip()), "unknown error")
    return first if len(first) <= 300 else first[:297] + "..."


class TrunkProgress:
    """The trunk's progress on the driver, read from its records.

    A line every ~1/5 of its epochs, then finished or failed.
    """

    LINES = 5

    def __init__(self, sweep: Sweep, *, poll_s: float = 2.0) -> None:
        from prelora_ray.orchestration.trunk import trunk_dir

        self.folder, self.name, self.epochs = trunk_dir(sweep), f"{sweep.name}_baseline", sweep.space.base.epochs
        self.metrics = [o.metric for o in sweep.space.objectives]
        self.step = max(1, math.ceil(self.epochs / self.LINES))
        self.poll_s, self.shown, self.done = poll_s, 0, False
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="trunk-progress", daemon=True)

    def start(self) -> TrunkProgress:
        """Poll in a thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling, after a last look (the trunk's end may fall between two polls)."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.check()

    def _run(self) -> None:
        while not self.done and not self._stop.wait(self.poll_s):
            self.check()

    def check(self) -> None:
        """Print what is new since the last look."""
        from prelora_ray import fork

        with self._lock:
            if self.done:
                return
            try:
                status, history = fork.read_status(self.folder), fork.read_history(self.folder)
            except (OSError, ValueError):  # a file being replaced: next time
                return
            state, n = status.get("state"), len(history)
            if state == "finished":
                log.info(
                    "trunk %s: finished: %s (full training, %d epochs)",
                    self.name,
                    objectives_text(fork.summarize(history), self.metrics),
                    n,
                )
                self.done = True
            elif state == "failed":
                log.warning(
                    "trunk %s: FAILED: %s; the trials waiting for it fail too (--resume retries them)",
                    self.name,
                    status.get("error"),
                )
                self.done = True
            elif n < self.epochs and n // self.step > self.shown // self.step:
                last = history[-1]
                log.info(
                    "trunk %s: epoch %d/%d | val_acc %.4f | %.2f s/epoch",
                    self.name,
                    n,
                    self.epochs,
                    float(last[M.VAL_ACC]),
                    float(last[M.EPOCH_TIME_S]),
                )
                self.shown = n
