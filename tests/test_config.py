"""Typed config: YAML + --set, unknown keys with the nearest name, every bad value named."""

from __future__ import annotations

import pytest
import yaml

from prelora_ray.config import TrainSettings, field_docs, valid_keys
from prelora_ray.data import check_data
from prelora_ray.config import DataSettings


def test_defaults_and_yaml_plus_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"epochs": 12, "prelora": {"tau": 0.25, "modules": ["query", "value"]}}))
    cfg = TrainSettings.load(path, ["prelora.tau=0.5", "optim.lr=3e-4", "data.batch_size=32"])
    assert cfg.epochs == 12 and cfg.prelora.tau == 0.5 and cfg.prelora.modules == ("query", "value")
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.data.batch_size == 32
    assert TrainSettings().data.name == "digits"


def test_round_trip_and_flat():
    cfg = TrainSettings.load(None, ["prelora.r_min=4", "cluster.num_workers=2"])
    assert TrainSettings.from_dict(cfg.to_dict()) == cfg
    flat = cfg.flat()
    assert flat["prelora.r_min"] == 4 and flat["cluster.num_workers"] == 2
    assert set(flat) == set(valid_keys())
    assert all(doc for _, _, _, doc in field_docs())


@pytest.mark.parametrize(
    "override, name",
    [
        ("prelora.tua=1", "prelora.tau"),
        ("epoch=3", "epochs"),
        ("prelora.rmin=4", "prelora.r_min"),
    ],
)
def test_unknown_key_suggests_nearest(override, name):
    with pytest.raises(ValueError, match=f"did you mean '{name}'"):
        TrainSettings.load(None, [override])


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prelora:\n  zetta: 1\n")
    with pytest.raises(ValueError, match="prelora.zetta.*prelora.zeta") as err:
        TrainSettings.load(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "override, field",
    [
        ("prelora.tau=0", "prelora.tau"),
        ("prelora.zeta=-1", "prelora.zeta"),
        ("prelora.k=1", "prelora.k"),
        ("prelora.m=0", "prelora.m"),
        ("prelora.warmup=-1", "prelora.warmup"),
        ("prelora.r_min=3", "prelora.r_min"),
        ("prelora.r_min=32", "prelora.r_min"),
        ("prelora.modules=[foo]", "prelora.modules"),
        ("prelora.window_unit=batch", "prelora.window_unit"),
        ("cluster.num_workers=0", "cluster.num_workers"),
        ("data.name=imagenet", "data.name"),
        ("epochs=abc", "epochs"),
        ("optim.lr=fast", "optim.lr"),
        ("model.preset=vit-giant", "model.preset"),
        ("prelora.trainable_after_freeze=[everything]", "prelora.trainable_after_freeze"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ValueError) as err:
        TrainSettings.load(None, [override])
    assert field in str(err.value) and "\n" not in str(err.value)


def test_missing_and_empty_dataset_paths(tmp_path):
    with pytest.raises(ValueError, match="data.root"):
        check_data(DataSettings(name="imagefolder", root=str(tmp_path / "nope")))
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="data.root.*no images"):
        check_data(DataSettings(name="imagefolder", root=str(tmp_path)))
    with pytest.raises(ValueError, match="data.root"):
        DataSettings(name="cifar10")
