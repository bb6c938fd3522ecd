"""Search-space files: a base train config, distributions over config keys, objectives, sampler.

Loaded and validated without Ray (every error names the file and the key); the orchestration turns
a `SearchSpace` into Ray Tune distributions and an Optuna sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prelora_ray import metrics as M
from prelora_ray.config import TrainSettings, _unknown_key_error, valid_keys

TOP_KEYS = ("name", "description", "base", "parameters", "objectives", "sampler", "num_samples", "max_concurrent", "trial_executor", "baseline", "experiment", "fork")
FORK_KEYS = ("enabled", "every")
TRIAL_EXECUTORS = ("ray_train", "tune")
# keys a fork-mode sweep may sample: they act only at or after the switch, so every trial's full phase
# is the trunk's (the other prelora.* keys, only window_unit excepted, decide the switch itself)
POST_SWITCH_OPTIM_KEYS = ("optim.lora_lr", "optim.carry_optimizer_state")
DISTRIBUTIONS = {
    "uniform": ("low", "high"),
    "loguniform": ("low", "high"),
    "int": ("low", "high", "step"),
    "categorical": ("values",),
}
SAMPLERS = ("tpe", "nsga2", "random", "qmc")
OBJECTIVE_METRICS = (M.FINAL_VAL_ACC, M.BEST_VAL_ACC, M.MEAN_EPOCH_TIME_S, M.PEAK_MEM_MB, M.TRAINABLE_FRACTION, M.TOTAL_TRAIN_TIME_S, M.VAL_LOSS)
DEFAULT_OBJECTIVES = ({"metric": M.FINAL_VAL_ACC, "mode": "max"}, {"metric": M.MEAN_EPOCH_TIME_S, "mode": "min"})


@dataclass(frozen=True, kw_only=True)
class Parameter:
    """One searched config key and its distribution."""

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    step: int | None = None
    values: tuple[Any, ...] = ()

    def bounds(self) -> tuple[Any, Any]:
        """Smallest and largest value the distribution can give."""
        if self.kind == "categorical":
            return min(self.values), max(self.values)
        return self.low, self.high


@dataclass(frozen=True, kw_only=True)
class Objective:
    """A summary metric and whether to maximise it."""

    metric: str
    mode: str


@dataclass(kw_only=True)
class SearchSpace:
    """A validated search-space file."""

    name: str
    path: str
    base: TrainSettings
    parameters: list[Parameter]
    objectives: list[Objective]
    sampler: str = "tpe"
    seed: int | None = 0
    num_samples: int = 8
    max_concurrent: int = 2
    trial_executor: str = "ray_train"  # ray_train: a TorchTrainer per trial; tune: one worker in the trial's own process
    baseline: bool = True
    experiment: str | None = None
    description: str = ""
    fork: bool = False  # trials fork from the baseline's trunk (decided on load: see parse_fork)
    fork_every: int = 1  # epochs between the trunk's fork checkpoints
    raw_text: str = field(default="", repr=False)

    def trial_config(self, sampled: dict[str, Any]) -> TrainSettings:
        """The train config of one trial: base + sampled values, with relations repaired.

        r_min > r_max (sampled independently) is repaired by swapping the two, so every sample is a
        valid config; Optuna still sees the raw values it suggested.
        """
        values = dict(sampled)
        lo = values.get("prelora.r_min", self.base.prelora.r_min)
        hi = values.get("prelora.r_max", self.base.prelora.r_max)
        if lo > hi:
            values["prelora.r_min"], values["prelora.r_max"] = hi, lo
        return self.base.replace(**values)


def _err(path: str, key: str, msg: str) -> ValueError:
    return ValueError(f"{path}: {key}: {msg}")


def _number(path: str, key: str, spec: dict, name: str) -> float:
    v = spec.get(name)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise _err(path, f"{key}.{name}", f"must be a finite number, got {v!r}")
    return v


def _parameter(path: str, key: str, spec: Any, base: TrainSettings) -> Parameter:
    if key not in valid_keys():
        raise _unknown_key_error(key, valid_keys(), f"{path}: parameters")
    if not isinstance(spec, dict) or "type" not in spec:
        raise _err(path, f"parameters.{key}", f"must be a mapping with a type ({', '.join(DISTRIBUTIONS)}), got {spec!r}")
    kind = spec["type"]
    if kind not in DISTRIBUTIONS:
        raise _err(path, f"parameters.{key}.type", f"unknown distribution {kind!r}; valid: {', '.join(DISTRIBUTIONS)}")
    unknown = [k for k in spec if k != "type" and k not in DISTRIBUTIONS[kind]]
    if unknown:
        raise _err(path, f"parameters.{key}.{unknown[0]}", f"not a field of a {kind} distribution (fields: {', '.join(DISTRIBUTIONS[kind])})")
    if kind == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise _err(path, f"parameters.{key}.values", f"must be a non-empty list, got {values!r}")
        param = Parameter(key=key, kind=kind, values=tuple(values))
        samples = list(values)
    else:
        low, high = _number(path, f"parameters.{key}", spec, "low"), _number(path, f"parameters.{key}", spec, "high")
        if low > high:
            raise _err(path, f"parameters.{key}", f"low ({low}) is above high ({high})")
        if kind == "loguniform" and low <= 0:
            raise _err(path, f"parameters.{key}.low", f"a loguniform distribution needs low > 0, got {low}")
        step = None
        if kind == "int":
            if int(low) != low or int(high) != high:
                raise _err(path, f"parameters.{key}", f"an int distribution needs integer low and high, got {low}, {high}")
            step = spec.get("step", 1)
            if not isinstance(step, int) or step < 1:
                raise _err(path, f"parameters.{key}.step", f"must be an integer >= 1, got {step!r}")
            low, high = int(low), int(high)
        param = Parameter(key=key, kind=kind, low=low, high=high, step=step)
        samples = [low, high]
    for value in samples:  # every extreme must make a valid config on its own
        try:
            base.replace(**{key: value})
        except ValueError as exc:
            if key in ("prelora.r_min", "prelora.r_max") and "<= prelora.r_max" in str(exc):
                continue  # checked jointly below
            raise _err(path, f"parameters.{key}", f"value {value!r} is not valid here ({exc})") from None
    return param


def _check_relations(path: str, params: dict[str, Parameter], base: TrainSettings) -> None:
    lo_p, hi_p = params.get("prelora.r_min"), params.get("prelora.r_max")
    lo_min = lo_p.bounds()[0] if lo_p else base.prelora.r_min
    hi_max = hi_p.bounds()[1] if hi_p else base.prelora.r_max
    if lo_min > hi_max:
        raise _err(path, "parameters.prelora.r_min", f"its smallest value ({lo_min}) is above the largest prelora.r_max ({hi_max}): no valid pair exists")
    for key in ("prelora.r_min", "prelora.r_max"):
        p = params.get(key)
        if p is not None and p.kind != "categorical":
            raise _err(path, f"parameters.{key}", "ranks must be powers of two: use a categorical distribution, e.g. values: [4, 8, 16]")


def full_phase_keys(keys: list[str]) -> list[str]:
    """The sampled keys that change the full-training phase (and so cannot share one trunk)."""
    return [k for k in keys if not ((k.startswith("prelora.") and k != "prelora.window_unit") or k in POST_SWITCH_OPTIM_KEYS)]


def parse_fork(path: str, raw: Any, base: TrainSettings, sampled: list[str]) -> tuple[bool, int]:
    """`fork: true|false` or `fork: {enabled, every}`; on by default where the space allows it.

    Fork mode needs trials whose full phase is the baseline's: prelora with epoch windows, and
    sampled keys that act only at or after the switch. Asked for explicitly on a space that breaks
    this, it is an error naming the key; left unset, such a space quietly runs every trial whole.
    """
    spec = {"enabled": raw} if raw is None or isinstance(raw, bool) else raw
    if not isinstance(spec, dict):
        raise _err(path, "fork", f"must be true, false or a mapping with {', '.join(FORK_KEYS)}, got {raw!r}")
    extra = [k for k in spec if k not in FORK_KEYS]
    if extra:
        raise _err(path, f"fork.{extra[0]}", f"unknown field (fields: {', '.join(FORK_KEYS)})")
    enabled, every = spec.get("enabled"), spec.get("every", 1)
    if enabled is not None and not isinstance(enabled, bool):
        raise _err(path, "fork.enabled", f"must be true or false, got {enabled!r}")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise _err(path, "fork.every", f"must be an integer >= 1 (epochs between the trunk's checkpoints), got {every!r}")
    problems = [(f"parameters.{k}", "changes the full-training phase, which every forked trial shares with the trunk; "
                 "sample only prelora.* (not window_unit), optim.lora_lr or optim.carry_optimizer_state, or set fork: false")
                for k in full_phase_keys(sampled)]
    if base.strategy != "prelora":
        problems.append(("base.strategy", f"is {base.strategy!r}: forked trials are prelora runs"))
    if base.prelora.window_unit != "epoch":
        problems.append(("base.prelora.window_unit", "is 'step': the trunk records one snapshot per epoch; use epoch or fork: false"))
    if enabled and problems:
        raise _err(path, problems[0][0], problems[0][1])
    return (not problems if enabled is None else enabled), every


def load_search_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file; ValueError naming the file and key otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"search space {str(p)!r} does not exist")
    text = p.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: the top level must be a mapping with keys {', '.join(TOP_KEYS)}")
    return parse_search_space(data, path=str(p), raw_text=text)


def parse_search_space(data: dict[str, Any], *, path: str = "<search space>", raw_text: str = "") -> SearchSpace:
    """Validate an already-parsed search space (see load_search_space)."""
    for key in data:
        if key not in TOP_KEYS:
            raise _unknown_key_error(str(key), list(TOP_KEYS), path)
    base = TrainSettings.from_dict(data.get("base") or {}, source=f"{path}: base")
    raw_params = data.get("parameters")
    if not isinstance(raw_params, dict) or not raw_params:
        raise _err(path, "parameters", "must be a non-empty mapping of config key -> distribution")
    params = {str(k): _parameter(path, str(k), v, base) for k, v in raw_params.items()}
    _check_relations(path, params, base)
    raw_obj = data.get("objectives", list(DEFAULT_OBJECTIVES))
    if not isinstance(raw_obj, list) or not raw_obj:
        raise _err(path, "objectives", f"must be a non-empty list of {{metric, mode}}; metrics: {', '.join(OBJECTIVE_METRICS)}")
    objectives = []
    for i, o in enumerate(raw_obj):
        if not isinstance(o, dict) or "metric" not in o:
            raise _err(path, f"objectives[{i}].metric", f"missing; one of {', '.join(OBJECTIVE_METRICS)}")
        if o["metric"] not in OBJECTIVE_METRICS:
            raise _err(path, f"objectives[{i}].metric", f"unknown metric {o['metric']!r}; one of {', '.join(OBJECTIVE_METRICS)}")
        if o.get("mode") not in ("max", "min"):
            raise _err(path, f"objectives[{i}].mode", f"must be max or min, got {o.get('mode')!r}")
        extra = [k for k in o if k not in ("metric", "mode")]
        if extra:
            raise _err(path, f"objectives[{i}].{extra[0]}", "unknown field (fields: metric, mode)")
        objectives.append(Objective(metric=o["metric"], mode=o["mode"]))
    if len({o.metric for o in objectives}) != len(objectives):
        raise _err(path, "objectives", "a metric appears twice")
    sampler = data.get("sampler", {"type": "tpe"})
    if isinstance(sampler, str):
        sampler = {"type": sampler}
    if not isinstance(sampler, dict) or sampler.get("type") not in SAMPLERS:
        raise _err(path, "sampler.type", f"must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    extra = [k for k in sampler if k not in ("type", "seed")]
    if extra:
        raise _err(path, f"sampler.{extra[0]}", "unknown field (fields: type, seed)")
    num_samples = data.get("num_samples", 8)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise _err(path, "num_samples", f"must be an integer >= 1, got {num_samples!r}")
    max_concurrent = data.get("max_concurrent", 2)
    if not isinstance(max_concurrent, int) or isinstance(max_concurrent, bool) or max_concurrent < 1:
        raise _err(path, "max_concurrent", f"must be an integer >= 1, got {max_concurrent!r}")
    executor = data.get("trial_executor", "ray_train")
    if executor not in TRIAL_EXECUTORS:
        raise _err(path, "trial_executor", f"must be one of {', '.join(TRIAL_EXECUTORS)}, got {executor!r}")
    if executor == "tune" and base.cluster.num_workers != 1:
        raise _err(path, "trial_executor", f"tune runs each trial's one worker in the trial's own process: it needs base.cluster.num_workers 1, got {base.cluster.num_workers} (use ray_train)")
    if executor == "tune" and "cluster.num_workers" in params:
        raise _err(path, "trial_executor", "tune runs one worker per trial: cluster.num_workers cannot be sampled (use ray_train)")
    baseline = data.get("baseline", True)
    if not isinstance(baseline, bool):
        raise _err(path, "baseline", f"must be true or false, got {baseline!r}")
    name = data.get("name") or Path(path).stem
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise _err(path, "name", f"must be letters, digits, - and _ only, got {name!r}")
    fork, fork_every = parse_fork(path, data.get("fork"), base, list(params))
    seed = sampler.get("seed", 0)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise _err(path, "sampler.seed", f"must be an integer or null, got {seed!r}")
    return SearchSpace(
        name=name,
        path=path,
        base=base,
        parameters=list(params.values()),
        objectives=objectives,
        sampler=sampler["type"],
        seed=seed,
        num_samples=num_samples,
        max_concurrent=max_concurrent,
        trial_executor=executor,
        baseline=baseline,
        experiment=data.get("experiment"),
        fork=fork,
        fork_every=fork_every,
        description=str(data.get("description", "")),
        raw_text=raw_text,
    )
