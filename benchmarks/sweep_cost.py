"""Cost of a fork-from-trunk sweep vs the same sweep trained from scratch ("naive") and with early stopping ("es").

    python benchmarks/sweep_cost.py [--num-samples 16] [--sampler random] [--seed 0] [--epochs 30]
                                    [--trial-executor tune] [--arms fork,naive,es] [--bad-lora-lr 0.5]

The "es" arm is the fork sweep with `early_stopping: {type: mo-asha}` at its defaults (rungs 1, 2, 4, 8 epochs
after the fork, reduction factor 3, grace 0, min_trials 1, speed margin 5%). Reported for it: epochs trained
against the fork sweep's (acceptance, issue 27: <= 0.6x), each trial's stop (epoch, or "-"), and whether its
plausible rows hold the fork sweep's best accuracy within noise (the best plausible es trial is not `worse`, exact
McNemar on the images, than the fork sweep's most accurate trial); also, matching trials on their sampled
parameters, how many stopped trials ended (in the fork sweep) indistinguishable from that best. `--bad-lora-lr X`
adds `optim.lora_lr: categorical [0.001, X]` to the space of every arm (a space with hopeless trials: X diverges).

Both sweeps use search_spaces/quickstart.yaml's space on digits with `--model` (default vit-digits, as measured;
the quickstart itself now uses vit-digits-wide, which switches earlier) and `deterministic: true`, max_concurrent
1, the same trial executor (`--trial-executor`, default tune as the quickstart: each trial trains in its Tune trial
process; ray_train: a TorchTrainer per trial, ~15-25 s of start-up each on 2 CPUs) and the same sampler and seed;
only `fork` differs. Each runs through make_sweep/run_sweep in its own temp folder (its own sqlite MLflow store,
Optuna db and storage), on one Ray instance with 2 CPUs; fork first, then naive. Reported: epochs trained (the
parent run's `epochs_trained_total`), wall time (perf_counter around run_sweep), and per trial, matched on its
sampled parameters (the `sampled` tag), the switch epoch and final val_acc of both sweeps.

The default sampler is `random`: its draws do not depend on the results, so both sweeps sample the same parameter
sets. With `tpe`, trials after Optuna's start-up trials depend on the observed objectives, and mean_epoch_time_s is
a timing, so the two sweeps' later trials would differ.
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


EARLY_STOPPING = {"type": "mo-asha"}


def space_for(args: argparse.Namespace, arm: str):
    from prelora_ray.search_space import parse_search_space

    fork = arm != "naive"
    data = yaml.safe_load(QUICKSTART.read_text())
    data["name"] = f"sweepcost-{arm}"
    # the model of the measured figures (README): the quickstart's own model may change
    data["base"] = {**data["base"], "epochs": args.epochs, "deterministic": True, "model": {"preset": args.model}}
    data.update(
        num_samples=args.num_samples,
        max_concurrent=1,
        sampler={"type": args.sampler, "seed": args.seed},
        fork=fork,
        trial_executor=args.trial_executor,
    )
    if args.bad_lora_lr is not None:
        data["parameters"]["optim.lora_lr"] = {"type": "categorical", "values": [0.001, args.bad_lora_lr]}
    if arm == "es":
        data["early_stopping"] = EARLY_STOPPING
    space = parse_search_space(data, path=f"{data['name']}.yaml", raw_text=yaml.safe_dump(data, sort_keys=False))
    assert space.fork is fork
    return space


def run_one(args: argparse.Namespace, arm: str) -> dict:
    """Run one sweep in a fresh folder; its wall time, parent metrics and one row per child run."""
    from prelora_ray.orchestration.sweep import make_sweep
    from prelora_ray.orchestration.tune import run_sweep

    root = Path(tempfile.mkdtemp(prefix=f"sweepcost-{arm}-"))
    sweep = make_sweep(
        space_for(args, arm), name=None, tracking_uri=f"sqlite:///{root}/mlflow.db", storage_path=str(root / "ray")
    )
    started = time.perf_counter()
    table = run_sweep(sweep)
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
            "run_id": r["run_id"],
            "stopped_epoch": int(get(r, f"tags.{M.EARLY_STOPPED_EPOCH_TAG}", -1)),
        }
        for _, r in runs.iterrows()
    ]
    fronts = dict(zip(table["run_id"], table["front"], strict=True)) if "front" in table else {}
    for row in rows:
        row["front"] = fronts.get(row["run_id"], "")
        row["hits"] = val_correct(sweep.tracking_uri, row["run_id"])
    return {"folder": str(root), "wall_time_s": wall, "parent_metrics": parent, "runs": rows}


def val_correct(uri: str, run_id: str):
    """The run's val_correct.npy (None without one)."""
    import numpy as np

    with tempfile.TemporaryDirectory() as folder:
        try:
            return np.load(tracking.download_artifact(uri, run_id, M.VAL_CORRECT_ARTIFACT, folder))
        except Exception:
            return None


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
        "--model", default="vit-digits", help="model.preset of every sweep (default vit-digits, as measured)"
    )
    ap.add_argument(
        "--trial-executor",
        default="tune",
        choices=["tune", "ray_train"],
        help="how the sweeps' trials train (default tune)",
    )
    ap.add_argument("--arms", default="fork,naive,es", help="sweeps to run, of fork, naive, es (default: all three)")
    ap.add_argument("--bad-lora-lr", type=float, default=None, help="add optim.lora_lr: [0.001, X] to the space")
    args = ap.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not set(arms) <= {"fork", "naive", "es"} or "fork" not in arms:
        ap.error(f"--arms: a list of fork, naive, es that includes fork, got {args.arms!r}")
    from prelora_ray.orchestration.train import init_ray

    init_ray(None, num_cpus=2)
    result = {arm: run_one(args, arm) for arm in arms}
    out: dict = {"args": vars(args), "quickstart": yaml.safe_load(QUICKSTART.read_text())}
    if "naive" in result:
        out.update(report_naive(args, result))
    if "es" in result:
        out["early_stopping"] = report_es(args, result)
    name = "sweep_cost" if "naive" in arms else f"sweep_cost_{'_'.join(arms)}"
    if args.bad_lora_lr is not None:
        name += "_bad_lr"
    for arm in result.values():  # the images stay out of the JSON
        for row in arm["runs"]:
            row.pop("hits", None)
    path = write_json(name, out)
    print(f"written {path}")


def paper_scale(pairs: list[dict], epochs: int = 300, switch: int = 150, trials: int = 12) -> dict:
    """The same rules at the paper's scale: a 300-epoch trunk, 12 trials forking near epoch 150, each keeping the
    share of its LoRA segment that the matched digits trial kept (es epochs / fork epochs, trials that trained)."""
    shares = [p["naive"]["epochs_trained"] / p["fork"]["epochs_trained"] for p in pairs if p["fork"]["epochs_trained"]]
    share = sum(shares) / len(shares) if shares else 1.0
    segment = epochs - switch
    return {"fork": epochs + trials * segment, "es": epochs + trials * segment * share, "segment_share": share}


def report_es(args: argparse.Namespace, result: dict) -> dict:
    """The early-stopping arm against the fork sweep: epochs, stops, and the front's best accuracy."""
    from prelora_ray.significance import compare_accuracy

    fork, es = result["fork"], result["es"]
    pairs, unmatched = pair_trials(fork, es)
    fork_trials = [r for r in fork["runs"] if r["role"] == "trial"]
    best = max(fork_trials, key=lambda r: r["final_val_acc"])
    print(f"\nearly stopping (mo-asha defaults) against the fork sweep, {len(pairs)} trials matched")
    head = f"{'sampled':<70} | {'acc fork':>8} {'ep':>3} | {'acc es':>8} {'ep':>3} {'stop':>5} {'front':<10}| vs best"
    print(head + "\n" + "-" * len(head))
    stopped_but_tied = 0
    for p in pairs:
        f, e = p["fork"], p["naive"]  # pair_trials' second arm: here the es sweep's trial
        tie = compare_accuracy(f["hits"], best["hits"]) if f["hits"] is not None and best["hits"] is not None else "?"
        if e["stopped_epoch"] >= 0 and tie != "worse":
            stopped_but_tied += 1
        sampled = ",".join(
            f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
            for k, v in p["sampled"].items()
        )
        stop = e["stopped_epoch"] if e["stopped_epoch"] >= 0 else "-"
        print(
            f"{sampled:<70} | {f['final_val_acc']:>8.4f} {f['epochs_trained']:>3} | {e['final_val_acc']:>8.4f} "
            f"{e['epochs_trained']:>3} {stop:>5} {e['front']:<10}| {tie}"
        )
    ep = {k: int(result[k]["parent_metrics"][M.EPOCHS_TRAINED_TOTAL]) for k in ("fork", "es")}
    ratio = ep["es"] / ep["fork"]
    plausible = [r for r in es["runs"] if r["role"] == "trial" and r["front"] == "plausible" and r["hits"] is not None]
    es_best = max(plausible, key=lambda r: r["final_val_acc"]) if plausible else None
    verdict = compare_accuracy(es_best["hits"], best["hits"]) if es_best is not None else "none"
    wall = {k: result[k]["wall_time_s"] for k in ("fork", "es")}
    print(
        f"\nepochs trained: fork {ep['fork']}, es {ep['es']}  ratio {ratio:.3f} (target <= 0.6); "
        f"wall time s: fork {wall['fork']:.0f}, es {wall['es']:.0f}"
    )
    print(
        f"best accuracy: fork sweep {best['final_val_acc']:.4f}; es plausible best "
        f"{es_best['final_val_acc'] if es_best else float('nan'):.4f} ({verdict} against it; target: not worse)"
    )
    stops = sum(r["stopped_epoch"] >= 0 for r in es["runs"])
    print(f"stopped: {stops} trials; of them {stopped_but_tied} ended in the fork sweep not worse than its best")
    paper = paper_scale(pairs)
    fork_n, es_n = paper["fork"], paper["es"]
    print(
        f"paper scale (300 epochs, switch near 150, 12 trials; each trial keeping the share of its LoRA segment it "
        f"kept here, {paper['segment_share']:.2f} on average): fork {fork_n} epochs = {fork_n / 300:.1f} "
        f"pre-trainings, with early stopping {es_n:.0f} = {es_n / 300:.1f} ({es_n / fork_n:.2f}x)"
    )
    for u in unmatched:
        print("UNMATCHED " + u)
    return {
        "epochs_trained": ep,
        "wall_time_s": wall,
        "ratio_epochs": ratio,
        "fork_best_acc": best["final_val_acc"],
        "es_plausible_best_acc": es_best["final_val_acc"] if es_best else None,
        "es_best_vs_fork_best": verdict,
        "stopped": stops,
        "stopped_not_worse_than_best_in_fork": stopped_but_tied,
        "paper_scale": paper,
        "acceptance": {"epochs_le_0.6": ratio <= 0.6, "front_holds_best": verdict in ("indistinguishable", "better")},
        "trials": [
            {
                "sampled": p["sampled"],
                "fork_acc": p["fork"]["final_val_acc"],
                "fork_epochs": p["fork"]["epochs_trained"],
                "es_acc": p["naive"]["final_val_acc"],
                "es_epochs": p["naive"]["epochs_trained"],
                "es_stopped_epoch": p["naive"]["stopped_epoch"],
                "es_front": p["naive"]["front"],
            }
            for p in pairs
        ],
    }


def report_naive(args: argparse.Namespace, result: dict) -> dict:
    """The fork sweep against the naive one (the figures of docs/fork_mode.md)."""
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
    return dict(
        {
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


if __name__ == "__main__":
    main()
