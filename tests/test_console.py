"""The console: one line per trial event, the trunk's progress, the front and where to browse the runs;
Ray's per-report dumps, Tune's tables and every run's epoch lines only with --verbose."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from prelora_ray import fork
from prelora_ray.cli import mlflow_lines
from prelora_ray.search_space import load_search_space
from tests.sweeps import sweep_space

MAX_LINES = 60  # the quickstart's 8 trials and baseline, without --verbose


def _sweep(tmp_path: Path, verbose: bool = False, epochs: int = 4):
    from prelora_ray.orchestration.sweep import Sweep

    space = load_search_space(sweep_space(tmp_path, "con", 3, epochs=epochs))
    return Sweep(
        space=space,
        name="con",
        experiment="e",
        tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
        storage_path=str(tmp_path / "ray"),
        verbose=verbose,
    )


def _messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "prelora_ray"]


def test_mlflow_lines_give_the_ui_command_and_the_runs_page():
    assert mlflow_lines("sqlite:////tmp/m.db", "3") == [
        "browse: mlflow ui --backend-store-uri sqlite:////tmp/m.db",
        "  then open http://127.0.0.1:5000/#/experiments/3/runs",
    ]
    assert mlflow_lines("sqlite:////tmp/m.db", "3", "abc")[-1].endswith("/#/experiments/3/runs/abc")
    assert mlflow_lines("http://mlflow.lan:5000/", "7") == ["open http://mlflow.lan:5000/#/experiments/7/runs"]


def test_sweep_console_prints_sampled_finished_and_failed_trials(tmp_path, caplog):
    from prelora_ray.orchestration.console import SweepConsole

    console = SweepConsole(_sweep(tmp_path))
    config = {
        "prelora.tau": 24.512345,
        "prelora.zeta": 31.2,
        "prelora.warmup": 0,
        "prelora.r_min": 2,
        "prelora.r_max": 8,
    }
    ok = SimpleNamespace(
        trial_id="aa11",
        config=config,
        last_result={
            "final_val_acc": 0.93611,
            "mean_epoch_time_s": 0.81234,
            "switch_epoch": 7,
            "epochs_trained": 23,
            "val_acc": 0.5,
        },
    )
    bad = SimpleNamespace(
        trial_id="bb22",
        config={**config, "prelora.r_min": 8, "prelora.r_max": 4},
        last_result={},
        error_file="/x/error.txt",
        get_pickled_error=lambda: SimpleNamespace(cause=RuntimeError("the trunk failed\nmore")),
    )
    with caplog.at_level(logging.INFO, logger="prelora_ray"):
        for trial in (ok, bad, ok):  # a retried trial starts again: sampled once
            console.on_trial_start(0, [], trial)
        console.on_trial_complete(0, [], ok)
        console.on_trial_error(0, [], bad)
    assert _messages(caplog) == [
        "trial con_aa11: sampled r_max=8 r_min=2 tau=24.51 warmup=0 zeta=31.2",
        "trial con_bb22: sampled r_max=4 r_min=8 tau=24.51 warmup=0 zeta=31.2 (repaired: r_max=8 r_min=4)",
        "trial con_aa11: finished: final_val_acc 0.9361, mean_epoch_time_s 0.8123; switch epoch 7, 23 epochs trained",
        "trial con_bb22: FAILED: RuntimeError: the trunk failed (trace: /x/error.txt)",
    ]


def test_trunk_progress_is_a_few_lines_then_finished(tmp_path, caplog):
    from prelora_ray.orchestration.console import TrunkProgress
    from prelora_ray.orchestration.trunk import trunk_dir

    sweep = _sweep(tmp_path, epochs=30)
    folder = trunk_dir(sweep)
    progress = TrunkProgress(sweep)
    history = []
    with caplog.at_level(logging.INFO, logger="prelora_ray"):
        fork.write_status(folder, "running")
        for epoch in range(30):
            history.append({"epoch": epoch, "val_acc": 0.5, "epoch_time_s": 1.0})
            fork.write_json(folder / fork.HISTORY_FILE, history)
            progress.check()
        fork.write_status(folder, "finished")
        progress.check()
        progress.check()
    lines = _messages(caplog)
    assert lines[:-1] == [f"trunk con_baseline: epoch {e}/30 | val_acc 0.5000 | 1.00 s/epoch" for e in (6, 12, 18, 24)]
    assert (
        lines[-1] == "trunk con_baseline: finished: final_val_acc 0.5, mean_epoch_time_s 1 (full training, 30 epochs)"
    )


def test_verbosity_reaches_the_trials_workers(tmp_path, monkeypatch):
    from prelora_ray.orchestration import sweep as sweep_module

    calls = []
    monkeypatch.setattr(sweep_module, "prepare_run", lambda cfg, **kw: SimpleNamespace(cfg=cfg))
    monkeypatch.setattr(sweep_module, "fit_run", lambda run, **kw: calls.append(kw) or {})
    for verbose in (False, True):
        sweep = _sweep(tmp_path, verbose=verbose)
        sweep_module.run_one(sweep, sweep.space.base, "con_x", "trial", {}, True)
    assert [(c["verbose"], c["epoch_lines"]) for c in calls] == [(False, False), (True, True)]


def test_apply_console_sets_what_a_ray_process_prints():
    code = (
        "import logging, os; from prelora_ray.orchestration.ray_hooks import apply_console, ray_report_logger\n"
        "out = []\n"
        "for kw in ({}, {'progress': False}, {'verbose': True}):\n"
        "    apply_console(**kw)\n"
        "    out.append([logging.getLogger('prelora_ray').level, logging.getLogger(ray_report_logger()).level])\n"
        "out.append(os.environ.get('MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR'))\n"
        "print(__import__('json').dumps(out))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    info, warning = logging.INFO, logging.WARNING
    assert json.loads(out.stdout.splitlines()[-1]) == [
        [info, warning],
        [warning, warning],
        [info, logging.NOTSET],
        "false",
    ]


def _cli(tmp_path: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "prelora_ray.cli", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


def _train_args(tmp_path: Path) -> list[str]:
    return [
        "train",
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--set",
        f"cluster.storage_path={tmp_path / 'ray'}",
        "--set",
        f"output_dir={tmp_path / 'out'}",
    ]


@pytest.mark.slow
def test_a_cli_sweep_prints_trial_events_progress_and_the_front_in_few_lines(two_sweeps):
    """The "small" sweep of the shared fixture.

    A CLI sweep as the quickstart runs it (trial_executor tune, no --verbose).
    """
    out = two_sweeps.outputs["small"]
    lines = out.splitlines()
    assert len(lines) <= MAX_LINES, out
    assert len([line for line in lines if re.search(r"^trial small_\w+: sampled ", line)]) == 3, out
    assert len([line for line in lines if re.search(r"^trial small_\w+: finished: final_val_acc \d", line)]) == 3, out
    events = (
        "forked from the trunk at epoch",
        "reusing its result",
        "never passes on the trunk",
    )  # from the trials' processes
    assert len([line for line in lines if "trial small_" in line and any(e in line for e in events)]) == 3, out
    # the trunk's progress: its end always; its epoch lines (polled every 2 s) only if a poll lands inside its 2-s run
    # (test_trunk_progress_is_a_few_lines_then_finished checks them on a recorded trunk)
    progress = re.findall(r"^trunk small_baseline: (.*)$", out, re.M)
    assert progress and progress[-1].startswith("finished: final_val_acc"), out
    assert all(re.match(r"epoch [123]/4 \| val_acc", line) for line in progress[:-1]), out
    assert "Pareto front" in out and "speedup" in out
    exp = mlflow.tracking.MlflowClient(two_sweeps.uri).get_experiment_by_name("prelora-ray")
    assert (
        f"open {two_sweeps.uri}/#/experiments/{exp.experiment_id}/runs" in out
    )  # a tracking server: its own page, no `mlflow ui`
    assert "View run" not in out and "View experiment" not in out  # MLflow's own links per run: only with --verbose
    assert "View run other_" in two_sweeps.outputs["other"]  # ... which --verbose shows
    for noise in (
        "Reporting training result",
        "epoch   3 |",
        "Trial status",
        "Configuration for experiment",
        "Traceback",
        "Downloading artifacts",
        "Writing model shards",
        "A new study created",
        "Checkpoint successfully created",
        "Experiment state snapshotting",
        "Token authentication",
    ):
        assert noise not in out, noise


@pytest.mark.slow
def test_the_train_cli_prints_its_epochs_and_summary_and_with_verbose_rays_reports(tmp_path):
    out = _cli(tmp_path, *_train_args(tmp_path), "--set", "epochs=3")
    for epoch in range(3):
        assert f"epoch   {epoch} | full" in out
    assert "final val_acc" in out and "merged model (plain ViT)" in out
    run_page = re.search(r"http://127\.0\.0\.1:5000/#/experiments/(\w+)/runs/(\w+)", out)
    assert run_page and "mlflow ui --backend-store-uri" in out, out
    assert "Reporting training result" not in out and "Writing model shards" not in out, out
    assert len(out.splitlines()) <= 15, out

    verbose = _cli(tmp_path, *_train_args(tmp_path), "--set", "epochs=2", "--verbose")
    assert "epoch   1 | full" in verbose and "Reporting training result 2" in verbose


_SIGTERM_IN_A_FINALIZER = """
import os, signal, sys
from prelora_ray.orchestration import ray_hooks

def raise_exit(signum, frame):  # what Ray's worker does on SIGTERM
    raise SystemExit(1)

signal.signal(signal.SIGTERM, raise_exit)
if sys.argv[1] == "hook":
    ray_hooks.exit_quietly_when_terminated()

class Finalized:
    def __del__(self):
        if sys.argv[2] == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10**6):  # the handler runs here, inside the finalizer
                pass
        else:
            raise ValueError("a finalizer's own bug")

obj = Finalized()
print("before", flush=True)
del obj
print("after", flush=True)
"""


@pytest.mark.parametrize("hooked", [True, False])
def test_a_sigterm_inside_a_finalizer_ends_the_process_without_a_traceback(hooked):
    out = subprocess.run(
        [sys.executable, "-c", _SIGTERM_IN_A_FINALIZER, "hook" if hooked else "plain", "sigterm"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if hooked:  # the SIGTERM is obeyed, quietly
        assert (out.returncode, out.stdout.split(), out.stderr) == (1, ["before"], "")
    else:  # what Python does alone: the traceback, and the process goes on
        assert "Exception ignored" in out.stderr and "SystemExit" in out.stderr
        assert out.stdout.split() == ["before", "after"]


def test_other_exceptions_in_a_finalizer_are_still_printed_with_the_hook():
    out = subprocess.run(
        [sys.executable, "-c", _SIGTERM_IN_A_FINALIZER, "hook", "bug"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.split() == ["before", "after"]
    assert "Exception ignored" in out.stderr and "a finalizer's own bug" in out.stderr
