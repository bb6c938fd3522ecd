"""docs/cluster.md's one-machine walkthrough, run as written: a Ray head on 127.0.0.1, the quickstart submitted as a Ray
job, its records on a real S3 API (moto), its runs on a real MLflow server, the Optuna study in a journal file; then
`best` and `pareto` reading from the server."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import mlflow
import pytest

from prelora_ray import metrics as M
from tests.servers import bucket_keys, create_bucket, free_port, kill_mentioning, kill_session, local_s3_folders

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "cluster.md"
QUICKSTART_MAX_LINES = 45  # the quickstart's console with an http:// tracking URI (the bound)


def walkthrough() -> str:
    """The bash block between the one-machine markers of docs/cluster.md."""
    text = DOC.read_text()
    block = text.split("<!-- one-machine:begin -->", 1)[1].split("<!-- one-machine:end -->", 1)[0]
    return block.split("```bash", 1)[1].split("```", 1)[0]


def test_the_docs_one_machine_walkthrough_runs_the_quickstart_as_a_ray_job(tmp_path, s3_endpoint, mlflow_server_uri):
    script = walkthrough()
    assert "ray start --head" in script and "ray job submit" in script and "prelora-ray tune quickstart.yaml" in script
    create_bucket(s3_endpoint, "sweeps")
    work = tmp_path / "work"
    (work / "search_spaces").mkdir(parents=True)
    (work / "search_spaces" / "quickstart.yaml").write_text((REPO / "search_spaces" / "quickstart.yaml").read_text())
    ray_tmp = Path(tempfile.mkdtemp(prefix="rw", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {
        **os.environ,
        "S3_ENDPOINT": s3_endpoint,
        "MLFLOW_URI": mlflow_server_uri,
        "SHARED": str(tmp_path / "shared"),
        "RAY_PORT": str(free_port()),
        "DASHBOARD_PORT": str(free_port()),
        "AGENT_PORT": str(free_port()),  # the job agent's: another local Ray's agent holds the default 52365
        "RAY_TMPDIR": str(ray_tmp),  # this head's files (and its ray_current_cluster) apart from any other local Ray
    }
    env.pop("RAY_ADDRESS", None)
    # its own session: the head's processes are stopped with it afterwards, not the test session's own local Ray
    # (`ray stop` would stop every Ray on the machine)
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=1200)
    finally:
        kill_session(proc.pid)
        kill_mentioning(str(ray_tmp))  # the head's daemons (gcs, raylet, dashboard), outside the shell's session
        proc.wait()
    assert proc.returncode == 0, out[-5000:]

    # the sweep's own console, as the job printed it (between Ray's job header and footer)
    job = out.split("Running entrypoint for job", 1)[1].split("\n", 1)[1]
    job = re.split(r"\n.*Job '\S+' succeeded", job, maxsplit=1)[0]
    lines = [line for line in job.splitlines() if line.strip()]
    assert len(lines) <= QUICKSTART_MAX_LINES, job
    assert "View run" not in out and "View experiment" not in out, job
    assert "Pareto front" in job and f"open {mlflow_server_uri}/#/experiments/" in job, job
    assert len(re.findall(r"^trial quickstart_\w+: finished: final_val_acc \d", job, re.M)) == 8, job

    # every record in the bucket; nothing on a local folder named after the scheme
    keys = bucket_keys(s3_endpoint, "sweeps")
    for key in (
        "prelora/quickstart/trunk/history.json",
        "prelora/quickstart/trunk/status.json",
        "prelora/quickstart/tuner.pkl",
    ):
        assert key in keys, key
    assert any(k.startswith("prelora/quickstart/trunk/checkpoints/") and k.endswith(".pt.manifest.json") for k in keys)
    client = mlflow.tracking.MlflowClient(mlflow_server_uri)
    exp = client.get_experiment_by_name("prelora-ray")
    parent = client.search_runs(
        [exp.experiment_id], "tags.`prelora.role` = 'parent' and tags.`prelora.sweep` = 'quickstart'"
    )[0]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    trials = [c for c in children if c.data.tags[M.ROLE_TAG] == "trial"]
    assert len(trials) == 8 and all(c.info.status == "FINISHED" for c in trials)
    for c in (
        trials
    ):  # each trial's own records: its Ray Tune folder (checkpoints) where it trained, its result in the fork registry
        if int(c.data.tags.get(M.EPOCHS_TRAINED_TAG, "0")) > 0 and M.FORK_REUSED_TAG not in c.data.tags:
            assert any(k.startswith(f"prelora/quickstart/{c.info.run_name}/") for k in keys), c.info.run_name
    assert any(k.startswith("prelora/quickstart/trunk/results/") for k in keys)
    assert not local_s3_folders(work, tmp_path, ray_tmp), local_s3_folders(work, tmp_path)

    # the study in the journal file named on the command line; best and pareto from the server
    assert (tmp_path / "shared" / "quickstart.journal").stat().st_size > 0
    assert parent.data.params["optuna_storage"] == f"journal:{tmp_path / 'shared' / 'quickstart.journal'}"
    assert (work / "best.yaml").read_text().startswith("# prelora-ray best --pick knee: trial quickstart_")
    assert len(list((work / "plots").glob("*.png"))) >= 5
