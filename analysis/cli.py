"""The `pareto` verb of `prelora-ray` (registered by prelora_ray.cli)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, commands: dict) -> None:
    """Add `prelora-ray pareto` to the CLI."""
    p = sub.add_parser("pareto", help="print Pareto fronts from MLflow and write the paper's plots")
    p.add_argument("--experiment", required=True, help="MLflow experiment of the sweeps")
    p.add_argument(
        "--sweep", action="append", default=None, help="sweep name (repeatable to overlay fronts; default: the newest)"
    )
    p.add_argument("--out", default="pareto-plots", help="folder for the PNGs (default pareto-plots)")
    p.add_argument("--trial", help="run name of the trial for the norm, rank and efficiency plots (default: the knee)")
    p.add_argument("--family", help="module family of the per-layer norm plot (default: the first)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite mlflow.db in the working directory)")
    p.add_argument("--no-log", action="store_true", help="do not log the plots to the sweeps' parent runs")
    p.add_argument(
        "--optuna-storage",
        help="the first sweep's Optuna storage, for the importance plot (default: the URL its parent run logged)",
    )
    commands["pareto"] = cmd_pareto


def cmd_pareto(args: argparse.Namespace) -> int:
    """Print the fronts and the written plots."""
    from analysis.report import make_report
    from prelora_ray.tracking import resolve_uri

    result = make_report(
        resolve_uri(args.tracking_uri),
        args.experiment,
        sweeps=args.sweep,
        out=args.out,
        trial=args.trial,
        family=args.family,
        log_to_mlflow=not args.no_log,
        optuna_storage=args.optuna_storage,
    )
    print(result["text"])
    print(f"\nchosen trial for the per-run plots: {result['chosen']['run_name']}")
    for name, path in result["plots"].items():
        print(f"{name:>14}: {path}")
    return 0
