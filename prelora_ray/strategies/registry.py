"""The strategy registry: `strategy` name -> the Strategy class that declares and runs it.

The shipped strategies register when `prelora_ray.strategies` is imported; a user's package registers its
own with `register_strategy(cls)` or through the entry-point group `prelora_ray.strategies`, which is
loaded on the first look-up (`REGISTRY`, `get`, `names`, `strategy_sections`): so every process, Ray's
workers included, finds a strategy its package declares, without importing it by hand.

Light to import: config.py reads the strategy names and their config sections from here, before torch.
It does not import `base` (which imports this module for `strategy_sections`): a class is checked by its
declaration instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from importlib import metadata
from typing import TYPE_CHECKING, Any

from prelora_ray.strategies import phases

if TYPE_CHECKING:
    from prelora_ray.strategies.base import Strategy

ENTRY_POINT_GROUP = "prelora_ray.strategies"
"""`[project.entry-points."prelora_ray.strategies"] my_name = "my_package.my_module:MyStrategy"`."""

RESERVED = ("strategy", "epochs", "seed", "deterministic", "amp", "name", "output_dir")
RESERVED += ("model", "data", "optim", "cluster", "tracking", "calibration", "strategy_sections")
"""TrainSettings' own keys and sections: no strategy's section may take one of these names."""

_TABLE: dict[str, type[Strategy]] = {}
_entry_points_loaded = False


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Add a strategy class (a subclass of `prelora_ray.strategies.Strategy`); returns it, so it works as a decorator.

    Its declaration is checked first (name, config section, phases and their stored numbers, metrics): a
    ValueError names what is wrong. Registering the same class again does nothing.
    """
    name = getattr(cls, "name", None)
    if _TABLE.get(name) is cls:
        return cls
    problem = _declaration_problem(cls)
    if problem:
        raise ValueError(f"register_strategy({getattr(cls, '__name__', cls)!r}): {problem}")
    _TABLE[name] = cls
    phases.activate(p for c in _TABLE.values() for p in c.phases)
    return cls


def unregister_strategy(name: str) -> None:
    """Remove a strategy (and the phases only it declared); for tests and notebooks."""
    if _TABLE.pop(name, None) is None:
        raise ValueError(f"strategy={name!r} is not registered")
    phases.activate(p for c in _TABLE.values() for p in c.phases)


def _declaration_problem(cls: Any) -> str | None:
    """What is wrong with a class's declaration, or None."""
    if not isinstance(cls, type) or not any(
        c.__name__ == "Strategy" and c.__module__ == "prelora_ray.strategies.base" for c in cls.__mro__
    ):
        return "not a subclass of prelora_ray.strategies.Strategy"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        return f"name={name!r} is invalid: an identifier (the value of the `strategy` key)"
    if name in _TABLE:
        return f"strategy {name!r} is registered already, by {_TABLE[name].__module__}.{_TABLE[name].__qualname__}"
    section, settings = cls.section, cls.section_class
    if (section is None) != (settings is None):
        return "section and section_class go together: both None, or a section name and its dataclass"
    if section is not None:
        if not section.isidentifier() or section in RESERVED:
            return f"section={section!r} is invalid: an identifier other than {', '.join(RESERVED)}"
        owner = strategy_sections(load=False).get(section)
        if owner is not None:
            return (
                f"section {section!r} belongs to strategy {owner.name!r} (to read it, list it in `uses` "
                "and set section and section_class to None, or give the strategy a section of its own)"
            )
        if not dataclasses.is_dataclass(settings):
            return f"section_class={settings!r} is not a dataclass"
        undocumented = [f.name for f in dataclasses.fields(settings) if not f.metadata.get("doc")]
        if undocumented:
            return f"settings fields without a doc (use prelora_ray.fields.setting): {', '.join(undocumented)}"
    if phases.FULL not in cls.phases or not all(isinstance(p, phases.Phase) for p in cls.phases):
        return "phases must be Phase objects, FULL among them (every run starts in FULL)"
    for phase in cls.phases:
        clash = phases.conflict(phase)
        if clash:
            return clash
    if not all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in dict(cls.metrics).items()):
        return f"metrics={cls.metrics!r} is invalid: metric name -> its number before any event"
    return None


def load_entry_points() -> None:
    """Register the strategies of every installed package's `prelora_ray.strategies` entry points (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True  # first: a module loaded here may look a strategy up while it imports
    for point in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = point.load()
        except Exception as exc:
            raise ValueError(
                f"entry point {point.name} = {point.value} (group {ENTRY_POINT_GROUP}) failed to load: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if getattr(cls, "name", None) != point.name:
            raise ValueError(
                f"entry point {point.name} = {point.value} (group {ENTRY_POINT_GROUP}): "
                f"names a class whose name is {getattr(cls, 'name', None)!r}, not {point.name!r}"
            )
        register_strategy(cls)


def get(name: str) -> type[Strategy]:
    """The class registered as `name`; a ValueError naming the `strategy` key and the valid names otherwise."""
    load_entry_points()
    try:
        return _TABLE[name]
    except KeyError:
        raise ValueError(f"strategy={name!r} is invalid: one of {', '.join(_TABLE)}") from None


def names() -> tuple[str, ...]:
    """The registered strategies' names, in registration order (the shipped ones first)."""
    load_entry_points()
    return tuple(_TABLE)


def strategy_sections(*, load: bool = True) -> dict[str, type[Strategy]]:
    """Config section -> the strategy that owns it (prelora, relora, lte, a user's ...), in registration order."""
    if load:
        load_entry_points()
    return {cls.section: cls for cls in _TABLE.values() if cls.section is not None}


class _Registry(Mapping[str, "type[Strategy]"]):
    """`REGISTRY`: the registered strategies as a read-only mapping, the entry points loaded on first use."""

    def __getitem__(self, name: str) -> type[Strategy]:
        load_entry_points()
        return _TABLE[name]

    def __iter__(self) -> Iterator[str]:
        load_entry_points()
        return iter(tuple(_TABLE))

    def __len__(self) -> int:
        load_entry_points()
        return len(_TABLE)

    def __repr__(self) -> str:
        return f"REGISTRY({', '.join(self)})"


REGISTRY: Mapping[str, type[Strategy]] = _Registry()
