"""The paper's plots, drawn from records (DataFrames and dicts), never from MLflow directly.

Each function takes plain data and a path, writes one PNG and returns the path; the data-shaping is
in analysis.runs and analysis.pareto, so tests check the records and one smoke test per image.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from prelora_ray import metrics as M  # noqa: E402

LABELS = {
    M.FINAL_VAL_ACC: "final validation accuracy (top-1)",
    M.BEST_VAL_ACC: "best validation accuracy (top-1)",
    M.MEAN_EPOCH_TIME_S: "mean training time per epoch (s)",
    M.PEAK_MEM_MB: "peak memory (MiB)",
    M.TRAINABLE_FRACTION: "trainable fraction of parameters",
    M.TOTAL_TRAIN_TIME_S: "total training time (s)",
    M.VAL_LOSS: "validation loss",
}


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _save_front(fig: plt.Figure, ax: plt.Axes, x: str, y: str, title: str, path: str | Path) -> Path:
    """Label, grid and legend (outside, right) of a front plot, then save it."""
    ax.set_xlabel(LABELS.get(x, x))
    ax.set_ylabel(LABELS.get(y, y))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return _save(fig, path)


def plot_fronts(
    fronts: dict[str, pd.DataFrame],
    x: str,
    y: str,
    path: str | Path,
    *,
    baselines: dict[str, tuple[float, float]] | None = None,
    knees: dict[str, tuple[float, float]] | None = None,
    bands: dict[str, tuple[float, float]] | None = None,
    title: str = "Pareto fronts",
) -> Path:
    """Fronts overlaid: every trial as a point with its intervals, the front as a step line, baseline and knee marked.

    `fronts` maps a label (sweep or strategy) to its table with columns x, y and a boolean `pareto`. Where the table
    has the noise columns (front.noise_columns) each trial gets error bars on both axes (`acc_lo`/`acc_hi` for an
    accuracy, `<metric>_lo`/`_hi` otherwise), the `dominated` ones are faded and the early-`stopped` ones are grey
    crosses; `bands` maps a label to the baseline's interval on the y axis, drawn as a band.
    """
    fig, ax = plt.subplots(figsize=(10, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, table) in enumerate(fronts.items()):
        c = colors[i % len(colors)]
        kind = table["front"] if "front" in table else pd.Series("", index=table.index)
        groups = (
            ("plausible" if "front" in table else "all", table[~kind.isin(["dominated", "stopped"])], c, 0.45),
            ("dominated", table[kind == "dominated"], c, 0.15),
            ("early-stopped", table[kind == "stopped"], "grey", 0.3),  # judged at a rung: never on the front
        )
        for name, rows, color, alpha in groups:
            if rows.empty:
                continue
            ax.errorbar(
                rows[x],
                rows[y],
                xerr=error_bars(rows, x),
                yerr=error_bars(rows, y),
                fmt="x" if name == "early-stopped" else "o",
                color=color,
                alpha=alpha,
                markersize=5,
                elinewidth=1,
                capsize=2,
                label=f"{label}: {name} trials ({len(rows)})",
            )
        if bands and label in bands:
            lo, hi = bands[label]
            ax.axhspan(lo, hi, color=c, alpha=0.08, label=f"{label}: baseline's interval")
        front = table[table[M.PARETO_TAG].astype(bool)].sort_values(x)
        ax.plot(
            front[x],
            front[y],
            marker="o",
            color=c,
            drawstyle="steps-post",
            label=f"{label}: Pareto front ({len(front)})",
        )
        if baselines and label in baselines:
            bx, by = baselines[label]
            ax.scatter(
                [bx],
                [by],
                marker="*",
                s=220,
                color=c,
                edgecolor="black",
                zorder=5,
                label=f"{label}: full-training baseline",
            )
        if knees and label in knees:
            kx, ky = knees[label]
            ax.scatter(
                [kx],
                [ky],
                marker="D",
                s=90,
                facecolor="none",
                edgecolor=c,
                linewidth=2,
                zorder=6,
                label=f"{label}: knee",
            )
    return _save_front(fig, ax, x, y, title, path)


def error_bars(rows: pd.DataFrame, column: str) -> np.ndarray | None:
    """Asymmetric error bars (2 x n) of `column` from its interval columns, or None where the table has none."""
    lo, hi = ("acc_lo", "acc_hi") if column == M.FINAL_VAL_ACC else (f"{column}_lo", f"{column}_hi")
    if lo not in rows or hi not in rows or rows[lo].isna().all():
        return None
    value = rows[column].astype(float).to_numpy()
    lower = (value - rows[lo].astype(float).to_numpy()).clip(min=0)
    upper = (rows[hi].astype(float).to_numpy() - value).clip(min=0)
    return np.nan_to_num(np.vstack([lower, upper]))


def plot_front_by_strategy(
    table: pd.DataFrame,
    x: str,
    y: str,
    path: str | Path,
    *,
    baseline: tuple[float, float] | None = None,
    knee: tuple[float, float] | None = None,
    title: str = "Pareto front by strategy",
) -> Path:
    """One sweep's trials coloured by strategy (column `strategy`): every trial a faint point, the trials on the
    sweep's front filled and circled in their strategy's colour, the front itself a black step line; baseline and knee
    marked."""
    fig, ax = plt.subplots(figsize=(10, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    on = table[M.PARETO_TAG].astype(bool)
    for i, strategy in enumerate(
        sorted(set(table["strategy"].astype(str)))
    ):  # by name: a strategy keeps its colour across sweeps
        c, rows = colors[i % len(colors)], table["strategy"].astype(str) == strategy
        if (rows & ~on).any():
            ax.scatter(
                table.loc[rows & ~on, x],
                table.loc[rows & ~on, y],
                color=c,
                alpha=0.35,
                s=30,
                label=f"{strategy}: off the front ({int((rows & ~on).sum())})",
            )
        if (rows & on).any():
            ax.scatter(
                table.loc[rows & on, x],
                table.loc[rows & on, y],
                color=c,
                edgecolor="black",
                s=60,
                zorder=4,
                label=f"{strategy}: on the front ({int((rows & on).sum())})",
            )
    front = table[on].sort_values(x)
    ax.plot(front[x], front[y], color="black", linewidth=1, drawstyle="steps-post", zorder=3, label="Pareto front")
    if baseline is not None:
        ax.scatter(
            [baseline[0]],
            [baseline[1]],
            marker="*",
            s=220,
            color="gold",
            edgecolor="black",
            zorder=5,
            label="full-training baseline",
        )
    if knee is not None:
        ax.scatter(
            [knee[0]],
            [knee[1]],
            marker="D",
            s=90,
            facecolor="none",
            edgecolor="black",
            linewidth=2,
            zorder=6,
            label="knee",
        )
    return _save_front(fig, ax, x, y, title, path)


def _mark_phases(ax: plt.Axes, switch: float | None, freeze: float | None, color: str) -> None:
    if switch is not None and switch >= 0:
        ax.axvline(switch, color=color, linestyle="--", alpha=0.7)
    if freeze is not None and freeze >= 0:
        ax.axvline(freeze, color=color, linestyle=":", alpha=0.9)


def plot_curves(
    histories: dict[str, pd.DataFrame],
    path: str | Path,
    *,
    events: dict[str, tuple[float, float]] | None = None,
    title: str = "Accuracy and loss per epoch",
) -> Path:
    """Validation accuracy and training loss against epoch (Figures 4-5), switch (--) and freeze (:) marked."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, h) in enumerate(histories.items()):
        c = colors[i % len(colors)]
        if M.VAL_ACC in h:
            ax1.plot(h.index, h[M.VAL_ACC], color=c, label=label)
        if M.TRAIN_LOSS in h:
            ax2.plot(h.index, h[M.TRAIN_LOSS], color=c, label=label)
        if events and label in events:
            for ax in (ax1, ax2):
                _mark_phases(ax, *events[label], color=c)
    ax1.set(xlabel="epoch", ylabel="validation accuracy (top-1)", title="Validation accuracy")
    ax2.set(xlabel="epoch", ylabel="training loss (cross-entropy)", title="Training loss", yscale="log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8, title="-- switch   : freeze", title_fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_family_norms(
    history: pd.DataFrame,
    path: str | Path,
    *,
    switch: float | None = None,
    freeze: float | None = None,
    title: str = "Mean weight norm per module family",
) -> Path:
    """Mean weight norm of each family against epoch (Figure 1); columns `norm/<family>`."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for col in [c for c in history.columns if c.startswith(M.NORM_PREFIX)]:
        ax.plot(history.index, history[col], label=col[len(M.NORM_PREFIX) :])
    _mark_phases(ax, switch, freeze, "grey")
    ax.set(xlabel="epoch", ylabel="mean Frobenius norm of the family's weights", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="family (-- switch, : freeze)", title_fontsize=8)
    return _save(fig, path)


def plot_layer_norms(
    history: pd.DataFrame, family: str, path: str | Path, *, switch: float | None = None, freeze: float | None = None
) -> Path:
    """Per-layer weight norms of one family against epoch (Figure 3); columns `layer_norm/<family>/<layer>`."""
    prefix = f"{M.LAYER_NORM_PREFIX}{family}/"
    cols = sorted((c for c in history.columns if c.startswith(prefix)), key=lambda c: int(c.rsplit("/", 1)[1]))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    cmap = plt.get_cmap("viridis", max(2, len(cols)))
    for i, col in enumerate(cols):
        ax.plot(history.index, history[col], color=cmap(i), label=f"layer {col.rsplit('/', 1)[1]}")
    _mark_phases(ax, switch, freeze, "grey")
    ax.set(xlabel="epoch", ylabel="Frobenius norm of the weight", title=f"Weight norm per layer: {family}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(cols) > 8 else 1, title="-- switch, : freeze", title_fontsize=7)
    return _save(fig, path)


def plot_rank_heatmap(ranks: dict[str, list[int]], path: str | Path, *, title: str = "Assigned LoRA ranks") -> Path:
    """Ranks as a family × layer heat map, each cell annotated (0 = no adapter)."""
    families = list(ranks)
    grid = np.array([ranks[f] for f in families], dtype=float)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * grid.shape[1] + 2.5), 0.55 * len(families) + 1.8))
    im = ax.imshow(grid, cmap="magma_r", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(
            j,
            i,
            f"{int(value)}",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if value > grid.max() / 2 else "black",
        )
    ax.set_xticks(range(grid.shape[1]), [str(j) for j in range(grid.shape[1])])
    ax.set_yticks(range(len(families)), families)
    ax.set(xlabel="encoder layer", ylabel="module family", title=title)
    fig.colorbar(im, ax=ax, label="LoRA rank")
    return _save(fig, path)


def plot_importance(
    importances: dict[str, dict[str, float]], path: str | Path, *, title: str = "Hyperparameter importance (fANOVA)"
) -> Path:
    """One horizontal bar chart per objective: parameter -> importance (sums to 1)."""
    n = max(1, len(importances))
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    for ax, (objective, imp) in zip(axes[0], importances.items(), strict=False):
        items = sorted(imp.items(), key=lambda kv: kv[1])
        ax.barh([k.replace("prelora.", "") for k, _ in items], [v for _, v in items], color="tab:blue")
        ax.set(xlabel="importance (fraction of variance explained)", title=LABELS.get(objective, objective))
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(title)
    return _save(fig, path)


def plot_parallel_coordinates(
    table: pd.DataFrame,
    params: list[str],
    color_by: str,
    path: str | Path,
    *,
    title: str = "Trials in parallel coordinates",
) -> Path:
    """Each trial a line across its (min-max scaled) parameters and objectives, coloured by one objective."""
    cols = [c for c in params if c in table and table[c].notna().any()] + [color_by]
    data = table[cols].astype(float)
    lo, hi = data.min(), data.max()
    scaled = (data - lo) / (hi - lo).replace(0, 1)
    fig, ax = plt.subplots(figsize=(1.4 * len(cols) + 3, 4.5))
    cmap = plt.get_cmap("viridis")
    cval = scaled[color_by].fillna(0)
    for idx in scaled.index:
        ax.plot(range(len(cols)), scaled.loc[idx], color=cmap(float(cval[idx])), alpha=0.8)
    ax.set_xticks(range(len(cols)), [c.replace("prelora.", "") for c in cols])
    box = {"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1}
    for j, c in enumerate(cols):
        ax.axvline(j, color="grey", linewidth=0.6)
        ax.text(
            j, 0.01, f"{lo[c]:.3g}", ha="center", va="bottom", fontsize=7, transform=ax.get_xaxis_transform(), bbox=box
        )
        ax.text(
            j, 0.99, f"{hi[c]:.3g}", ha="center", va="top", fontsize=7, transform=ax.get_xaxis_transform(), bbox=box
        )
    ax.set_ylim(-0.08, 1.08)
    ax.set_yticks([])
    ax.set(ylabel="each axis scaled: min at bottom, max at top", title=title)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo[color_by], hi[color_by]))
    fig.colorbar(sm, ax=ax, label=LABELS.get(color_by, color_by))
    return _save(fig, path)


def plot_efficiency(
    histories: dict[str, pd.DataFrame],
    path: str | Path,
    *,
    switch: float | None = None,
    freeze: float | None = None,
    title: str = "Epoch time, throughput and memory",
) -> Path:
    """Epoch time, throughput and peak memory per epoch, baseline against a chosen trial (Figure 7)."""
    panels = [
        (M.EPOCH_TIME_S, "training time per epoch (s)"),
        (M.THROUGHPUT, "throughput (images/s)"),
        (M.PEAK_MEM_MB, "peak memory (MiB)"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name, h in histories.items():
            if key in h:
                ax.plot(h.index, h[key], label=name)
        _mark_phases(ax, switch, freeze, "grey")
        ax.set(xlabel="epoch (-- switch, : freeze of the chosen trial)", ylabel=label, title=label.split(" (")[0])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
