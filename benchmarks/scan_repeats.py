"""What `--repeats 3` does to the switch-epoch scan's curve on digits, against the same scan without repeats.

    python benchmarks/scan_repeats.py [--set KEY=VALUE ...] [--repeats 3]

1. `prelora-ray scan` on digits with cheap settings (below, plus any --set) and its default candidates (8 points), in a
   fresh folder (its own sqlite MLflow store and Ray storage): one run per point, each compared with the trunk on the
   images (Wilson interval, exact McNemar);
2. the same scan with `--repeats N` in another fresh folder: every point and the trunk's continuation from epoch
   k*m trained with N data-order seeds; scan.csv's accuracy is the mean, its interval is over seeds and images, and
   p is paired per seed against the trunk's repeats.

Both are the real CLI in a subprocess, `deterministic: true`, so repeat 0 of every point must equal the point of the
scan without repeats (checked and reported). Reported per point: the accuracy and interval of each scan, the spread
across seeds (val_acc_sd), p and verdict of each, and how many points' verdicts changed; the epochs each scan trained
and their wall times (rough: the machine is shared).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
from common import run_cli, write_json
from mlflow.tracking import MlflowClient

from prelora_ray import metrics as M

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # this process reads each scan.csv
CHEAP = [
    "model.preset=vit-digits",
    "epochs=16",
    "prelora.k=2",
    "prelora.m=1",
    "prelora.warmup=1",
    "deterministic=true",
]


def uptime() -> str:
    """The load averages now."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run_scan(root: Path, sets: list[str], repeats: int) -> tuple[float, str]:
    """`prelora-ray scan` in `root`; its wall time and output (fails loudly)."""
    return run_cli(["scan", *sets, "--name", "reps", "--repeats", str(repeats), "--storage", str(root / "ray")], root)


def scan_record(root: Path) -> tuple[pd.DataFrame, dict[str, float], dict[str, float]]:
    """scan.csv, the parent's metrics, and each point's own (repeat 0) final_val_acc by switch epoch (-1: trunk)."""
    c = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = c.get_experiment_by_name("prelora-ray").experiment_id
    parent = c.search_runs([exp], f"tags.`{M.SCAN_TAG}` = 'reps' and tags.`{M.ROLE_TAG}` = 'scan'")[0]
    table = pd.read_csv(io.StringIO(Path(c.download_artifacts(parent.info.run_id, "scan.csv", str(root))).read_text()))
    own = {}
    for run in c.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"):
        tag = run.data.tags.get(M.FORK_SWITCH_TAG)
        epoch = -1 if run.data.tags.get(M.ROLE_TAG) == "baseline" else int(tag) if tag and tag.isdigit() else None
        if epoch is not None:
            own[epoch] = run.data.metrics[M.FINAL_VAL_ACC]
    return table, parent.data.metrics, own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sets = [x for o in [*CHEAP, *args.overrides] for x in ("--set", o)]
    load_before = uptime()
    one_root = Path(tempfile.mkdtemp(prefix="scanrep-1-"))
    one_wall, _ = run_scan(one_root, sets, 1)
    load_between = uptime()
    many_root = Path(tempfile.mkdtemp(prefix=f"scanrep-{args.repeats}-"))
    many_wall, many_out = run_scan(many_root, sets, args.repeats)
    load_after = uptime()
    one, one_parent, one_own = scan_record(one_root)
    many, many_parent, many_own = scan_record(many_root)

    a, b = one.set_index("switch_epoch"), many.set_index("switch_epoch")
    points = []
    for epoch in a.index:
        x, y = a.loc[epoch], b.loc[epoch]
        points.append(
            {
                "switch_epoch": int(epoch),
                "acc_1": float(x[M.FINAL_VAL_ACC]),
                "acc_lo_1": float(x["acc_lo"]),
                "acc_hi_1": float(x["acc_hi"]),
                "p_1": float(x["p_vs_baseline"]),
                "verdict_1": str(x["verdict"]),
                "acc_mean_n": float(y[M.FINAL_VAL_ACC]),
                "acc_lo_n": float(y["acc_lo"]),
                "acc_hi_n": float(y["acc_hi"]),
                "val_acc_sd_n": float(y[M.VAL_ACC_SD]),
                "p_n": float(y["p_vs_baseline"]),
                "verdict_n": str(y["verdict"]),
                "repeat0_equals_n1": many_own.get(int(epoch)) == one_own.get(int(epoch)),
            }
        )
    changed = [p["switch_epoch"] for p in points if p["switch_epoch"] >= 0 and p["verdict_1"] != p["verdict_n"]]
    width_1 = [p["acc_hi_1"] - p["acc_lo_1"] for p in points]
    width_n = [p["acc_hi_n"] - p["acc_lo_n"] for p in points]
    result = {
        "repeats": args.repeats,
        "settings": [*CHEAP, *args.overrides],
        "points": points,
        "verdicts_changed": changed,
        "mean_interval_width_1": sum(width_1) / len(width_1),
        "mean_interval_width_n": sum(width_n) / len(width_n),
        "repeat0_equals_n1_everywhere": all(p["repeat0_equals_n1"] for p in points),
        "epochs_trained_1": int(one_parent[M.EPOCHS_TRAINED_TOTAL]),
        "epochs_trained_n": int(many_parent[M.EPOCHS_TRAINED_TOTAL]),
        "wall_s_1": one_wall,
        "wall_s_n": many_wall,
        "uptime_before": load_before,
        "uptime_between": load_between,
        "uptime_after": load_after,
        "scan_csv_1": one.to_csv(index=False),
        "scan_csv_n": many.to_csv(index=False),
    }
    n = args.repeats
    print(f"scan on digits ({', '.join(result['settings'])}): 1 seed against {n} seeds per point")
    print(
        f"{'switch':>6} {'acc(1)':>7} {'interval(1)':>15} {'verdict(1)':>17} | {'mean(' + str(n) + ')':>8} "
        f"{'interval(' + str(n) + ')':>15} {'sd':>7} {'p':>7} {'verdict(' + str(n) + ')':>17}"
    )
    for p in points:
        label = "trunk" if p["switch_epoch"] < 0 else str(p["switch_epoch"])
        print(
            f"{label:>6} {p['acc_1']:7.4f} [{p['acc_lo_1']:.4f}, {p['acc_hi_1']:.4f}] {p['verdict_1']:>17} | "
            f"{p['acc_mean_n']:8.4f} [{p['acc_lo_n']:.4f}, {p['acc_hi_n']:.4f}] {p['val_acc_sd_n']:7.4f} "
            f"{p['p_n']:7.3g} {p['verdict_n']:>17}"
        )
    print(
        f"verdicts changed at {len(changed)} of {len(points) - 1} points{': ' + str(changed) if changed else ''}; "
        f"mean interval width {result['mean_interval_width_1']:.4f} (1 seed) vs {result['mean_interval_width_n']:.4f} "
        f"({n} seeds); repeat 0 equals the 1-seed scan at every point: {result['repeat0_equals_n1_everywhere']}"
    )
    print(
        f"epochs trained: {result['epochs_trained_1']} vs {result['epochs_trained_n']}; wall time {one_wall:.0f} s vs "
        f"{many_wall:.0f} s (shared machine)"
    )
    print(f"load: before {load_before}\n      between {load_between}\n      after {load_after}")
    print(many_out[many_out.rfind("\nscan reps") :])
    print(f"written: {write_json('scan_repeats', result)}")


if __name__ == "__main__":
    main()
