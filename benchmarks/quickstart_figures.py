"""The quickstart's acceptance figures, read from the MLflow store of a finished quickstart sweep.

    cd EMPTY && time prelora-ray tune .../search_spaces/quickstart.yaml   # wall time, lines of output
    python benchmarks/quickstart_figures.py EMPTY/mlflow.db [--sweep quickstart]

Prints, over the sweep's trials, the median of (median LoRA-phase epoch time / median full-phase
epoch time) from each run's per-epoch `epoch_time_s` and `phase_index` (a forked trial's full-phase
epochs are the trunk's, copied into its run), each trial's ratio, and the best final val_acc.
Trials that never reach the LoRA phase (switch too late for their warmup, or never) are left out.
"""

from __future__ import annotations

import argparse
import statistics

from mlflow.tracking import MlflowClient

from prelora_ray import metrics as M

FULL, LORA = 0, 2  # phase_index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("db", help="the sweep's MLflow sqlite file (mlflow.db in the folder it ran in)")
    ap.add_argument("--sweep", default="quickstart")
    ap.add_argument("--experiment", default="prelora-ray")
    args = ap.parse_args()
    c = MlflowClient(f"sqlite:///{args.db}")
    exp = c.get_experiment_by_name(args.experiment)
    if exp is None:
        raise SystemExit(f"no MLflow experiment {args.experiment!r} in {args.db}")
    runs = c.search_runs(
        [exp.experiment_id],
        f"tags.`{M.ROLE_TAG}` = 'trial' and tags.`{M.SWEEP_TAG}` = '{args.sweep}'",
        max_results=1000,
    )
    ratios, best = {}, (0.0, "")
    for r in runs:
        times = {m.step: m.value for m in c.get_metric_history(r.info.run_id, M.EPOCH_TIME_S)}
        phase = {m.step: m.value for m in c.get_metric_history(r.info.run_id, M.PHASE_INDEX)}
        full = [t for s, t in times.items() if phase.get(s) == FULL]
        lora = [t for s, t in times.items() if phase.get(s) == LORA]
        if full and lora:
            ratios[r.info.run_name] = statistics.median(lora) / statistics.median(full)
        acc = r.data.metrics.get(M.FINAL_VAL_ACC, 0.0)
        if acc > best[0]:
            best = (acc, r.info.run_name)
    if not ratios:
        raise SystemExit(f"no trial of sweep {args.sweep!r} reached the LoRA phase")
    print(f"{len(runs)} trials, {len(ratios)} with full and LoRA epochs")
    for name, ratio in sorted(ratios.items(), key=lambda kv: kv[1]):
        print(f"  {name}: median LoRA / median full epoch time {ratio:.3f}")
    print(f"median over trials: {statistics.median(ratios.values()):.3f} (target <= 0.8)")
    print(f"best final val_acc: {best[0]:.4f} ({best[1]}) (target >= 0.95)")


if __name__ == "__main__":
    main()
