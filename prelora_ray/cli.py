"""`prelora-ray`: train (one run), tune (a sweep), scan (the switch-epoch curve), best (export a config), pareto
(plots)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from prelora_ray import metrics as M
from prelora_ray import strategies
from prelora_ray.config import TrainSettings, field_docs

log = logging.getLogger("prelora_ray")

VERBOSE_HELP = "also Ray's per-report dumps, Ray Tune's tables, every run's line per epoch, progress bars"
# Ray merges similar lines of different processes ("[repeated 3x across cluster]"): never ours
NEVER_DEDUP = r"^trial \S+: |^epoch +\d+ \|"
# Ray-internal lines with nothing to act on, hidden without --verbose: Ray Train's controller on its own
# PreemptionWatcher actor (once per run), the raylet counting the processes a sweep's short-lived actors start
RAY_NOISE = r"'PreemptionWatcher' .*max_restarts > 0|PYTHON worker processes have been started on node"


def _console_env(verbose: bool) -> None:
    """Console settings read once when Ray and MLflow are imported, so set before (processes Ray starts inherit
    them)."""
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", NEVER_DEDUP)
    if not sys.stdout.isatty():  # a log file or a pipe: no colour codes around Ray's "(trial_fn pid=...)"
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if not verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS_SKIP_REGEX", RAY_NOISE)
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "Creating initial MLflow database tables..."
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run ... at: http://..." per run
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def mlflow_lines(uri: str, experiment_id: str | None, run_id: str | None = None) -> list[str]:
    """How to see the runs: the UI command and the direct page (MLflow 3's UI otherwise opens on an empty GenAI
    overview)."""
    page = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "") if experiment_id else ""
    if uri.startswith(("http://", "https://")):  # a tracking server is its own UI
        return [f"open {uri.rstrip('/')}/{page}"]
    lines = [f"browse: mlflow ui --backend-store-uri {uri}"]
    if page:
        lines.append(f"  then open http://127.0.0.1:5000/{page}")
    return lines


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="one training run of a strategy (PreLoRA by default) on Ray Train, logged to MLflow"
    )
    p.add_argument("--config", help="YAML file of config keys (see the README's reference)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set prelora.tau=0.5 (repeatable)",
    )
    p.add_argument("--address", help="Ray cluster to join (same as --set cluster.address=...)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (same as --set tracking.uri=...)")
    p.add_argument("--no-tracking", action="store_true", help="train without MLflow")
    p.add_argument(
        "--help-config", action="store_true", help="print every config key with its default and meaning, then exit"
    )
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


def cmd_train(args: argparse.Namespace) -> int:
    """Validate everything, then run."""
    if args.help_config:
        for key, _type, default, doc in field_docs():
            print(f"{key:34} {json.dumps(default):>14}  {doc}")
        return 0
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"cluster.address={args.address}")
    if args.tracking_uri:
        overrides.append(f"tracking.uri={args.tracking_uri}")
    if args.no_tracking:
        overrides.append("tracking.enabled=false")
    cfg = TrainSettings.load(args.config, overrides)
    from prelora_ray.orchestration.train import prepare_run  # checks before Ray starts

    summary = _run_prepared(prepare_run(cfg), verbose=args.verbose)
    print(_summary_text(summary))
    return 0


def _run_prepared(run: Any, *, verbose: bool = False) -> dict[str, Any]:
    from prelora_ray.orchestration.train import fit_run, init_ray

    log.info(
        "run %s: %s on %s, %d epochs; MLflow %s",
        run.name,
        run.cfg.strategy,
        run.cfg.data.name,
        run.cfg.epochs,
        run.tracking_uri or "off",
    )
    init_ray(run.cfg.cluster.address, verbose=verbose)
    summary = fit_run(run, verbose=verbose, epoch_lines=True)
    summary.update(
        run_name=run.name,
        strategy=run.cfg.strategy,
        mlflow_run_id=run.mlflow_run_id,
        tracking_uri=run.tracking_uri,
        experiment=run.cfg.tracking.experiment,
        experiment_id=run.experiment_id,
    )
    return summary


def _summary_text(s: dict[str, Any]) -> str:
    lines = [
        f"run {s.get('run_name')}: final val_acc {s.get('final_val_acc', float('nan')):.4f} "
        f"(best {s.get('best_val_acc', float('nan')):.4f}), "
        f"mean epoch time {s.get('mean_epoch_time_s', float('nan')):.3f} s, "
        f"total {s.get('total_train_time_s', float('nan')):.1f} s",
    ]
    if M.SPEEDUP in s:  # measured in the run against full training of the same model (calibration.*)
        lines.append(
            f"speedup against full training {s[M.SPEEDUP]:.3f} [{s[M.SPEEDUP_LO]:.3f}, {s[M.SPEEDUP_HI]:.3f}] "
            "(step time, measured in the run)"
        )
    lines.append(strategies.get(s.get("strategy", "prelora")).summary_line(s))  # the strategy's own line
    if s.get("merged_model_path"):
        lines.append(f"merged model (plain ViT): {s['merged_model_path']}")
    if s.get("tracking_uri"):
        lines.append(
            f"MLflow run {s.get('mlflow_run_id')} in experiment {s.get('experiment')!r} (id {s.get('experiment_id')})"
        )
        lines += mlflow_lines(s["tracking_uri"], s.get("experiment_id"), s.get("mlflow_run_id"))
    return "\n".join(lines)


def _tune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="a sweep: Ray Tune + Optuna over PreLoRA's hyperparameters, every trial in MLflow")
    p.add_argument("search_space", help="search-space YAML (see search_spaces/)")
    p.add_argument("--address", help="Ray cluster to join, e.g. auto")
    p.add_argument("--num-samples", type=int, help="trials (default: the file's num_samples)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: the file's max_concurrent)")
    p.add_argument("--name", help="sweep name (default: the file's name); same name + --resume continues it")
    p.add_argument("--experiment", help="MLflow experiment (default: the file's, else tracking.experiment)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite mlflow.db in the working directory)")
    p.add_argument(
        "--storage",
        help="where the sweep's records, checkpoints and models go: a folder every node sees, or "
        "s3://BUCKET/PREFIX (MinIO: ?endpoint_override=HOST:PORT&scheme=http) or gs://BUCKET/PREFIX "
        "(default: the base config's cluster.storage_path)",
    )
    p.add_argument(
        "--optuna-storage",
        help="the Optuna study's storage: sqlite:///PATH, postgresql://..., mysql://... or journal:PATH "
        "(default: the file's optuna_storage, else optuna.db beside a sqlite MLflow store)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


def cmd_tune(args: argparse.Namespace) -> int:
    """Load and validate the space, then run or resume the sweep and print the front."""
    from prelora_ray.search_space import load_search_space

    space = load_search_space(args.search_space)
    for flag in ("num_samples", "max_concurrent"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={value} is invalid: an integer >= 1")
    from prelora_ray.front import format_front
    from prelora_ray.orchestration.sweep import make_sweep
    from prelora_ray.orchestration.tune import run_sweep

    sweep = make_sweep(
        space,
        name=args.name,
        tracking_uri=args.tracking_uri,
        storage_path=args.storage,
        experiment=args.experiment,
        verbose=args.verbose,
        optuna_storage=args.optuna_storage,
    )
    log.info(
        "sweep %s: %d trials of %s (+ baseline), MLflow %s",
        sweep.name,
        args.num_samples or space.num_samples,
        space.path,
        sweep.tracking_uri,
    )
    table = run_sweep(
        sweep,
        address=args.address,
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent,
        resume=args.resume,
    )
    print("\nPareto front (and the full-training baseline):")
    print(format_front(table))
    print(
        f"\n{int((table['role'] == 'trial').sum()) if len(table) else 0} trials in MLflow experiment "
        f"{sweep.experiment!r} (id {sweep.experiment_id}), parent run {sweep.parent_run_id}"
    )
    print("\n".join(mlflow_lines(sweep.tracking_uri, sweep.experiment_id)))
    return 0


def _epoch_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated epochs, e.g. 9,15,21") from None


def _scan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scan",
        help="the accuracy/time curve over the switch epoch: forks of one trunk, and where threshold settings land",
    )
    p.add_argument("--config", help="train config YAML (the scan's base)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable)",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--every", type=int, help="a switch epoch every N epochs after the first Algorithm 1 could run")
    which.add_argument("--epochs", type=_epoch_list, help="switch epochs, comma-separated (0-based), e.g. 9,15,21")
    p.add_argument(
        "--grid", help="YAML list of (name, tau, zeta, k, m) to replay on the trunk (default: the paper's Exp1-3)"
    )
    p.add_argument(
        "--name",
        help="scan name; the same name reuses its finished trunk and adds the new points to the scan's table "
        "(default: scan-<dataset>-<time>)",
    )
    p.add_argument("--experiment", help="MLflow experiment (default: the config's tracking.experiment)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite mlflow.db in the working directory)")
    p.add_argument(
        "--storage",
        help="where the trunk, the points' checkpoints and models go: a folder, s3://... or gs://... "
        "(default: the config's cluster.storage_path)",
    )
    p.add_argument("--address", help="Ray cluster to join, e.g. auto")
    p.add_argument(
        "--trial-executor",
        choices=("ray_train", "tune"),
        help="how a point trains: tune (default with 1 worker: in its Tune process) or ray_train",
    )
    p.add_argument(
        "--repeats",
        default="1",
        help="data-order seeds per point and for the trunk's continuation (default 1: no repeats); "
        "scan.csv then holds each point's mean accuracy and its interval across seeds",
    )
    p.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)


def repeats_option(text: str) -> int:
    """--repeats as an integer >= 1, or a one-line error naming it."""
    from prelora_ray.significance import check_repeats

    try:
        value: object = int(text)
    except ValueError:
        value = text
    return check_repeats(value, "--repeats")


def cmd_scan(args: argparse.Namespace) -> int:
    """Validate config, candidates and grid; then trunk, forks, replay; print the table."""
    from prelora_ray import fork, scan

    repeats = repeats_option(args.repeats)
    cfg = TrainSettings.load(args.config, args.overrides)
    cfg = cfg.replace(**{"strategy": "prelora", "prelora.switch_at_epoch": None})
    candidates = scan.candidate_epochs(cfg, every=args.every, epochs=args.epochs)
    grid = scan.load_grid(args.grid, cfg) if args.grid else scan.default_grid(cfg)
    from prelora_ray.orchestration.scan import make_scan, run_scan

    sweep = make_scan(
        cfg,
        name=args.name,
        tracking_uri=args.tracking_uri,
        storage_path=args.storage,
        experiment=args.experiment,
        trial_executor=args.trial_executor,
        verbose=args.verbose,
        repeats=repeats,
    )
    log.info(
        "scan %s: switch epochs %s of %d, %s, MLflow %s",
        sweep.name,
        ",".join(map(str, candidates)),
        cfg.epochs,
        sweep.space.trial_executor,
        sweep.tracking_uri,
    )
    result = run_scan(sweep, candidates, grid, address=args.address)
    print(
        f"\nscan {sweep.name} ({cfg.model.preset} on {cfg.data.name}, {cfg.epochs} epochs; "
        "speedup = trunk epoch time / point epoch time):"
    )
    print(scan.format_table(result["trunk"], result["rows"], result["landings"]))
    if sweep.space.repeats > 1:
        print(
            f"final_acc: the mean over {sweep.space.repeats} data-order seeds (the trunk's: its continuation from "
            f"epoch {fork.repeat_fork_epoch(sweep.space.base, 1)}); scan.csv has each row's interval across seeds "
            "(acc_lo, acc_hi), spread (val_acc_sd), and p and verdict against the trunk's repeats, paired per seed"
        )
    if result["failed"]:
        print(
            f"FAILED points (switch epochs): {', '.join(map(str, result['failed']))}; "
            f"run again with --name {sweep.name}"
        )
    print(
        f"\nscan.csv, grid.csv and scan.png on parent run {sweep.parent_run_id} in MLflow experiment "
        f"{sweep.experiment!r} (id {sweep.experiment_id})"
    )
    print("\n".join(mlflow_lines(sweep.tracking_uri, sweep.experiment_id, sweep.parent_run_id)))
    print(
        f"config at a point: prelora-ray best --experiment {sweep.experiment} --scan {sweep.name} "
        "--switch-epoch E (or --pick earliest-within=0.5)"
    )
    return 1 if result["failed"] else 0


def _best_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("best", help="write a train config from a sweep's chosen Pareto trial, or from a scan's point")
    p.add_argument("--experiment", required=True, help="MLflow experiment of the sweep")
    p.add_argument("--sweep", help="sweep name (default: the newest sweep in the experiment)")
    p.add_argument(
        "--scan", help="scan name: export a config switching at --switch-epoch, or --pick earliest-within=POINTS"
    )
    p.add_argument("--switch-epoch", type=int, help="with --scan: the switch epoch (0-based)")
    p.add_argument(
        "--pick",
        help="knee (default), max-acc, min-time, fastest-within=POINTS or fastest-not-worse[=POINTS]; "
        "with --scan: earliest-within=POINTS or earliest-not-worse[=POINTS]",
    )
    p.add_argument("--out", default="best.yaml", help="where to write the config (default best.yaml)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite mlflow.db in the working directory)")


def cmd_best(args: argparse.Namespace) -> int:
    """Export the picked trial's config."""
    from prelora_ray import tracking

    if args.scan:
        if args.sweep:
            raise ValueError("give --sweep or --scan, not both")
        from prelora_ray.orchestration.scan import export_scan_config

        epoch, how, _ = export_scan_config(
            tracking.resolve_uri(args.tracking_uri),
            args.experiment,
            args.scan,
            switch_epoch=args.switch_epoch,
            pick=args.pick,
            out=args.out,
        )
        print(f"{args.out}: switch at epoch {epoch} via {how}")
        print(f"final run: prelora-ray train --config {args.out}")
        return 0
    if args.switch_epoch is not None:
        raise ValueError("--switch-epoch needs --scan NAME")
    from prelora_ray.metrics import SWITCH_PARAMS
    from prelora_ray.orchestration.results import export_best

    args.pick = args.pick or "knee"
    row, cfg = export_best(tracking.resolve_uri(args.tracking_uri), args.experiment, args.sweep, args.pick, args.out)
    flat = cfg.flat()
    print(
        f"{args.out}: trial {row['run_name']} ({args.pick}): "
        + ", ".join(f"{k.split('.')[-1]}={flat[k]}" for k in SWITCH_PARAMS)
    )
    if row.get("pick_note"):
        print(f"note: {row['pick_note']}")
    print(f"final run: prelora-ray train --config {args.out} --set epochs=300")
    return 0


COMMANDS = {"train": cmd_train, "tune": cmd_tune, "scan": cmd_scan, "best": cmd_best}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = argparse.ArgumentParser(prog="prelora-ray", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final summary")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _tune_parser(sub)
    _scan_parser(sub)
    _best_parser(sub)
    try:  # the pareto verb lives in analysis/, which depends only on metric names
        from analysis.cli import register
    except ImportError:
        pass
    else:
        register(sub, COMMANDS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes are one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    _console_env(getattr(args, "verbose", False))  # every verb: best and pareto download artifacts too
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        return COMMANDS[args.command](args)
    except ValueError as exc:
        print(f"prelora-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
