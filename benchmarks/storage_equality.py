"""The quickstart sweep twice, its records in a local folder and in a bucket of a real S3 API (moto on 127.0.0.1):
the same trials, switch epochs, accuracies and front; what the bucket holds; no local folder named `s3:`.

    python benchmarks/storage_equality.py [--space search_spaces/quickstart.yaml] [--num-samples N]

Both runs use the same sampler seed, so they sample the same configurations in the same order; each trial is
matched on its sampled parameters. Accuracies are compared with ==. Epoch times are measurements of the moment,
so the time objective, and with it the Pareto flags, may differ between the runs; the table shows both. Writes
benchmarks/results/storage_equality.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from common import RESULTS, machine  # noqa: E402

from tests.servers import S3_ENV, bucket_keys, create_bucket, local_s3_folders, moto_server, s3_uri  # noqa: E402

ROW_KEYS = ("switch_epoch", "final_val_acc", "best_val_acc", "epochs_trained", "pareto", "mean_epoch_time_s")


def run_sweep(space: str, workdir: Path, storage: str, num_samples: int | None) -> tuple[float, str]:
    """`prelora-ray tune` in `workdir` with its records in `storage`; returns (wall seconds, console output)."""
    cmd = [
        sys.executable,
        "-m",
        "prelora_ray.cli",
        "tune",
        space,
        "--storage",
        storage,
        "--tracking-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
    ]
    if num_samples:
        cmd += ["--num-samples", str(num_samples)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"the sweep in {workdir} failed:\n{proc.stdout[-3000:]}")
    return time.perf_counter() - started, proc.stdout


def trials(workdir: Path) -> dict[str, dict]:
    """Each finished run of the sweep by its sampled parameters ("baseline" for the trunk)."""
    client = mlflow.tracking.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("prelora-ray")
    parent = client.search_runs([exp.experiment_id], "tags.`prelora.role` = 'parent'")[0]
    out = {}
    for run in client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"):
        m, t = run.data.metrics, run.data.tags
        out[t.get("sampled", "baseline")] = {
            "run_name": run.info.run_name,
            "switch_epoch": int(m.get("switch_epoch", -1)),
            "final_val_acc": m["final_val_acc"],
            "best_val_acc": m["best_val_acc"],
            "epochs_trained": t.get("epochs_trained"),
            "pareto": t.get("pareto", "baseline"),
            "mean_epoch_time_s": m["mean_epoch_time_s"],
        }
    return out


def main() -> int:
    """Run both sweeps, compare, print and write the record."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default=str(REPO / "search_spaces" / "quickstart.yaml"))
    p.add_argument("--num-samples", type=int)
    args = p.parse_args()
    import os

    for key, value in S3_ENV.items():
        os.environ.setdefault(key, value)
    root = Path(tempfile.mkdtemp(prefix="storage-eq-"))
    (root / "local").mkdir()
    (root / "s3").mkdir()
    with moto_server(root) as endpoint:
        create_bucket(endpoint, "sweeps")
        local_s, _ = run_sweep(args.space, root / "local", str(root / "local" / "ray"), args.num_samples)
        s3_s, s3_out = run_sweep(args.space, root / "s3", s3_uri(endpoint, "sweeps", "prelora"), args.num_samples)
        keys = bucket_keys(endpoint, "sweeps")
    local, remote = trials(root / "local"), trials(root / "s3")
    same = {k: all(local[k][c] == remote.get(k, {}).get(c) for c in ROW_KEYS[:4]) for k in local}
    print(f"{'trial (sampled)':<60} {'switch':>6} {'acc local':>9} {'acc s3':>9} {'equal':>5} {'pareto local/s3':>16}")
    for k, row in sorted(local.items(), key=lambda kv: kv[1]["switch_epoch"]):
        other = remote.get(k, {})
        label = (
            "baseline"
            if k == "baseline"
            else " ".join(
                f"{a.split('.')[-1]}={v:.4g}" if isinstance(v, float) else f"{a.split('.')[-1]}={v}"
                for a, v in json.loads(k).items()
            )
        )
        print(
            f"{label[:60]:<60} {row['switch_epoch']:>6} {row['final_val_acc']:>9.4f} "
            f"{other.get('final_val_acc', float('nan')):>9.4f} "
            f"{'yes' if same[k] else 'NO':>5} {row['pareto'] + '/' + str(other.get('pareto')):>16}"
        )
    trunk_keys = [k for k in keys if k.startswith("prelora/quickstart/trunk/")]
    stray = local_s3_folders(root)
    print(
        f"\n{sum(same.values())}/{len(same)} runs equal (switch epoch, final and best val_acc, epochs trained); "
        f"wall {local_s:.0f} s local, {s3_s:.0f} s on S3; "
        f"{len(keys)} objects in the bucket ({len(trunk_keys)} under the trunk); "
        f"local folders named s3: {len(stray)}"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "storage_equality.json").write_text(
        json.dumps(
            {
                "machine": machine(),
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "space": args.space,
                "num_samples": args.num_samples,
                "wall_s": {"local": local_s, "s3": s3_s},
                "runs": {"local": local, "s3": remote},
                "equal": same,
                "bucket_objects": len(keys),
                "trunk_objects": len(trunk_keys),
                "local_s3_folders": [str(p) for p in stray],
            },
            indent=2,
            default=str,
        )
    )
    print(s3_out.strip().splitlines()[-1])
    return 0 if all(same.values()) and len(local) == len(remote) and not stray else 1


if __name__ == "__main__":
    sys.exit(main())
