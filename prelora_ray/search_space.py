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
from prelora_ray.early_stopping import EarlyStopping, parse_early_stopping
from prelora_ray.strategies import REGISTRY

TOP_KEYS = (
    "name",
    "description",
    "base",
    "parameters",
    "objectives",
    "sampler",
    "num_samples",
    "max_concurrent",
    "trial_executor",
    "baseline",
    "experiment",
    "fork",
    "optuna_storage",
    "alpha",
    "early_stopping",
    "repeats",
)
JOURNAL_PREFIX = "journal:"  # an Optuna journal file (JournalFileBackend), e.g. on an NFS mount every node sees
RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "mariadb", "oracle", "mssql")
OPTUNA_STORAGE_VALID = (
    "an Optuna storage: an RDB URL (sqlite:///PATH, postgresql://USER:PASSWORD@HOST:PORT/DB, mysql://...) "
    "or journal:PATH (a journal file on storage every node sees)"
)
FORK_KEYS = ("enabled", "every")
TRIAL_EXECUTORS = ("ray_train", "tune")
# which keys a fork-mode sweep may sample is each strategy's to say (`Strategy.fork_safe`): for prelora,
# prelora.* but window_unit (they decide the switch itself) and POST_SWITCH_OPTIM_KEYS (they act after it)
DISTRIBUTIONS = {
    "uniform": ("low", "high"),
    "loguniform": ("low", "high"),
    "int": ("low", "high", "step"),
    "categorical": ("values",),
}
CONDITION_FIELD = "when"  # a parameter sampled only in trials where other (categorical) parameters take given values
SAMPLERS = ("tpe", "nsga2", "random", "qmc")
OBJECTIVE_METRICS = (
    M.FINAL_VAL_ACC,
    M.BEST_VAL_ACC,
    M.SPEEDUP,  # against full training, measured in each trial (calibration.*): robust to contention and node speed
    M.MEAN_EPOCH_TIME_S,
    M.PEAK_MEM_MB,
    M.TRAINABLE_FRACTION,
    M.TOTAL_TRAIN_TIME_S,
    M.VAL_LOSS,
)
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
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # (key, allowed values): sampled only where every one holds

    def applies(self, chosen: dict[str, Any]) -> bool:
        """Whether a trial with these sampled values samples this parameter (its `when` holds)."""
        return all(key in chosen and chosen[key] in allowed for key, allowed in self.when)

    def condition(self, key: str) -> tuple[Any, ...] | None:
        """The values of `key` under which this parameter is sampled (None: it does not depend on `key`)."""
        return next((allowed for k, allowed in self.when if k == key), None)

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
    trial_executor: str = (
        "ray_train"  # ray_train: a TorchTrainer per trial; tune: one worker in the trial's own process
    )
    baseline: bool = True
    experiment: str | None = None
    description: str = ""
    fork: bool = False  # trials fork from the baseline's trunk (decided on load: see parse_fork)
    fork_every: int = 1  # epochs between the trunk's fork checkpoints
    raw_text: str = field(default="", repr=False)
    optuna_storage: str | None = None  # the Optuna study's storage URL (None: the sweep's default, `Sweep.optuna_url`)
    alpha: float = 0.05  # significance level of the front's intervals, verdicts and dominance (significance.py)
    early_stopping: EarlyStopping | None = None  # `early_stopping:` (None: off; prelora_ray/early_stopping.py)
    repeats: int = 1  # data-order seeds per forked segment (trials and the baseline's continuation): docs/sweeps.md

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


def _check_speedup_objective(
    path: str, objectives: list[Objective], base: TrainSettings, params: dict[str, Parameter]
) -> None:
    """`speedup` is measured by calibration: an objective only where every trial calibrates (rounds >= 1)."""
    if not any(o.metric == M.SPEEDUP for o in objectives):
        return
    key = "calibration.rounds"
    if key in params and params[key].bounds()[0] < 1:
        raise _err(path, f"parameters.{key}", f"must be >= 1 in every trial: objective {M.SPEEDUP} is measured by it")
    if key not in params and base.calibration.rounds < 1:
        raise _err(
            path,
            f"base.{key}",
            f"is {base.calibration.rounds}: objective {M.SPEEDUP} is measured by calibration; set it >= 1",
        )


def _number(path: str, key: str, spec: dict, name: str) -> float:
    v = spec.get(name)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise _err(path, f"{key}.{name}", f"must be a finite number, got {v!r}")
    return v


def _condition(path: str, key: str, raw: Any, earlier: dict[str, Parameter]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """`when: {other_key: value or [values]}`.

    other_key is a categorical parameter declared above, without a `when` itself.
    """
    where = f"parameters.{key}.{CONDITION_FIELD}"
    if not isinstance(raw, dict) or not raw:
        raise _err(
            path,
            where,
            "must be a mapping of a categorical parameter above to its value(s), "
            f"e.g. {{strategy: [relora_prelora]}}, got {raw!r}",
        )
    out = []
    for other, values in raw.items():
        other = str(other)
        p = earlier.get(other)
        if p is None or p.kind != "categorical" or p.when:
            choices = [k for k, q in earlier.items() if q.kind == "categorical" and not q.when]
            raise _err(
                path,
                f"{where}.{other}",
                "must name a categorical parameter declared above it without a when of its own; "
                f"here: {', '.join(choices) or 'none'}",
            )
        allowed = tuple(values) if isinstance(values, list) else (values,)
        bad = [v for v in allowed if v not in p.values]
        if not allowed or bad:
            raise _err(
                path,
                f"{where}.{other}",
                f"{(bad or [values])[0]!r} is not one of its values ({', '.join(map(str, p.values))})",
            )
        out.append((other, allowed))
    return tuple(out)


def _contexts(when: tuple[tuple[str, tuple[Any, ...]], ...], strategy: Parameter | None) -> list[dict[str, Any]]:
    """The settings a parameter's values must be valid with: each combination of its conditions' values, and each
    sampled strategy its condition leaves open (a strategy checks its own keys, e.g. relora.start_epoch < epochs)."""
    axes = dict(when)
    if strategy is not None and "strategy" not in axes and not strategy.when:
        axes["strategy"] = strategy.values
    contexts: list[dict[str, Any]] = [{}]
    for key, values in axes.items():
        contexts = [{**c, key: v} for c in contexts for v in values]
    return contexts


def _parameter(
    path: str,
    key: str,
    spec: Any,
    base: TrainSettings,
    earlier: dict[str, Parameter] | None = None,
    strategy: Parameter | None = None,
) -> Parameter:
    """One parameter; `earlier`: those declared above it (its `when` may name them), `strategy`: the sampled strategy
    wherever it is declared (the parameter's values are checked with each strategy)."""
    earlier = earlier or {}
    if key not in valid_keys():
        raise _unknown_key_error(key, valid_keys(), f"{path}: parameters")
    if not isinstance(spec, dict) or "type" not in spec:
        raise _err(
            path, f"parameters.{key}", f"must be a mapping with a type ({', '.join(DISTRIBUTIONS)}), got {spec!r}"
        )
    kind = spec["type"]
    if kind not in DISTRIBUTIONS:
        raise _err(path, f"parameters.{key}.type", f"unknown distribution {kind!r}; valid: {', '.join(DISTRIBUTIONS)}")
    unknown = [k for k in spec if k not in ("type", CONDITION_FIELD) and k not in DISTRIBUTIONS[kind]]
    if unknown:
        raise _err(
            path,
            f"parameters.{key}.{unknown[0]}",
            f"not a field of a {kind} distribution (fields: {', '.join(DISTRIBUTIONS[kind])}, {CONDITION_FIELD})",
        )
    when = _condition(path, key, spec[CONDITION_FIELD], earlier) if CONDITION_FIELD in spec else ()
    if key == "strategy":
        if kind != "categorical":
            raise _err(
                path,
                "parameters.strategy.type",
                f"a strategy is sampled from a categorical (values from {', '.join(REGISTRY)}), got {kind!r}",
            )
        values = spec.get("values")
        bad = [v for v in values if v not in REGISTRY] if isinstance(values, list) else []
        if bad:
            raise _err(path, "parameters.strategy.values", f"unknown strategy {bad[0]!r}; valid: {', '.join(REGISTRY)}")
    if kind == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise _err(path, f"parameters.{key}.values", f"must be a non-empty list, got {values!r}")
        param = Parameter(key=key, kind=kind, values=tuple(values), when=when)
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
                raise _err(
                    path, f"parameters.{key}", f"an int distribution needs integer low and high, got {low}, {high}"
                )
            step = spec.get("step", 1)
            if not isinstance(step, int) or step < 1:
                raise _err(path, f"parameters.{key}.step", f"must be an integer >= 1, got {step!r}")
            low, high = int(low), int(high)
        param = Parameter(key=key, kind=kind, low=low, high=high, step=step, when=when)
        samples = [low, high]
    for context in _contexts(when, None if key == "strategy" else strategy or earlier.get("strategy")):
        for value in samples:  # every extreme must make a valid config on its own (in each setting it is sampled in)
            try:
                base.replace(**{**context, key: value})
            except ValueError as exc:
                if key in ("prelora.r_min", "prelora.r_max") and "<= prelora.r_max" in str(exc):
                    continue  # checked jointly below
                where = f" with {', '.join(f'{k}={v}' for k, v in context.items())}" if context else ""
                raise _err(path, f"parameters.{key}", f"value {value!r} is not valid here{where} ({exc})") from None
    return param


def _check_relations(path: str, params: dict[str, Parameter], base: TrainSettings) -> None:
    lo_p, hi_p = params.get("prelora.r_min"), params.get("prelora.r_max")
    lo_min = lo_p.bounds()[0] if lo_p else base.prelora.r_min
    hi_max = hi_p.bounds()[1] if hi_p else base.prelora.r_max
    if lo_min > hi_max:
        raise _err(
            path,
            "parameters.prelora.r_min",
            f"its smallest value ({lo_min}) is above the largest prelora.r_max ({hi_max}): no valid pair exists",
        )
    for key in ("prelora.r_min", "prelora.r_max"):
        p = params.get(key)
        if p is not None and p.kind != "categorical":
            raise _err(
                path,
                f"parameters.{key}",
                "ranks must be powers of two: use a categorical distribution, e.g. values: [4, 8, 16]",
            )


def _samples(p: Parameter) -> list[Any]:
    """The values a parameter's checks try: every categorical value, else both bounds."""
    return list(p.values) if p.kind == "categorical" else [p.low, p.high]


def _check_pairs(path: str, params: dict[str, Parameter], base: TrainSettings) -> None:
    """Every two parameters sampled together give a valid config at each pair of their extremes (in each setting of
    the strategy and the conditions they are sampled in). A relation between two keys (relora.warmup_steps <=
    relora.merge_every, ...) holds over a range if it holds at the corners; the r_min/r_max pair is repaired instead
    (SearchSpace.trial_config)."""
    strategy = params.get("strategy")
    keys = [k for k in params if k != "strategy"]
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if {a, b} == {"prelora.r_min", "prelora.r_max"}:
                continue
            pa, pb = params[a], params[b]
            tried: set[str] = set()
            for context in _contexts(pa.when + pb.when, strategy):
                for va in _samples(pa):
                    for vb in _samples(pb):
                        chosen = {**context, a: va, b: vb}
                        key = repr(sorted(chosen.items(), key=lambda kv: kv[0]))
                        if key in tried or not (pa.applies(chosen) and pb.applies(chosen)):
                            continue
                        tried.add(key)
                        try:
                            base.replace(**chosen)
                        except ValueError as exc:
                            rest = {k: v for k, v in context.items() if k not in (a, b)}
                            where = f" with {', '.join(f'{k}={v}' for k, v in rest.items())}" if rest else ""
                            raise _err(
                                path,
                                f"parameters.{a}",
                                f"value {va!r} with {b}={vb!r} is not valid here{where} ({exc})",
                            ) from None


def space_strategies(base: TrainSettings, params: dict[str, Parameter]) -> tuple[str, ...]:
    """The strategies a space's trials can have.

    The sampled `strategy`'s values (and the base's where it has a `when`), else the base's.
    """
    p = params.get("strategy")
    if p is None:
        return (base.strategy,)
    return tuple(dict.fromkeys((*p.values, *((base.strategy,) if p.when else ()))))


def fork_problems(base: TrainSettings, params: dict[str, Parameter]) -> list[tuple[str, str]]:
    """(key, reason) for each way the space breaks fork mode (none: its trials can share the trunk).

    Each strategy says which sampled keys leave its part before the fork point equal to the trunk's
    (`Strategy.fork_safe`) and what in its config stops a fork (`Strategy.fork_problem`); a key under
    `when: {strategy: ...}` is asked of those strategies only.
    """
    strategies = space_strategies(base, params)
    problems = []
    for key, p in params.items():
        if key == "strategy":
            continue
        applies = [s for s in (p.condition("strategy") or strategies) if s in strategies]
        unsafe = [s for s in applies if not REGISTRY[s].fork_safe(key)]
        if unsafe:
            allowed = (
                "; ".join(f"{s}: {REGISTRY[s].fork_keys_text}" for s in unsafe)
                if len(strategies) > 1
                else REGISTRY[unsafe[0]].fork_keys_text
            )
            hint = (
                " (or put the key under a when: {strategy: ...} that leaves these out)" if len(strategies) > 1 else ""
            )
            problems.append(
                (
                    f"parameters.{key}",
                    "changes the full-training phase, which every forked trial shares with the trunk; "
                    f"sample only {allowed}{hint}, or set fork: false",
                )
            )
    for s in strategies:
        why = REGISTRY[s].fork_problem(base.replace(strategy=s))
        if why is not None:
            key, reason = why.split(": ", 1)
            problems.append((f"base.{key}", reason))
    if not any(REGISTRY[s].fork_mode == "fork" for s in strategies):
        forking = [n for n, cls in REGISTRY.items() if cls.fork_mode == "fork"]
        where = "parameters.strategy" if "strategy" in params else "base.strategy"
        problems.append(
            (
                where,
                f"is {' or '.join(map(repr, strategies))}: no trial forks from the trunk "
                f"(strategies that do: {', '.join(forking)})",
            )
        )
    return problems


def parse_fork(path: str, raw: Any, base: TrainSettings, params: dict[str, Parameter]) -> tuple[bool, int]:
    """`fork: true|false` or `fork: {enabled, every}`; on by default where the space allows it.

    Fork mode needs trials whose part before their fork point is the trunk's (`fork_problems`): e.g.
    prelora with epoch windows, and sampled keys that act only at or after the switch. Asked for
    explicitly on a space that breaks this, it is an error naming the key; left unset, such a space
    quietly runs every trial whole.
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
        raise _err(
            path, "fork.every", f"must be an integer >= 1 (epochs between the trunk's checkpoints), got {every!r}"
        )
    problems = fork_problems(base, params)
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
    strategy = (
        None  # checked first: every other parameter's values are checked with each strategy, wherever it is declared
    )
    if "strategy" in raw_params and not (
        isinstance(raw_params["strategy"], dict) and CONDITION_FIELD in raw_params["strategy"]
    ):
        strategy = _parameter(path, "strategy", raw_params["strategy"], base)
    params: dict[str, Parameter] = {}
    for k, v in raw_params.items():
        params[str(k)] = (
            strategy
            if str(k) == "strategy" and strategy is not None
            else _parameter(path, str(k), v, base, params, strategy)
        )
    _check_relations(path, params, base)
    _check_pairs(path, params, base)
    raw_obj = data.get("objectives", list(DEFAULT_OBJECTIVES))
    if not isinstance(raw_obj, list) or not raw_obj:
        raise _err(
            path, "objectives", f"must be a non-empty list of {{metric, mode}}; metrics: {', '.join(OBJECTIVE_METRICS)}"
        )
    objectives = []
    for i, o in enumerate(raw_obj):
        if not isinstance(o, dict) or "metric" not in o:
            raise _err(path, f"objectives[{i}].metric", f"missing; one of {', '.join(OBJECTIVE_METRICS)}")
        if o["metric"] not in OBJECTIVE_METRICS:
            raise _err(
                path,
                f"objectives[{i}].metric",
                f"unknown metric {o['metric']!r}; one of {', '.join(OBJECTIVE_METRICS)}",
            )
        if o.get("mode") not in ("max", "min"):
            raise _err(path, f"objectives[{i}].mode", f"must be max or min, got {o.get('mode')!r}")
        extra = [k for k in o if k not in ("metric", "mode")]
        if extra:
            raise _err(path, f"objectives[{i}].{extra[0]}", "unknown field (fields: metric, mode)")
        objectives.append(Objective(metric=o["metric"], mode=o["mode"]))
    if len({o.metric for o in objectives}) != len(objectives):
        raise _err(path, "objectives", "a metric appears twice")
    _check_speedup_objective(path, objectives, base, params)
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
        raise _err(
            path,
            "trial_executor",
            "tune runs each trial's one worker in the trial's own process: "
            f"it needs base.cluster.num_workers 1, got {base.cluster.num_workers} (use ray_train)",
        )
    if executor == "tune" and "cluster.num_workers" in params:
        raise _err(
            path,
            "trial_executor",
            "tune runs one worker per trial: cluster.num_workers cannot be sampled (use ray_train)",
        )
    baseline = data.get("baseline", True)
    if not isinstance(baseline, bool):
        raise _err(path, "baseline", f"must be true or false, got {baseline!r}")
    name = data.get("name") or Path(path).stem
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise _err(path, "name", f"must be letters, digits, - and _ only, got {name!r}")
    fork, fork_every = parse_fork(path, data.get("fork"), base, params)
    optuna_storage = data.get("optuna_storage")
    if optuna_storage is not None:
        optuna_storage = check_optuna_storage(optuna_storage, f"{path}: optuna_storage")
    from prelora_ray.significance import check_alpha, check_repeats  # numpy: not at import (search_space loads none)

    try:
        alpha = check_alpha(data.get("alpha", 0.05), "alpha")
        repeats = check_repeats(data.get("repeats", 1), "repeats")
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    try:
        early_stopping = parse_early_stopping(data.get("early_stopping"))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if early_stopping is not None and not fork:
        raise _err(
            path,
            "early_stopping",
            "needs fork mode (fork: true, the default where the space allows it): the trunk is every rung's reference",
        )
    if early_stopping is not None and repeats > 1:
        raise _err(
            path,
            "early_stopping",
            f"cannot be combined with repeats {repeats} yet (a rung judges one run's report; a trial's repeats train "
            "after it): use repeats: 1, or no early_stopping",
        )
    if repeats > 1 and not fork:
        raise _err(
            path,
            "repeats",
            f"{repeats} needs fork mode (each repeat retrains the trials' forked segments with its own seed); "
            "this space does not fork (see fork:)",
        )
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
        optuna_storage=optuna_storage,
        alpha=alpha,
        early_stopping=early_stopping,
        repeats=repeats,
    )


def check_optuna_storage(url: Any, key: str) -> str:
    """An Optuna storage URL made absolute (sqlite and journal paths against the working directory).

    An invalid one raises a ValueError naming `key`. Only the form is checked here; the sweep connects to it before Ray
    starts (`optuna_search.open_storage`)."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"{key}={url!r} is invalid: {OPTUNA_STORAGE_VALID}")
    url = url.strip()
    if url.startswith(JOURNAL_PREFIX):
        file = url[len(JOURNAL_PREFIX) :].removeprefix("//")
        if not file:
            raise ValueError(f"{key}={url!r} is invalid: journal:PATH needs a file path")
        return JOURNAL_PREFIX + str(Path(file).expanduser().resolve())
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower() if "://" in url else ""
    if scheme not in RDB_SCHEMES:
        raise ValueError(f"{key}={url!r} is invalid: {OPTUNA_STORAGE_VALID}")
    if (
        scheme == "sqlite"
        and url.startswith("sqlite:///")
        and not url.startswith("sqlite:////")
        and url != "sqlite:///:memory:"
    ):
        return "sqlite:///" + str(Path(url[len("sqlite:///") :]).expanduser().resolve())
    if url in ("sqlite://", "sqlite:///:memory:"):
        raise ValueError(
            f"{key}={url!r} is invalid: an in-memory database dies with the driver; give a file or a server"
        )
    return url
