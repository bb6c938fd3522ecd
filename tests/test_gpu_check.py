"""benchmarks/gpu_check.py's CPU form end to end, and data.loader_workers' auto value and validation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prelora_ray.config import DataSettings, TrainSettings
from prelora_ray.data import build_datasets, make_train_loader, resolve_loader_workers

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_loader_workers_auto_follows_the_device_and_the_cpus():
    auto = DataSettings(name="synthetic")
    assert auto.loader_workers is None  # the default is auto
    assert resolve_loader_workers(auto, "cpu", cpus=64) == 0  # CPU: workers would take the training threads' cores
    assert resolve_loader_workers(auto, "cuda", cpus=16) == 8  # capped at 8
    assert resolve_loader_workers(auto, "cuda", cpus=4) == 3  # one core left to drive the GPU
    assert resolve_loader_workers(auto, "cuda", cpus=1) == 1
    assert resolve_loader_workers(DataSettings(name="digits"), "cuda", cpus=16) == 0  # 8x8 images: no workers
    explicit = DataSettings(name="synthetic", loader_workers=2)
    assert resolve_loader_workers(explicit, "cpu") == resolve_loader_workers(explicit, "cuda", cpus=16) == 2
    assert resolve_loader_workers(DataSettings(loader_workers=0), "cuda", cpus=16) == 0


def test_the_train_loader_uses_the_resolved_workers():
    settings = DataSettings(name="synthetic", image_size=8, synthetic_samples=16, batch_size=4)
    loader, sampler = make_train_loader(build_datasets(settings).train, settings, "cpu", seed=3)
    assert loader.num_workers == 0 and not loader.pin_memory and sampler.seed == 3
    assert next(iter(loader))[0].shape == (4, 3, 8, 8)


@pytest.mark.parametrize("value", [-1, 1.5, "auto", True])
def test_loader_workers_must_be_null_or_an_integer(value):
    with pytest.raises(ValueError, match="data.loader_workers") as err:
        TrainSettings.from_dict({"data": {"loader_workers": value}})
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="data.loader_workers"):
        DataSettings(loader_workers=value)


def test_loader_workers_null_and_integers_load():
    assert TrainSettings.load(None, ["data.loader_workers=null"]).data.loader_workers is None
    assert TrainSettings.load(None, ["data.loader_workers=4"]).data.loader_workers == 4


@pytest.mark.slow
def test_gpu_check_cpu_form_runs_and_writes_a_sane_json(tmp_path):
    out = tmp_path / "g.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == [] and data["wall_time_s"] > 0
    assert {"date", "machine", "device", "args"} <= set(data)
    assert data["device"]["type"] in ("cpu", "cuda") and data["device"]["torch"]
    assert data["args"]["tiny"] is True
    assert set(data["steps"]) == set(data["args"]["presets"]) and len(data["steps"]) == 2
    for model in data["steps"].values():
        assert model["batch"] >= 1
        assert set(model["phases"]) == {"full", "lora", "lora_prefix"}
        for row in model["phases"].values():
            assert row["s_per_step"] > 0 and row["img_s"] > 0 and row["batch"] == model["batch"]
            assert (row["peak_mib"] is None) == (data["device"]["type"] == "cpu")
        assert model["phases"]["full"]["ratio_to_full"] == 1.0
    assert set(data["loader"]) == {"synthetic", "imagefolder"}
    for loader in data["loader"].values():
        assert loader["img_s"] > 0 and loader["images"] > 0 and loader["workers"] >= 0
    for preset in data["steps"]:
        assert {name: row["ratio"] > 0 for name, row in data["loader_keeps_up"][preset].items()} == {
            "synthetic": True,
            "imagefolder": True,
        }
    sweep = data["sweep"]
    assert sweep["rc"] == 0 and sweep["trials_finished"] == 2 and sweep["wall_s"] > 0
    assert sweep["front"] and "final_val_acc" in sweep["front"][0]  # the front's header line
    assert sweep["epochs_trained_total"] <= sweep["epochs_naive_total"]  # fork mode trained no more than naive would
    assert "written" in proc.stdout and len(proc.stdout.splitlines()) < 20  # a compact table
