"""`prelora-ray scan`, the Ray-free part: candidate switch epochs, the (τ, ζ, k, m) grid, where each
grid setting lands on the trunk, and the scan's table.

A scan forks the trunk (the `full` baseline) at each candidate epoch with `prelora.switch_at_epoch`
and trains each fork to the end; the grid is only replayed on the trunk's history (no training).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from prelora_ray import fork
from prelora_ray import metrics as M
from prelora_ray.config import TrainSettings
from prelora_ray.strategies.prelora import switch_epoch_range

DEFAULT_POINTS = 8
GRID_KEYS = ("name", "tau", "zeta", "k", "m")
# Table 1 of the PreLoRA paper (τ for weights, ζ for loss, in percent); k = m = 3 epochs of a 300-epoch run
PAPER_GRID = (("Exp1", 1.00, 5.00), ("Exp2", 0.50, 2.50), ("Exp3", 0.25, 1.00))
PAPER_EPOCHS, PAPER_K, PAPER_M = 300, 3, 3
LANDING_COLORS = (
    "tab:green",
    "tab:purple",
    "tab:brown",
    "tab:olive",
    "tab:cyan",
    "tab:pink",
)  # not the curves' blue and red
TABLE_COLUMNS = (
    "switch_epoch",
    M.FINAL_VAL_ACC,
    M.BEST_VAL_ACC,
    M.MEAN_EPOCH_TIME_S,
    "speedup",
    M.TRAINABLE_FRACTION,
    "epochs_trained",
    "speedup_wall",
    "speedup_lo",
    "speedup_hi",
    M.VAL_N,
    M.VAL_CORRECT,
)


def candidate_epochs(
    cfg: TrainSettings, *, every: int | None = None, epochs: Sequence[int] | None = None, points: int = DEFAULT_POINTS
) -> list[int]:
    """The switch epochs to scan, ascending; ValueError (naming the flag and the valid range) on bad input.

    Default: `points` epochs evenly spread over (first, last], first being the epoch Algorithm 1 could
    first run (k*m - 1) and last the latest that leaves room for the warmup and one LoRA epoch; the
    earliest is left out (the costliest fork, switching on the steepest part of training).
    `every N`: first + N, first + 2N, ... up to last.
    """
    lo, hi = switch_epoch_range(cfg)
    where = (
        f"an epoch in [{lo}, {hi}] (k*m - 1 = {lo}; epochs - 2 - prelora.warmup = {hi}, "
        f"so that the warmup and one LoRA epoch fit in {cfg.epochs} epochs)"
    )
    if hi < lo:
        raise ValueError(
            f"no epoch can be scanned: epochs={cfg.epochs} leaves no room for k*m = {lo + 1} recorded epochs, "
            f"the warmup (prelora.warmup={cfg.prelora.warmup}) and one LoRA epoch"
        )
    if every is not None and epochs is not None:
        raise ValueError("give --every or --epochs, not both")
    if epochs is not None:
        if not epochs:
            raise ValueError("--epochs is empty: give switch epochs, e.g. --epochs 9,15,21")
        bad = [e for e in epochs if not lo <= e <= hi]
        if bad:
            raise ValueError(f"--epochs {bad[0]} is invalid: {where}")
        return sorted(set(epochs))
    if every is not None:
        if every < 1:
            raise ValueError(f"--every={every} is invalid: an integer >= 1")
        return list(range(lo + every, hi + 1, every)) or [hi]
    n = min(points, hi - lo) or 1
    return sorted({lo + math.floor((hi - lo) * i / n + 0.5) for i in range(1, n + 1)}) if hi > lo else [lo]


@dataclass(frozen=True, kw_only=True)
class GridSetting:
    """One (τ, ζ, k, m) of the grid, replayed on the trunk."""

    name: str
    tau: float
    zeta: float
    k: int
    m: int

    def config(self, base: TrainSettings) -> TrainSettings:
        """The train config with these thresholds and windows (Algorithm 1 decides: no switch_at_epoch)."""
        return base.replace(
            **{
                "prelora.tau": self.tau,
                "prelora.zeta": self.zeta,
                "prelora.k": self.k,
                "prelora.m": self.m,
                "prelora.switch_at_epoch": None,
                "strategy": "prelora",
            }
        )


def default_grid(cfg: TrainSettings) -> list[GridSetting]:
    """The paper's Exp1-3 (Table 1) with k = 3 and the paper's m = 3 epochs of 300 scaled to the run (at least 1)."""
    m = max(1, round(PAPER_M * cfg.epochs / PAPER_EPOCHS))
    return [GridSetting(name=name, tau=tau, zeta=zeta, k=PAPER_K, m=m) for name, tau, zeta in PAPER_GRID]


def load_grid(path: str | Path, cfg: TrainSettings) -> list[GridSetting]:
    """A grid YAML file: a list of settings (or {settings: [...]}) with keys name, tau, zeta, k, m; missing
    keys take the train config's values. Each setting is checked as a train config would be."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--grid {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and set(data) == {"settings"}:
        data = data["settings"]
    if not data:
        raise ValueError(f"{p}: the grid is empty: give a list of settings with keys {', '.join(GRID_KEYS)}")
    if not isinstance(data, list):
        raise ValueError(
            f"{p}: the top level must be a list of settings (or settings: [...]), got {type(data).__name__}"
        )
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not item:
            raise ValueError(f"{p}: setting {i} must be a mapping with keys {', '.join(GRID_KEYS)}, got {item!r}")
        for key in item:
            if key not in GRID_KEYS:
                near = difflib.get_close_matches(str(key), GRID_KEYS, n=1)
                raise ValueError(
                    f"{p}: setting {i}: unknown key {key!r}"
                    + (f"; did you mean {near[0]!r}?" if near else f"; keys: {', '.join(GRID_KEYS)}")
                )
        p_ = cfg.prelora
        values = {
            "tau": p_.tau,
            "zeta": p_.zeta,
            "k": p_.k,
            "m": p_.m,
            **{k: v for k, v in item.items() if k != "name"},
        }
        try:
            checked = cfg.replace(
                **{f"prelora.{k}": v for k, v in values.items()}, **{"prelora.switch_at_epoch": None}
            ).prelora
        except ValueError as exc:
            raise ValueError(f"{p}: setting {i}: {exc}") from None
        out.append(
            GridSetting(
                name=str(item.get("name", f"setting{i}")), tau=checked.tau, zeta=checked.zeta, k=checked.k, m=checked.m
            )
        )
    return out


def grid_landings(
    cfg: TrainSettings, history: Sequence[dict[str, Any]], grid: Sequence[GridSetting]
) -> list[dict[str, Any]]:
    """Where each grid setting switches on the trunk's history (Algorithm 1 and 2 replayed): -1 never."""
    rows = []
    for g in grid:
        point = fork.replay_for(g.config(cfg), history)
        rows.append(
            {
                "setting": g.name,
                "tau": g.tau,
                "zeta": g.zeta,
                "k": g.k,
                "m": g.m,
                "switch_epoch": point.epoch if point else -1,
            }
        )
    return rows


def point_row(switch_epoch: int, result: dict[str, Any], trunk_time_s: float) -> dict[str, Any]:
    """One row of the scan table from a point's summary (the last report of its run)."""
    time_s = float(result.get(M.MEAN_EPOCH_TIME_S, math.nan))
    wall = trunk_time_s / time_s if time_s > 0 else math.nan
    measured = 1.0 if switch_epoch < 0 else float(result.get("speedup", math.nan))  # its own measure, where logged
    return {
        "switch_epoch": switch_epoch,
        M.FINAL_VAL_ACC: float(result.get(M.FINAL_VAL_ACC, math.nan)),
        M.BEST_VAL_ACC: float(result.get(M.BEST_VAL_ACC, math.nan)),
        M.MEAN_EPOCH_TIME_S: time_s,
        "speedup": wall if math.isnan(measured) else measured,
        M.TRAINABLE_FRACTION: float(result.get(M.TRAINABLE_FRACTION, math.nan)),
        "epochs_trained": int(result.get("epochs_trained", -1)),
        "speedup_wall": wall,
        # full training (the trunk) is 1 by definition; a point's interval is its own measure's, where logged
        "speedup_lo": 1.0 if switch_epoch < 0 else float(result.get("speedup_lo", math.nan)),
        "speedup_hi": 1.0 if switch_epoch < 0 else float(result.get("speedup_hi", math.nan)),
        M.VAL_N: float(result.get(M.VAL_N, math.nan)),
        M.VAL_CORRECT: float(result.get(M.VAL_CORRECT, math.nan)),
    }


def trunk_row(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The trunk (full training, never switches) as a row: the reference line of the table and plot."""
    summary = {
        **fork.summarize(history),
        M.TRAINABLE_FRACTION: float(history[-1][M.TRAINABLE_FRACTION]),
        "epochs_trained": len(history),
    }
    return point_row(-1, summary, summary[M.MEAN_EPOCH_TIME_S])


def format_row(row: dict[str, Any], landed: Sequence[str] = ()) -> str:
    """One line of the console table."""
    name = "trunk" if row["switch_epoch"] < 0 else str(row["switch_epoch"])
    return (
        f"{name:>6} {row[M.FINAL_VAL_ACC]:>9.4f} {row[M.BEST_VAL_ACC]:>9.4f} {row[M.MEAN_EPOCH_TIME_S]:>10.3f} "
        f"{row['speedup']:>8.3f} {row[M.TRAINABLE_FRACTION]:>10.4f} {row['epochs_trained']:>8d}  {', '.join(landed)}"
    ).rstrip()


TABLE_HEADER = (
    f"{'switch':>6} {'final_acc':>9} {'best_acc':>9} {'epoch_s':>10} {'speedup':>8} {'trainable':>10} {'trained':>8}  "
    "grid settings landing here"
)


def format_table(trunk: dict[str, Any], rows: Sequence[dict[str, Any]], landings: Sequence[dict[str, Any]]) -> str:
    """The scan's table: the trunk, then one line per point with the grid settings that land on it."""
    by_epoch: dict[int, list[str]] = {}
    for g in landings:
        by_epoch.setdefault(g["switch_epoch"], []).append(g["setting"])
    lines = [TABLE_HEADER, format_row(trunk, by_epoch.get(-1, []) and [f"never: {', '.join(by_epoch[-1])}"])]
    lines += [format_row(r, by_epoch.get(r["switch_epoch"], [])) for r in sorted(rows, key=lambda r: r["switch_epoch"])]
    off = [
        f"{g['setting']}@{g['switch_epoch']}"
        for g in landings
        if g["switch_epoch"] >= 0 and g["switch_epoch"] not in {r["switch_epoch"] for r in rows}
    ]
    if off:
        lines.append(f"grid settings between the scanned epochs: {', '.join(off)}")
    return "\n".join(lines)


def plot_scan(
    trunk: dict[str, Any],
    rows: Sequence[dict[str, Any]],
    landings: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """`scan.png`: final val_acc (top) and mean epoch time (bottom) against the switch epoch, the trunk as a
    dashed reference line in both, and each grid setting marked at the epoch it lands on.

    Where the rows carry the noise columns (orchestration/scan.py's scan_frame): the accuracy's interval as error
    bars and the trunk's as a band, `dominated` points faded, and the bottom panel the runs' own speed-up with its
    interval where they measured one."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = sorted(rows, key=lambda r: r["switch_epoch"])
    x = [r["switch_epoch"] for r in rows]
    fig, (acc_ax, time_ax) = plt.subplots(2, 1, sharex=True, figsize=(10, 6.5))
    panels = (
        (acc_ax, M.FINAL_VAL_ACC, "final validation accuracy (top-1)", "tab:blue"),
        (time_ax, M.MEAN_EPOCH_TIME_S, "mean training time per epoch (s)", "tab:red"),
    )
    if rows and all(not math.isnan(float(r.get("speedup_lo", math.nan))) for r in rows):
        panels = (panels[0], (time_ax, "speedup", "speed-up against full training (own measure)", "tab:red"))
    for ax, key, label, color in panels:
        ax.plot(x, [r[key] for r in rows], "-", color=color, alpha=0.5)
        lo_key, hi_key = ("acc_lo", "acc_hi") if key == M.FINAL_VAL_ACC else (f"{key}_lo", f"{key}_hi")
        bounds = [(float(r.get(lo_key, math.nan)), float(r.get(hi_key, math.nan))) for r in rows]
        for faded in (False, True):
            idx = [i for i, r in enumerate(rows) if (r.get("front") == "dominated") == faded]
            if not idx:
                continue
            yerr = None
            if all(not math.isnan(bounds[i][0]) for i in idx):
                yerr = [
                    [max(0.0, rows[i][key] - bounds[i][0]) for i in idx],
                    [max(0.0, bounds[i][1] - rows[i][key]) for i in idx],
                ]
            ax.errorbar(
                [x[i] for i in idx],
                [rows[i][key] for i in idx],
                yerr=yerr,
                fmt="o",
                color=color,
                alpha=0.25 if faded else 1.0,
                capsize=3,
                label="dominated (with confidence)" if faded else "switch at this epoch (scan point)",
            )
        ax.axhline(trunk[key], color="0.35", linestyle="--", label=f"trunk, full training ({trunk[key]:.4g})")
        band = (float(trunk.get(lo_key, math.nan)), float(trunk.get(hi_key, math.nan)))
        if not any(math.isnan(b) for b in band) and band[1] > band[0]:
            ax.axhspan(*band, color="0.35", alpha=0.1, label="trunk's interval")
        values = [r[key] for r in rows] + [trunk[key]]  # the reference line inside the axes, off the frame
        values += [b for lo_hi in bounds for b in lo_hi if not math.isnan(b)]
        values += [b for b in band if not math.isnan(b)]
        pad = 0.08 * ((max(values) - min(values)) or abs(trunk[key]) or 1.0)
        ax.set_ylim(min(values) - pad, max(values) + pad)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    landed = [g for g in landings if g["switch_epoch"] >= 0]
    for i, g in enumerate(landed):
        for ax in (acc_ax, time_ax):
            ax.axvline(
                g["switch_epoch"],
                color=LANDING_COLORS[i % len(LANDING_COLORS)],
                linestyle=":",
                linewidth=1.5,
                label=(
                    f"{g['setting']} (τ={g['tau']:g}, ζ={g['zeta']:g}, k={g['k']}, m={g['m']}) "
                    f"lands at {g['switch_epoch']}"
                )
                if ax is acc_ax
                else None,
            )
    never = [g["setting"] for g in landings if g["switch_epoch"] < 0]
    if never:
        acc_ax.plot([], [], " ", label=f"never pass on the trunk: {', '.join(never)}")
    time_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    time_ax.set_xlabel("switch epoch (0-based; full training up to its end, then warmup and LoRA)")
    acc_ax.set_title(title or "Switch-epoch scan: accuracy and epoch time against the switch epoch")
    # legends outside the axes, on the right: never over the points
    for ax in (acc_ax, time_ax):
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
