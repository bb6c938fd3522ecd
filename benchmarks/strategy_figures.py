"""Per-strategy figures of finished `prelora-ray train` runs, read from their MLflow store.

    prelora-ray train --set strategy=full            --set name=acc-full
    prelora-ray train --set strategy=prelora         --set name=acc-prelora
    prelora-ray train --set strategy=relora_prelora  --set name=acc-relora_prelora
    python benchmarks/strategy_figures.py mlflow.db [--runs acc-full acc-prelora ...] [--target 0.93]

For each run (default: every run of the experiment, oldest first): strategy, epochs, final and best
val_acc, the first epoch reaching `--target` val_acc, mean epoch time, and per phase (by the stored
`phase_index`) its epochs, median epoch time and trainable fraction; then the strategy's own counters
(`relora_merges`, `lte_merges`, switch and freeze epochs) and `comm_bytes_per_step` where logged.
"""

from __future__ import annotations

import argparse
import statistics

from mlflow.tracking import MlflowClient

from prelora_ray import metrics as M
from prelora_ray.strategies.phases import phase_index

PHASE_NAME = {index: phase.value for phase, index in phase_index().items()}
COUNTERS = ("relora_merges", "lte_merges", M.SWITCH_EPOCH, M.FREEZE_EPOCH, "comm_bytes_per_step")


def history(client, run_id: str, key: str) -> dict[int, float]:
    """step -> value of one metric."""
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("db", help="the MLflow sqlite file (mlflow.db in the folder the runs ran in)")
    ap.add_argument("--experiment", default="prelora-ray")
    ap.add_argument("--runs", nargs="*", help="run names (default: every run of the experiment)")
    ap.add_argument("--target", type=float, default=0.93, help="report the first epoch whose val_acc reaches this")
    args = ap.parse_args()
    c = MlflowClient(f"sqlite:///{args.db}")
    exp = c.get_experiment_by_name(args.experiment)
    if exp is None:
        raise SystemExit(f"no MLflow experiment {args.experiment!r} in {args.db}")
    runs = sorted(c.search_runs([exp.experiment_id], max_results=1000), key=lambda r: r.info.start_time)
    if args.runs:
        by_name = {r.info.run_name: r for r in runs}
        missing = [n for n in args.runs if n not in by_name]
        if missing:
            raise SystemExit(f"no runs named {missing} in {args.experiment!r}; there are {sorted(by_name)}")
        runs = [by_name[n] for n in args.runs]
    for r in runs:
        rid = r.info.run_id
        acc, times, phase = history(c, rid, M.VAL_ACC), history(c, rid, M.EPOCH_TIME_S), history(c, rid, M.PHASE_INDEX)
        fraction = history(c, rid, M.TRAINABLE_FRACTION)
        if not acc:
            continue
        last = max(acc)
        reach = next((e for e in sorted(acc) if acc[e] >= args.target), None)
        print(
            f"\n{r.info.run_name}  strategy={r.data.params.get('strategy')}  epochs={last + 1}  "
            f"final val_acc {acc[last]:.4f}  best {max(acc.values()):.4f}  "
            f"first >= {args.target}: {'never' if reach is None else f'epoch {reach} ({reach + 1} epochs)'}  "
            f"mean epoch {statistics.mean(times.values()):.3f} s"
        )
        for index in sorted(set(phase.values())):
            epochs = [e for e, p in phase.items() if p == index]
            fractions = sorted({round(fraction[e], 4) for e in epochs if e in fraction})
            print(
                f"  {PHASE_NAME.get(int(index), index):<7} epochs {len(epochs):>3}  "
                f"median epoch {statistics.median(times[e] for e in epochs):.3f} s  "
                f"trainable fraction {', '.join(f'{f:.4f}' for f in fractions)}"
            )
        counters = {k: history(c, rid, k) for k in COUNTERS}
        shown = [
            f"{k} {v[last]:g}"
            if k != "comm_bytes_per_step"
            else f"{k} {statistics.mean(v.values()):,.0f} (mean over epochs)"
            for k, v in counters.items()
            if v and last in v
        ]
        if shown:
            print("  " + "; ".join(shown))


if __name__ == "__main__":
    main()
