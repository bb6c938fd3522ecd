"""Per-epoch results of every shipped strategy on digits, this tree against a git commit, compared with `==`.

Runs the same short deterministic trainings (one thread, `vit-digits`, digits data, 6 epochs) of `full`,
`prelora` (three variants), `relora_prelora` and `lte` (two variants) twice: on the commit's code (`git
archive` into a temporary folder, its package first on PYTHONPATH) and on this tree, each in a process of
its own running this file with `--record`. Each run's record: every epoch's losses, accuracy, learning
rate, phase, trainable parameters, family norms and event metrics, the switch and freeze epochs, the
ranks, the optimizer steps and a hash of the final weights. Prints a table and writes
benchmarks/results/strategy_equality.json.

    python benchmarks/strategy_equality.py                     # this tree against 4207b21 (before the registry)
    python benchmarks/strategy_equality.py --against HEAD~3
    python benchmarks/strategy_equality.py --record --out F.json [--compare OTHER.json]   # one version's records

Uses only what both versions have (`TrainSettings.load`, `TrainingLoop`, `LocalRuntime`, the history and the
summary). Exit status 1 when any run differs.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "strategy_equality.json"
DEFAULT_COMMIT = "4207b21"  # the commit before the strategy registry and the adapters package
TIMING = (
    "epoch_time_s",
    "throughput_img_s",
    "peak_mem_mb",
    "wall_time",
    *("step_speedup", "step_speedup_lo", "step_speedup_hi", "calibration_time_s"),  # measured: calibration.py
)
PER_EPOCH = ("train_loss", "val_loss", "val_acc")
BASE = [
    "epochs=6",
    "deterministic=true",
    "model.preset=vit-digits",
    "tracking.enabled=false",
    "data.name=digits",
    "seed=3",
    "prelora.k=2",
    "prelora.m=1",
    "prelora.tau=50",
    "prelora.zeta=50",
    "prelora.warmup=1",
]
RUNS = {
    "full": ["strategy=full"],
    "prelora": [],
    "prelora_w0_head": ["prelora.warmup=0", "prelora.trainable_after_freeze=[head,norms]"],
    "prelora_steps": ["prelora.window_unit=step", "prelora.m=10", "prelora.tau=5", "prelora.zeta=30"],
    "relora_prelora": [
        "strategy=relora_prelora",
        "relora.start_epoch=2",
        "relora.rank=4",
        "relora.merge_every=50",  # >= relora.warmup_steps (50 by default since issue 25), valid on both sides
        "relora.rewarm_steps=2",
        "prelora.min_switch_epoch=3",
    ],
    "lte": ["strategy=lte", "lte.merge_every=7"],
    "lte_2heads_late": ["strategy=lte", "lte.num_heads=2", "lte.start_epoch=2", "lte.train_others=frozen"],
}


def record(extra: list[str]) -> dict[str, Any]:
    """One run's per-epoch results (timings dropped) and outcome, in this process's prelora_ray."""
    from prelora_ray.config import TrainSettings
    from prelora_ray.runtime import LocalRuntime
    from prelora_ray.trainer import TrainingLoop

    loop = TrainingLoop(TrainSettings.load(None, [*BASE, *extra]), LocalRuntime())
    summary = loop.run()
    weights = hashlib.sha256()
    for key, value in sorted(loop.model.state_dict().items()):
        weights.update(key.encode())
        weights.update(value.detach().cpu().contiguous().numpy().tobytes())
    return {
        "history": [{k: v for k, v in h.items() if k not in TIMING} for h in loop.state.history],
        "switch_epoch": summary["switch_epoch"],
        "freeze_epoch": summary["freeze_epoch"],
        "ranks": summary["ranks"],
        "steps": loop.state.step,
        "weights_sha256": weights.hexdigest(),
    }


def record_all(out: Path) -> dict[str, Any]:
    """Every run of RUNS, written to `out` as JSON (read back, so both sides compare the same types)."""
    import torch

    import prelora_ray

    torch.set_num_threads(1)
    runs = {name: record(extra) for name, extra in RUNS.items()}
    data = json.loads(json.dumps({"package": prelora_ray.__file__, "torch": torch.__version__, "runs": runs}))
    out.write_text(json.dumps(data, indent=1, sort_keys=True))
    return data


def record_in(tree: Path, out: Path) -> dict[str, Any]:
    """`record_all` in a fresh process whose prelora_ray is `tree`'s (checked)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--record", "--out", str(out)]
    subprocess.run(cmd, env=env, cwd=out.parent, check=True)
    data = json.loads(out.read_text())
    if not Path(data["package"]).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"the run of {tree} imported prelora_ray from {data['package']}")
    return data


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per run: is each per-epoch series, the whole history, the outcome and the final weights equal."""
    rows = []
    for name in RUNS:
        a, b = old["runs"][name], new["runs"][name]
        row: dict[str, Any] = {"run": name, "epochs": len(b["history"])}
        for key in PER_EPOCH:
            row[key] = [h[key] for h in a["history"]] == [h[key] for h in b["history"]]
        # the keys both versions record (a newer version may add some, e.g. val_n, val_correct and val_hits)
        common = set(a["history"][0]) & set(b["history"][0]) if a["history"] and b["history"] else set()
        row["history"] = len(a["history"]) == len(b["history"]) and all(
            {k: x[k] for k in common} == {k: y[k] for k in common}
            for x, y in zip(a["history"], b["history"], strict=False)
        )
        row["switch/freeze/ranks"] = (a["switch_epoch"], a["freeze_epoch"], a["ranks"]) == (
            b["switch_epoch"],
            b["freeze_epoch"],
            b["ranks"],
        )
        row["weights"] = a["weights_sha256"] == b["weights_sha256"] and a["steps"] == b["steps"]
        row["phases"] = " ".join(f"{h['phase']}" for h in b["history"])
        row["equal"] = all(v for k, v in row.items() if isinstance(v, bool))
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a fixed-width table."""
    cols = ["run", "epochs", *PER_EPOCH, "history", "switch/freeze/ranks", "weights", "phases"]
    cells = [[str(r[c]) if not isinstance(r[c], bool) else ("==" if r[c] else "DIFFERENT") for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def against(commit: str) -> int:
    """This tree against `commit`: both recorded in processes of their own, compared, the table printed and saved."""
    sha = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory(prefix="strategy-equality-") as tmp:
        base = Path(tmp) / "base"
        base.mkdir()
        archive = subprocess.run(["git", "archive", sha.strip()], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
        old = record_in(base, Path(tmp) / "old.json")
        new = record_in(ROOT, Path(tmp) / "new.json")
    rows = compare(old, new)
    print(f"this tree ({ROOT}) against {commit} ({sha.strip()[:12]}), per-epoch results compared with ==:")
    print(table(rows))
    same = all(r["equal"] for r in rows)
    print(f"{sum(r['equal'] for r in rows)}/{len(rows)} runs equal")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "against": {"commit": commit, "sha": sha.strip()},
                "config": {"base": BASE, "runs": RUNS, "threads": 1},
                "torch": new["torch"],
                "all_equal": same,
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {RESULT.relative_to(ROOT)}")
    return 0 if same else 1


def main() -> int:
    """Compare against a commit (default), or record this process's version (`--record`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--against", default=DEFAULT_COMMIT, help=f"git commit to compare with (default {DEFAULT_COMMIT})"
    )
    parser.add_argument("--record", action="store_true", help="only record the runs of the prelora_ray imported here")
    parser.add_argument("--out", help="with --record: JSON file to write")
    parser.add_argument("--compare", help="with --record: JSON of another version's --record; exit 1 unless equal")
    args = parser.parse_args()
    if not args.record:
        return against(args.against)
    if not args.out:
        parser.error("--record needs --out")
    results = record_all(Path(args.out))
    if args.compare:
        rows = compare(json.loads(Path(args.compare).read_text()), results)
        print(table(rows))
        return 0 if all(r["equal"] for r in rows) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
