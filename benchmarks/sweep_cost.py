"""Cost of a fork-from-trunk sweep vs the same sweep trained from scratch ("naive"), in one run.

    python benchmarks/sweep_cost.py [--num-samples 16] [--sampler random] [--seed 0] [--epochs 30]
                                    [--trial-executor tune]

Both sweeps use search_spaces/quickstart.yaml's space on digits with `--model` (default vit-digits, as
measured; the quickstart itself now uses vit-digits-wide, which switches earlier) and `deterministic: true`,
max_concurrent 1, the same trial executor (`--trial-executor`, default tune as the quickstart: each
trial trains in its Tune trial process; ray_train: a TorchTrainer per trial, ~15-25 s of start-up
each on 2 CPUs) and the same sampler and seed; only `fork` differs. Each runs through
make_sweep/run_sweep in its own temp folder (its own sqlite MLflow store, Optuna db and storage),
on one Ray instance with 2 CPUs; fork first, then naive. Reported: epochs trained (the parent
run's `epochs_trained_total`), wall time (perf_counter around run_sweep), and per trial, matched on
its sampled parameters (the `sampled` tag), the switch epoch and final val_acc of both sweeps.

The default sampler is `random`: its draws do not depend on the results, so both sweeps sample the
same parameter sets. With `tpe`, trials after Optuna's start-up trials depend on the observed
objectives, and mean_epoch_time_s is a timing, so the two sweeps' later trials would differ.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml
from common import write_json

from prelora_ray import metrics as M
from prelora_ray import tracking

QUICKSTART = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"


def space_for(args: argparse.Namespace, fork: bool):
    from prelora_ray.search_space import parse_search_space

    data = yaml.safe_load(QUICKSTART.read_text())
    data["name"] = f"sweepcost-{'fork' if fork else 'naive'}"
    # the model of the measured figures (README): the quickstart's own model may change
    data["base"] = {**data["base"], "epochs": args.epochs, "deterministic": True, "model": {"preset": args.model}}
    data.update(
        num_samples=args.num_samples,
        max_concurrent=1,
        sampler={"type": args.sampler, "seed": args.seed},
        fork=fork,
        trial_executor=args.trial_executor,
    )
    space = parse_search_space(data, path=f"{data['name']}.yaml", raw_text=yaml.safe_dump(data, sort_keys=False))
    assert space.fork is fork
    return space


def run_one(args: argparse.Namespace, fork: bool) -> dict:
    """Run one sweep in a fresh folder; its wall time, parent metrics and one row per child run."""
    from prelora_ray.orchestration.sweep import make_sweep
    from prelora_ray.orchestration.tune import run_sweep

    root = Path(tempfile.mkdtemp(prefix=f"sweepcost-{'fork' if fork else 'naive'}-"))
    sweep = make_sweep(
        space_for(args, fork), name=None, tracking_uri=f"sqlite:///{root}/mlflow.db", storage_path=str(root / "ray")
    )
    started = time.perf_counter()
    run_sweep(sweep)
    wall = time.perf_counter() - started
    parent = tracking.run_metrics(sweep.tracking_uri, sweep.parent_run_id)
    runs = tracking.runs(sweep.tracking_uri, sweep.experiment_id, parent=sweep.parent_run_id)

    def get(r, col, default=None):
        v = r.get(col)
        return default if v is None or v != v else v

    rows = [
        {
            "role": get(r, f"tags.{M.ROLE_TAG}"),
            "status": r["status"],
            "sampled": get(r, "tags.sampled", ""),
            "switch_epoch": int(get(r, f"metrics.{M.SWITCH_EPOCH}", -99)),
            "final_val_acc": get(r, f"metrics.{M.FINAL_VAL_ACC}", float("nan")),
            "mean_epoch_time_s": get(r, f"metrics.{M.MEAN_EPOCH_TIME_S}"),
            "epochs_trained": int(get(r, f"tags.{M.EPOCHS_TRAINED_TAG}", args.epochs)),
            "fork_epoch": get(r, f"tags.{M.FORK_EPOCH_TAG}"),
            "reused": get(r, f"tags.{M.FORK_REUSED_TAG}") is not None,
            "pareto": get(r, f"tags.{M.PARETO_TAG}") == "true",
        }
        for _, r in runs.iterrows()
    ]
    return {"folder": str(root), "wall_time_s": wall, "parent_metrics": parent, "runs": rows}


def pair_trials(fork: dict, naive: dict) -> tuple[list[dict], list[str]]:
    """Trials matched on their sampled parameters; the unmatched ones' parameters."""
    by_key: dict[str, list[dict]] = {}
    for r in naive["runs"]:
        if r["role"] == "trial":
            by_key.setdefault(r["sampled"], []).append(r)
    pairs, unmatched = [], []
    for f in (r for r in fork["runs"] if r["role"] == "trial"):
        twins = by_key.get(f["sampled"])
        if twins:
            pairs.append({"sampled": json.loads(f["sampled"]), "fork": f, "naive": twins.pop(0)})
        else:
            unmatched.append(f"fork only: {f['sampled']}")
    unmatched += [f"naive only: {r['sampled']}" for rs in by_key.values() for r in rs]
    pairs.sort(key=lambda p: (p["naive"]["switch_epoch"] < 0, p["naive"]["switch_epoch"], p["sampled"]["prelora.tau"]))
    return pairs, unmatched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--sampler", default="random", choices=["random", "tpe", "nsga2", "qmc"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--model", default="vit-digits", help="model.preset of both sweeps (default vit-digits, as measured)"
    )
    ap.add_argument(
        "--trial-executor",
        default="tune",
        choices=["tune", "ray_train"],
        help="how both sweeps' trials train (default tune)",
    )
    args = ap.parse_args()
    from prelora_ray.orchestration.train import init_ray

    init_ray(None, num_cpus=2)
    result = {"fork": run_one(args, True), "naive": run_one(args, False)}
    pairs, unmatched = pair_trials(result["fork"], result["naive"])
    base = {k: next(r for r in v["runs"] if r["role"] == "baseline") for k, v in result.items()}

    print(
        f"\n{args.num_samples} trials + baseline, quickstart space, {args.epochs} epochs, "
        f"sampler {args.sampler} seed {args.seed}, max_concurrent 1, trial_executor {args.trial_executor}"
    )
    head = (
        f"{'tau':>6}{'zeta':>6}{'k':>3}{'m':>3}{'wu':>4}{'rmin':>5}{'rmax':>5} | {'sw fork':>7}{'sw naive':>9} | "
        f"{'acc fork':>9}{'acc naive':>10}{'same':>6} | {'ep':>3} {'how':<7}| pareto f/n"
    )
    print(head + "\n" + "-" * len(head))
    for p in pairs:
        s, f, n = p["sampled"], p["fork"], p["naive"]
        p["same_switch"] = f["switch_epoch"] == n["switch_epoch"]
        p["same_acc"] = f["final_val_acc"] == n["final_val_acc"]
        how = (
            "reused"
            if f["reused"]
            else "never"
            if f["switch_epoch"] < 0 and f["epochs_trained"] == 0
            else f"@{f['fork_epoch']}"
        )
        print(
            f"{s['prelora.tau']:>6.2f}{s['prelora.zeta']:>6.2f}{s['prelora.k']:>3}{s['prelora.m']:>3}"
            f"{s['prelora.warmup']:>4}{s['prelora.r_min']:>5}{s['prelora.r_max']:>5} | "
            f"{f['switch_epoch']:>7}{n['switch_epoch']:>9} | {f['final_val_acc']:>9.4f}{n['final_val_acc']:>10.4f}"
            f"{'yes' if p['same_acc'] and p['same_switch'] else 'NO':>6} | "
            f"{f['epochs_trained']:>3} {how:<7}| {'*' if f['pareto'] else '-'}/{'*' if n['pareto'] else '-'}"
        )
    print(
        f"baseline (full): acc fork {base['fork']['final_val_acc']:.4f}, naive {base['naive']['final_val_acc']:.4f}; "
        f"epochs {base['fork']['epochs_trained']} / {base['naive']['epochs_trained']}  "
        "(sw: switch epoch, ep: epochs the fork trial trained, how: @fork epoch | reused | never)"
    )
    for u in unmatched:
        print("UNMATCHED " + u)
    differ = [p["sampled"] for p in pairs if not (p["same_acc"] and p["same_switch"])]
    ep = {k: int(v["parent_metrics"][M.EPOCHS_TRAINED_TOTAL]) for k, v in result.items()}
    wall = {k: v["wall_time_s"] for k, v in result.items()}
    ratios = {"epochs": ep["fork"] / ep["naive"], "wall_time": wall["fork"] / wall["naive"]}
    print(
        f"\nepochs trained: fork {ep['fork']}, naive {ep['naive']} "
        f"(naive-equivalent of fork: {int(result['fork']['parent_metrics'][M.EPOCHS_NAIVE_TOTAL])})  "
        f"ratio {ratios['epochs']:.3f} (target <= 0.4)"
    )
    print(
        f"wall time s:    fork {wall['fork']:.0f}, naive {wall['naive']:.0f}  "
        f"ratio {ratios['wall_time']:.3f} (target <= 0.5)"
    )
    print(
        f"trials matched on sampled params: {len(pairs)}/{args.num_samples}; unmatched {len(unmatched)}; "
        f"switch epoch or final val_acc differ: {len(differ)}"
    )
    path = write_json(
        "sweep_cost",
        {
            "args": vars(args),
            "quickstart": yaml.safe_load(QUICKSTART.read_text()),
            "epochs_trained": ep,
            "wall_time_s": wall,
            "ratios": ratios,
            "acceptance": {"epochs_le_0.4": ratios["epochs"] <= 0.4, "wall_time_le_0.5": ratios["wall_time"] <= 0.5},
            "matched": len(pairs),
            "unmatched": unmatched,
            "differ": differ,
            "trials": [
                {
                    "sampled": p["sampled"],
                    **{
                        f"{k}_{arm}": p[arm][k]
                        for arm in ("fork", "naive")
                        for k in ("switch_epoch", "final_val_acc", "mean_epoch_time_s", "epochs_trained", "pareto")
                    },
                    "fork_epoch": p["fork"]["fork_epoch"],
                    "reused": p["fork"]["reused"],
                }
                for p in pairs
            ],
            "baseline": base,
            "parent_metrics": {k: v["parent_metrics"] for k, v in result.items()},
        },
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
