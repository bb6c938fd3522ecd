"""`prelora-ray pareto` after real sweeps: every plot written and logged; two sweeps in one plot."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pandas as pd
import pytest

from analysis.report import axes_of, finished_trials, knee_row, make_report
from analysis.runs import load_sweep, metric_history

pytestmark = pytest.mark.slow
EXPECTED = {"fronts", "curves", "family_norms", "layer_norms", "ranks", "importance", "parallel", "efficiency"}


def test_pareto_cli_writes_every_plot_and_logs_them_to_the_parent(two_sweeps):
    root, uri = two_sweeps.root, two_sweeps.uri  # a real MLflow tracking server
    out = root / "plots-cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "prelora_ray.cli",
            "pareto",
            "--experiment",
            "prelora-ray",
            "--sweep",
            "small",
            "--out",
            str(out),
            "--tracking-uri",
            uri,
        ],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sweep small" in proc.stdout
    pngs = {p.name: p.stat().st_size for p in out.glob("*.png")}
    assert len(pngs) == len(EXPECTED), pngs
    assert all(size > 5000 for size in pngs.values()), pngs
    record = load_sweep(uri, "prelora-ray", "small")
    logged = {a.path for a in mlflow.tracking.MlflowClient(uri).list_artifacts(record.parent_run_id, "plots")}
    assert {f"plots/{name}" for name in pngs} <= logged


def test_two_sweeps_compared_in_one_front_plot(two_sweeps, tmp_path):
    uri = two_sweeps.uri  # a real MLflow tracking server
    result = make_report(uri, "prelora-ray", sweeps=["small", "other"], out=tmp_path, log_to_mlflow=False)
    assert set(result["plots"]) == EXPECTED
    assert [r.name for r in result["records"]] == ["small", "other"]
    assert "sweep small" in result["text"] and "sweep other" in result["text"]
    assert result["plots"]["fronts"].stat().st_size > 5000
    # the record behind the plot: each sweep has its own trials, front, baseline and knee
    for record in result["records"]:
        trials = finished_trials(record)
        assert len(trials) == 3 and trials["pareto"].any()
        assert knee_row(record)["pareto"]
    assert axes_of(result["records"][0].objectives) == ("mean_epoch_time_s", "final_val_acc")


def test_metric_history_is_per_epoch(two_sweeps):
    uri = two_sweeps.uri  # a real MLflow tracking server
    record = load_sweep(uri, "prelora-ray", "small")
    run_id = record.table.loc[record.table["role"] == "baseline", "run_id"].iloc[0]
    h = metric_history(uri, run_id, ["val_acc", "train_loss", "norm/query"])
    assert list(h.index) == [0, 1, 2, 3] and isinstance(h, pd.DataFrame)
    assert h["val_acc"].between(0, 1).all()


def test_example_script_runs_on_two_sweeps(two_sweeps, tmp_path):
    out = tmp_path / "fronts.png"
    proc = subprocess.run(
        [
            sys.executable,
            "analysis/example.py",
            "--tracking-uri",
            two_sweeps.uri,
            "--sweep",
            "small",
            "--sweep",
            "other",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=__import__("pathlib").Path(__file__).parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "== sweep small" in proc.stdout and "== sweep other" in proc.stdout and "hypervolume" in proc.stdout
    assert out.stat().st_size > 5000
