"""The storage layer: one contract on a local folder and on a real S3 API (moto in server mode on 127.0.0.1),
what readers trust on each, and the one-line errors before Ray starts."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import pytest
import torch

from prelora_ray import fork, storage
from prelora_ray.checkpoint import CheckpointError, load_state_file
from prelora_ray.config import TrainSettings
from prelora_ray.storage import Location, location, resolve
from tests.servers import bucket_keys, free_port, s3_uri


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> Location:
    """The same tests on a local folder and on a fresh bucket of the S3 server."""
    if request.param == "local":
        return location(tmp_path / "store")
    endpoint, bucket = request.getfixturevalue("s3_bucket")
    return resolve(s3_uri(endpoint, bucket, "store"), "test")


def _raw_s3_put(loc: Location, data: bytes) -> None:
    """Write an object straight through the filesystem, without the layer's manifest.

    What a failed upload would leave.
    """
    with loc.fs.open_output_stream(loc.path) as f:
        f.write(data)


# -- the contract, on both backends ---------------------------------------------------------------------------


def test_small_files_round_trip_and_are_listed(root):
    f = root / "trunk" / "status.json"
    assert not f.exists() and f.mtime_ns() is None
    with pytest.raises(FileNotFoundError):
        f.read_json()
    f.write_json({"state": "running"})
    assert f.read_json() == {"state": "running"} and f.exists() and (root / "trunk").is_dir()
    first = f.mtime_ns()
    time.sleep(1.1)  # S3 keeps modification times to the second
    f.write_json({"state": "finished"})
    assert f.read_json() == {"state": "finished"} and f.mtime_ns() > first
    (root / "trunk" / "history.json").write_text("[]")
    assert [c.name for c in (root / "trunk").children()] == ["history.json", "status.json"]
    f.delete()
    assert not f.exists() and [c.name for c in (root / "trunk").children()] == ["history.json"]
    (root / "trunk").delete_tree()
    assert not (root / "trunk").exists() and (root / "trunk").children() == []


def test_large_files_are_trusted_only_when_whole(root, tmp_path):
    src = tmp_path / "state.pt"
    torch.save({"w": torch.arange(10.0)}, src)
    target = root / "checkpoints" / "epoch_00002.pt"
    assert not target.committed()
    target.put_file(src)
    assert target.committed() and torch.equal(load_state_file(target)["w"], torch.arange(10.0))
    assert [c.name for c in (root / "checkpoints").children()] == ["epoch_00002.pt"]  # no manifest or temp file listed
    if root.is_local:
        return
    # an object store: a truncated object (a failed upload that pyarrow completed on close) is not trusted
    _raw_s3_put(target, src.read_bytes()[:20])
    assert not target.committed()
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        load_state_file(target)
    # nor is a file with no manifest at all (written by something else, or still uploading)
    other = root / "checkpoints" / "epoch_00004.pt"
    _raw_s3_put(other, src.read_bytes())
    assert not other.committed()


def test_folders_are_seen_only_when_complete(root, tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "state.pt").write_bytes(b"x" * 1000)
    (src / "sub" / "worker_rank1.pt").write_bytes(b"y" * 10)
    target = root / "run" / "checkpoint_000003"
    assert not target.folder_complete()
    target.put_folder(src)
    assert target.folder_complete()
    with target.fetched_folder() as local:
        assert (local / "state.pt").read_bytes() == b"x" * 1000 and (
            local / "sub" / "worker_rank1.pt"
        ).read_bytes() == b"y" * 10
    assert [c.name for c in (root / "run").children()] == ["checkpoint_000003"]
    if root.is_local:  # a writer killed mid-copy leaves only a hidden .partial- folder
        (root.local / "run" / ".partial-checkpoint_000004").mkdir()
        assert [c.name for c in (root / "run").children()] == ["checkpoint_000003"]
        return
    half = root / "run" / "checkpoint_000004"
    _raw_s3_put(half / "state.pt", b"x" * 1000)  # its files, but no MANIFEST.json yet
    assert not half.folder_complete()
    (half / storage.FOLDER_MANIFEST).write_json({"files": {"state.pt": 1000, "sub/worker_rank1.pt": 10}})
    assert not half.folder_complete()  # the manifest names a file that is not there


def test_a_claim_is_won_once(root):
    key = root / "results" / "k.json"
    assert key.create_exclusive(b'{"owner": "a"}')
    assert not key.create_exclusive(b'{"owner": "b"}')
    assert key.read_json() == {"owner": "a"}


def test_the_trunks_records_and_plans_are_the_same_on_both_backends(root, tmp_path):
    """A trunk written through TrunkWriter, read back by plan_fork and a trial's checkpoint load, on either backend."""
    history = [
        {
            "epoch": e,
            "train_loss": 2.0 - 0.1 * e,
            "val_acc": 0.5,
            "epoch_time_s": 1.0,
            **{
                f"layer_norm/{fam}/{i}": 10.0 + e * (0.5 - 0.1 * e) + i
                for fam in ("query", "key", "value", "attn_out", "mlp_in", "mlp_out")
                for i in range(2)
            },
        }
        for e in range(6)
    ]
    writer = fork.TrunkWriter(root / "trunk", every=2)
    writer.start(0, lambda: {"epoch": torch.tensor(0)})
    for e, record in enumerate(history):
        writer.after_epoch(e, record, lambda e=e: {"epoch": torch.tensor(e + 1)})
    assert fork.read_history(root / "trunk") == history
    assert fork.checkpoint_epochs(root / "trunk") == [0, 2, 4, 6]
    cfg = TrainSettings.load(
        None,
        [
            "epochs=6",
            "prelora.k=2",
            "prelora.m=1",
            "prelora.tau=50",
            "prelora.zeta=50",
            "prelora.warmup=0",
            "model.preset=vit-digits",
        ],
    )
    plan = fork.plan_fork(cfg, root / "trunk")
    assert plan is not None and plan.mode == "fork" and plan.fork_epoch <= plan.switch.epoch + 1
    assert location(plan.checkpoint) == fork.checkpoint_path(root / "trunk", plan.fork_epoch)
    assert int(load_state_file(location(plan.checkpoint))["epoch"]) == plan.fork_epoch
    fork.write_status(root / "trunk", "finished", run_id="r")
    assert fork.read_status(root / "trunk") == {"state": "finished", "run_id": "r"}
    registry = fork.ResultRegistry(root / "trunk" / "results")
    assert registry.claim("k", "a") is None and registry.claim("k", "b")["owner"] == "a"
    registry.finish("k", "a", run_id="x")
    assert registry.claim("k", "b")["state"] == "finished"


# -- naming, pickling and the pre-flight check ------------------------------------------------------------------


def test_a_uri_keeps_its_options_in_every_child_and_pickles_as_plain_data():
    loc = location("s3://bucket/sweeps?endpoint_override=127.0.0.1:9&scheme=http")
    child = loc / "q" / "trunk" / "history.json"
    assert child.uri == "s3://bucket/sweeps/q/trunk/history.json?endpoint_override=127.0.0.1:9&scheme=http"
    assert location(child.uri) == child and child.parent.parent == loc / "q" and child.bucket == "bucket"
    assert pickle.loads(pickle.dumps(child)) == child and "fs" not in child.__dict__
    assert location("gcs://b/x").uri == "gs://b/x"
    assert location("file:///tmp/x/../y") == location("/tmp/y") and location("rel").uri == str(Path.cwd() / "rel")
    with pytest.raises(ValueError, match="invalid path component"):
        _ = loc / "../escape"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("ftp://host/x", r"unsupported scheme 'ftp'; use a local path, file://PATH, s3://"),
        ("hdfs://nn/x", "unsupported scheme 'hdfs'"),
        ("s3:///no-bucket", "no bucket"),
        (
            "s3://b/x?endpoint_override=127.0.0.1:1&scheme=http&colour=blue",
            "Unexpected query parameter in S3 URI: 'colour'",
        ),
    ],
)
def test_bad_storage_uris_are_one_line_naming_the_key(value, message):
    with pytest.raises(ValueError, match=message) as err:
        resolve(value, "cluster.storage_path")
    assert str(err.value).startswith(("cluster.storage_path=", "cluster.storage_path=")) and "\n" not in str(err.value)


def test_a_missing_bucket_an_unreachable_store_and_missing_credentials_are_one_line(s3_endpoint, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="bucket 'nobucket' does not exist") as err:
        resolve(s3_uri(s3_endpoint, "nobucket", "x"), "--storage")
    assert str(err.value).startswith("--storage='s3://nobucket/x?") and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not reachable"):
        resolve(s3_uri(f"127.0.0.1:{free_port()}", "b", "x"), "--storage")
    for key in storage.AWS_CREDENTIAL_ENV + ("AWS_SECRET_ACCESS_KEY",):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws either
    with pytest.raises(ValueError, match="no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        resolve(s3_uri(s3_endpoint, "b", "x"), "--storage")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "only-the-id")
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY is not"):
        resolve(s3_uri(s3_endpoint, "b", "x"), "--storage")


def test_a_gcs_store_that_cannot_be_reached_is_a_bounded_one_line_error(monkeypatch):
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    started = time.monotonic()
    with pytest.raises(ValueError) as err:
        resolve(
            f"gs://bucket/x?endpoint_override=127.0.0.1:{free_port()}&scheme=http&retry_limit_seconds=1",
            "cluster.storage_path",
        )
    assert str(err.value).startswith("cluster.storage_path='gs://bucket/x?") and "\n" not in str(err.value)
    assert time.monotonic() - started < 60


def test_data_root_on_object_storage_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"data.root='s3://b/imagenet' is invalid: .*mount the bucket"):
        TrainSettings.load(None, ["data.name=imagefolder", "data.root=s3://b/imagenet"])


def test_the_cli_refuses_a_bad_storage_before_ray_starts(tmp_path, capsys):
    from prelora_ray.cli import main

    space = tmp_path / "s.yaml"
    space.write_text(json.dumps({"name": "s", "parameters": {"prelora.tau": {"type": "uniform", "low": 1, "high": 2}}}))
    rc = main(["tune", str(space), "--storage", "ftp://h/x", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err.strip()
    assert (
        rc == 2
        and err.startswith("prelora-ray tune: error: --storage='ftp://h/x' is invalid: unsupported scheme")
        and "\n" not in err
    )
    assert not (tmp_path / "m.db").exists()  # refused before MLflow, Optuna or Ray
    rc = main(["train", "--set", "cluster.storage_path=ftp://h/x", "--no-tracking"])
    assert rc == 2 and "cluster.storage_path='ftp://h/x' is invalid" in capsys.readouterr().err


def test_ray_gets_the_same_filesystem(s3_bucket):
    endpoint, bucket = s3_bucket
    loc = resolve(s3_uri(endpoint, bucket, "sweeps"), "x")
    path, fs = loc.ray_storage()
    assert path == f"{bucket}/sweeps" and fs is loc.fs and type(fs).__name__ == "S3FileSystem"
    (loc / "a.json").write_json([1])
    assert "sweeps/a.json" in bucket_keys(endpoint, bucket)
    assert location("/tmp/x").ray_storage() == ("/tmp/x", None)


# -- where the Optuna study lives ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("journal:study.journal", "journal:{cwd}/study.journal"),
        ("journal:///shared/s.journal", "journal:/shared/s.journal"),
        ("sqlite:///rel/optuna.db", "sqlite:///{cwd}/rel/optuna.db"),
        ("sqlite:////abs/optuna.db", "sqlite:////abs/optuna.db"),
        ("postgresql+psycopg2://u:p@db:5432/optuna", "postgresql+psycopg2://u:p@db:5432/optuna"),
    ],
)
def test_optuna_storage_urls_are_made_absolute(url, expected, tmp_path, monkeypatch):
    from prelora_ray.search_space import check_optuna_storage

    monkeypatch.chdir(tmp_path)
    assert check_optuna_storage(url, "optuna_storage") == expected.format(cwd=tmp_path.resolve())


@pytest.mark.parametrize("url", ["redis://h/0", "optuna.db", "sqlite:///:memory:", "journal:", "", 3])
def test_bad_optuna_storage_is_one_line_naming_the_key(url):
    from prelora_ray.search_space import check_optuna_storage

    with pytest.raises(ValueError, match=r"^--optuna-storage=") as err:
        check_optuna_storage(url, "--optuna-storage")
    assert "\n" not in str(err.value)


def test_the_studys_default_place_follows_the_stores(tmp_path, caplog, s3_bucket, mlflow_server_uri, monkeypatch):
    """Beside a sqlite MLflow store; else in a local storage path; else (a bucket and a server) in the working
    directory, with a warning that names the setting; a given URL always wins, and an unreachable one fails before Ray
    starts."""
    from prelora_ray.orchestration.sweep import make_sweep
    from prelora_ray.search_space import parse_search_space

    monkeypatch.chdir(tmp_path)
    space = parse_search_space({"name": "s", "parameters": {"prelora.tau": {"type": "uniform", "low": 1, "high": 2}}})
    bucket = s3_uri(*s3_bucket, "sweeps")
    by_sqlite = make_sweep(
        space, name="s", tracking_uri=f"sqlite:///{tmp_path / 'm' / 'mlflow.db'}", storage_path=bucket
    )
    assert by_sqlite.optuna_url == f"sqlite:///{tmp_path / 'm' / 'optuna.db'}"
    local = make_sweep(space, name="s", tracking_uri=mlflow_server_uri, storage_path=str(tmp_path / "ray"))
    assert local.optuna_url == f"sqlite:///{tmp_path / 'ray' / 'optuna.db'}"
    assert "optuna_storage" not in caplog.text
    remote = make_sweep(space, name="s", tracking_uri=mlflow_server_uri, storage_path=bucket)
    assert remote.optuna_url == f"sqlite:///{tmp_path / 'optuna.db'}" and "set optuna_storage" in caplog.text
    given = make_sweep(
        space, name="s", tracking_uri=mlflow_server_uri, storage_path=bucket, optuna_storage="journal:j/s.journal"
    )
    assert given.optuna_url == f"journal:{tmp_path / 'j' / 's.journal'}" and (tmp_path / "j").is_dir()
    with pytest.raises(
        ValueError, match=r"^--optuna-storage='postgresql://u:\*\*\*@127.0.0.1:1/x': cannot open the Optuna storage"
    ):
        make_sweep(
            space,
            name="s",
            tracking_uri=mlflow_server_uri,
            storage_path=bucket,
            optuna_storage="postgresql://u:secret@127.0.0.1:1/x",
        )


def test_a_trunks_task_checkpoints_keep_the_newest_and_fall_back_past_a_bad_one(root):
    """FolderRuntime (a sweep's trunk under trial_executor tune) on either backend: the newest `keep` checkpoint folders
    stay; an unreadable newest one is reported and the one before it resumes the run."""
    from prelora_ray.orchestration.worker import CHECKPOINT_FILE, FolderRuntime

    runtime = FolderRuntime(root / "run", keep=2)
    for epoch in range(3):
        runtime.report({"epoch": epoch}, {"epoch": torch.tensor(epoch)})
    assert [c.name for c in (root / "run").children()] == ["checkpoint_000001", "checkpoint_000002"]
    assert int(runtime.latest_checkpoint()["epoch"]) == 2
    newest = root / "run" / "checkpoint_000002" / CHECKPOINT_FILE
    if root.is_local:
        newest.local.write_bytes(b"not a checkpoint")  # same size or not: the bytes are refused when read
    else:
        _raw_s3_put(newest, b"truncated")  # a half-done upload: its folder's manifest names another size
    assert int(runtime.latest_checkpoint()["epoch"]) == 1


def test_the_study_caps_a_sweeps_trials_across_drivers(tmp_path):
    """The searcher stops suggesting once the study holds max_trials live or finished trials of its sweep, whatever its
    own (restored) count says; failed or lost trials and other sweeps' trials in the same storage do not count."""
    import optuna
    from ray.tune.search import Searcher

    from prelora_ray.orchestration.optuna_search import SWEEP_ATTR, TUNE_TRIAL_ATTR, TaggedOptunaSearch, open_storage
    from prelora_ray.orchestration.study import DefineByRun
    from prelora_ray.search_space import parse_search_space

    url = f"journal:{tmp_path / 's.journal'}"
    space = parse_search_space({"name": "s", "parameters": {"prelora.tau": {"type": "uniform", "low": 1, "high": 2}}})
    optuna.create_study(
        study_name="s", storage=open_storage(url), directions=["maximize", "minimize"]
    ).ask()  # an earlier sweep's

    def searcher() -> TaggedOptunaSearch:
        return TaggedOptunaSearch(
            space=DefineByRun(space.parameters),
            metric=["final_val_acc", "mean_epoch_time_s"],
            mode=["max", "min"],
            study_name="s",
            storage=open_storage(url),
            max_trials=2,
        )

    first = searcher()
    assert first.suggest("a") is not None and first.suggest("b") is not None
    assert first.suggest("c") == Searcher.FINISHED  # two of this sweep live: no third
    first.on_trial_complete("a", {"final_val_acc": 0.9, "mean_epoch_time_s": 1.0})
    study = optuna.load_study(study_name="s", storage=open_storage(url))
    mine = [t for t in study.trials if t.user_attrs.get(SWEEP_ATTR) == first.sweep_instance]
    assert sorted(t.user_attrs[TUNE_TRIAL_ATTR] for t in mine) == ["a", "b"]
    b = next(t for t in mine if t.user_attrs[TUNE_TRIAL_ATTR] == "b")
    open_storage(url).set_trial_state_values(b._trial_id, optuna.trial.TrialState.FAIL)  # b lost with its driver
    assert first.suggest("d") is not None  # one finished, none live: one more
    assert searcher().suggest("e") is not None  # a new sweep of the same name counts its own trials only
