"""`prelora-ray`: train (one run), tune (a sweep), best (export a config), pareto (plots)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from prelora_ray.config import TrainSettings, field_docs

log = logging.getLogger("prelora_ray")


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="one PreLoRA (or full) training run on Ray Train, logged to MLflow")
    p.add_argument("--config", help="YAML file of config keys (see the README's reference)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. --set prelora.tau=0.5 (repeatable)")
    p.add_argument("--address", help="Ray cluster to join (same as --set cluster.address=...)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (same as --set tracking.uri=...)")
    p.add_argument("--no-tracking", action="store_true", help="train without MLflow")
    p.add_argument("--help-config", action="store_true", help="print every config key with its default and meaning, then exit")


def cmd_train(args: argparse.Namespace) -> int:
    """Validate everything, then run."""
    if args.help_config:
        for key, typ, default, doc in field_docs():
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

    summary = _run_prepared(prepare_run(cfg))
    print(_summary_text(summary))
    return 0


def _run_prepared(run: Any) -> dict[str, Any]:
    from prelora_ray.orchestration.train import fit_run, init_ray

    log.info("run %s: %s on %s, %d epochs; MLflow %s", run.name, run.cfg.strategy, run.cfg.data.name, run.cfg.epochs, run.tracking_uri or "off")
    init_ray(run.cfg.cluster.address)
    summary = fit_run(run)
    summary.update(run_name=run.name, mlflow_run_id=run.mlflow_run_id, tracking_uri=run.tracking_uri)
    return summary


def _summary_text(s: dict[str, Any]) -> str:
    lines = [
        f"run {s.get('run_name')}: final val_acc {s.get('final_val_acc', float('nan')):.4f} (best {s.get('best_val_acc', float('nan')):.4f}), "
        f"mean epoch time {s.get('mean_epoch_time_s', float('nan')):.3f} s, total {s.get('total_train_time_s', float('nan')):.1f} s",
    ]
    if s.get("switch_epoch", -1) >= 0:
        lines.append(f"switch at epoch {s['switch_epoch']}, base frozen at epoch {s['freeze_epoch']}; ranks {json.dumps(s.get('ranks'))}")
    else:
        lines.append("no switch (full training throughout)")
    if s.get("merged_model_path"):
        lines.append(f"merged model (plain ViT): {s['merged_model_path']}")
    if s.get("tracking_uri"):
        lines.append(f"MLflow run {s.get('mlflow_run_id')}: mlflow ui --backend-store-uri {s['tracking_uri']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = argparse.ArgumentParser(prog="prelora-ray", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final summary")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    for register in _extra_verbs():
        register(sub)
    return parser


def _extra_verbs() -> list:
    """Verbs defined in other modules (tune, best, pareto), registered when present."""
    verbs = []
    try:
        from prelora_ray.orchestration.cli_tune import register as tune_register

        verbs.append(tune_register)
    except ImportError:
        pass
    try:
        from analysis.cli import register as pareto_register

        verbs.append(pareto_register)
    except ImportError:
        pass
    return verbs


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes are one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        if args.command == "train":
            return cmd_train(args)
        return args.func(args)
    except ValueError as exc:
        print(f"prelora-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
