"""Typed config: defaults, YAML + --set overrides, unknown keys with the nearest valid name, every bad
value rejected with a one-line ValueError naming the field, data paths checked before any work."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from prelora_ray.config import (
    ClusterSettings,
    DataSettings,
    ModelSettings,
    OptimSettings,
    TrackingSettings,
    TrainSettings,
    field_docs,
    parse_override,
    valid_keys,
)
from prelora_ray.data import check_data
from prelora_ray.strategies.prelora import PreLoRASettings


def write_yaml(tmp_path, data, name: str = "config.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# -- defaults --------------------------------------------------------------------------------------


def test_defaults_construct_and_validate():
    cfg = TrainSettings()
    assert cfg.strategy == "prelora" and cfg.epochs >= 1
    assert cfg.data.name == "digits" and cfg.model.preset == "vit-digits-wide"
    p = cfg.prelora
    assert p.k >= 2 and p.m >= 1 and p.tau > 0 and p.zeta > 0 and p.warmup >= 0
    assert p.r_min <= p.r_max and p.alpha_scale == 2.0  # lora_alpha = 2 * rank, the paper's scale
    assert p.modules == ("query", "key", "value", "attn_out", "mlp_in", "mlp_out")
    assert p.trainable_after_freeze == ()  # the paper freezes everything but LoRA
    assert p.window_unit == "epoch" and p.window_stat == "mean"
    for cls in (ModelSettings, DataSettings, OptimSettings, PreLoRASettings, ClusterSettings, TrackingSettings):
        assert cls() == cls()  # every section constructs on its own
    assert TrainSettings.load(None) == cfg == TrainSettings.load(None, [])


def test_every_field_has_a_doc_and_a_dotted_key():
    rows = field_docs()
    assert rows and all(doc for _, _, _, doc in rows)
    keys = valid_keys()
    assert len(keys) == len(set(keys))
    assert {
        "epochs",
        "prelora.tau",
        "prelora.zeta",
        "prelora.k",
        "prelora.m",
        "prelora.warmup",
        "prelora.r_min",
        "prelora.r_max",
    } <= set(keys)


# -- YAML + overrides ------------------------------------------------------------------------------


def test_yaml_file_then_set_overrides(tmp_path):
    path = write_yaml(
        tmp_path,
        {
            "epochs": 12,
            "seed": 3,
            "prelora": {"tau": 0.25, "zeta": 1.0, "modules": ["query", "value"]},
            "optim": {"lr": 0.01},
        },
    )
    cfg = TrainSettings.load(path, ["prelora.tau=0.5", "optim.lr=3e-4", "data.batch_size=32", "prelora.k=4"])
    assert cfg.epochs == 12 and cfg.seed == 3  # from the file
    assert cfg.prelora.tau == 0.5  # the override wins over the file
    assert cfg.prelora.zeta == 1.0 and cfg.prelora.modules == ("query", "value")  # file values kept
    assert cfg.optim.lr == pytest.approx(3e-4)  # 3e-4 without a dot is a YAML string: still a float
    assert cfg.data.batch_size == 32 and cfg.prelora.k == 4
    assert cfg.prelora.m == PreLoRASettings().m  # untouched: the default


def test_overrides_apply_in_order_and_parse_yaml_values():
    cfg = TrainSettings.load(
        None,
        [
            "prelora.tau=2",
            "prelora.tau=0.5",  # the later one wins
            "prelora.modules=[query, mlp_in]",
            "prelora.trainable_after_freeze=head,norms",  # comma list
            "optim.grad_clip=null",
            "tracking.enabled=false",
            "prelora.zero_rank_below=0.1",
            "name=my-run",
        ],
    )
    assert cfg.prelora.tau == 0.5
    assert cfg.prelora.modules == ("query", "mlp_in")
    assert cfg.prelora.trainable_after_freeze == ("head", "norms")
    assert cfg.optim.grad_clip is None and cfg.tracking.enabled is False
    assert cfg.prelora.zero_rank_below == 0.1 and cfg.name == "my-run"


def test_empty_and_null_sections_in_yaml(tmp_path):
    assert TrainSettings.load(write_yaml(tmp_path, {}, "empty.yaml")) == TrainSettings()
    path = tmp_path / "null.yaml"
    path.write_text("prelora:\nepochs: 5\n")  # an empty section is null in YAML
    cfg = TrainSettings.load(path, ["prelora.tau=0.5"])
    assert cfg.epochs == 5 and cfg.prelora.tau == 0.5


@pytest.mark.parametrize(
    "item, expected",
    [("prelora.tau=0.5", ("prelora.tau", 0.5)), ("epochs=3", ("epochs", 3)), ("name=", ("name", None))],
)
def test_parse_override(item, expected):
    assert parse_override(item) == expected


def test_override_without_equals_sign():
    with pytest.raises(ValueError, match="key=value"):
        TrainSettings.load(None, ["prelora.tau"])


def test_missing_or_bad_yaml_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        TrainSettings.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        TrainSettings.load(bad)


# -- unknown keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, unknown, nearest",
    [
        ("prelora.tua=1", "prelora.tua", "prelora.tau"),
        ("epoch=3", "epoch", "epochs"),
        ("prelora.zetta=1", "prelora.zetta", "prelora.zeta"),
        ("prelora.rmin=4", "prelora.rmin", "prelora.r_min"),
        ("prelora.warmpu=2", "prelora.warmpu", "prelora.warmup"),
        ("optim.weight_decy=0.1", "optim.weight_decy", "optim.weight_decay"),
        ("cluster.num_worker=2", "cluster.num_worker", "cluster.num_workers"),
        ("data.batchsize=8", "data.batchsize", "data.batch_size"),
    ],
)
def test_unknown_set_key_names_it_and_suggests_the_nearest(override, unknown, nearest):
    with pytest.raises(ValueError) as err:
        TrainSettings.load(None, [override])
    msg = str(err.value)
    assert repr(unknown) in msg and f"did you mean {nearest!r}" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "data, unknown, nearest",
    [
        ({"prelora": {"tua": 1.0}}, "prelora.tua", "prelora.tau"),
        ({"epoch": 3}, "epoch", "epochs"),
        ({"model": {"presett": "vit-tiny"}}, "model.presett", "model.preset"),
        ({"prelor": {"tau": 1.0}}, "prelor", "prelora"),
    ],
)
def test_unknown_yaml_key_names_it_the_file_and_the_nearest(tmp_path, data, unknown, nearest):
    path = write_yaml(tmp_path, data)
    with pytest.raises(ValueError) as err:
        TrainSettings.load(path)
    msg = str(err.value)
    assert repr(unknown) in msg and repr(nearest) in msg and str(path) in msg
    assert "\n" not in msg
    with pytest.raises(ValueError, match=f"did you mean {nearest!r}"):
        TrainSettings.from_dict(data)


def test_unknown_key_with_no_near_match_lists_valid_keys():
    with pytest.raises(ValueError) as err:
        TrainSettings.load(None, ["zzzqqq.xxyy=1"])
    msg = str(err.value)
    assert "'zzzqqq.xxyy'" in msg and "prelora.tau" in msg and "\n" not in msg


# -- bad values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["prelora.tau=0"], "prelora.tau"),
        (["prelora.tau=-0.5"], "prelora.tau"),
        (["prelora.zeta=-1"], "prelora.zeta"),
        (["prelora.zeta=0"], "prelora.zeta"),
        (["prelora.k=1"], "prelora.k"),
        (["prelora.k=2.5"], "prelora.k"),
        (["prelora.m=0"], "prelora.m"),
        (["prelora.warmup=-1"], "prelora.warmup"),
        (["prelora.r_min=3"], "prelora.r_min"),
        (["prelora.r_max=48"], "prelora.r_max"),
        (["prelora.r_min=32", "prelora.r_max=16"], "prelora.r_min"),
        (["prelora.r_min=0"], "prelora.r_min"),
        (["prelora.modules=[foo]"], "prelora.modules"),
        (["prelora.modules=[]"], "prelora.modules"),
        (["prelora.modules=[query, query]"], "prelora.modules"),
        (["prelora.window_unit=batch"], "prelora.window_unit"),
        (["prelora.window_stat=median"], "prelora.window_stat"),
        (["prelora.tie_rank=median"], "prelora.tie_rank"),
        (["prelora.alpha_scale=0"], "prelora.alpha_scale"),
        (["prelora.lora_dropout=1.0"], "prelora.lora_dropout"),
        (["prelora.zero_rank_below=-1"], "prelora.zero_rank_below"),
        (["prelora.trainable_after_freeze=[everything]"], "prelora.trainable_after_freeze"),
        (["prelora.min_switch_epoch=-1"], "prelora.min_switch_epoch"),
        (["cluster.num_workers=0"], "cluster.num_workers"),
        (["cluster.cpus_per_worker=0"], "cluster.cpus_per_worker"),
        (["data.name=imagenet"], "data.name"),
        (["data.batch_size=0"], "data.batch_size"),
        (["data.name=imagefolder"], "data.root"),  # a disk data set needs a root
        (["data.name=cifar10"], "data.root"),
        (["model.preset=vit-giant"], "model.preset"),
        (["model.dropout=1.5"], "model.dropout"),
        (["optim.lr=0"], "optim.lr"),
        (["optim.lr=fast"], "optim.lr"),
        (["optim.betas=[0.9]"], "optim.betas"),
        (["optim.schedule=step"], "optim.schedule"),
        (["strategy=lora"], "strategy"),
        (["epochs=abc"], "epochs"),
        (["epochs=0"], "epochs"),
        (["epochs=1.5"], "epochs"),
        (["epochs=true"], "epochs"),
        (["deterministic=maybe"], "deterministic"),
        (["prelora.tau=true"], "prelora.tau"),
        (["tracking.experiment="], "tracking.experiment"),
        (["calibration.rounds=-1"], "calibration.rounds"),
        (["calibration.rounds=1.5"], "calibration.rounds"),
        (["calibration.rounds=true"], "calibration.rounds"),
        (["calibration.every=0"], "calibration.every"),
        (["calibration.every=two"], "calibration.every"),
    ],
)
def test_bad_values_give_a_one_line_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError) as err:
        TrainSettings.load(None, overrides)
    msg = str(err.value)
    assert field in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "data, field",
    [
        ({"epochs": "abc"}, "epochs"),
        ({"prelora": {"tau": 0}}, "prelora.tau"),
        ({"prelora": {"k": True}}, "prelora.k"),
        ({"prelora": {"modules": "foo"}}, "prelora.modules"),
        ({"cluster": {"num_workers": 0}}, "cluster.num_workers"),
        ({"prelora": 3}, "prelora"),
    ],
)
def test_bad_values_in_a_yaml_file_name_field_and_file(tmp_path, data, field):
    path = write_yaml(tmp_path, data)
    with pytest.raises(ValueError) as err:
        TrainSettings.load(path)
    msg = str(err.value)
    assert field in msg and str(path) in msg and "\n" not in msg


def test_direct_construction_is_validated_too():
    with pytest.raises(ValueError, match="epochs"):
        TrainSettings(epochs="abc")
    with pytest.raises(ValueError, match="prelora.k"):
        PreLoRASettings(k=1)
    with pytest.raises(ValueError, match="prelora.r_min"):
        PreLoRASettings(r_min=32, r_max=16)
    with pytest.raises(ValueError, match="cluster.num_workers"):
        ClusterSettings(num_workers=0)


# -- data paths ------------------------------------------------------------------------------------


def test_imagefolder_with_a_missing_root(tmp_path):
    settings = DataSettings(name="imagefolder", root=str(tmp_path / "does-not-exist"))  # the type is fine
    with pytest.raises(ValueError) as err:
        check_data(settings)
    assert "data.root" in str(err.value) and "does-not-exist" in str(err.value) and "\n" not in str(err.value)


def test_imagefolder_with_an_empty_train_folder(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)  # a class folder but no image
    (tmp_path / "val" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "cat" / "a.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError) as err:
        check_data(DataSettings(name="imagefolder", root=str(tmp_path)))
    msg = str(err.value)
    assert "data.root" in msg and "train" in msg and "\n" not in msg


def test_imagefolder_with_no_val_folder(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "a.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="data.root.*val"):
        check_data(DataSettings(name="imagefolder", root=str(tmp_path)))


def test_imagefolder_with_images_passes_the_check(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "a.JPG").write_bytes(b"\xff\xd8")
    check_data(DataSettings(name="imagefolder", root=str(tmp_path)))  # no error


def test_cifar_without_data_and_without_download(tmp_path):
    with pytest.raises(ValueError, match="data.root"):
        check_data(DataSettings(name="cifar10", root=str(tmp_path)))


def test_offline_data_sets_need_no_root():
    check_data(DataSettings(name="digits"))
    check_data(DataSettings(name="synthetic"))


# -- round trips -----------------------------------------------------------------------------------


def test_to_dict_from_dict_round_trip():
    cfg = TrainSettings.load(
        None,
        [
            "epochs=7",
            "prelora.r_min=4",
            "prelora.r_max=32",
            "prelora.modules=[query, value, mlp_out]",
            "prelora.trainable_after_freeze=[head]",
            "prelora.zero_rank_below=0.2",
            "optim.betas=[0.8, 0.95]",
            "optim.grad_clip=null",
            "cluster.num_workers=2",
            "data.name=synthetic",
            "tracking.enabled=false",
        ],
    )
    data = cfg.to_dict()
    assert isinstance(data["prelora"], dict) and data["prelora"]["modules"] == ["query", "value", "mlp_out"]
    assert data["optim"]["betas"] == [0.8, 0.95]  # tuples come out as lists (YAML/JSON friendly)
    again = TrainSettings.from_dict(data)
    assert again == cfg
    assert again.optim.betas == (0.8, 0.95) and again.prelora.modules == ("query", "value", "mlp_out")
    assert TrainSettings.from_dict(yaml.safe_load(yaml.safe_dump(data))) == cfg  # through YAML text too
    assert TrainSettings.from_dict(TrainSettings().to_dict()) == TrainSettings()


def test_flat_keys_are_the_dotted_leaf_keys():
    cfg = TrainSettings.load(None, ["prelora.tau=0.5", "cluster.num_workers=2"])
    flat = cfg.flat()
    assert set(flat) == set(valid_keys())
    assert flat["prelora.tau"] == 0.5 and flat["cluster.num_workers"] == 2 and flat["epochs"] == cfg.epochs
    assert not any(isinstance(v, dict) for v in flat.values())
    # every flat key can be fed back as an override and gives the same settings
    overrides = [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in flat.items()
    ]
    assert TrainSettings.load(None, overrides) == cfg


def test_replace_returns_a_validated_copy():
    cfg = TrainSettings()
    new = cfg.replace(**{"prelora.tau": 0.5, "epochs": 3})
    assert new.prelora.tau == 0.5 and new.epochs == 3 and cfg.prelora.tau == TrainSettings().prelora.tau
    with pytest.raises(ValueError, match="prelora.tau"):
        cfg.replace(**{"prelora.tau": 0})
    with pytest.raises(ValueError, match="did you mean 'prelora.tau'"):
        cfg.replace(**{"prelora.tua": 0.5})
    assert dataclasses.is_dataclass(new)


def test_set_into_a_section_that_the_file_made_a_scalar(tmp_path):
    path = write_yaml(tmp_path, {"prelora": 3})
    with pytest.raises(ValueError, match="prelora"):
        TrainSettings.load(path, ["prelora.tau=1"])
