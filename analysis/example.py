"""Example: compare sweeps from a notebook or a script, with the same functions `prelora-ray pareto` uses.

    python analysis/example.py --tracking-uri sqlite:///$PWD/mlflow.db --experiment prelora-ray [--sweep quickstart ...]

Reads each sweep from MLflow, prints its front with the hypervolume against its own baseline and the
speed-up at equal accuracy, then writes the fronts plot (no MLflow logging).
"""

from __future__ import annotations

import argparse

from analysis import plots
from analysis.pareto import hypervolume, speedup_at_equal_accuracy
from analysis.report import axes_of, baseline_row, finished_trials, knee_row
from analysis.runs import format_front, load_sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--experiment", default="prelora-ray")
    ap.add_argument("--sweep", action="append", default=None)
    ap.add_argument("--out", default="example-fronts.png")
    args = ap.parse_args()
    records = [load_sweep(args.tracking_uri, args.experiment, s) for s in (args.sweep or [None])]
    fronts, baselines, knees = {}, {}, {}
    for rec in records:
        trials = finished_trials(rec)
        x, y = axes_of(rec.objectives)
        base, knee = baseline_row(rec), knee_row(rec)
        print(f"== sweep {rec.name}: {len(trials)} finished trials")
        print(format_front(rec.table))
        if base is not None:
            ref = [float(base[m]) for m, _ in rec.objectives]
            hv = hypervolume(
                trials[[m for m, _ in rec.objectives]].astype(float).to_numpy(), [d for _, d in rec.objectives], ref
            )
            idx, speedup = speedup_at_equal_accuracy(
                trials[y].astype(float).tolist(), trials[x].astype(float).tolist(), float(base[y]), float(base[x]), 0.5
            )
            print(f"hypervolume over the baseline point: {hv:.4g}")
            print(
                "within 0.5 points of the baseline's accuracy: "
                + (f"{trials.iloc[idx]['run_name']}, {speedup:.2f}x faster per epoch" if idx is not None else "none")
            )
            baselines[rec.name] = (float(base[x]), float(base[y]))
        if knee is not None:
            knees[rec.name] = (float(knee[x]), float(knee[y]))
        fronts[rec.name] = trials
    x, y = axes_of(records[0].objectives)
    print(f"written {plots.plot_fronts(fronts, x, y, args.out, baselines=baselines, knees=knees)}")


if __name__ == "__main__":
    main()
