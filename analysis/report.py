"""`prelora-ray pareto`: read sweeps from MLflow, print their fronts, write every plot, log them.

Usable from a notebook: `make_report(uri, "prelora-ray", sweeps=["quickstart"], out="plots")`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from analysis import plots
from analysis.pareto import knee_point
from analysis.runs import (
    SweepRecord,
    format_front,
    load_sweep,
    metric_history,
    metric_keys,
    run_ranks,
    trial_strategies,
)
from prelora_ray import metrics as M
from prelora_ray import tracking

log = logging.getLogger("prelora_ray")
CURVE_KEYS = (M.VAL_ACC, M.TRAIN_LOSS)
EFFICIENCY_KEYS = (M.EPOCH_TIME_S, M.THROUGHPUT, M.PEAK_MEM_MB)


def axes_of(objectives: list[tuple[str, str]]) -> tuple[str, str]:
    """(x, y) of the front plot: the first minimised objective against the first maximised one."""
    x = next((m for m, d in objectives if d == "min"), M.MEAN_EPOCH_TIME_S)
    y = next((m for m, d in objectives if d == "max"), M.FINAL_VAL_ACC)
    return x, y


def finished_trials(record: SweepRecord) -> pd.DataFrame:
    """FINISHED trials of a sweep (the candidates of its front)."""
    t = record.table
    return t[(t["role"] == "trial") & (t["status"] == "FINISHED")].reset_index(drop=True)


def baseline_row(record: SweepRecord) -> pd.Series | None:
    """The sweep's finished baseline run, if any."""
    t = record.table
    rows = t[(t["role"] == "baseline") & (t["status"] == "FINISHED")]
    return rows.iloc[0] if len(rows) else None


def knee_row(record: SweepRecord) -> pd.Series | None:
    """The knee of the sweep's front (over its objectives)."""
    trials = finished_trials(record)
    front = trials[trials[M.PARETO_TAG].astype(bool)].reset_index(drop=True)
    if front.empty:
        return None
    values = front[[m for m, _ in record.objectives]].astype(float).to_numpy()
    return front.iloc[knee_point(values, [d for _, d in record.objectives])]


def importances(record: SweepRecord, optuna_storage: str | None = None) -> dict[str, dict[str, float]]:
    """fANOVA importance of each searched parameter for each objective, from the persisted Optuna study.

    The study is where the sweep's parent run says (param `optuna_storage`: an RDB URL, or `journal:PATH`), unless
    `optuna_storage` is given (a URL whose password the param masks)."""
    import optuna

    url = optuna_storage or record.params.get("optuna_storage")
    if not url:
        raise ValueError(f"sweep {record.name!r}: its parent run has no optuna_storage param")
    if "***" in url:
        raise ValueError(
            f"sweep {record.name!r}: its Optuna storage {url} hides a password; give it with --optuna-storage"
        )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if url.startswith("journal:"):  # search_space.JOURNAL_PREFIX: an Optuna journal file
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:") :]))
    else:
        storage = url
    study = optuna.load_study(study_name=record.name, storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        raise ValueError(
            f"sweep {record.name!r}: importance needs at least 2 complete trials, the study has {len(complete)}"
        )
    out = {}
    for i, (metric, _) in enumerate(record.objectives):
        imp = optuna.importance.get_param_importances(
            study, target=lambda t, i=i: t.values[i], evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0)
        )
        out[metric] = dict(imp)
    return out


def make_report(
    uri: str,
    experiment: str,
    *,
    sweeps: list[str] | None = None,
    out: str | Path = "pareto-plots",
    trial: str | None = None,
    family: str | None = None,
    log_to_mlflow: bool = True,
    optuna_storage: str | None = None,
) -> dict[str, Any]:
    """Print fronts, write every plot as PNG under `out`, log them to each sweep's parent run (`optuna_storage`: the
    first sweep's study, for the importance plot, when its parent run's param masks a password).

    Returns {"records": [...], "plots": {name: path}, "text": the printed fronts}.
    """
    out = Path(out)
    records = [load_sweep(uri, experiment, s) for s in (sweeps or [None])]
    first = records[0]
    x, y = axes_of(first.objectives)
    paths: dict[str, Path] = {}
    texts = []
    fronts, baselines, knees, bands = {}, {}, {}, {}
    for rec in records:
        texts.append(f"sweep {rec.name} ({len(finished_trials(rec))} finished trials):\n{format_front(rec.table)}")
        fronts[rec.name] = finished_trials(rec)
        base, knee = baseline_row(rec), knee_row(rec)
        if base is not None:
            baselines[rec.name] = (float(base[x]), float(base[y]))
            lo, hi = ("acc_lo", "acc_hi") if y == M.FINAL_VAL_ACC else (f"{y}_lo", f"{y}_hi")
            if pd.notna(base.get(lo)) and pd.notna(base.get(hi)):
                bands[rec.name] = (float(base[lo]), float(base[hi]))
        if knee is not None:
            knees[rec.name] = (float(knee[x]), float(knee[y]))
    title = "Pareto fronts: " + " vs ".join(r.name for r in records)
    paths["fronts"] = plots.plot_fronts(
        fronts, x, y, out / "fronts.png", baselines=baselines, knees=knees, bands=bands, title=title
    )
    for rec in records:  # a sweep over strategies: its front coloured by strategy
        if len(trial_strategies(rec.table)) > 1:
            name = "front_by_strategy" if len(records) == 1 else f"front_by_strategy_{rec.name}"
            paths[name] = plots.plot_front_by_strategy(
                finished_trials(rec),
                x,
                y,
                out / f"{name}.png",
                baseline=baselines.get(rec.name),
                knee=knees.get(rec.name),
                title=f"Pareto front by strategy: sweep {rec.name}",
            )

    # the chosen trial: named, else the knee of the first sweep
    trials = finished_trials(first)
    if trial is not None:
        match = first.table[first.table["run_name"] == trial]
        if match.empty:
            raise ValueError(f"--trial {trial!r}: no run of that name in sweep {first.name!r}")
        chosen = match.iloc[0]
    else:
        chosen = knee_row(first)
        if chosen is None:
            raise ValueError(f"sweep {first.name!r} has no finished trial on its front")
    base = baseline_row(first)
    events = {r["run_name"]: (r[M.SWITCH_EPOCH], r[M.FREEZE_EPOCH]) for _, r in first.table.iterrows()}

    shown = trials[trials[M.PARETO_TAG].astype(bool)]
    curve_runs = [(r["run_name"], r["run_id"]) for _, r in shown.iterrows()] + (
        [(f"{base['run_name']} (baseline)", base["run_id"])] if base is not None else []
    )
    histories = {name: metric_history(uri, run_id, CURVE_KEYS) for name, run_id in curve_runs}
    events = {**events, **({f"{base['run_name']} (baseline)": (-1, -1)} if base is not None else {})}
    paths["curves"] = plots.plot_curves(
        histories, out / "curves.png", events=events, title=f"Pareto trials and baseline: sweep {first.name}"
    )

    norm_keys = metric_keys(uri, chosen["run_id"], M.NORM_PREFIX)
    families = [k[len(M.NORM_PREFIX) :] for k in norm_keys]
    family = family or ("query" if "query" in families or not families else families[0])
    layer_keys = metric_keys(uri, chosen["run_id"], f"{M.LAYER_NORM_PREFIX}{family}/")
    norms = metric_history(uri, chosen["run_id"], norm_keys + layer_keys)
    sw, fr = chosen[M.SWITCH_EPOCH], chosen[M.FREEZE_EPOCH]
    paths["family_norms"] = plots.plot_family_norms(
        norms,
        out / "family_norms.png",
        switch=sw,
        freeze=fr,
        title=f"Mean weight norm per family: {chosen['run_name']}",
    )
    paths["layer_norms"] = plots.plot_layer_norms(
        norms, family, out / f"layer_norms_{family}.png", switch=sw, freeze=fr
    )

    ranks = run_ranks(uri, chosen["run_id"])
    if ranks:
        paths["ranks"] = plots.plot_rank_heatmap(
            ranks, out / "ranks.png", title=f"Assigned LoRA ranks: {chosen['run_name']}"
        )
    else:
        log.warning("trial %s never switched: no rank heat map", chosen["run_name"])

    try:
        paths["importance"] = plots.plot_importance(
            importances(first, optuna_storage),
            out / "importance.png",
            title=f"Hyperparameter importance: sweep {first.name}",
        )
    except ValueError as exc:
        log.warning("no importance plot: %s", exc)
    paths["parallel"] = plots.plot_parallel_coordinates(
        trials, list(M.SWITCH_PARAMS), y, out / "parallel_coordinates.png", title=f"Trials of sweep {first.name}"
    )

    eff = {f"{chosen['run_name']} (chosen)": metric_history(uri, chosen["run_id"], EFFICIENCY_KEYS)}
    if base is not None:
        eff[f"{base['run_name']} (baseline)"] = metric_history(uri, base["run_id"], EFFICIENCY_KEYS)
    paths["efficiency"] = plots.plot_efficiency(
        eff, out / "efficiency.png", switch=sw, freeze=fr, title=f"Baseline vs {chosen['run_name']}"
    )

    if log_to_mlflow:
        for rec in records:
            for p in paths.values():
                tracking.log_file(uri, rec.parent_run_id, p, "plots")
    return {"records": records, "plots": paths, "text": "\n\n".join(texts), "chosen": chosen}
