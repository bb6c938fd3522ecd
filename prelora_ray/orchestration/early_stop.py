"""`early_stopping: {type: mo-asha}`: a Ray Tune TrialScheduler that stops forked segments at rungs.

The rule is prelora_ray/early_stopping.py's (pure, unit-tested without Ray); this module is its Ray side. At each
rung a trial reaches (its report of that epoch), the scheduler judges it against the trials that reached the rung
before it and against the trunk at the same epoch (read from the trunk's records), records the row and the decision
in `<storage>/<sweep>/early_stopping/decisions.json` (so a resumed driver takes the same decisions: a trial is judged
once per rung, and a decision read back is replayed, never taken again), and returns STOP for a trial that must stop.

A stopped trial:
* its Optuna trial is told PRUNED (no values: TPE counts it among the worst, NSGA-II ignores it) with the rung epoch
  as a user attribute; the searcher then leaves it alone (optuna_search.TaggedOptunaSearch);
* its MLflow run ends FINISHED with the tags `prelora.early_stopped` = true, `prelora.early_stopped_epoch`,
  `prelora.early_stopped_by`, `epochs_trained`, its metrics as they were at the rung (final_val_acc, speed-up...)
  and the rung's val_correct.npy; the trial's own process, which Ray Tune ends, leaves the run to the driver
  (train.fit_in_trial/fit_run let a SystemExit through without ending the run);
* the console prints one line: which trial, at which epoch, dominated by which.

Imported lazily: it imports Ray Tune.
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from prelora_ray import metrics as M
from prelora_ray import tracking
from prelora_ray.early_stopping import TRUNK, EarlyStopping, RungRow, decide, judgeable
from prelora_ray.orchestration.sweep import Sweep

log = logging.getLogger("prelora_ray")
# in a folder of its own: Ray Tune copies the experiment folder's top-level .json/.pkl files down when it restores
# and back up with its snapshots, which would put a restored driver's stale copy over newer decisions
RECORD = ("early_stopping", "decisions.json")
STOPPED_ATTR = "early_stopped_epoch"  # on the Optuna trial


class ParetoRungScheduler(FIFOScheduler):
    """Multi-objective ASHA over forked segments, with the intervals of the sweep's front (early_stopping.decide).

    Trials are judged asynchronously, once per rung, when they reach it; nothing is paused or promoted: a trial that
    is not stopped simply goes on to its next rung.
    """

    def __init__(self, sweep: Sweep) -> None:
        super().__init__()
        if sweep.space.early_stopping is None:
            raise ValueError("ParetoRungScheduler needs a sweep with early_stopping")
        self.sweep = sweep
        self._record: dict[str, Any] | None = None  # loaded on first use (also after Tuner.restore unpickles it)
        self._trunk_cache: tuple[int, dict[int, Any]] = (-1, {})

    @property
    def rules(self) -> EarlyStopping:
        assert self.sweep.space.early_stopping is not None
        return self.sweep.space.early_stopping

    # -- the record on storage --------------------------------------------------------------------------
    def _file(self):
        return self.sweep.folder / RECORD[0] / RECORD[1]

    def record(self) -> dict[str, Any]:
        """The rows and decisions so far: {"rungs": {rung: [row]}, "decisions": {trial: {rung: decision}}}."""
        if self._record is None:
            path = self._file()
            self._record = path.read_json() if path.exists() else {"rungs": {}, "decisions": {}}
        return self._record

    def _save(self) -> None:
        self._file().write_json(self.record())

    # -- the trunk --------------------------------------------------------------------------------------
    def _trunk_hits(self, epoch: int) -> Any:
        """The trunk's per-image correctness at `epoch` (None: not recorded yet, or recorded without it)."""
        from prelora_ray import fork
        from prelora_ray.orchestration.trunk import trunk_dir
        from prelora_ray.significance import unpack_hits

        seen, by_epoch = self._trunk_cache
        if epoch not in by_epoch:
            try:
                history = fork.read_history(trunk_dir(self.sweep))
            except Exception:  # no trunk records yet
                history = []
            if len(history) != seen:
                by_epoch = {
                    int(h[M.EPOCH]): unpack_hits(h[M.VAL_HITS]) for h in history if h.get(M.VAL_HITS) is not None
                }
                self._trunk_cache = (len(history), by_epoch)
        return by_epoch.get(epoch)

    # -- Ray Tune's hooks -------------------------------------------------------------------------------
    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        """Judge the trial at a rung; CONTINUE anywhere else."""
        if M.EPOCH not in result or M.VAL_HITS not in result:  # the trial's closing report, or a run without hits
            return TrialScheduler.CONTINUE
        epoch = int(result[M.EPOCH])
        passed = [i for i, e in enumerate(self.rules.rung_epochs(int(result.get("forked_from", -1)))) if e <= epoch]
        if not passed:
            return TrialScheduler.CONTINUE
        # the last rung it has reached: judged there, or (a rung that came during its warmup or grace) at its first
        # judgeable epoch after it; a rung passed while a later one is due is not judged on its own
        rung = str(passed[-1])
        trial_id = str(trial.trial_id)
        record = self.record()
        past = record["decisions"].get(trial_id, {}).get(rung)
        if past is not None:
            if not past["stop"]:
                return TrialScheduler.CONTINUE
            # the driver died between the decision and Ray Tune's snapshot: the trial came back; end it as decided
            self._stopped(trial, result, _row(trial_id, epoch, result), past["dominated_by"], past["rows"], int(rung))
            return TrialScheduler.STOP
        if not judgeable(result, self.rules.grace_epochs):
            return TrialScheduler.CONTINUE
        row = _row(trial_id, epoch, result)
        others = [RungRow.from_dict(r) for r in record["rungs"].get(rung, []) if r["trial"] != trial_id]
        decision = decide(row, others, self._trunk_hits, self.rules, self.sweep.space.alpha)
        record["rungs"].setdefault(rung, []).append(row.as_dict())
        record["decisions"].setdefault(trial_id, {})[rung] = {
            "stop": decision.stop,
            "epoch": epoch,
            "rank": decision.rank,
            "rows": decision.rows,
            "dominated_by": decision.dominated_by,
            "why": decision.why,
        }
        self._save()
        if not decision.stop:
            return TrialScheduler.CONTINUE
        self._stopped(trial, result, row, decision.dominated_by, decision.rows, int(rung))
        return TrialScheduler.STOP

    def debug_string(self) -> str:
        stops = sum(d["stop"] for by in self.record()["decisions"].values() for d in by.values())
        return f"Using MO-ASHA over forked segments: {stops} trials stopped"

    # -- a stop -----------------------------------------------------------------------------------------
    def _stopped(
        self, trial: Any, result: dict[str, Any], row: RungRow, dominated_by: str | None, rows: int, rung: int
    ) -> None:
        """Tell the console, Optuna and MLflow, once (a replayed decision whose run is already ended so says nothing);
        each step on its own: one failing does not undo the others."""
        run_name = f"{self.sweep.name}_{trial.trial_id}"
        by = dominated_by or "?"
        rival = "the trunk at the same epoch" if by == TRUNK else f"{self.sweep.name}_{by}"
        try:
            prune_optuna_trial(self.sweep, str(trial.trial_id), row.epoch)
        except Exception as exc:  # the study's storage down: the searcher's on_trial_complete still ends it
            log.warning("trial %s: could not mark its Optuna trial pruned (%s)", run_name, exc)
        try:
            if not finish_stopped_run(self.sweep, run_name, result, row, rival):
                return
        except Exception as exc:  # MLflow down: the sweep's end marks the run (mark_lost_trials)
            log.warning("trial %s: could not end its MLflow run as early-stopped (%s)", run_name, exc)
        log.info(
            "trial %s stopped at epoch %d (rung %d, %d epochs trained): val_acc %.4f, speed-up %.2f; "
            "dominated by %s (%d rows at the rung, the trunk included where recorded)",
            run_name,
            row.epoch,
            self.rules.rungs[rung],
            int(result.get("epochs_trained", 0)),
            row.acc,
            row.speedup[0],
            rival,
            rows,
        )


def _row(trial_id: str, epoch: int, result: dict[str, Any]) -> RungRow:
    from prelora_ray.significance import unpack_hits

    def num(key: str) -> float:
        value = result.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan

    return RungRow(
        trial=trial_id,
        epoch=epoch,
        acc=num(M.VAL_ACC),
        hits=unpack_hits(result[M.VAL_HITS]),
        speedup=(num(M.SPEEDUP), num(M.SPEEDUP_LO), num(M.SPEEDUP_HI)),
    )


def prune_optuna_trial(sweep: Sweep, trial_id: str, epoch: int) -> None:
    """Tell the study that the Optuna trial of Tune trial `trial_id` was pruned (a state a multi-objective study
    accepts, without values), with the epoch it stopped at."""
    import optuna

    from prelora_ray.orchestration.optuna_search import TUNE_TRIAL_ATTR

    study = optuna.load_study(study_name=sweep.name, storage=sweep.study_storage())
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get(TUNE_TRIAL_ATTR) == trial_id:
            study._storage.set_trial_user_attr(t._trial_id, STOPPED_ATTR, epoch)
            study.tell(t.number, state=optuna.trial.TrialState.PRUNED)
            return


def finish_stopped_run(sweep: Sweep, run_name: str, result: dict[str, Any], row: RungRow, rival: str) -> bool:
    """The trial's MLflow run, FINISHED as early-stopped: tags, its metrics at the rung, val_correct.npy. False when
    it had been ended so before (or has no run)."""
    import numpy as np

    run_id = tracking.find_run(sweep.tracking_uri, sweep.experiment_id, run_name)
    if run_id is None:
        return False
    tags = tracking.run_tags(sweep.tracking_uri, run_id)
    if tags.get(M.EARLY_STOPPED_TAG) == "true":  # ended so before (a resumed driver replaying the decision)
        return False
    numbers = {
        k: float(v)
        for k, v in result.items()
        if k in _SUMMARY_KEYS and isinstance(v, int | float) and not isinstance(v, bool)
    }
    numbers[M.FINAL_VAL_ACC] = row.acc
    tracking.log_metrics(sweep.tracking_uri, run_id, numbers)
    with tempfile.TemporaryDirectory(prefix="prelora-") as folder:
        path = Path(folder) / M.VAL_CORRECT_ARTIFACT
        np.save(path, row.hits)
        tracking.log_file(sweep.tracking_uri, run_id, path)
    tracking.set_tags(
        sweep.tracking_uri,
        run_id,
        {
            M.EARLY_STOPPED_TAG: "true",
            M.EARLY_STOPPED_EPOCH_TAG: str(row.epoch),
            M.EARLY_STOPPED_BY_TAG: rival,
            M.EPOCHS_TRAINED_TAG: str(int(result.get("epochs_trained", 0))),
        },
    )
    tracking.end_run(sweep.tracking_uri, run_id, "FINISHED")
    return True


_SUMMARY_KEYS = (
    M.BEST_VAL_ACC,
    M.SPEEDUP,
    M.SPEEDUP_LO,
    M.SPEEDUP_HI,
    M.MEAN_EPOCH_TIME_S,
    M.PEAK_MEM_MB,
    M.TRAINABLE_FRACTION,
    M.TOTAL_TRAIN_TIME_S,
    M.SWITCH_EPOCH,
    M.FREEZE_EPOCH,
    M.VAL_N,
    M.VAL_CORRECT,
)
