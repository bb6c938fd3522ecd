"""The front's noise columns, verdicts and honest picks on hand-made runs (a table as MLflow's search returns it)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from prelora_ray import metrics as M
from prelora_ray.front import NOISE_COLUMNS, format_front, noise_line, sweep_table
from prelora_ray.orchestration.results import check_pick, pick_row
from prelora_ray.orchestration.scan import check_scan_pick, pick_switch_epoch

OBJECTIVES = [(M.FINAL_VAL_ACC, "max"), ("speedup", "max")]
N = 360
IMAGES = np.arange(N)


def _run(run_id: str, role: str, hits: np.ndarray | None, time_s: float, speedup=None, status="FINISHED") -> dict:
    row = {
        "run_id": run_id,
        "tags.mlflow.runName": run_id,
        f"tags.{M.ROLE_TAG}": role,
        "status": status,
        "params.strategy": "full" if role == "baseline" else "prelora",
        f"metrics.{M.MEAN_EPOCH_TIME_S}": time_s,
    }
    if hits is not None:
        row[f"metrics.{M.FINAL_VAL_ACC}"] = hits.mean()
        row[f"metrics.{M.VAL_N}"] = hits.size
        row[f"metrics.{M.VAL_CORRECT}"] = int(hits.sum())
    if speedup is not None:
        row["metrics.speedup"], row["metrics.speedup_lo"], row["metrics.speedup_hi"] = speedup
    return row


BASE = IMAGES >= 10  # 350 right
HITS = {
    "baseline": BASE,
    "same": BASE.copy(),  # the baseline's images: indistinguishable, p = 1
    "few": (IMAGES >= 13) | (IMAGES < 2),  # 2 gained, 3 lost: noise
    "worse": IMAGES >= 25,  # 15 lost: p = 2 / 2**15
    "better": IMAGES >= 0,  # 10 gained: p = 2 / 2**10
}


def _table(alpha: float = 0.05, with_hits: bool = True) -> pd.DataFrame:
    runs = pd.DataFrame(
        [
            _run("baseline", "baseline", HITS["baseline"], 1.0, (1.0, 1.0, 1.0)),
            _run("same", "trial", HITS["same"], 0.70, (1.30, 1.25, 1.35)),
            _run("few", "trial", HITS["few"], 0.72, (1.28, 1.20, 1.34)),  # within noise of `same` in both
            _run("worse", "trial", HITS["worse"], 0.50, (1.60, 1.55, 1.65)),  # fastest, surely less accurate
            _run("better", "trial", HITS["better"], 0.95, (1.02, 0.98, 1.06)),
            _run("slow", "trial", HITS["same"], 0.90, (1.05, 1.00, 1.10)),  # as accurate as `same`, surely slower
            _run("crashed", "trial", None, float("nan"), status="FAILED"),
        ]
    )
    return sweep_table(runs, OBJECTIVES, hits=HITS | {"slow": HITS["same"]} if with_hits else {}, alpha=alpha)


def by_run(table: pd.DataFrame) -> dict[str, pd.Series]:
    return {r["run_id"]: r for _, r in table.iterrows()}


def test_intervals_and_p_values_agree_with_scipy_on_the_counts_and_images():
    rows = by_run(_table())
    for name in ("same", "few", "worse", "better", "baseline"):
        r, hits = rows[name], HITS[name]
        ci = binomtest(int(hits.sum()), N).proportion_ci(confidence_level=0.95, method="wilson")
        assert (r[M.VAL_N], r["acc_lo"], r["acc_hi"]) == (N, pytest.approx(ci.low), pytest.approx(ci.high))
        b = int(np.sum(hits & ~BASE))
        c = int(np.sum(~hits & BASE))
        want = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
        assert r["p_vs_baseline"] == pytest.approx(want)
    assert rows["worse"]["p_vs_baseline"] == pytest.approx(2 / 2**15)


def test_verdicts_and_the_front_with_intervals():
    rows = by_run(_table())
    verdicts = {k: rows[k]["verdict"] for k in ("baseline", "same", "few", "worse", "better", "slow")}
    assert verdicts == {
        "baseline": "indistinguishable",
        "same": "indistinguishable",
        "few": "indistinguishable",
        "worse": "worse",
        "better": "better",
        "slow": "indistinguishable",
    }
    front = {k: r["front"] for k, r in rows.items()}
    # baseline: surely slower than `same`, as accurate: dominated; `slow` likewise; `few` ties `same` within noise
    assert front == {
        "baseline": "dominated",
        "same": "plausible",
        "few": "plausible",
        "worse": "plausible",  # the fastest: a trade-off, not dominated
        "better": "plausible",  # the most accurate
        "slow": "dominated",
        "crashed": "",
    }
    assert rows["crashed"]["verdict"] == "" and np.isnan(rows["crashed"]["p_vs_baseline"])
    assert set(NOISE_COLUMNS) <= set(_table().columns)


def test_speedup_is_the_runs_own_measure_and_the_wall_ratio_is_kept():
    rows = by_run(_table())
    assert rows["same"]["speedup"] == 1.30 and rows["same"]["speedup_wall"] == pytest.approx(1.0 / 0.70)
    assert (rows["same"]["speedup_lo"], rows["same"]["speedup_hi"]) == (1.25, 1.35)


def test_a_larger_alpha_turns_noise_into_verdicts():
    assert by_run(_table(alpha=0.5))["few"]["verdict"] == "indistinguishable"  # 2 vs 3: p = 1
    runs_5_0 = by_run(_table(alpha=0.05))
    assert runs_5_0["worse"]["verdict"] == "worse"


def test_runs_logged_before_per_image_correctness_get_empty_verdicts_and_a_note():
    old = pd.DataFrame(
        [
            {
                **_run("baseline", "baseline", None, 1.0),
                f"metrics.{M.FINAL_VAL_ACC}": 0.97,
            },
            {**_run("t", "trial", None, 0.8), f"metrics.{M.FINAL_VAL_ACC}": 0.96},
        ]
    )
    table = sweep_table(old, OBJECTIVES)
    assert list(table["verdict"]) == ["", ""] and table["acc_lo"].isna().all()
    assert (table["speedup"] == table["speedup_wall"]).all()  # no own measure: the wall ratio
    assert "logged no val_correct.npy" in format_front(table)


def test_the_console_says_how_much_is_noise():
    text = format_front(_table())
    line = text.splitlines()[-1]
    assert line.startswith("noise: one image is 0.28 points")
    assert "3 trials indistinguishable, 1 better, 1 worse" in line and "4 of 5 plausible" in line


def test_fastest_not_worse_is_the_fastest_trial_whose_verdict_is_not_worse():
    table = _table()
    hits = HITS | {"slow": HITS["same"]}
    row = pick_row(table, OBJECTIVES, "fastest-not-worse", hits=hits)
    assert row["run_id"] == "same"  # `worse` is faster but significantly worse
    not_worse = table[(table["role"] == "trial") & (table["verdict"].isin(["indistinguishable", "better"]))]
    assert row["speedup"] == not_worse["speedup"].max()
    # a margin of 5 points admits `worse` (15 images = 4.2 points lost; its interval reaches above -5 points)
    assert pick_row(table, OBJECTIVES, "fastest-not-worse=5", hits=hits)["run_id"] == "worse"


def test_max_acc_within_noise_takes_the_fastest_and_says_so():
    table = _table()
    hits = HITS | {"slow": HITS["same"]}
    row = pick_row(table, OBJECTIVES, "max-acc", hits=hits)
    assert row["run_id"] == "better"  # 10 images more than `same`: p = 2/1024, no tie
    # with `better` gone, the most accurate plausible trials are `same` and `few` (a tie within noise)
    rest = table[table["run_id"] != "better"]
    row = pick_row(rest, OBJECTIVES, "max-acc", hits=hits)
    assert row["run_id"] == "same" and "indistinguishable in accuracy" in row["pick_note"]


def test_knee_chooses_among_plausible_trials_only():
    row = pick_row(_table(), OBJECTIVES, "knee", hits=HITS)
    assert row["front"] == "plausible" and row["role"] == "trial"


@pytest.mark.parametrize("bad", ["fastest", "fastest-not-worse=x", "fastest-not-worse=-1", "knees", "max_acc"])
def test_a_bad_pick_is_one_line(bad):
    with pytest.raises(ValueError, match="--pick") as err:
        check_pick(bad)
    assert "\n" not in str(err.value)


def test_earliest_not_worse_reads_the_scans_verdicts_and_margins():
    scan = pd.DataFrame(
        {
            "switch_epoch": [-1, 3, 6, 9],
            M.FINAL_VAL_ACC: [HITS["baseline"].mean(), HITS["worse"].mean(), HITS["few"].mean(), HITS["same"].mean()],
            "verdict": ["indistinguishable", "worse", "indistinguishable", "indistinguishable"],
        }
    )
    assert pick_switch_epoch(scan, "earliest-not-worse") == 6
    hits = {-1: HITS["baseline"], 3: HITS["worse"], 6: HITS["few"], 9: HITS["same"]}
    assert pick_switch_epoch(scan, "earliest-not-worse=5", hits) == 3
    with pytest.raises(ValueError, match="did not log"):
        pick_switch_epoch(scan.drop(columns="verdict"), "earliest-not-worse")
    for bad in ("earliest", "earliest-not-worse=-2", "earliest-within"):
        with pytest.raises(ValueError, match="--pick"):
            check_scan_pick(bad)


def test_error_bars_come_from_the_interval_columns():
    from analysis.plots import error_bars

    rows = pd.DataFrame(
        {M.FINAL_VAL_ACC: [0.9, 0.8], "acc_lo": [0.85, 0.7], "acc_hi": [0.93, 0.85], "speedup": [1.2, 1.0]}
    )
    assert np.allclose(error_bars(rows, M.FINAL_VAL_ACC), [[0.05, 0.1], [0.03, 0.05]])
    assert error_bars(rows, "speedup") is None  # no interval logged: no bars
    rows["speedup_lo"], rows["speedup_hi"] = [1.1, float("nan")], [1.3, float("nan")]
    assert np.allclose(error_bars(rows, "speedup"), [[0.1, 0.0], [0.1, 0.0]])


def test_the_scan_picture_draws_intervals_bands_and_faded_points(tmp_path):
    from prelora_ray import scan as S

    trunk = S.point_row(-1, {M.FINAL_VAL_ACC: 0.97, M.BEST_VAL_ACC: 0.97, M.MEAN_EPOCH_TIME_S: 1.0}, 1.0)
    rows = [
        {**S.point_row(e, {M.FINAL_VAL_ACC: a, M.BEST_VAL_ACC: a, M.MEAN_EPOCH_TIME_S: 0.8}, 1.0), **extra}
        for e, a, extra in (
            (2, 0.95, {"acc_lo": 0.92, "acc_hi": 0.97, "front": "dominated"}),
            (4, 0.97, {"acc_lo": 0.94, "acc_hi": 0.98, "front": "plausible"}),
        )
    ]
    path = S.plot_scan({**trunk, "acc_lo": 0.95, "acc_hi": 0.985}, rows, [], tmp_path / "scan.png")
    assert path.stat().st_size > 10_000


def test_an_early_stopped_trial_is_a_row_off_the_front_never_picked_and_never_a_dominator():
    fast = IMAGES >= 5  # more accurate than every other trial and the fastest: it would dominate them all
    runs = pd.DataFrame(
        [
            _run("baseline", "baseline", HITS["baseline"], 1.0, (1.0, 1.0, 1.0)),
            _run("same", "trial", HITS["same"], 0.70, (1.30, 1.25, 1.35)),
            _run("slow", "trial", HITS["same"], 0.90, (1.05, 1.00, 1.10)),
            {**_run("stopped", "trial", fast, 0.40, (2.0, 1.95, 2.05)), f"tags.{M.EARLY_STOPPED_TAG}": "true"},
        ]
    )
    table = by_run(sweep_table(runs, OBJECTIVES, hits=HITS | {"slow": HITS["same"], "stopped": fast}))
    assert table["stopped"]["front"] == "stopped" and not table["stopped"][M.PARETO_TAG]
    assert table["same"]["front"] == "plausible" and table["slow"]["front"] == "dominated"
    whole = sweep_table(runs, OBJECTIVES, hits=HITS | {"slow": HITS["same"], "stopped": fast})
    for pick in ("knee", "max-acc", "fastest-not-worse"):
        assert pick_row(whole, OBJECTIVES, pick, hits=HITS | {"stopped": fast})["run_id"] != "stopped"
    assert "1 stopped early" in noise_line(whole)
