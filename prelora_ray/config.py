"""Typed, validated configuration: one keyword-only dataclass per component.

Every field has a one-line docstring (the `doc` metadata, shown by `prelora-ray train --help-config`
and in the README). Values are checked in `__post_init__`, so a bad value fails before Ray starts
or any data loads. `TrainSettings.from_dict` rejects unknown keys with the nearest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prelora_ray.algorithms import is_power_of_two

MODULE_FAMILIES = ("query", "key", "value", "attn_out", "mlp_in", "mlp_out")
"""Module families that can get adapters (see algorithms.md for the transformers module names)."""

EXTRA_TRAINABLE = ("head", "norms", "embeddings", "biases")
"""Non-LoRA parameter groups that may stay trainable after the freeze (the paper: none)."""

MODEL_PRESETS = ("vit-digits", "vit-digits-wide", "vit-tiny", "vit-small", "vit-base", "vit-large", "vit-huge")
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")
STRATEGIES = ("prelora", "full", "relora_prelora", "lte")
"""Training strategies: the names of `prelora_ray.strategies.REGISTRY` (each with its own section, if any)."""


def _f(default: Any, doc: str, **kwargs: Any) -> Any:
    """A dataclass field with its docstring attached as metadata."""
    if isinstance(default, (list, dict, tuple)) and not isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata={"doc": doc}, **kwargs)
    return field(default=default, metadata={"doc": doc}, **kwargs)


def _nested(factory: type, doc: str) -> Any:
    return field(default_factory=factory, metadata={"doc": doc})


def _check(cond: bool, key: str, value: Any, valid: str) -> None:
    if not cond:
        raise ValueError(f"{key}={value!r} is invalid: {valid}")


@dataclass(kw_only=True)
class ModelSettings:
    """Which ViT to build (always from a config: nothing is downloaded)."""

    preset: str = _f(
        "vit-digits-wide",
        "ViT preset: vit-digits-wide (the default: 2 layers, hidden 256, where LoRA epochs are cheaper on CPU), vit-digits (4 layers, hidden 64: the fastest), vit-tiny, vit-small, vit-base, vit-large (ViT-L/16) or vit-huge.",
    )
    patch_size: int | None = _f(
        None,
        "Patch size; None takes the preset's (2 for vit-digits, 4 for vit-digits-wide, 16 for the others, 14 for vit-huge).",
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
        "Data set: digits (embedded, offline), cifar10, cifar100, imagefolder (train/ and val/ trees) or synthetic (random tensors, for tests and benchmarks).",
    )
    root: str | None = _f(None, "Folder of the data set (cifar*, imagefolder); unused for digits and synthetic.")
    download: bool = _f(False, "Let torchvision download cifar10/cifar100 into root (needs internet).")
    image_size: int | None = _f(
        None, "Input side in pixels; None: 8 for digits, 32 for cifar, 224 for imagefolder and synthetic."
    )
    batch_size: int = _f(64, "Batch size per worker.")
    loader_workers: int | None = _f(
        None,
        "DataLoader worker processes per training worker; None (auto): 0 on CPU and for digits, min(8, CPUs - 1) on CUDA.",
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
            "a local or mounted folder: images are not read from object storage; mount the bucket (s3fs, gcsfuse, NFS) and give its path",
        )


@dataclass(kw_only=True)
class OptimSettings:
    """AdamW with a linear-warmup + cosine learning-rate schedule, in optimizer steps."""

    lr: float = _f(1e-3, "Peak learning rate (AdamW).")
    lora_lr: float | None = _f(None, "Learning rate of LoRA parameters; None uses lr (same schedule).")
    weight_decay: float = _f(0.05, "AdamW weight decay of matrices (biases and norms get none).")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas.")
    lr_warmup_epochs: float = _f(2.0, "Epochs of linear learning-rate warmup from 0 (not the PreLoRA warmup w).")
    schedule: str = _f("cosine", "Learning-rate schedule after warmup: cosine, linear or constant.")
    min_lr_ratio: float = _f(0.0, "Final learning rate as a fraction of lr (cosine and linear).")
    grad_clip: float | None = _f(1.0, "Max global gradient norm; None disables clipping.")
    label_smoothing: float = _f(
        0.1, "Label smoothing of the cross-entropy loss (keeps the loss off zero, so ζ can be met)."
    )
    carry_optimizer_state: bool = _f(
        True,
        "Keep AdamW moments of parameters that keep training across a phase change (False: fresh optimizer, as the paper's code).",
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
class PreLoRASettings:
    """The switch: Algorithm 1's thresholds and windows, Algorithm 2's rank bounds, the warmup w."""

    tau: float = _f(1.0, "τ: max |% change| of each family's mean weight norm between consecutive windows.")
    zeta: float = _f(5.0, "ζ: max |% change| of the training loss between consecutive windows.")
    k: int = _f(3, "Number of windows the convergence test compares (k >= 2).")
    m: int = _f(2, "Window size, in window units (the paper: 3 epochs; 2 suits the 40-epoch digits default).")
    window_unit: str = _f("epoch", "Unit of m: epoch (the paper) or step (optimizer steps, for long epochs).")
    window_stat: str = _f("mean", "A window's value: mean of its m snapshots, or last (the window's end).")
    warmup: int = _f(3, "w: epochs base and LoRA train together after the test passes (the paper: 10 of 300).")
    r_min: int = _f(2, "Smallest LoRA rank (power of two; the paper: 8 on ViT-L).")
    r_max: int = _f(16, "Largest LoRA rank (power of two, >= r_min; the paper: 64 on ViT-L).")
    modules: tuple[str, ...] = _f(
        MODULE_FAMILIES, "Module families that get adapters: query, key, value, attn_out, mlp_in, mlp_out."
    )
    alpha_scale: float = _f(2.0, "lora_alpha = alpha_scale * rank for each layer (the paper: 2).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input (0: no copy of the activations is made).")
    tie_rank: str = _f(
        "min", "Rank of a family whose layers all changed equally: min (r_min, the paper's v=0), middle or max."
    )
    zero_rank_below: float | None = _f(
        None,
        "Beyond the paper: layers whose abs(ΔW) (percent) is below this get rank 0, no adapter, frozen (a family keeps at least its most-changed layer). None: off.",
    )
    trainable_after_freeze: tuple[str, ...] = _f(
        (), "Non-LoRA groups still trained after the freeze: head, norms, embeddings, biases (the paper: none)."
    )
    min_switch_epoch: int = _f(0, "Earliest epoch (0-based) at whose end the switch may happen.")
    switch_at_epoch: int | None = _f(
        None,
        "Switch at the end of this epoch (0-based) whatever Algorithm 1 says; ranks still from Algorithm 2 over the k windows ending there. None: off (Algorithm 1 decides).",
    )

    def __post_init__(self) -> None:
        self.modules = tuple(self.modules)
        self.trainable_after_freeze = tuple(self.trainable_after_freeze)
        _check(self.tau > 0, "prelora.tau", self.tau, "a percentage > 0")
        _check(self.zeta > 0, "prelora.zeta", self.zeta, "a percentage > 0")
        _check(isinstance(self.k, int) and self.k >= 2, "prelora.k", self.k, "an integer >= 2")
        _check(isinstance(self.m, int) and self.m >= 1, "prelora.m", self.m, "an integer >= 1")
        _check(self.window_unit in ("epoch", "step"), "prelora.window_unit", self.window_unit, "epoch or step")
        _check(self.window_stat in ("mean", "last"), "prelora.window_stat", self.window_stat, "mean or last")
        _check(isinstance(self.warmup, int) and self.warmup >= 0, "prelora.warmup", self.warmup, "an integer >= 0")
        _check(is_power_of_two(self.r_min), "prelora.r_min", self.r_min, "a power of two (1, 2, 4, 8, ...)")
        _check(is_power_of_two(self.r_max), "prelora.r_max", self.r_max, "a power of two (1, 2, 4, 8, ...)")
        _check(self.r_min <= self.r_max, "prelora.r_min", self.r_min, f"<= prelora.r_max ({self.r_max})")
        _check(
            len(self.modules) > 0,
            "prelora.modules",
            list(self.modules),
            f"a non-empty list of {', '.join(MODULE_FAMILIES)}",
        )
        bad = [m for m in self.modules if m not in MODULE_FAMILIES]
        _check(not bad, "prelora.modules", bad, f"module families from {', '.join(MODULE_FAMILIES)}")
        _check(len(set(self.modules)) == len(self.modules), "prelora.modules", list(self.modules), "no family twice")
        _check(self.alpha_scale > 0, "prelora.alpha_scale", self.alpha_scale, "a number > 0")
        _check(0 <= self.lora_dropout < 1, "prelora.lora_dropout", self.lora_dropout, "a probability in [0, 1)")
        _check(self.tie_rank in ("min", "middle", "max"), "prelora.tie_rank", self.tie_rank, "min, middle or max")
        _check(
            self.zero_rank_below is None or self.zero_rank_below >= 0,
            "prelora.zero_rank_below",
            self.zero_rank_below,
            "a percentage >= 0 or null",
        )
        bad = [g for g in self.trainable_after_freeze if g not in EXTRA_TRAINABLE]
        _check(not bad, "prelora.trainable_after_freeze", bad, f"groups from {', '.join(EXTRA_TRAINABLE)}")
        _check(self.min_switch_epoch >= 0, "prelora.min_switch_epoch", self.min_switch_epoch, "an integer >= 0")


@dataclass(kw_only=True)
class ReLoRASettings:
    """`strategy: relora_prelora` (PreLoRA v2, section 4.2.4): the ReLoRA phase between FULL and the per-layer switch."""

    start_epoch: int = _f(
        5, 'First epoch (0-based) of the RELORA phase; FULL before it (the paper: "several" full epochs).'
    )
    rank: int = _f(16, "Uniform LoRA rank of every target layer in RELORA (the paper: 256 on ViT-L).")
    merge_every: int = _f(
        100,
        "Optimizer steps between merges: fold s·B·A into the base, re-initialise, prune the LoRA moments, restart the LR.",
    )
    prune: float = _f(
        0.9,
        "Fraction of each LoRA tensor's AdamW moments (m and v each) zeroed at a merge, smallest magnitudes first (ReLoRA: 0.9).",
    )
    rewarm_steps: int = _f(
        50, "Steps over which the LR rises linearly from 0 back to the global cosine after each merge (ReLoRA: 50-100)."
    )
    alpha_scale: float = _f(
        2.0, "LoRA scale s = lora_alpha / rank of the uniform adapters (prelora.alpha_scale is the per-layer phase's)."
    )

    def __post_init__(self) -> None:
        _check(
            isinstance(self.start_epoch, int) and self.start_epoch >= 0,
            "relora.start_epoch",
            self.start_epoch,
            "an integer >= 0",
        )
        _check(isinstance(self.rank, int) and self.rank >= 1, "relora.rank", self.rank, "an integer >= 1")
        _check(
            isinstance(self.merge_every, int) and self.merge_every >= 1,
            "relora.merge_every",
            self.merge_every,
            "an integer >= 1 (optimizer steps)",
        )
        _check(0 <= self.prune < 1, "relora.prune", self.prune, "a fraction in [0, 1)")
        _check(
            isinstance(self.rewarm_steps, int) and 0 <= self.rewarm_steps < self.merge_every,
            "relora.rewarm_steps",
            self.rewarm_steps,
            f"an integer in [0, relora.merge_every) = [0, {self.merge_every})",
        )
        _check(self.alpha_scale > 0, "relora.alpha_scale", self.alpha_scale, "a number > 0")


@dataclass(kw_only=True)
class LTESettings:
    """`strategy: lte` (LoRA-the-Explorer): parallel LoRA heads, merged into the frozen base every T steps."""

    heads_per_worker: int = _f(
        1,
        "LoRA heads each worker trains, each on its own equal chunk of the worker's batch (heads in all: this x cluster.num_workers).",
    )
    rank: int = _f(8, "Rank r of every head on the target families (prelora.modules).")
    alpha: float = _f(32.0, "Head scale s = alpha / rank (the reference: r = 32, alpha = 4096 on ViT-S).")
    merge_every: int = _f(
        6,
        "T: optimizer steps between merges (W += the mean head delta over all heads, one all-reduce); every epoch also ends with one, before validation (6 divides the 12 steps of a 2-worker digits epoch: one merge per 6 steps).",
    )
    start_epoch: int = _f(0, "Full-training epochs before LTE starts (0: LTE from scratch, as the paper).")
    train_others: str = _f(
        "averaged",
        "Parameters without heads (norms, embeddings, biases, classifier): averaged (train locally, averaged at each merge) or frozen (the reference's ViT example).",
    )

    def __post_init__(self) -> None:
        _check(
            isinstance(self.heads_per_worker, int) and self.heads_per_worker >= 1,
            "lte.heads_per_worker",
            self.heads_per_worker,
            "an integer >= 1",
        )
        _check(isinstance(self.rank, int) and self.rank >= 1, "lte.rank", self.rank, "an integer >= 1")
        _check(self.alpha > 0, "lte.alpha", self.alpha, "a number > 0")
        _check(
            isinstance(self.merge_every, int) and self.merge_every >= 1,
            "lte.merge_every",
            self.merge_every,
            "an integer >= 1 (optimizer steps)",
        )
        _check(
            isinstance(self.start_epoch, int) and self.start_epoch >= 0,
            "lte.start_epoch",
            self.start_epoch,
            "an integer >= 0",
        )
        _check(self.train_others in ("averaged", "frozen"), "lte.train_others", self.train_others, "averaged or frozen")


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
        "Where checkpoints and the sweep's records go: a folder every node sees (made absolute), s3://BUCKET/PREFIX (MinIO: ?endpoint_override=HOST:PORT&scheme=http) or gs://BUCKET/PREFIX. Same path and name resumes.",
    )
    checkpoints_to_keep: int = _f(2, "Checkpoints kept per run (the newest).")
    checkpoint_every: int = _f(
        1, "Attach a checkpoint to every N-th epoch's report (and always the last and each phase change)."
    )
    torch_threads: int | None = _f(None, "torch.set_num_threads per worker; None: cpus_per_worker rounded up.")
    release_memory: bool = _f(
        False,
        "CPU workers hand freed memory back to the OS (glibc mmap threshold): lower peak RSS in the LoRA phase, slower steps.",
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
class TrainSettings:
    """One training run: `prelora-ray train` takes exactly this."""

    strategy: str = _f(
        "prelora",
        "prelora (full -> warmup -> LoRA), full (the baseline: never switches), relora_prelora (full -> ReLoRA -> warmup -> LoRA) or lte (LoRA-the-Explorer: parallel heads merged every lte.merge_every steps).",
    )
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
    prelora: PreLoRASettings = _nested(PreLoRASettings, "The PreLoRA switch.")
    relora: ReLoRASettings = _nested(ReLoRASettings, "The ReLoRA phase of strategy relora_prelora.")
    lte: LTESettings = _nested(LTESettings, "The heads and merges of strategy lte.")
    cluster: ClusterSettings = _nested(ClusterSettings, "Ray Train workers.")
    tracking: TrackingSettings = _nested(TrackingSettings, "MLflow.")

    def __post_init__(self) -> None:
        _check(self.strategy in STRATEGIES, "strategy", self.strategy, " or ".join(STRATEGIES))
        _check(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        at = self.prelora.switch_at_epoch
        if at is not None:
            lo, hi = switch_epoch_range(self)
            _check(
                self.prelora.window_unit == "epoch",
                "prelora.switch_at_epoch",
                at,
                "only with prelora.window_unit=epoch",
            )
            _check(
                lo <= at <= hi,
                "prelora.switch_at_epoch",
                at,
                f"an epoch in [{lo}, {hi}]: Algorithm 2 needs k*m = {lo + 1} recorded epochs, and the warmup "
                f"(prelora.warmup={self.prelora.warmup}) and one LoRA epoch must fit in epochs={self.epochs}",
            )
        if self.strategy == "relora_prelora":
            _check(
                self.relora.start_epoch < self.epochs,
                "relora.start_epoch",
                self.relora.start_epoch,
                f"< epochs ({self.epochs})",
            )
            _check(
                at is None or at >= self.relora.start_epoch,
                "prelora.switch_at_epoch",
                at,
                f">= relora.start_epoch ({self.relora.start_epoch}) with strategy relora_prelora (its switch leaves the RELORA phase)",
            )
        if self.strategy == "lte":
            _check(
                self.lte.start_epoch < self.epochs, "lte.start_epoch", self.lte.start_epoch, f"< epochs ({self.epochs})"
            )
            _check(
                self.data.batch_size % self.lte.heads_per_worker == 0,
                "data.batch_size",
                self.data.batch_size,
                f"a multiple of lte.heads_per_worker ({self.lte.heads_per_worker}): each head trains on an equal chunk of the batch",
            )

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
        """Nested plain dict (tuples as lists), the inverse of from_dict."""
        return _plain(dataclasses.asdict(self))

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


def switch_epoch_range(cfg: TrainSettings) -> tuple[int, int]:
    """First and last epoch a switch can happen at: once k*m epochs are recorded (Algorithm 1 and 2 need
    k windows), and early enough for the warmup and at least one LoRA-only epoch (hi < lo: none)."""
    p = cfg.prelora
    return p.k * p.m - 1, cfg.epochs - 2 - p.warmup


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def field_docs(cls: type = TrainSettings, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every leaf field: the README's config reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows.extend(field_docs(hint, f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{prefix}{f.name}", _type_name(hint), _plain(default), f.metadata.get("doc", "")))
    return rows


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def valid_keys(cls: type = TrainSettings) -> list[str]:
    """All dotted leaf keys of a settings class."""
    return [row[0] for row in field_docs(cls)]


def _unknown_key_error(key: str, valid: list[str], source: str) -> ValueError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid)}"
    return ValueError(f"{source}: unknown config key {key!r}{hint}")


def _build(cls: type, data: dict[str, Any], *, prefix: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            full = f"{prefix}{key}"
            raise _unknown_key_error(full, valid_keys(TrainSettings) + [k[:-1] for k in _section_prefixes()], source)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, prefix=f"{prefix}{key}.", source=source)
        else:
            kwargs[key] = _coerce(value, hint, f"{prefix}{key}", source)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def _section_prefixes() -> list[str]:
    return [
        f"{f.name}."
        for f in dataclasses.fields(TrainSettings)
        if dataclasses.is_dataclass(typing.get_type_hints(TrainSettings)[f.name])
    ]


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
