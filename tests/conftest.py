"""Shared fixtures: one local Ray for the session's Ray tests, tiny fast configs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """ray.init(num_cpus=2) once for every Ray test, with the fast Train health check."""
    import ray

    from prelora_ray.orchestration.train import init_ray

    init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's in-process runs: steady on a busy 2-CPU box, and the same
    count everywhere a result is compared exactly (float sums depend on it: a fork and its trunk too)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def sqlite_uri(tmp_path):
    """A fresh MLflow sqlite store in the test's temp dir."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _no_fault_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("PRELORA_FAULT_"):
            monkeypatch.delenv(key)


def pytest_configure(config) -> None:
    """The test S3 server's credentials in the environment from the start, so that every process Ray starts (its
    local cluster may start before the first S3 test) inherits them, as on a cluster whose nodes all have them."""
    from tests.servers import S3_ENV

    for key, value in S3_ENV.items():
        os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 API (moto in server mode) on 127.0.0.1 for the session; yields its HOST:PORT."""
    from tests.servers import moto_server

    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the session's S3 server; yields (endpoint, bucket name)."""
    from tests.servers import create_bucket

    return s3_endpoint, create_bucket(s3_endpoint)


@pytest.fixture(scope="session")
def mlflow_server_uri(tmp_path_factory):
    """A real `mlflow server` (sqlite backend, its own artifact serving) on 127.0.0.1 for the session.

    Yields its URI.
    """
    from tests.servers import mlflow_server

    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as uri:
        yield uri


@dataclass(frozen=True)
class TwoSweeps:
    """The session's two real CLI sweeps: where they ran and what they printed."""

    root: Path  # their working directory; "small" keeps its records in root/ray
    outputs: dict[str, str]  # console output by sweep name
    uri: str  # the MLflow tracking server both log to
    s3_endpoint: str  # the S3 server holding "other"'s records
    bucket: str


@pytest.fixture(scope="session")
def two_sweeps(tmp_path_factory, mlflow_server_uri, s3_endpoint):
    """Two real small sweeps, via the CLI, logged to one real MLflow tracking server, 3 trials + baseline each, their
    trials training in their Tune trial processes (trial_executor tune: no TorchTrainer start-ups), the same sampled
    configurations (random sampler, seed 1, deterministic): "small" with its records in a local folder, "other"
    (--verbose) with them in a bucket of the S3 server. A TorchTrainer per trial (trial_executor ray_train) is
    test_fork_sweep.py's `fork_sweep`."""
    from tests.servers import create_bucket, s3_uri
    from tests.sweeps import run_tune, sweep_space

    root = tmp_path_factory.mktemp("sweeps")
    bucket = create_bucket(s3_endpoint, "sweeps")
    outputs = {}
    for name in ("small", "other"):
        extra = {"trial_executor": "tune", "base": {"deterministic": True}}
        storage = s3_uri(s3_endpoint, bucket, "records") if name == "other" else None
        proc = run_tune(
            root,
            str(sweep_space(root, name, 3, seed=1, **extra)),
            *(["--verbose"] if name == "other" else []),
            tracking=mlflow_server_uri,
            storage=storage,
        )
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-3000:]
        outputs[name] = out
    return TwoSweeps(root=root, outputs=outputs, uri=mlflow_server_uri, s3_endpoint=s3_endpoint, bucket=bucket)
