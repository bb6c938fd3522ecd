"""Is `speedup` robust to contention? The quickstart twice, quiet and with two busy loops from the trunk's end.

    python benchmarks/speedup_robustness.py [--space search_spaces/quickstart.yaml] [--busy 2] [--nice 0]
    python benchmarks/speedup_robustness.py --compare QUIET_FOLDER BUSY_FOLDER   # two finished runs' folders

1. `prelora-ray tune SPACE` (the real CLI in a subprocess, its own fresh folder: sqlite MLflow store, Ray storage),
   on the machine as it is ("quiet");
2. the same command again in another fresh folder, with `--busy` processes spinning (`while True: pass`, at
   niceness `--nice`, default 0 as a user's shell starts them; Ray runs its workers at niceness 15, so the
   spinners then take most of the CPUs) from the moment the console prints that the trunk finished until the
   sweep ends ("busy").

The file's sampler and seed are the same both times (the quickstart's TPE samples at random for its first 10
trials, so both runs sample the same configurations); trials are matched on their sampled parameters (the
`sampled` tag). Per trial: its switch epoch, the calibrated `speedup` (and its interval) in both runs, and the
wall-clock ratio in both, the baseline's `mean_epoch_time_s` over the trial's (what the front table calls
`speedup_wall`), with their relative differences |busy - quiet| / quiet. Acceptance (issue 26): every trial that
switched (LoRA injected: switch epoch >= 0) has its `speedup` within 10% between the two runs. Also reported:
each run's wall time and the load average (`uptime`) before, between and after. Exit status 1 when the
acceptance fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_json
from mlflow.tracking import MlflowClient

from prelora_ray import metrics as M

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
TOLERANCE = 0.10


def uptime() -> str:
    """The load averages now."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def spin(nice: int) -> subprocess.Popen:
    """A process that keeps one CPU busy, at niceness `nice`."""
    return subprocess.Popen(
        [sys.executable, "-c", "import os, sys; os.nice(int(sys.argv[1]))\nwhile True: pass", str(nice)]
    )


def run_sweep(space: Path, root: Path, busy: int, nice: int = 0) -> dict:
    """`prelora-ray tune SPACE` in `root`; with `busy`, that many spinning processes from the trunk's end on."""
    cmd = [sys.executable, "-m", "prelora_ray.cli", "tune", str(space), "--tracking-uri", f"sqlite:///{root}/mlflow.db"]
    cmd += ["--storage", str(root / "ray")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    spinners: list[subprocess.Popen] = []
    lines: list[str] = []
    started = time.perf_counter()
    trunk_done = None
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in proc.stdout:
            lines.append(line)
            if trunk_done is None and line.startswith("trunk ") and ": finished" in line:
                trunk_done = time.perf_counter() - started
                spinners = [spin(nice) for _ in range(busy)]
        proc.wait()
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{''.join(lines)[-4000:]}")
    return {"folder": str(root), "wall_s": wall, "trunk_finished_s": trunk_done, "busy": busy, **read_runs(root)}


def stop_on_sigterm() -> None:
    """SIGTERM (a `timeout`) ends the script through its `finally` blocks: the spinners and the sweep are stopped."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def read_runs(root: Path) -> dict:
    """The sweep's baseline and trials from its MLflow store."""
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("prelora-ray").experiment_id
    runs = client.search_runs([exp], "", max_results=1000)
    times = [(r.info.start_time, r.info.end_time or r.info.start_time) for r in runs]
    runs = [r for r in runs if r.data.tags.get(M.ROLE_TAG) in ("baseline", "trial")]
    baseline = next(r for r in runs if r.data.tags[M.ROLE_TAG] == "baseline")
    base_time = baseline.data.metrics[M.MEAN_EPOCH_TIME_S]
    trials = []
    for r in runs:
        if r.data.tags[M.ROLE_TAG] != "trial":
            continue
        m = r.data.metrics
        trials.append(
            {
                "sampled": r.data.tags.get("sampled", ""),
                "switch_epoch": int(m.get(M.SWITCH_EPOCH, -1)),
                "reused": M.FORK_REUSED_TAG in r.data.tags,
                **{k: m.get(k, float("nan")) for k in (M.SPEEDUP, M.SPEEDUP_LO, M.SPEEDUP_HI, M.MEAN_EPOCH_TIME_S)},
                "speedup_wall": base_time / m[M.MEAN_EPOCH_TIME_S],
            }
        )
    base_speedup = baseline.data.metrics[M.SPEEDUP]
    return {
        "mlflow_wall_s": (max(e for _, e in times) - min(s for s, _ in times)) / 1000,  # first start to last end
        "trunk_finished_s": (baseline.info.end_time - min(s for s, _ in times)) / 1000,
        "baseline_mean_epoch_time_s": base_time,
        "baseline_speedup": base_speedup,
        "trials": trials,
    }


def rel(a: float, b: float) -> float:
    return abs(b - a) / a


def compare(quiet: dict, busy: dict) -> list[dict]:
    """One row per trial, matched on its sampled parameters."""
    by_key = {t["sampled"]: t for t in busy["trials"]}
    rows = []
    for q in quiet["trials"]:
        b = by_key.get(q["sampled"])
        if b is None:
            sys.exit(f"trial {q['sampled']} of the quiet run is not in the busy run: different samples")
        rows.append(
            {
                "sampled": json.loads(q["sampled"]),
                "switch_epoch": q["switch_epoch"],
                "speedup_quiet": q[M.SPEEDUP],
                "interval_quiet": [q[M.SPEEDUP_LO], q[M.SPEEDUP_HI]],
                "speedup_busy": b[M.SPEEDUP],
                "interval_busy": [b[M.SPEEDUP_LO], b[M.SPEEDUP_HI]],
                "speedup_rel_diff": rel(q[M.SPEEDUP], b[M.SPEEDUP]),
                "wall_quiet": q["speedup_wall"],
                "wall_busy": b["speedup_wall"],
                "wall_rel_diff": rel(q["speedup_wall"], b["speedup_wall"]),
            }
        )
    rows.sort(key=lambda r: (r["switch_epoch"] < 0, r["switch_epoch"], r["sampled"].get("prelora.tau", 0)))
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'trial (tau zeta k m w r_min r_max)':<38}{'switch':>7}{'speedup quiet':>22}{'busy':>22}{'diff':>7}"
    head += f"{'wall quiet':>11}{'busy':>7}{'diff':>7}"
    lines = [head]
    for r in rows:
        s = r["sampled"]
        name = " ".join(
            f"{s.get(k, '-'):.3g}" if isinstance(s.get(k), float) else str(s.get(k, "-"))
            for k in ("prelora.tau", "prelora.zeta", "prelora.k", "prelora.m", "prelora.warmup")
            + ("prelora.r_min", "prelora.r_max")
        )
        cq = f"{r['speedup_quiet']:.3f} [{r['interval_quiet'][0]:.3f}, {r['interval_quiet'][1]:.3f}]"
        cb = f"{r['speedup_busy']:.3f} [{r['interval_busy'][0]:.3f}, {r['interval_busy'][1]:.3f}]"
        lines.append(
            f"{name:<38}{r['switch_epoch']:>7}{cq:>22}{cb:>22}{100 * r['speedup_rel_diff']:>6.1f}%"
            f"{r['wall_quiet']:>11.3f}{r['wall_busy']:>7.3f}{100 * r['wall_rel_diff']:>6.1f}%"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", type=Path, default=QUICKSTART, help="search-space file (default: the quickstart)")
    parser.add_argument("--busy", type=int, default=2, help="spinning processes in the second run (default 2)")
    parser.add_argument("--nice", type=int, default=0, help="their niceness (default 0)")
    parser.add_argument(
        "--compare", nargs=2, type=Path, metavar=("QUIET", "BUSY"), help="only compare two finished runs' folders"
    )
    args = parser.parse_args()
    space = args.space.resolve()
    if args.compare:
        load = {"now": uptime()}
        quiet, busy = ({"folder": str(f), "wall_s": float("nan"), **read_runs(f)} for f in args.compare)
    else:
        stop_on_sigterm()
        load = {"before": uptime()}
        quiet = run_sweep(space, Path(tempfile.mkdtemp(prefix="speedup-quiet-")), 0)
        load["between"] = uptime()
        busy = run_sweep(space, Path(tempfile.mkdtemp(prefix="speedup-busy-")), args.busy, args.nice)
        load["after"] = uptime()
    rows = compare(quiet, busy)
    switched = [r for r in rows if r["switch_epoch"] >= 0]
    worst = max((r["speedup_rel_diff"] for r in switched), default=float("nan"))
    worst_wall = max((r["wall_rel_diff"] for r in switched), default=float("nan"))
    ok = bool(switched) and worst <= TOLERANCE
    print(table(rows))
    print(
        f"trials that switched: {len(switched)}/{len(rows)}; max relative difference quiet vs busy: "
        f"speedup {100 * worst:.1f}%, wall-clock ratio {100 * worst_wall:.1f}%"
    )
    print(f"baseline speedup: {quiet['baseline_speedup']} and {busy['baseline_speedup']}")
    print(
        f"wall time: quiet {quiet['wall_s']:.0f} s (MLflow: {quiet['mlflow_wall_s']:.0f} s), busy {busy['wall_s']:.0f}"
        f" s (MLflow: {busy['mlflow_wall_s']:.0f} s; the trunk finished at {busy['trunk_finished_s']:.0f} s)"
    )
    print("load: " + "\n      ".join(f"{k} {v}" for k, v in load.items()))
    print(f"acceptance (every switched trial's speedup within {TOLERANCE:.0%}): {'PASS' if ok else 'FAIL'}")
    path = write_json(
        "speedup_robustness",
        {
            "space": str(space),
            "busy_processes": args.busy,
            "busy_nice": args.nice,
            "tolerance": TOLERANCE,
            "max_rel_diff_speedup": worst,
            "max_rel_diff_wall": worst_wall,
            "accepted": ok,
            "load": load,
            "quiet": {k: v for k, v in quiet.items() if k != "trials"},
            "busy": {k: v for k, v in busy.items() if k != "trials"},
            "rows": rows,
        },
    )
    print(f"written: {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
