"""MLflow: the only module that imports mlflow (lazily), holds an MlflowClient or writes a search filter.

The driver creates (or, on resume, finds) the run and logs params, tags and artifacts; rank 0 of
the workers logs per-epoch metrics through `MlflowSink`, which keeps metrics it could not send
and sends them with the next batch, so an MLflow outage mid-run loses nothing. Everyone else asks
in plain terms (`runs(..., parent=..., role=..., status=...)`, `set_tags`, `download_text`);
tests/test_tracking_facade.py fails when a filter string or a client appears elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

from prelora_ray.metrics import ROLE_TAG
from prelora_ray.metrics import RUN_NAME_TAG as RUN_KEY_TAG  # how a resumed run finds its MLflow run

try:
    import fcntl
except ImportError:  # not POSIX: a new sqlite store is opened without a lock
    fcntl = None

log = logging.getLogger("prelora_ray")


def resolve_uri(uri: str | None) -> str:
    """The tracking URI: given, or an absolute sqlite file in the working directory.

    Absolute because Ray Tune trials and Train workers run in other working directories.
    """
    if uri:
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
        return uri
    return "sqlite:///" + str((Path.cwd() / "mlflow.db").resolve())


def artifact_location(uri: str) -> str | None:
    """For a sqlite store, artifacts go beside the database file (not into whatever the working
    directory of a Tune trial or Train worker happens to be); servers choose their own."""
    db = sqlite_path(uri)
    return (db.parent / "mlruns").as_uri() if db is not None else None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// store; None for any other store."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def _client(uri: str):
    """An MlflowClient for the URI (import deferred: a run without tracking never imports mlflow)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _search(uri: str, experiment_ids: list[str], filter_string: str = "") -> pd.DataFrame:
    """mlflow.search_runs into pandas for a store (sets the tracking URI, never an experiment)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_ids, filter_string=filter_string, output_format="pandas", max_results=50000)


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, created if needed; a clear error when the store cannot be reached.

    Uses MlflowClient, never mlflow.set_experiment (which sets MLFLOW_EXPERIMENT_ID in the
    environment and sends Ray's integration runs to the wrong experiment).
    """
    try:
        with _fail_fast(), _sqlite_init_lock(uri):
            c = _client(uri)
            exp = c.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            return c.create_experiment(name, artifact_location=artifact_location(uri))
    except Exception as exc:  # any backend failure: unreachable server, bad path, locked db
        if "already exists" in str(exc):
            return _client(uri).get_experiment_by_name(name).experiment_id
        raise ValueError(
            f"tracking.uri={uri!r}: MLflow store not reachable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None


@contextlib.contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock file beside a sqlite store while it is opened for the first time.

    MLflow creates and migrates the tables of a new sqlite store when a process first opens it;
    two sweeps launched at once on a new store both do it, and one fails ("duplicate column
    name"). Other stores (servers, databases) and systems without fcntl go unlocked.
    """
    db, handle = sqlite_path(uri), None
    if db is not None and fcntl is not None:
        with contextlib.suppress(OSError):  # no such directory: MLflow's own error says it better
            handle = open(db.with_name(db.name + ".lock"), "a")  # noqa: SIM115
    if handle is None:
        yield
        return
    with handle:  # closing the file releases the lock
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _fail_fast() -> Iterator[None]:
    """No retries and a short timeout for the pre-flight check (MLflow's own retries take minutes)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _quote(value: str) -> str:
    """A value inside a filter string's single quotes (names and ids here never hold a quote: refuse one)."""
    if "'" in str(value):
        raise ValueError(f"{value!r}: a quote cannot be searched for in MLflow")
    return f"'{value}'"


def _filter(*, parent: str | None = None, status: str | None = None, tags: dict[str, str] | None = None) -> str:
    """The one place filter strings are written: parent run, run status, exact tag values."""
    parts = [f"tags.mlflow.parentRunId = {_quote(parent)}"] if parent else []
    if status:
        parts.append(f"attributes.status = {_quote(status)}")
    parts += [f"tags.`{key}` = {_quote(value)}" for key, value in (tags or {}).items()]
    return " and ".join(parts)


def runs(
    uri: str,
    experiment_id: str,
    *,
    parent: str | None = None,
    role: str | None = None,
    status: str | None = None,
    tags: dict[str, str] | None = None,
    top_level: bool = False,
) -> pd.DataFrame:
    """The experiment's runs as a DataFrame (mlflow.search_runs' columns), narrowed to a parent run, a role
    (`metrics.ROLE_TAG`), a status (RUNNING, FINISHED, FAILED, KILLED) and exact tag values; `top_level`: only runs
    without a parent or role (standalone `prelora-ray train` runs)."""
    all_tags = {**({ROLE_TAG: role} if role else {}), **(tags or {})}
    found = _search(uri, [experiment_id], _filter(parent=parent, status=status, tags=all_tags))
    if top_level:
        for column in ("tags.mlflow.parentRunId", f"tags.{ROLE_TAG}"):
            if column in found:
                found = found[found[column].isna()]
        found = found.reset_index(drop=True)
    return found


def experiment_id(uri: str, name: str) -> str | None:
    """The id of the experiment with this name, or None."""
    exp = _client(uri).get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else None


def find_run(uri: str, experiment_id: str, run_name: str, *, status: str | None = None) -> str | None:
    """The id of the newest run tagged with this run name (for resume), or None."""
    flt = _filter(status=status, tags={RUN_KEY_TAG: run_name})
    found = _client(uri).search_runs(
        [experiment_id], filter_string=flt, order_by=["attributes.start_time DESC"], max_results=1
    )
    return found[0].info.run_id if found else None


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    """Set tags on a run (values as strings)."""
    c = _client(uri)
    for key, value in tags.items():
        c.set_tag(run_id, key, str(value))


def run_tags(uri: str, run_id: str) -> dict[str, str]:
    """A run's tags."""
    return dict(_client(uri).get_run(run_id).data.tags)


def run_params(uri: str, run_id: str) -> dict[str, str]:
    """A run's params (strings, as MLflow stores them)."""
    return dict(_client(uri).get_run(run_id).data.params)


def run_metrics(uri: str, run_id: str) -> dict[str, float]:
    """A run's latest value of every metric."""
    return dict(_client(uri).get_run(run_id).data.metrics)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, int, float]]:
    """(step, timestamp, value) of every logged value of a metric."""
    return [(m.step, m.timestamp, m.value) for m in _client(uri).get_metric_history(run_id, key)]


def download_text(uri: str, run_id: str, path: str) -> str:
    """A text artifact of a run (JSON, YAML, CSV)."""
    with tempfile.TemporaryDirectory(prefix="prelora-") as tmp:
        return Path(_client(uri).download_artifacts(run_id, path, tmp)).read_text()


def download_artifact(uri: str, run_id: str, path: str, folder: str | Path) -> Path:
    """An artifact of a run, downloaded into `folder`; returns its local path."""
    return Path(_client(uri).download_artifacts(run_id, path, str(folder)))


def start_run(
    uri: str,
    experiment_id: str,
    run_name: str,
    *,
    params: dict[str, Any],
    tags: dict[str, str],
    parent_run_id: str | None = None,
) -> str:
    """Create a run (or reopen the one with this name) and log params and tags; returns its id."""
    c = _client(uri)
    run_id = find_run(uri, experiment_id, run_name)
    all_tags = {RUN_KEY_TAG: run_name, **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if run_id is None:
        run_id = c.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
        log_params(uri, run_id, params)
    else:
        c.update_run(run_id, status="RUNNING")
        for k, v in all_tags.items():
            c.set_tag(run_id, k, v)
    return run_id


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log params in batches (MLflow caps a batch at 100)."""
    from mlflow.entities import Param

    items = [Param(k, json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in params.items()]
    c = _client(uri)
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log numeric metrics at one step (non-numbers skipped)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    c = _client(uri)
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i : i + 1000])


def log_history(uri: str, run_id: str, history: list[dict[str, Any]]) -> None:
    """Per-epoch records (numbers only, at step = their epoch): a forked trial's copy of the trunk's curves."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, int(record["epoch"]))
        for record in history
        for k, v in record.items()
        if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    c = _client(uri)
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i : i + 1000])


def copy_metrics(uri: str, source_run_id: str, run_id: str) -> None:
    """Every metric's whole history from one run to another (a reused trial shows its twin's curves)."""
    from mlflow.entities import Metric

    c = _client(uri)
    items = [
        Metric(key, m.value, m.timestamp, m.step)
        for key in c.get_run(source_run_id).data.metrics
        for m in c.get_metric_history(source_run_id, key)
    ]
    for i in range(0, len(items), 1000):
        c.log_batch(run_id, metrics=items[i : i + 1000])


def last_step(uri: str, run_id: str, key: str) -> int | None:
    """The highest step logged for a metric of the run (None: none, or the store cannot say)."""
    try:
        with _fail_fast():
            steps = [m.step for m in _client(uri).get_metric_history(run_id, key)]
    except Exception:  # the store is down: log everything, a duplicate beats a gap
        return None
    return max(steps) if steps else None


def log_text(uri: str, run_id: str, text: str, name: str) -> None:
    """A text artifact (JSON, YAML, CSV) at the run's artifact root."""
    _client(uri).log_text(run_id, text, name)


def log_file(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """A file artifact (under `artifact_path` if given)."""
    _client(uri).log_artifact(run_id, str(path), artifact_path)


def end_run(uri: str, run_id: str, status: str = "FINISHED", error: str | None = None) -> None:
    """Mark the run FINISHED / FAILED / KILLED (with the error as a tag)."""
    c = _client(uri)
    if error:
        c.set_tag(run_id, "error", error[:5000])
    c.set_terminated(run_id, status=status)


class MlflowSink:
    """Per-epoch metrics to one MLflow run; metrics that fail to send are kept and retried.

    `pending` holds what could not be sent yet; `flush()` at the end of a run tries once more and
    returns what is still pending (the driver reports it, nothing is silently dropped).
    """

    def __init__(self, uri: str, run_id: str, *, logged_through: int | None = None) -> None:
        self.uri, self.run_id = uri, run_id
        self.pending: list[tuple[dict[str, float], int]] = []
        self._warned = False
        self.logged_through = logged_through

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue and try to send; a step the run already holds (an epoch re-run after a restart) is not sent twice."""
        if self.logged_through is not None and step <= self.logged_through:
            return
        self.pending.append((metrics, step))
        self.flush()

    def flush(self) -> list[tuple[dict[str, float], int]]:
        """Send everything pending; keep it on failure."""
        while self.pending:
            metrics, step = self.pending[0]
            try:
                with _fail_fast():  # an outage must not stall training for MLflow's minutes of retries
                    log_metrics(self.uri, self.run_id, metrics, step)
            except Exception as exc:  # store down: keep the metrics for the next try
                if not self._warned:
                    log.warning("MLflow unreachable (%s); keeping metrics locally and retrying", type(exc).__name__)
                    self._warned = True
                break
            self.pending.pop(0)
            self._warned = False
        return self.pending

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        """A JSON artifact (failures are logged, not raised: training goes on)."""
        try:
            log_text(self.uri, self.run_id, json.dumps(data, indent=2), name)
        except Exception as exc:
            log.warning("could not log %s to MLflow: %s", name, exc)


def write_temp(text: str, name: str) -> Path:
    """Write text to a fresh temporary folder under its name (for log_file)."""
    path = Path(tempfile.mkdtemp(prefix="prelora-")) / name
    path.write_text(text)
    return path
