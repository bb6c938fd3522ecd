"""Training phases: each a name and a stored number, declared by the strategy that owns it.

A phase is what the loop is in (`LoopState.phase`): its name goes into checkpoints and Ray reports, its
number into MLflow as `phase_index`, and its `trains` rule says which parameters have requires_grad
(`adapters.model.set_trainable`). FULL (0) is every run's first phase and is declared here; the others
are declared in the files of the strategies that own them (warmup 1 and lora 2 in prelora.py, relora 3,
lte 4) and become known when their strategy registers (`strategies.registry`).

The numbers are stored in every MLflow run and never change: a new phase takes a free number (a user's
package: 100 and up, so that a later built-in does not take it). `Phase` itself lists the phases of the
registered strategies: `list(Phase)`, `Phase("lora")`, `Phase.LORA`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

TrainsRule = Callable[[str, Any], bool]
"""(parameter name, the strategy's settings) -> whether it trains in the phase."""


class _Phases(type):
    """The registered phases as the class's own collection (as an Enum's members)."""

    def __iter__(cls) -> Iterator[Phase]:
        return iter(sorted(_ACTIVE.values(), key=lambda p: p.index))

    def __len__(cls) -> int:
        return len(_ACTIVE)

    def __call__(cls, value: str) -> Phase:
        """The registered phase named `value` (a checkpoint's or a report's phase)."""
        try:
            return _ACTIVE[value]
        except KeyError:
            raise ValueError(
                f"phase {value!r} is unknown: none of the registered strategies declares it "
                f"(phases: {', '.join(_ACTIVE)}); register the strategy that wrote it first"
            ) from None

    def __getattr__(cls, name: str) -> Phase:
        """`Phase.LORA`: the registered phase named `lora`."""
        if name.isupper() and name.lower() in _ACTIVE:
            return _ACTIVE[name.lower()]
        raise AttributeError(f"type object 'Phase' has no attribute {name!r} (no registered phase {name.lower()!r})")


class Phase(metaclass=_Phases):
    """A training phase: `value` (its name), `index` (its stored number) and `trains` (which parameters train)."""

    value: str
    index: int
    trains: TrainsRule

    @classmethod
    def declare(cls, value: str, index: int, *, trains: TrainsRule) -> Phase:
        """A new phase (known to `Phase(...)` once a strategy listing it in its `phases` registers)."""
        if not value.isidentifier() or value != value.lower():
            raise ValueError(f"phase name {value!r} is invalid: a lower-case identifier")
        if type(index) is not int or index < 0:
            raise ValueError(f"phase {value!r}: stored number {index!r} is invalid: an integer >= 0")
        phase = object.__new__(cls)
        phase.value, phase.index, phase.trains = value, index, trains
        return phase

    def __repr__(self) -> str:
        return f"<Phase.{self.value.upper()}: {self.index}>"

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # a pickled phase is looked up again by name where it is loaded (its strategy registered there too)
        return Phase, (self.value,)


def train_all(name: str, settings: Any) -> bool:
    """Every parameter trains (FULL; prelora's WARMUP)."""
    return True


FULL = Phase.declare("full", 0, trains=train_all)
"""Every run starts here: full-parameter training. Its checkpoints are the ones a fork starts from."""

_ACTIVE: dict[str, Phase] = {"full": FULL}


def activate(declared: Iterable[Phase]) -> None:
    """Make exactly FULL and `declared` the known phases (the registry calls this as strategies come and go)."""
    table = {"full": FULL}
    for phase in declared:
        table[phase.value] = phase
    _ACTIVE.clear()
    _ACTIVE.update(table)


def conflict(phase: Phase) -> str | None:
    """Why `phase` cannot join the known phases (its name or its number is another phase's), or None."""
    same_name = _ACTIVE.get(phase.value)
    if same_name is not None and same_name is not phase:
        return (
            f"phase {phase.value!r} is declared already (stored number {same_name.index}): "
            "reuse that Phase object instead of declaring it again"
        )
    for other in _ACTIVE.values():
        if other.index == phase.index and other is not phase:
            return f"phase {phase.value!r}: stored number {phase.index} is phase {other.value!r}'s"
    return None


def phase_index() -> dict[Phase, int]:
    """Every known phase and its stored number (MLflow's `phase_index`)."""
    return {p: p.index for p in Phase}
