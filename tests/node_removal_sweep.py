"""A sweep on a fake 3-node Ray cluster that loses a node mid-run (run as a script by test_reliability).

    python tests/node_removal_sweep.py WORKDIR

Starts `ray.cluster_utils.Cluster` (a head with 0 CPUs and three 1-CPU nodes, node death detected in
about 1.5 s), runs a 3-trial sweep with `run_sweep` in a thread, waits until every trial has a
checkpoint, kills a node that hosts a Ray Train worker (no graceful shutdown), waits for the sweep,
and writes WORKDIR/result.json: what was where, which node went, and the sweep's table.
"""

from __future__ import annotations

import collections
import json
import sys
import threading
import time
import traceback
from pathlib import Path

import yaml

NUM_TRIALS = 3
EPOCHS = 12


def space_file(workdir: Path) -> Path:
    data = {
        "name": "noderm",
        "base": {
            "epochs": EPOCHS,
            "model": {"preset": "vit-digits"},  # the fastest preset: what is tested is where the trials run
            "prelora": {"k": 2, "m": 1, "warmup": 1},
            "cluster": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 2},
        },
        "parameters": {
            "prelora.tau": {"type": "loguniform", "low": 20.0, "high": 80.0},
            "prelora.r_max": {"type": "categorical", "values": [4, 8]},
        },
        "objectives": [{"metric": "final_val_acc", "mode": "max"}, {"metric": "mean_epoch_time_s", "mode": "min"}],
        "sampler": {"type": "random", "seed": 0},
        "num_samples": NUM_TRIALS,
        "max_concurrent": NUM_TRIALS,
        "baseline": False,
        "fork": False,  # each trial its own whole run: the node lost is one of theirs (fork mode always runs a trunk)
    }
    path = workdir / "noderm.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def actors_by_node() -> dict[str, list[str]]:
    from ray._private import state  # the GCS actor table: works without the dashboard

    where: dict[str, list[str]] = collections.defaultdict(list)
    for actor in state.actors().values():
        if actor["State"] == "ALIVE":
            where[actor["Address"]["NodeID"]].append(actor["ActorClassName"])
    return dict(where)


def wait_for_checkpoints(train_dir: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [d for d in train_dir.glob("noderm_*") if any(p.is_dir() for p in d.glob("checkpoint_*"))]
        if len(runs) >= NUM_TRIALS:
            return
        time.sleep(0.2)
    raise TimeoutError(f"not every trial had a checkpoint in {train_dir} after {timeout:.0f} s")


def main(workdir: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from prelora_ray.orchestration.sweep import make_sweep
    from prelora_ray.orchestration.tune import run_sweep
    from prelora_ray.search_space import load_search_space

    workdir.mkdir(parents=True, exist_ok=True)
    fast_death = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": fast_death})
    result: dict = {}
    try:
        nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
        cluster.wait_for_nodes()
        sweep = make_sweep(
            load_search_space(space_file(workdir)),
            name="noderm",
            tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}",
            storage_path=str(workdir / "ray"),
        )
        outcome: dict = {}

        def run() -> None:
            try:
                outcome["table"] = run_sweep(sweep, address=cluster.address)
            except BaseException as exc:  # reported in result.json
                outcome["error"] = "".join(traceback.format_exception(exc))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        wait_for_checkpoints(workdir / "ray" / "noderm" / "train", timeout=400)
        before = actors_by_node()
        victim = next(n for n in nodes if "RayTrainWorker" in before.get(n.node_id, []))
        cluster.remove_node(victim, allow_graceful=False)
        print(f"removed node {victim.node_id} hosting {before[victim.node_id]}", flush=True)
        thread.join(600)
        result = {
            "head": cluster.head_node.node_id,
            "workers": [n.node_id for n in nodes],
            "victim": victim.node_id,
            "actors_before": before,
            "alive_nodes_after": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
            "finished": not thread.is_alive(),
            "error": outcome.get("error"),
            "table": outcome["table"].to_dict(orient="records") if "table" in outcome else None,
        }
    finally:
        (workdir / "result.json").write_text(json.dumps(result, indent=1, default=str))
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
