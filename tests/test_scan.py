"""`prelora-ray scan`: candidate epochs and the grid without Ray; bad input fails before Ray starts; one small
real scan (CLI, Ray Tune + Train, MLflow, digits) whose point equals a from-scratch `switch_at_epoch` run and
whose grid replay gives a live threshold run's switch epoch; `best --scan` writes a config switching there.
"""

from __future__ import annotations

import re
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
import torch
import yaml

from prelora_ray import metrics as M
from prelora_ray import scan as S
from prelora_ray.algorithms import assign_ranks, last_window_changes, replay_switch, window_values
from prelora_ray.cli import main
from prelora_ray.config import TrainSettings
from tests.builders import short_scan

EPOCHS = 6
BASE = short_scan(EPOCHS)
POINTS = (2, 3)
# "open" passes on the trunk's first boundaries; "shut" never does
GRID = [{"name": "open", "tau": 50.0, "zeta": 50.0, "k": 2, "m": 1}, {"name": "shut", "tau": 1e-6, "zeta": 50.0}]


# -- candidates, grid, switch_at_epoch: no Ray ---------------------------------------------------


def test_default_candidates_are_8_points_over_the_range_without_its_first_epoch():
    cfg = TrainSettings()  # 40 epochs, k=3, m=2, warmup 3: switch epochs 5..35
    assert S.candidate_epochs(cfg) == [9, 13, 16, 20, 24, 28, 31, 35]
    assert S.candidate_epochs(cfg, every=10) == [15, 25, 35]
    assert S.candidate_epochs(cfg, epochs=[30, 6, 30]) == [6, 30]
    small = TrainSettings.load(None, BASE)  # range 1..3
    assert S.candidate_epochs(small) == [2, 3]


@pytest.mark.parametrize(
    "kwargs, overrides, message",
    [
        ({"epochs": [36]}, [], r"--epochs 36 is invalid: an epoch in \[5, 35\]"),
        ({"epochs": [4]}, [], r"--epochs 4 is invalid: an epoch in \[5, 35\]"),
        ({"every": 0}, [], r"--every=0 is invalid"),
        ({}, ["epochs=10", "prelora.warmup=5"], "no epoch can be scanned: epochs=10 leaves no room"),
    ],
)
def test_bad_candidates_name_the_flag_and_the_range(kwargs, overrides, message):
    with pytest.raises(ValueError, match=message):
        S.candidate_epochs(TrainSettings.load(None, overrides), **kwargs)


@pytest.mark.parametrize(
    "override, valid",
    [
        ("prelora.switch_at_epoch=40", False),
        ("prelora.switch_at_epoch=4", False),
        ("prelora.switch_at_epoch=36", False),
        ("prelora.switch_at_epoch=35", True),
        ("prelora.switch_at_epoch=5", True),
    ],
)
def test_switch_at_epoch_is_checked_against_windows_warmup_and_epochs(override, valid):
    if valid:
        assert TrainSettings.load(None, [override]).prelora.switch_at_epoch == int(override.split("=")[1])
    else:
        with pytest.raises(ValueError, match=r"prelora.switch_at_epoch=\d+ is invalid: an epoch in \[5, 35\]"):
            TrainSettings.load(None, [override])


def test_replay_with_switch_at_epoch_ignores_algorithm_1_and_takes_algorithm_2_there():
    history = [({"query": [10.0 + i, 10.0 + 2 * i]}, 5.0 - i) for i in range(8)]  # never converges (loss -20 %/epoch)
    kw = {"tau": 1.0, "zeta": 1.0, "k": 2, "m": 2, "r_min": 2, "r_max": 8}
    assert replay_switch(history, **kw) is None
    point = replay_switch(history, **kw, switch_at_epoch=5)
    per_layer, _ = window_values(history[:6], 2, 2)
    assert point.epoch == 5 and point.ranks == assign_ranks(last_window_changes(per_layer), 2, 8)
    assert replay_switch(history[:5], **kw, switch_at_epoch=5) is None  # the trunk has not reached it yet


def test_default_grid_is_the_papers_table_1_with_windows_scaled_to_the_run():
    grid = S.default_grid(TrainSettings.load(None, ["epochs=300"]))
    assert [(g.name, g.tau, g.zeta, g.k, g.m) for g in grid] == [
        ("Exp1", 1.0, 5.0, 3, 3),
        ("Exp2", 0.5, 2.5, 3, 3),
        ("Exp3", 0.25, 1.0, 3, 3),
    ]
    assert {g.m for g in S.default_grid(TrainSettings())} == {1}  # 3 epochs of 300 -> 0.4 of 40, at least 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "the grid is empty"),
        ("settings: []", "the grid is empty"),
        ("- {tau: 1.0, zetta: 2.0}", "unknown key 'zetta'; did you mean 'zeta'"),
        ("- {tau: -1}", r"prelora.tau=-1.0 is invalid"),
        ("tau: 1", "the top level must be a list"),
    ],
)
def test_bad_grid_files(tmp_path, text, message):
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        S.load_grid(path, TrainSettings())


def test_grid_file_keys_default_to_the_config(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(GRID))
    grid = S.load_grid(path, TrainSettings.load(None, BASE))
    assert [(g.name, g.tau, g.zeta, g.k, g.m) for g in grid] == [("open", 50.0, 50.0, 2, 1), ("shut", 1e-6, 50.0, 2, 1)]


def test_table_and_plot_from_records(tmp_path):
    trunk = S.trunk_row(
        [{M.EPOCH: e, M.EPOCH_TIME_S: 2.0, M.VAL_ACC: 0.5 + e / 10, M.TRAINABLE_FRACTION: 1.0} for e in range(4)]
    )
    rows = [
        S.point_row(
            e,
            {
                M.FINAL_VAL_ACC: 0.7,
                M.BEST_VAL_ACC: 0.75,
                M.MEAN_EPOCH_TIME_S: 1.6,
                M.TRAINABLE_FRACTION: 0.1,
                "epochs_trained": 3 - e,
            },
            2.0,
        )
        for e in (1, 2)
    ]
    landings = [
        {"setting": "a", "tau": 1.0, "zeta": 5.0, "k": 2, "m": 1, "switch_epoch": 1},
        {"setting": "b", "tau": 0.5, "zeta": 2.0, "k": 2, "m": 1, "switch_epoch": 3},
        {"setting": "c", "tau": 0.1, "zeta": 1.0, "k": 2, "m": 1, "switch_epoch": -1},
    ]
    assert (
        trunk[M.FINAL_VAL_ACC] == pytest.approx(0.8)
        and trunk["epochs_trained"] == 4
        and rows[0]["speedup"] == pytest.approx(1.25)
    )
    lines = S.format_table(trunk, rows, landings).splitlines()
    assert (
        lines[0] == S.TABLE_HEADER
        and lines[1].endswith("never: c")
        and lines[2].split()[0] == "1"
        and lines[2].endswith("a")
    )
    assert lines[-1] == "grid settings between the scanned epochs: b@3"
    with open(S.plot_scan(trunk, rows, landings, tmp_path / "scan.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "5"], r"--epochs 5 is invalid: an epoch in \[1, 3\]"),
        (["--set", "prelora.warmup=4"], "no epoch can be scanned"),
        (["--grid", "EMPTY"], "the grid is empty"),
        (["--grid", "UNKNOWN"], "unknown key 'taus'"),
    ],
)
def test_scan_cli_errors_are_one_line_before_ray_starts(tmp_path, capsys, args, message):
    (tmp_path / "EMPTY").write_text("[]\n")
    (tmp_path / "UNKNOWN").write_text("- {taus: 1.0}\n")
    args = [str(tmp_path / a) if a in ("EMPTY", "UNKNOWN") else a for a in args]
    sets = [x for b in BASE for x in ("--set", b)]
    rc = main(
        [
            "scan",
            *sets,
            *args,
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--storage",
            str(tmp_path / "ray"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("prelora-ray scan: error:"), err
    assert re.search(message, err), err
    assert (
        not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()
    )  # no Ray run, no MLflow store: nothing started


# -- one real scan -----------------------------------------------------------------------------------

SCAN_BUCKET = "scans"


def _scan(root, s3_endpoint: str, points) -> subprocess.CompletedProcess:
    """`prelora-ray scan --name sc` with its trunk and points' records in a bucket of the S3 server."""
    from tests.servers import s3_uri

    sets = [x for b in BASE for x in ("--set", b)]
    cmd = [
        sys.executable,
        "-m",
        "prelora_ray.cli",
        "scan",
        *sets,
        "--epochs",
        ",".join(map(str, points)),
        "--grid",
        str(root / "grid.yaml"),
        "--name",
        "sc",
        "--tracking-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--storage",
        s3_uri(s3_endpoint, SCAN_BUCKET, "scans"),
    ]
    return subprocess.run(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory, s3_endpoint):
    """`prelora-ray scan` on digits: a 6-epoch trunk, forks switching at epochs 2 and 3, a two-setting grid; the trunk's
    records and the points' checkpoints in a bucket of a real S3 API."""
    from tests.servers import create_bucket

    root = tmp_path_factory.mktemp("scan")
    (root / "grid.yaml").write_text(yaml.safe_dump(GRID))
    create_bucket(s3_endpoint, SCAN_BUCKET)
    proc = _scan(root, s3_endpoint, POINTS)
    assert proc.returncode == 0, proc.stdout[-3000:]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("prelora-ray")
    parent = client.search_runs([exp.experiment_id], f"tags.`{M.SCAN_TAG}` = 'sc' and tags.`{M.ROLE_TAG}` = 'scan'")[0]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "scan.csv", str(root)))
    grid = pd.read_csv(client.download_artifacts(parent.info.run_id, "grid.csv", str(root)))
    return root, proc.stdout, client, parent, children, table, grid


@pytest.mark.slow
def test_scan_logs_the_trunk_a_child_per_point_with_fork_lineage_and_the_table(small_scan):
    root, out, client, parent, children, table, grid = small_scan
    trunk = next(c for c in children if c.data.tags[M.ROLE_TAG] == "baseline")
    points = sorted(
        (c for c in children if c.data.tags[M.ROLE_TAG] == "trial"), key=lambda c: int(c.data.tags[M.FORK_SWITCH_TAG])
    )
    assert [int(c.data.tags[M.FORK_SWITCH_TAG]) for c in points] == list(POINTS)
    for c, e in zip(points, POINTS, strict=True):
        assert c.info.status == "FINISHED" and c.data.tags[M.SCAN_TAG] == "sc"
        assert c.data.tags[M.FORK_TRUNK_RUN_TAG] == trunk.info.run_id and c.data.tags[M.FORK_EPOCH_TAG] == str(e + 1)
        assert c.data.tags[M.EPOCHS_TRAINED_TAG] == str(EPOCHS - e - 1) and c.data.metrics[M.SWITCH_EPOCH] == e
    assert list(table["switch_epoch"]) == [-1, *POINTS]
    assert table[M.FINAL_VAL_ACC].iloc[0] == trunk.data.metrics[M.FINAL_VAL_ACC]
    assert list(table[M.FINAL_VAL_ACC].iloc[1:]) == [c.data.metrics[M.FINAL_VAL_ACC] for c in points]
    # speedup: each point's own calibrated measure; speedup_wall: the trunk's mean epoch time over the point's
    assert list(table["speedup"].iloc[1:]) == pytest.approx([c.data.metrics[M.SPEEDUP] for c in points])
    assert table["speedup_wall"].iloc[1] == pytest.approx(
        table[M.MEAN_EPOCH_TIME_S].iloc[0] / table[M.MEAN_EPOCH_TIME_S].iloc[1]
    )
    assert (table[M.TRAINABLE_FRACTION].iloc[1:] < 1).all() and table[M.TRAINABLE_FRACTION].iloc[0] == 1
    assert parent.data.metrics[M.EPOCHS_TRAINED_TOTAL] == EPOCHS + sum(EPOCHS - e - 1 for e in POINTS)
    with open(client.download_artifacts(parent.info.run_id, "scan.png", str(root)), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"point  {S.TABLE_HEADER}" in out and out.count("point       ") == len(
        POINTS
    )  # a line per point as it finished
    assert (
        S.TABLE_HEADER in out
        and "mlflow ui --backend-store-uri" in out
        and f"#/experiments/{parent.info.experiment_id}/runs" in out
    )
    assert grid.set_index("setting").loc["shut", "switch_epoch"] == -1


@pytest.mark.slow
def test_a_scan_point_equals_a_from_scratch_run_with_switch_at_epoch(small_scan):
    from tests.sweeps import assert_equals_from_scratch

    root, _, client, _, children, _, _ = small_scan
    point = next(c for c in children if c.data.tags.get(M.FORK_SWITCH_TAG) == str(POINTS[0]))
    cfg = yaml.safe_load(open(client.download_artifacts(point.info.run_id, "config.yaml", str(root))))
    assert cfg["prelora"]["switch_at_epoch"] == POINTS[0] and cfg["strategy"] == "prelora"
    assert_equals_from_scratch(root, client, point)  # switch epoch, ranks, final/best val_acc, val_loss per epoch: ==


@pytest.mark.slow
def test_the_grid_replay_gives_the_switch_epoch_of_a_live_threshold_run(small_scan):
    from prelora_ray.runtime import LocalRuntime, StopTraining
    from prelora_ray.trainer import TrainingLoop
    from tests.builders import StopAtSwitch

    root, _, client, parent, _, _, grid = small_scan
    landed = grid.set_index("setting").loc["open", "switch_epoch"]
    assert landed >= 0
    base = TrainSettings.from_dict(
        yaml.safe_load(open(client.download_artifacts(parent.info.run_id, "config.yaml", str(root))))
    )
    live_cfg = (
        S.load_grid(root / "grid.yaml", base)[0].config(base).replace(**{"tracking.enabled": False, "name": None})
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trunk's worker: the same norms and losses
    try:
        loop = TrainingLoop(live_cfg, StopAtSwitch())
        with pytest.raises(StopTraining):
            loop.run()
    finally:
        torch.set_num_threads(threads)
    assert isinstance(loop.runtime, LocalRuntime) and loop.strategy.state.switch_epoch == landed


@pytest.mark.slow
def test_best_from_a_scan_writes_a_config_switching_there(small_scan, capsys):
    root, _, _, _, _, table, grid = small_scan
    uri = ["--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--experiment", "prelora-ray", "--scan", "sc"]
    landed = int(grid.set_index("setting").loc["open", "switch_epoch"])
    other = next(e for e in POINTS if e != landed)
    assert main(["best", *uri, "--switch-epoch", str(other), "--out", str(root / "at.yaml")]) == 0
    at = TrainSettings.load(root / "at.yaml")
    assert at.prelora.switch_at_epoch == other and at.epochs == EPOCHS
    assert main(["best", *uri, "--switch-epoch", str(landed), "--out", str(root / "grid.out.yaml")]) == 0
    by_grid = TrainSettings.load(root / "grid.out.yaml").prelora
    assert by_grid.switch_at_epoch is None and (by_grid.tau, by_grid.zeta) == (50.0, 50.0)
    assert main(["best", *uri, "--pick", "earliest-within=100", "--out", str(root / "pick.yaml")]) == 0
    assert "switch at epoch" in capsys.readouterr().out
    picked = TrainSettings.load(root / "pick.yaml").prelora
    assert picked.switch_at_epoch == POINTS[0] or (picked.switch_at_epoch is None and landed == POINTS[0])
    assert main(["best", *uri, "--switch-epoch", "5", "--out", str(root / "bad.yaml")]) == 2  # outside the run's range
    assert "prelora.switch_at_epoch=5 is invalid" in capsys.readouterr().err


@pytest.mark.slow
def test_the_same_scan_name_reuses_its_trunk_from_the_bucket_and_adds_its_points(small_scan, s3_endpoint):
    """Run last (it adds a point to the scan's table): the trunk is read from the bucket, not trained again; the new
    point equals a from-scratch run; the table holds every point scanned so far."""
    from tests.servers import bucket_keys, local_s3_folders
    from tests.sweeps import assert_equals_from_scratch

    root, _, client, parent, children, _, _ = small_scan
    trunk = next(c for c in children if c.data.tags[M.ROLE_TAG] == "baseline")
    proc = _scan(root, s3_endpoint, [1])
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "reusing its finished trunk sc_baseline (s3://scans/scans/sc/trunk?" in proc.stdout, proc.stdout[-3000:]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trunks = [c for c in children if c.data.tags[M.ROLE_TAG] == "baseline"]
    assert (
        len(trunks) == 1 and len(client.get_metric_history(trunk.info.run_id, M.VAL_ACC)) == EPOCHS
    )  # not one trunk epoch again
    new = next(c for c in children if c.data.tags.get(M.FORK_SWITCH_TAG) == "1")
    assert new.data.tags[M.FORK_EPOCH_TAG] == "2" and new.data.tags[M.EPOCHS_TRAINED_TAG] == str(EPOCHS - 2)
    assert_equals_from_scratch(root, client, new)
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "scan.csv", str(root / "again")))
    assert list(table["switch_epoch"]) == [-1, 1, *POINTS]
    assert [k for k in bucket_keys(s3_endpoint, SCAN_BUCKET) if k.startswith("scans/sc/trunk/checkpoints/")]
    assert not local_s3_folders(root), local_s3_folders(root)


@pytest.mark.slow
def test_the_scan_table_has_each_points_paired_verdict_against_the_trunk(small_scan):
    import numpy as np
    from scipy.stats import binomtest

    from prelora_ray.front import NOISE_COLUMNS
    from prelora_ray.orchestration.scan import pick_switch_epoch
    from tests.sweeps import val_correct

    root, out, client, parent, children, table, grid = small_scan
    assert set(NOISE_COLUMNS) <= set(table.columns)
    trunk = next(c for c in children if c.data.tags[M.ROLE_TAG] == "baseline")
    base = val_correct(client, trunk)
    verdicts = {}
    for c in children:
        if c.data.tags[M.ROLE_TAG] != "trial":
            continue
        epoch = int(c.data.tags[M.FORK_SWITCH_TAG])
        row = table[table["switch_epoch"] == epoch].iloc[0]
        hits = val_correct(client, c)
        b, d = int(np.sum(hits & ~base)), int(np.sum(~hits & base))
        assert row["p_vs_baseline"] == pytest.approx(1.0 if b + d == 0 else binomtest(b, b + d, 0.5).pvalue)
        assert row[M.VAL_N] == hits.size and row["front"] in ("plausible", "dominated")
        verdicts[epoch] = row["verdict"]
    trunk_row = table[table["switch_epoch"] < 0].iloc[0]
    assert (trunk_row["verdict"], trunk_row["p_vs_baseline"]) == ("indistinguishable", 1.0)
    not_worse = sorted(e for e, v in verdicts.items() if v != "worse")
    if not_worse:
        assert pick_switch_epoch(table, "earliest-not-worse") == not_worse[0]
