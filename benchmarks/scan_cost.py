"""Cost of `prelora-ray scan` against one baseline run, back to back on this machine.

    python benchmarks/scan_cost.py [--set KEY=VALUE ...] [--points 8]

1. `prelora-ray scan` with the default train config (plus any --set) and its default candidates (8 points),
   in a fresh folder (its own sqlite MLflow store and Ray storage);
2. right after it, `prelora-ray train --set strategy=full` with the same config, in another fresh folder.
Both are the real CLI in a subprocess. Reported: epochs trained (the scan parent's `epochs_trained_total`,
trunk included; the baseline run's `epochs_trained` tag), wall time of each command (perf_counter around
the subprocess: Ray start-up included), their ratios, the machine's load (`uptime`) before and after, and
the scan's table (scan.csv).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from common import run_cli, write_json
from mlflow.tracking import MlflowClient

from prelora_ray import metrics as M


def uptime() -> str:
    """The load averages now."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    sets = [x for o in args.overrides for x in ("--set", o)]
    load_before = uptime()

    scan_root = Path(tempfile.mkdtemp(prefix="scancost-scan-"))
    scan_wall, scan_out = run_cli(["scan", *sets, "--name", "scancost", "--storage", str(scan_root / "ray")], scan_root)
    load_between = uptime()
    base_root = Path(tempfile.mkdtemp(prefix="scancost-full-"))
    base_wall, _ = run_cli(
        [
            "train",
            *sets,
            "--set",
            "strategy=full",
            "--set",
            "name=scancost-full",
            "--set",
            f"cluster.storage_path={base_root / 'ray'}",
            "--set",
            f"output_dir={base_root / 'outputs'}",
        ],
        base_root,
    )
    load_after = uptime()

    c = MlflowClient(f"sqlite:///{scan_root}/mlflow.db")
    exp = c.get_experiment_by_name("prelora-ray").experiment_id
    parent = c.search_runs([exp], f"tags.`{M.SCAN_TAG}` = 'scancost' and tags.`{M.ROLE_TAG}` = 'scan'")[0]
    scan_epochs = int(parent.data.metrics[M.EPOCHS_TRAINED_TOTAL])
    table = scan_root / "scan.csv"
    table.write_text(Path(c.download_artifacts(parent.info.run_id, "scan.csv", str(scan_root))).read_text())
    b = MlflowClient(f"sqlite:///{base_root}/mlflow.db")
    base_run = b.search_runs([b.get_experiment_by_name("prelora-ray").experiment_id], "")[0]
    base_epochs = int(base_run.data.tags[M.EPOCHS_TRAINED_TAG])

    result = {
        "scan_epochs_trained": scan_epochs,
        "baseline_epochs_trained": base_epochs,
        "epochs_ratio": scan_epochs / base_epochs,
        "scan_wall_s": scan_wall,
        "baseline_wall_s": base_wall,
        "wall_ratio": scan_wall / base_wall,
        "uptime_before": load_before,
        "uptime_between": load_between,
        "uptime_after": load_after,
        "overrides": args.overrides,
        "scan_csv": table.read_text(),
    }
    print(scan_out[scan_out.rfind("\nscan scancost") :])
    print(
        f"epochs trained: scan {scan_epochs} (trunk included) vs one full run {base_epochs}: "
        f"{scan_epochs / base_epochs:.2f}x"
    )
    print(f"wall time: scan {scan_wall:.0f} s vs one full run {base_wall:.0f} s: {scan_wall / base_wall:.2f}x")
    print(f"load: before {load_before}\n      between {load_between}\n      after {load_after}")
    print(f"written: {write_json('scan_cost', result)}")


if __name__ == "__main__":
    main()
