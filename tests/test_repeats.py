"""Repeats (`repeats: N` in a sweep file, `prelora-ray scan --repeats N`): bad values are one-line errors naming the
key before Ray starts; the statistics over seeds agree with scipy's t distribution computed here from the images; a
table with repeats has their mean, interval and paired p, and a table without them is unchanged; one real scan on
digits with two repeats (local Ray, MLflow sqlite) whose repeat 0 equals a from-scratch run, whose repeat 1 equals
its config forked from the trunk's checkpoint in this process, and whose scan.csv holds the mean of the logged
accuracies with the interval and p computed here from the logged val_correct.npy; the same scan again trains no
finished repeat again."""

from __future__ import annotations

import math
import subprocess
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy.stats import t as student

from prelora_ray import metrics as M
from prelora_ray.cli import main
from prelora_ray.front import ACC_HI, ACC_LO, P_VS_BASELINE, VERDICT, sweep_table
from prelora_ray.search_space import load_search_space
from prelora_ray.significance import check_repeats, compare_repeated, repeat_seed, repeated_accuracy
from tests.builders import short_scan
from tests.sweeps import sweep_space

BAD = [0, -1, 1.5, "3", True]


# -- the key ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", BAD)
def test_a_bad_repeats_in_a_sweep_file_is_one_line_naming_the_key(tmp_path, bad):
    path = sweep_space(tmp_path, "rep", 1, repeats=bad)
    with pytest.raises(ValueError, match=r": repeats: ") as err:
        load_search_space(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(path))


@pytest.mark.parametrize("bad", BAD)
def test_check_repeats_refuses_what_is_not_an_integer_at_least_1(bad):
    with pytest.raises(ValueError, match=r"^repeats: ") as err:
        check_repeats(bad)
    assert "\n" not in str(err.value)


def test_repeats_defaults_to_1_and_needs_fork_mode(tmp_path):
    assert load_search_space(sweep_space(tmp_path, "plain", 1)).repeats == 1
    assert load_search_space(sweep_space(tmp_path, "three", 1, repeats=3)).repeats == 3
    with pytest.raises(ValueError, match=r"repeats: 2 needs fork mode") as err:
        load_search_space(sweep_space(tmp_path, "nofork", 1, repeats=2, fork=False))
    assert "\n" not in str(err.value)


def test_a_bad_repeats_fails_tune_before_ray_starts(tmp_path, capsys):
    path = sweep_space(tmp_path, "early", 1, repeats=0)
    rc = main(
        ["tune", str(path), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage", str(tmp_path / "ray")]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "repeats: 0 is below 1" in err, err
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("bad", ["0", "-1", "1.5", "three", "true"])
def test_a_bad_scan_repeats_is_one_line_naming_the_flag_before_ray_starts(tmp_path, capsys, bad):
    rc = main(
        [
            "scan",
            "--repeats",
            bad,
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--storage",
            str(tmp_path / "ray"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--repeats: " in err, err
    assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()


# -- the statistics, against scipy here --------------------------------------------------------------------

N_IMAGES = 360
RNG = np.random.default_rng(7)


def _hits(p: float) -> np.ndarray:
    return RNG.random(N_IMAGES) < p


def _satterthwaite(a: float, dfa: int, b: float, dfb: int) -> tuple[float, float]:
    return math.sqrt(a + b), (a + b) ** 2 / (a**2 / dfa + b**2 / dfb)


def test_repeated_accuracy_is_the_mean_with_the_t_interval_of_seeds_and_images():
    runs = [_hits(0.9), _hits(0.92), _hits(0.88)]
    got = repeated_accuracy(runs, alpha=0.05)
    acc = np.array([r.mean() for r in runs])
    rate = np.mean(np.array(runs, dtype=float), axis=0)
    se, df = _satterthwaite(acc.var(ddof=1) / 3, 2, rate.var(ddof=1) / N_IMAGES, N_IMAGES - 1)
    half = student.ppf(0.975, df) * se
    assert (got.mean, got.sd, got.repeats, got.n) == (
        pytest.approx(acc.mean()),
        pytest.approx(acc.std(ddof=1)),
        3,
        N_IMAGES,
    )
    assert (got.lo, got.hi) == (pytest.approx(acc.mean() - half), pytest.approx(acc.mean() + half))
    wider = repeated_accuracy(runs, alpha=0.01)
    assert wider.lo < got.lo and wider.hi > got.hi


def test_compare_repeated_pairs_by_seed_and_falls_back_to_a_single_baseline():
    base = {0: _hits(0.9), 1: _hits(0.9)}
    trial = {0: base[0] | _hits(0.5), 1: base[1] | _hits(0.5)}  # every baseline image kept, about half the rest gained
    got = compare_repeated(trial, base)
    d = np.array([trial[s].astype(float) - base[s] for s in (0, 1)])
    per_seed = d.mean(axis=1)
    se, df = _satterthwaite(per_seed.var(ddof=1) / 2, 1, d.mean(axis=0).var(ddof=1) / N_IMAGES, N_IMAGES - 1)
    assert got.paired == 2 and got.diff == pytest.approx(per_seed.mean())
    assert got.p == pytest.approx(2 * student.sf(per_seed.mean() / se, df)) and got.verdict == "better"
    assert compare_repeated(base, trial).verdict == "worse"
    same = compare_repeated(base, {0: base[0].copy(), 1: base[1].copy()})
    assert (same.diff, same.p, same.verdict) == (0.0, 1.0, "indistinguishable")
    single = compare_repeated(trial, {0: base[0]})  # the baseline not repeated: each repeat against its one run
    assert single.paired == 0 and single.diff == pytest.approx(
        np.mean([trial[s].mean() - base[0].mean() for s in (0, 1)])
    )
    with pytest.raises(ValueError, match="no seed in common"):
        compare_repeated({3: base[0], 4: base[1]}, base)


def test_repeat_seeds_start_at_the_runs_own_and_never_share_an_epochs_order():
    seeds = [repeat_seed(5, r) for r in range(3)]
    assert seeds == [5, 5 + 1_000_003, 5 + 2_000_006]
    # the sampler's epoch e permutation is seeded with seed + e: no two repeats of a 300-epoch run share one
    assert len({s + e for s in seeds for e in range(300)}) == 3 * 300


# -- the table -----------------------------------------------------------------------------------------------


def _run(run_id: str, role: str, hits: np.ndarray, time_s: float) -> dict:
    return {
        "run_id": run_id,
        "tags.mlflow.runName": run_id,
        f"tags.{M.ROLE_TAG}": role,
        "status": "FINISHED",
        "params.strategy": "full" if role == "baseline" else "prelora",
        f"metrics.{M.MEAN_EPOCH_TIME_S}": time_s,
        f"metrics.{M.FINAL_VAL_ACC}": hits.mean(),
        f"metrics.{M.VAL_N}": hits.size,
        f"metrics.{M.VAL_CORRECT}": int(hits.sum()),
    }


def test_a_table_with_repeats_has_their_mean_interval_and_paired_p_and_one_without_is_unchanged():
    seeds = {
        "baseline": {0: _hits(0.9), 1: _hits(0.9), 2: _hits(0.9)},
        "t1": {0: _hits(0.9), 1: _hits(0.85), 2: _hits(0.95)},
        "t2": {0: _hits(0.7), 1: _hits(0.72), 2: _hits(0.69)},
    }
    runs = pd.DataFrame(
        [
            _run(k, "baseline" if k == "baseline" else "trial", v[0], t)
            for (k, v), t in zip(seeds.items(), (1.0, 0.8, 0.5), strict=True)
        ]
    )
    objectives = [(M.FINAL_VAL_ACC, "max"), (M.MEAN_EPOCH_TIME_S, "min")]
    hits = {k: v[0] for k, v in seeds.items()}
    plain = sweep_table(runs, objectives, hits=hits)
    assert M.REPEATS not in plain and M.VAL_ACC_SD not in plain
    assert plain.equals(sweep_table(runs, objectives, hits=hits, repeats={}))
    table = sweep_table(runs, objectives, hits=hits, repeats=seeds).set_index("run_id")
    for run_id, own in seeds.items():
        row, stats = table.loc[run_id], repeated_accuracy(list(own.values()))
        assert row[M.FINAL_VAL_ACC] == pytest.approx(np.mean([h.mean() for h in own.values()]))
        assert (row[M.REPEATS], row[M.VAL_ACC_SD]) == (3, pytest.approx(stats.sd))
        assert (row[ACC_LO], row[ACC_HI]) == (pytest.approx(stats.lo), pytest.approx(stats.hi))
    assert table.loc["baseline", P_VS_BASELINE] == 1.0
    test = compare_repeated(seeds["t2"], seeds["baseline"])
    assert table.loc["t2", P_VS_BASELINE] == pytest.approx(test.p) and table.loc["t2", VERDICT] == "worse"
    assert table.loc["t1", P_VS_BASELINE] == pytest.approx(compare_repeated(seeds["t1"], seeds["baseline"]).p)


# -- one real scan with two repeats -------------------------------------------------------------------------

EPOCHS, POINT = 6, 3
SEED1 = str(repeat_seed(0, 1))  # repeat 1 of the default seed 0
BASE = short_scan(EPOCHS)


def _scan(root) -> subprocess.CompletedProcess:
    sets = [x for b in BASE for x in ("--set", b)]
    cmd = [sys.executable, "-m", "prelora_ray.cli", "scan", *sets, "--epochs", str(POINT), "--repeats", "2"]
    cmd += ["--name", "rs", "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--storage", str(root / "ray")]
    return subprocess.run(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)


def _runs(client, parent) -> dict[str, object]:
    found = client.search_runs([parent.info.experiment_id], f"tags.`{M.SWEEP_TAG}` = 'rs'")
    return {r.info.run_name: r for r in found}


@pytest.fixture(scope="module")
def repeated_scan(tmp_path_factory):
    """`prelora-ray scan --repeats 2` on digits: a 6-epoch trunk, the point switching at epoch 3, local storage."""
    root = tmp_path_factory.mktemp("repeats")
    proc = _scan(root)
    assert proc.returncode == 0, proc.stdout[-3000:]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("prelora-ray")
    parent = client.search_runs([exp.experiment_id], f"tags.`{M.SCAN_TAG}` = 'rs' and tags.`{M.ROLE_TAG}` = 'scan'")[0]
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "scan.csv", str(root)))
    return root, proc.stdout, client, parent, table


def _stats_here(runs: list[np.ndarray]) -> tuple[float, float, float]:
    """The mean and its 95% interval over seeds and images, computed here with scipy from the logged arrays."""
    acc = np.array([r.mean() for r in runs])
    rate = np.mean(np.array(runs, dtype=float), axis=0)
    se, df = _satterthwaite(acc.var(ddof=1) / len(runs), len(runs) - 1, rate.var(ddof=1) / rate.size, rate.size - 1)
    half = student.ppf(0.975, df) * se
    return acc.mean(), max(0.0, acc.mean() - half), min(1.0, acc.mean() + half)


@pytest.mark.slow
def test_a_scan_with_two_repeats_nests_them_and_its_table_has_their_mean_interval_and_paired_p(repeated_scan):
    from tests.sweeps import val_correct

    root, out, client, parent, table = repeated_scan
    runs = _runs(client, parent)
    point, trunk = runs[f"rs_switch{POINT:03d}"], runs["rs_baseline"]
    rep, trunk_rep = runs[f"rs_switch{POINT:03d}_rep1"], runs["rs_baseline_rep1"]
    for r, of in ((rep, point), (trunk_rep, trunk)):
        tags = r.data.tags
        assert (
            r.info.status == "FINISHED"
            and tags[M.ROLE_TAG] == "repeat"
            and tags["mlflow.parentRunId"] == of.info.run_id
        )
        assert (tags[M.REPEAT_TAG], tags[M.REPEAT_SEED_TAG], tags[M.REPEAT_OF_TAG]) == ("1", SEED1, of.info.run_id)
        assert of.data.tags[M.REPEATS_TAG] == "2" and of.data.metrics[M.REPEATS] == 2
    assert rep.data.tags[M.FORK_EPOCH_TAG] == str(POINT + 1) and rep.data.metrics[M.SWITCH_EPOCH] == POINT
    assert trunk_rep.data.tags[M.FORK_EPOCH_TAG] == "2"  # k * m: where the earliest trial could fork
    assert parent.data.metrics[M.EPOCHS_TRAINED_TOTAL] == EPOCHS + 2 * (EPOCHS - POINT - 1) + (EPOCHS - 2)
    rows = table.set_index("switch_epoch")
    for epoch, own, again in ((POINT, point, rep), (-1, trunk, trunk_rep)):
        row = rows.loc[epoch]
        accs = [own.data.metrics[M.FINAL_VAL_ACC], again.data.metrics[M.FINAL_VAL_ACC]]
        assert row[M.FINAL_VAL_ACC] == pytest.approx(np.mean(accs)) and row[M.REPEATS] == 2
        assert row[M.VAL_ACC_SD] == pytest.approx(np.std(accs, ddof=1))
        mean, lo, hi = _stats_here([val_correct(client, own), val_correct(client, again)])
        assert (row[M.FINAL_VAL_ACC], row[ACC_LO], row[ACC_HI]) == (
            pytest.approx(mean),
            pytest.approx(lo),
            pytest.approx(hi),
        )
    assert point.data.metrics[M.VAL_ACC_MEAN] == pytest.approx(rows.loc[POINT, M.FINAL_VAL_ACC])
    d = np.array(
        [
            val_correct(client, point).astype(float) - val_correct(client, trunk),
            val_correct(client, rep).astype(float) - val_correct(client, trunk_rep),
        ]
    )
    per_seed = d.mean(axis=1)
    se, df = _satterthwaite(per_seed.var(ddof=1) / 2, 1, d.mean(axis=0).var(ddof=1) / d.shape[1], d.shape[1] - 1)
    want = 1.0 if se == 0 and per_seed.mean() == 0 else 2 * student.sf(abs(per_seed.mean()) / se, df)
    assert rows.loc[POINT, P_VS_BASELINE] == pytest.approx(want)
    assert (rows.loc[-1, P_VS_BASELINE], rows.loc[-1, VERDICT]) == (1.0, "indistinguishable")
    assert "final_acc: the mean over 2 data-order seeds" in out


@pytest.mark.slow
def test_repeat_0_is_todays_point_and_repeat_1_its_config_forked_with_its_own_seed(repeated_scan):
    from prelora_ray import fork
    from prelora_ray.checkpoint import load_state_file
    from prelora_ray.config import TrainSettings
    from prelora_ray.runtime import LocalRuntime
    from prelora_ray.trainer import ForkStart, TrainingLoop
    from tests.sweeps import assert_equals_from_scratch, history

    root, _, client, parent, _ = repeated_scan
    runs = _runs(client, parent)
    point, rep = runs[f"rs_switch{POINT:03d}"], runs[f"rs_switch{POINT:03d}_rep1"]
    assert_equals_from_scratch(root, client, point)  # repeat 0: a scan point without repeats equals this run too
    cfg = TrainSettings.from_dict(
        yaml.safe_load(open(client.download_artifacts(rep.info.run_id, "config.yaml", str(root))))
    )
    assert str(cfg.seed) == SEED1 and cfg.prelora.switch_at_epoch == POINT
    trunk = root / "ray" / "rs" / "trunk"
    start = ForkStart(
        state=load_state_file(fork.checkpoint_path(trunk, POINT + 1)),
        snapshots=fork.snapshots(fork.read_history(trunk)[: POINT + 1]),
        reseed=True,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the point's worker
    try:
        loop = TrainingLoop(cfg.replace(**{"tracking.enabled": False, "name": None}), LocalRuntime(), fork=start)
        summary = loop.run()
    finally:
        torch.set_num_threads(threads)
    assert summary[M.FINAL_VAL_ACC] == rep.data.metrics[M.FINAL_VAL_ACC]
    logged = history(client, rep.info.run_id, M.VAL_LOSS)
    assert [v for _, v in logged] == [h[M.VAL_LOSS] for h in loop.state.history]
    before = history(client, point.info.run_id, M.VAL_LOSS)
    assert logged[: POINT + 1] == before[: POINT + 1]  # the trunk's epochs before the fork
    assert logged[POINT + 1 :] != before[POINT + 1 :]  # its own data order after it


@pytest.mark.slow
def test_the_same_scan_again_trains_no_finished_repeat(repeated_scan):
    root, _, client, parent, _ = repeated_scan
    before = _runs(client, parent)
    proc = _scan(root)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"rs_switch{POINT:03d}: repeat 1 (seed {SEED1}) finished before; not trained again" in proc.stdout, (
        proc.stdout
    )
    after = _runs(client, parent)
    assert sorted(after) == sorted(before)  # no new repeat run
    for name in (f"rs_switch{POINT:03d}_rep1", "rs_baseline_rep1"):
        assert after[name].info.end_time == before[name].info.end_time, name


# -- one real fork sweep with two repeats ------------------------------------------------------------------

SWEEP = {
    "name": "rsw",
    "base": {
        "epochs": 5,
        "deterministic": True,
        "prelora": {"k": 2, "m": 1, "warmup": 1},
        "cluster": {"num_workers": 1, "cpus_per_worker": 1},
        "model": {"preset": "vit-digits"},
    },
    "parameters": {
        "strategy": {"type": "categorical", "values": ["prelora", "full"]},
        "prelora.switch_at_epoch": {"type": "categorical", "values": [1, 2], "when": {"strategy": "prelora"}},
    },
    "objectives": [{"metric": "final_val_acc", "mode": "max"}, {"metric": "speedup", "mode": "max"}],
    "sampler": {"type": "random", "seed": 0},  # draws a full trial (the trunk's result) and a prelora one
    "num_samples": 2,
    "max_concurrent": 1,
    "trial_executor": "tune",
    "repeats": 2,
}


@pytest.mark.slow
def test_a_fork_sweep_with_two_repeats_tells_optuna_the_mean_and_pairs_its_table_per_seed(tmp_path):
    import optuna

    from prelora_ray.sweep_record import load_sweep
    from tests.sweeps import run_tune, sweep_runs, val_correct

    (tmp_path / "rsw.yaml").write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    proc = run_tune(tmp_path, str(tmp_path / "rsw.yaml"))
    out = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, out[-3000:]
    client, parent, children = sweep_runs(tmp_path, "rsw")
    every = {r.info.run_name: r for r in client.search_runs([parent.info.experiment_id], "", max_results=100)}
    trials = {c.data.params["strategy"]: c for c in children if c.data.tags[M.ROLE_TAG] == "trial"}
    assert sorted(trials) == ["full", "prelora"]
    base, base_rep = every["rsw_baseline"], every["rsw_baseline_rep1"]
    full_rep = every[f"{trials['full'].info.run_name}_rep1"]
    assert full_rep.data.tags[M.FORK_REUSED_TAG] == base_rep.info.run_id  # the trunk's result: the baseline's repeat
    assert (val_correct(client, full_rep) == val_correct(client, base_rep)).all()
    study = optuna.load_study(study_name="rsw", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    told = {t.params["strategy"]: t.values[0] for t in study.trials}
    pareto = pd.read_csv(client.download_artifacts(parent.info.run_id, "pareto.csv", str(tmp_path))).set_index("run_id")
    base_seeds = {0: val_correct(client, base), int(SEED1): val_correct(client, base_rep)}
    for strategy, trial in trials.items():
        rep = every[f"{trial.info.run_name}_rep1"]
        assert rep.data.tags["mlflow.parentRunId"] == trial.info.run_id and rep.data.params["seed"] == SEED1
        mean = np.mean([trial.data.metrics[M.FINAL_VAL_ACC], rep.data.metrics[M.FINAL_VAL_ACC]])
        assert told[strategy] == pytest.approx(mean)  # Optuna is told the mean over the repeats
        row = pareto.loc[trial.info.run_id]
        assert row[M.FINAL_VAL_ACC] == pytest.approx(mean) and row[M.REPEATS] == 2
        seeds = {0: val_correct(client, trial), int(SEED1): val_correct(client, rep)}
        assert row[P_VS_BASELINE] == pytest.approx(compare_repeated(seeds, base_seeds).p)
        _, lo, hi = _stats_here(list(seeds.values()))
        assert (row[ACC_LO], row[ACC_HI]) == (pytest.approx(lo), pytest.approx(hi))
    assert pareto.loc[base.info.run_id, M.FINAL_VAL_ACC] == pytest.approx(
        np.mean([base.data.metrics[M.FINAL_VAL_ACC], base_rep.data.metrics[M.FINAL_VAL_ACC]])
    )
    record = load_sweep(f"sqlite:///{tmp_path / 'mlflow.db'}", "prelora-ray", "rsw")  # `best`, `pareto`, analysis/
    again = record.table.set_index("run_id")
    for column in (M.FINAL_VAL_ACC, ACC_LO, ACC_HI, P_VS_BASELINE, M.VAL_ACC_SD):
        assert again[column].to_dict() == pytest.approx(pareto[column].to_dict(), nan_ok=True), column


def test_fastest_not_worse_reads_the_verdicts_over_seeds_in_a_sweep_with_repeats():
    from prelora_ray.orchestration.results import pick_row

    seeds = {
        "baseline": {0: _hits(0.9), 1: _hits(0.9), 2: _hits(0.9)},
        "slow": {0: _hits(0.9), 1: _hits(0.9), 2: _hits(0.9)},
        "fast": {0: _hits(0.7), 1: _hits(0.7), 2: _hits(0.7)},  # surely worse
    }
    runs = pd.DataFrame(
        [
            _run(k, "baseline" if k == "baseline" else "trial", v[0], t)
            for (k, v), t in zip(seeds.items(), (1.0, 0.9, 0.5), strict=True)
        ]
    )
    objectives = [(M.FINAL_VAL_ACC, "max"), (M.MEAN_EPOCH_TIME_S, "min")]
    table = sweep_table(runs, objectives, hits={k: v[0] for k, v in seeds.items()}, repeats=seeds)
    row = pick_row(table, objectives, "fastest-not-worse", hits={k: v[0] for k, v in seeds.items()})
    assert row["run_id"] == "slow" and "paired per seed" in row["pick_note"]
