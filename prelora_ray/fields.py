"""The two helpers every settings dataclass is written with: a field with its one-line doc, and a value check.

Shared by config.py's sections and each strategy's own section (prelora_ray/strategies/<name>.py), which
config.py imports: so this module imports nothing of the package (no circle) and nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from typing import Any


def setting(default: Any, doc: str | Callable[[], str], **kwargs: Any) -> Any:
    """A dataclass field with its one-line doc as metadata (`--help-config`, docs/config.md).

    `doc` may be a function, called when the docs are read: the `strategy` key's lists the strategies registered then.
    """
    if isinstance(default, (list, dict)):  # a mutable default: a fresh copy per instance
        return field(default_factory=lambda: default, metadata={"doc": doc}, **kwargs)
    return field(default=default, metadata={"doc": doc}, **kwargs)


def check(cond: bool, key: str, value: Any, valid: str) -> None:
    """Raise the one-line ValueError of a bad value: `key=value is invalid: valid`."""
    if not cond:
        raise ValueError(f"{key}={value!r} is invalid: {valid}")
