"""Typed, validated configuration: one keyword-only dataclass per component.

Every field has a one-line docstring (the `doc` metadata, shown by `prelora-ray train --help-config`
and in docs/config.md). Values are checked in `__post_init__`, so a bad value fails before Ray starts
or any data loads. `TrainSettings.from_dict` rejects unknown keys with the nearest valid name.

The run's own sections are here (model, data, optim, cluster, tracking, calibration); each strategy brings its own
section, declared in its file (prelora_ray/strategies/<name>.py) and found through the strategy registry:
a `TrainSettings` holds one per registered strategy (`cfg.prelora`, `cfg.relora`, ...), and the
`strategy` key's valid values and help come from the registry too. No torch is imported here: the
strategies' declarations are light (their torch code loads inside their hooks).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from prelora_ray.fields import check as _check
from prelora_ray.fields import setting as _f
from prelora_ray.models import MODULE_FAMILIES  # noqa: F401 (where the orchestration and the tests import it)
from prelora_ray.strategies.registry import get as strategy_class
from prelora_ray.strategies.registry import names as strategy_names
from prelora_ray.strategies.registry import strategy_sections

if TYPE_CHECKING:
    from prelora_ray.strategies.base import Strategy

MODEL_PRESETS = ("vit-digits", "vit-digits-wide", "vit-tiny", "vit-small", "vit-base", "vit-large", "vit-huge")
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")
SECTIONS_FIELD = "strategy_sections"
"""The TrainSettings field holding the strategies' sections (never a config key: each section is a top-level key)."""


def strategy_help() -> str:
    """The `strategy` key's doc: every registered strategy with its one line, the default first."""
    parts = [f"{name} ({strategy_class(name).description})" for name in strategy_names()]
    return (", ".join(parts[:-1]) + " or " + parts[-1] if len(parts) > 1 else "".join(parts)) + "."


def _nested(factory: type, doc: str) -> Any:
    """A section field: a fresh default instance per config, with its one-line doc."""
    return field(default_factory=factory, metadata={"doc": doc})


@dataclass(kw_only=True)
class ModelSettings:
    """Which ViT to build (always from a config: nothing is downloaded)."""

    preset: str = _f(
        "vit-digits-wide",
        "ViT preset: vit-digits-wide (the default: 2 layers, hidden 256, where LoRA epochs are cheaper on CPU), "
        "vit-digits (4 layers, hidden 64: the fastest), vit-tiny, vit-small, vit-base, vit-large (ViT-L/16) or "
        "vit-huge.",
    )
    patch_size: int | None = _f(
        None,
        "Patch size; None takes the preset's (2 for vit-digits, 4 for vit-digits-wide, 16 for the others, 14 for "
        "vit-huge).",
    )
    dropout: float = _f(0.0, "Hidden-state dropout probability.")
    attention_dropout: float = _f(0.0, "Attention-probability dropout.")

    def __post_init__(self) -> None:
        _check(self.preset in MODEL_PRESETS, "model.preset", self.preset, f"one of {', '.join(MODEL_PRESETS)}")
        _check(
            self.patch_size is None or self.patch_size >= 1,
            "model.patch_size",
            self.patch_size,
            "an integer >= 1 or null",
        )
        for name in ("dropout", "attention_dropout"):
            v = getattr(self, name)
            _check(0.0 <= v < 1.0, f"model.{name}", v, "a probability in [0, 1)")


@dataclass(kw_only=True)
class DataSettings:
    """The data set and how each worker reads it."""

    name: str = _f(
        "digits",
        "Data set: digits (embedded, offline), cifar10, cifar100, imagefolder (train/ and val/ trees) or synthetic "
        "(random tensors, for tests and benchmarks).",
    )
    root: str | None = _f(None, "Folder of the data set (cifar*, imagefolder); unused for digits and synthetic.")
    download: bool = _f(False, "Let torchvision download cifar10/cifar100 into root (needs internet).")
    image_size: int | None = _f(
        None, "Input side in pixels; None: 8 for digits, 32 for cifar, 224 for imagefolder and synthetic."
    )
    batch_size: int = _f(64, "Batch size per worker.")
    loader_workers: int | None = _f(
        None,
        "DataLoader worker processes per training worker; None (auto): 0 on CPU and for digits, min(8, CPUs - 1) on "
        "CUDA.",
    )
    randaugment: bool = _f(True, "RandAugment in the train transform of real-image data sets (cifar, imagefolder).")
    synthetic_samples: int = _f(512, "Train images of the synthetic data set (val gets a quarter).")
    synthetic_classes: int = _f(10, "Classes of the synthetic data set.")

    def __post_init__(self) -> None:
        _check(self.name in DATASETS, "data.name", self.name, f"one of {', '.join(DATASETS)}")
        _check(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer >= 1")
        _check(
            self.loader_workers is None or (type(self.loader_workers) is int and self.loader_workers >= 0),
            "data.loader_workers",
            self.loader_workers,
            "null (auto) or an integer >= 0",
        )
        _check(
            self.image_size is None or self.image_size >= 1,
            "data.image_size",
            self.image_size,
            "an integer >= 1 or null",
        )
        _check(self.synthetic_samples >= 2, "data.synthetic_samples", self.synthetic_samples, "an integer >= 2")
        _check(self.synthetic_classes >= 2, "data.synthetic_classes", self.synthetic_classes, "an integer >= 2")
        if self.name in ("cifar10", "cifar100", "imagefolder"):
            _check(bool(self.root), "data.root", self.root, f"a folder path (data.name={self.name} reads from disk)")
        _check(
            self.root is None or "://" not in str(self.root),
            "data.root",
            self.root,
            "a local or mounted folder: images are not read from object storage; mount the bucket (s3fs, gcsfuse, "
            "NFS) and give its path",
        )


@dataclass(kw_only=True)
class OptimSettings:
    """AdamW with a linear-warmup + cosine learning-rate schedule, in optimizer steps."""

    lr: float = _f(1e-3, "Peak learning rate (AdamW).")
    lora_lr: float | None = _f(None, "Learning rate of LoRA parameters; None uses lr (same schedule).")
    weight_decay: float = _f(0.05, "AdamW weight decay of matrices (biases and norms get none).")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas.")
    lr_warmup_epochs: float = _f(
        2.0,
        "Epochs of linear learning-rate warmup, (step + 1) / W (not the PreLoRA warmup w; relora_prelora: FULL's, "
        "RELORA has relora.warmup_steps).",
    )
    schedule: str = _f("cosine", "Learning-rate schedule after warmup: cosine, linear or constant.")
    min_lr_ratio: float = _f(
        0.0, "Final learning rate as a fraction of lr (cosine and linear; relora_prelora from RELORA on: relora.*'s)."
    )
    grad_clip: float | None = _f(1.0, "Max global gradient norm; None disables clipping.")
    label_smoothing: float = _f(
        0.1, "Label smoothing of the cross-entropy loss (keeps the loss off zero, so ζ can be met)."
    )
    carry_optimizer_state: bool = _f(
        True,
        "Keep AdamW moments of parameters that keep training across a phase change (False: fresh optimizer, as the "
        "paper's code).",
    )

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives a list
        _check(self.lr > 0, "optim.lr", self.lr, "a number > 0")
        _check(self.lora_lr is None or self.lora_lr > 0, "optim.lora_lr", self.lora_lr, "a number > 0 or null")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "a number >= 0")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            self.betas,
            "two numbers in [0, 1)",
        )
        _check(self.lr_warmup_epochs >= 0, "optim.lr_warmup_epochs", self.lr_warmup_epochs, "a number >= 0")
        _check(
            self.schedule in ("cosine", "linear", "constant"),
            "optim.schedule",
            self.schedule,
            "one of cosine, linear, constant",
        )
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        _check(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", self.grad_clip, "a number > 0 or null")
        _check(0 <= self.label_smoothing < 1, "optim.label_smoothing", self.label_smoothing, "a number in [0, 1)")


@dataclass(kw_only=True)
class ClusterSettings:
    """Where and on what the Ray Train workers run."""

    num_workers: int = _f(1, "Ray Train workers (data-parallel, one model replica each).")
    use_gpu: bool = _f(False, "One GPU per worker; bf16 autocast and CUDA memory stats follow.")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per worker.")
    address: str | None = _f(None, "Ray cluster to join ('auto' or ray://host:port); None starts a local Ray.")
    max_failures: int = _f(0, "Worker-group restarts from the last checkpoint before the run fails (-1: unlimited).")
    storage_path: str = _f(
        "./ray_results",
        "Where checkpoints and the sweep's records go: a folder every node sees (made absolute), s3://BUCKET/PREFIX "
        "(MinIO: ?endpoint_override=HOST:PORT&scheme=http) or gs://BUCKET/PREFIX. Same path and name resumes.",
    )
    checkpoints_to_keep: int = _f(2, "Checkpoints kept per run (the newest).")
    checkpoint_every: int = _f(
        1, "Attach a checkpoint to every N-th epoch's report (and always the last and each phase change)."
    )
    torch_threads: int | None = _f(None, "torch.set_num_threads per worker; None: cpus_per_worker rounded up.")
    release_memory: bool = _f(
        False,
        "CPU workers hand freed memory back to the OS (glibc mmap threshold): lower peak RSS in the LoRA phase, "
        "slower steps.",
    )

    def __post_init__(self) -> None:
        _check(
            isinstance(self.num_workers, int) and self.num_workers >= 1,
            "cluster.num_workers",
            self.num_workers,
            "an integer >= 1",
        )
        _check(self.cpus_per_worker > 0, "cluster.cpus_per_worker", self.cpus_per_worker, "a number > 0")
        _check(self.max_failures >= -1, "cluster.max_failures", self.max_failures, "an integer >= -1")
        _check(
            self.checkpoints_to_keep >= 1, "cluster.checkpoints_to_keep", self.checkpoints_to_keep, "an integer >= 1"
        )
        _check(self.checkpoint_every >= 1, "cluster.checkpoint_every", self.checkpoint_every, "an integer >= 1")
        _check(
            self.torch_threads is None or self.torch_threads >= 1,
            "cluster.torch_threads",
            self.torch_threads,
            "an integer >= 1 or null",
        )


@dataclass(kw_only=True)
class TrackingSettings:
    """MLflow logging (one run per training run)."""

    enabled: bool = _f(True, "Log to MLflow; False trains without it.")
    uri: str | None = _f(None, "MLflow tracking URI; None: sqlite:///<cwd>/mlflow.db (absolute).")
    experiment: str = _f("prelora-ray", "MLflow experiment name.")
    run_name: str | None = _f(None, "MLflow run name; None uses the run name.")

    def __post_init__(self) -> None:
        _check(bool(self.experiment), "tracking.experiment", self.experiment, "a non-empty name")


@dataclass(kw_only=True)
class CalibrationSettings:
    """The in-process speed-up measurement (`speedup`): the run's own step against full training's, same batch."""

    rounds: int = _f(
        2,
        "Calibration rounds per measured epoch, spread over its steps: each times the run's own training step and "
        "full training's (forward, backward, clipping, AdamW on scratch copies) of the same model on the same batch, "
        "in the order own, full, full, own, updating nothing; 0: off (speedup unknown: NaN). FULL epochs are 1 by "
        "definition and never measured.",
    )
    every: int = _f(
        1,
        "Measure every N-th epoch of a phase (its first always); the epochs between repeat the last measurement.",
    )

    def __post_init__(self) -> None:
        _check(
            type(self.rounds) is int and self.rounds >= 0, "calibration.rounds", self.rounds, "an integer >= 0 (0: off)"
        )
        _check(type(self.every) is int and self.every >= 1, "calibration.every", self.every, "an integer >= 1")


@dataclass(kw_only=True)
class TrainSettings:
    """One training run: `prelora-ray train` takes exactly this.

    Besides the fields below, one section per registered strategy (its own dataclass, from its file):
    `cfg.prelora`, `cfg.relora`, `cfg.lte`, ... read like fields, and are top-level keys in YAML and `--set`.
    """

    strategy: str = _f("prelora", strategy_help)
    epochs: int = _f(40, "Training epochs.")
    seed: int = _f(0, "Seed of weights, data order and augmentation.")
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms: exact resume on CPU, slower on GPU.")
    amp: bool = _f(True, "bf16 autocast on GPU (ignored on CPU).")
    name: str | None = _f(None, "Run name (Ray Train run and checkpoint folder); None: <strategy>-<dataset>-<time>.")
    output_dir: str = _f(
        "./outputs",
        "Where the merged model (a plain ViT, save_pretrained) is written, under <name>/: a folder, s3://... or gs://...",
    )
    model: ModelSettings = _nested(ModelSettings, "The ViT.")
    data: DataSettings = _nested(DataSettings, "The data.")
    optim: OptimSettings = _nested(OptimSettings, "The optimizer and schedule.")
    strategy_sections: dict[str, Any] = field(
        default_factory=dict, metadata={"doc": "Section name -> its settings: every registered strategy's section."}
    )
    cluster: ClusterSettings = _nested(ClusterSettings, "Ray Train workers.")
    tracking: TrackingSettings = _nested(TrackingSettings, "MLflow.")
    calibration: CalibrationSettings = _nested(
        CalibrationSettings, "The speed-up against full training, measured in the run (`speedup`)."
    )

    def __post_init__(self) -> None:
        names = strategy_names()
        _check(self.strategy in names, "strategy", self.strategy, " or ".join(names))
        _check(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        self.strategy_sections = _complete_sections(self.strategy_sections)
        for section in self.strategy_sections.values():  # each section against the rest (whatever the strategy)
            check_with = getattr(section, "check_with", None)
            if check_with is not None:
                check_with(self)
        strategy_class(self.strategy).check_config(self)

    def __getattr__(self, name: str) -> Any:
        """A strategy's section by its name (`cfg.prelora`), like a field."""
        sections = self.__dict__.get(SECTIONS_FIELD)  # absent while a pickled config is being restored
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def strategy_class(self) -> type[Strategy]:
        """The registered class of `strategy` (its declaration and hooks)."""
        return strategy_class(self.strategy)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, source: str = "config") -> TrainSettings:
        """Build from nested dicts (YAML). Unknown keys and bad types raise ValueError naming the key."""
        return _build(cls, data or {}, prefix="", source=source)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainSettings:
        """Read a YAML file (optional) and apply `key.sub=value` overrides, in that order."""
        data: dict[str, Any] = {}
        source = "config"
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ValueError(f"config file {str(p)!r} does not exist")
            try:
                data = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ValueError(f"{p}: not valid YAML: {exc}") from None
            if not isinstance(data, dict):
                raise ValueError(f"{p}: the top level must be a mapping of config keys, got {type(data).__name__}")
            source = str(p)
        for item in overrides:
            key, value = parse_override(item)
            set_dotted(data, key, value, root=cls)
        return cls.from_dict(data, source=source)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict (tuples as lists), the inverse of from_dict: each strategy's section a top-level key."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == SECTIONS_FIELD:
                out.update({name: _plain(dataclasses.asdict(section)) for name, section in value.items()})
            else:
                out[f.name] = _plain(dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value)
        return out

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, e.g. {'prelora.tau': 1.0, ...} (MLflow params)."""
        out: dict[str, Any] = {}

        def walk(d: dict[str, Any], prefix: str) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
                else:
                    out[f"{prefix}{k}"] = v

        walk(self.to_dict(), "")
        return out

    def replace(self, **dotted: Any) -> TrainSettings:
        """A copy with dotted keys changed: cfg.replace(**{'prelora.tau': 0.5})."""
        data = self.to_dict()
        for key, value in dotted.items():
            set_dotted(data, key, value, root=type(self))
        return type(self).from_dict(data)


def _complete_sections(given: dict[str, Any]) -> dict[str, Any]:
    """Every registered strategy's section, in registration order: the given ones, defaults for the rest."""
    owners = strategy_sections()
    unknown = [name for name in given if name not in owners]
    _check(not unknown, SECTIONS_FIELD, unknown, f"sections of registered strategies: {', '.join(owners)}")
    out = {}
    for name, owner in owners.items():
        section = given.get(name)
        if section is None:
            section = owner.section_class()
        _check(isinstance(section, owner.section_class), name, section, f"a {owner.section_class.__name__}")
        out[name] = section
    return out


def sections() -> dict[str, tuple[type, str]]:
    """Every section of a TrainSettings, in key order: name -> (its dataclass, its one-line doc).

    The run's own (model, data, optim, cluster, tracking, calibration) and each registered strategy's, in the place
    of the `strategy_sections` field (for the config reference: docs/make_config_reference.py).
    """
    hints = typing.get_type_hints(TrainSettings)
    out: dict[str, tuple[type, str]] = {}
    for f in dataclasses.fields(TrainSettings):
        if f.name == SECTIONS_FIELD:
            out.update({name: (cls.section_class, cls.section_doc) for name, cls in strategy_sections().items()})
        elif dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = (hints[f.name], f.metadata.get("doc", ""))
    return out


def _plain(value: Any) -> Any:
    """A value with tuples as lists and nested dicts copied: what YAML and JSON give back."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def field_docs(cls: type = TrainSettings, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every leaf field: the config reference (`--help-config`, docs/config.md).

    On TrainSettings, each registered strategy's section comes where the `strategy_sections` field is.
    """
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if cls is TrainSettings and f.name == SECTIONS_FIELD:
            for name, owner in strategy_sections().items():
                rows.extend(field_docs(owner.section_class, f"{prefix}{name}."))
        elif dataclasses.is_dataclass(hint):
            rows.extend(field_docs(hint, f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            doc = f.metadata.get("doc", "")
            rows.append((f"{prefix}{f.name}", _type_name(hint), _plain(default), doc() if callable(doc) else doc))
    return rows


def _type_name(hint: Any) -> str:
    """A type hint as the reference prints it (`int | None`, `tuple[str, ...]`)."""
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def valid_keys(cls: type = TrainSettings) -> list[str]:
    """All dotted leaf keys of a settings class."""
    return [row[0] for row in field_docs(cls)]


def _unknown_key_error(key: str, valid: list[str], source: str) -> ValueError:
    """The one-line error of an unknown key, with the nearest valid one."""
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid)}"
    return ValueError(f"{source}: unknown config key {key!r}{hint}")


def _build(cls: type, data: dict[str, Any], *, prefix: str, source: str) -> Any:
    """A settings object from nested dicts (a strategy's section of TrainSettings by the registry), keys checked."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {SECTIONS_FIELD}
    owners = strategy_sections() if cls is TrainSettings else {}
    kwargs: dict[str, Any] = {}
    given_sections: dict[str, Any] = {}
    for key, value in data.items():
        if key in owners:
            section_cls = owners[key].section_class
            given_sections[key] = _build(
                section_cls, value if value is not None else {}, prefix=f"{key}.", source=source
            )
        elif key not in names:
            full = f"{prefix}{key}"
            raise _unknown_key_error(full, valid_keys(TrainSettings) + [k[:-1] for k in _section_prefixes()], source)
        elif dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(
                hints[key], value if value is not None else {}, prefix=f"{prefix}{key}.", source=source
            )
        else:
            kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}", source)
    if cls is TrainSettings:
        kwargs[SECTIONS_FIELD] = given_sections
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def _section_prefixes() -> list[str]:
    """`model.`, `data.`, ..., `prelora.`, ...: every section of TrainSettings as a key prefix."""
    return [f"{name}." for name in sections()]


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check a YAML value against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{source}: {key}={value!r} is invalid: a list")
        item_type = args[0] if args else Any
        return tuple(_coerce(v, item_type, key, source) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{source}: {key}={value!r} is invalid: true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{source}: {key}={value!r} is invalid: an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{source}: {key}={value!r} is invalid: a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{source}: {key}={value!r} is invalid: a string")
    return value


def parse_override(item: str) -> tuple[str, Any]:
    """'prelora.tau=0.5' -> ('prelora.tau', 0.5); the value is parsed as YAML."""
    if "=" not in item:
        raise ValueError(f"--set {item!r} is invalid: use key=value, e.g. --set prelora.tau=0.5")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any, *, root: type = TrainSettings) -> None:
    """data['a']['b'] = value for key 'a.b', creating sections; unknown keys raise with a suggestion."""
    valid = valid_keys(root)
    sections = [p[:-1] for p in _section_prefixes()]
    if key not in valid and key not in sections:
        raise _unknown_key_error(key, valid, "--set")
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            section = ".".join(parts[: i + 1])
            raise ValueError(f"{section} must be a mapping of keys, got {node[part]!r}; cannot set {key}")
        node = node[part]
    node[parts[-1]] = value
