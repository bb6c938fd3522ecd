"""Reading checkpoint files safely: plain data only, never code (no Ray, no MLflow).

Checkpoints live on shared storage, where anyone who can write a file could otherwise make every
worker that resumes from it run their code: a full unpickler calls whatever the file names. So
files are read with `torch.load(weights_only=True)`, which accepts tensors, numbers, strings,
lists, tuples and dicts and refuses everything else; `TrainingLoop.state_dict()` writes only those.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from prelora_ray.storage import Location, location

# weights_only's errors for bytes it cannot parse, as opposed to objects it refuses to build
_UNREADABLE = re.compile(r"Unsupported operand|String is too long")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read: missing, corrupt, or refused as not plain data."""


def load_state_file(path: str | Path | Location) -> dict[str, Any]:
    """A checkpoint file's state dict on the CPU, loaded without running code from the file.

    `path` may be a storage location (`prelora_ray.storage`): on an object store the file is read only
    when its manifest vouches for it (complete, of the manifest's size).

    Raises:
        CheckpointError: naming the file, when it holds a pickled object that is not plain data
            (refused), or when it is missing, truncated or otherwise unreadable.
    """
    loc = location(path)
    if not loc.is_local:
        try:
            with loc.fetched() as local:
                return _load(local, loc.uri)
        except FileNotFoundError as exc:
            raise CheckpointError(f"checkpoint {loc.uri} is missing or incomplete ({exc})") from exc
    return _load(loc.local, str(loc.local))


def _load(file: Path, name: str) -> dict[str, Any]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if _UNREADABLE.search(str(exc)):  # bytes that are no pickle stream at all (a text file, garbage)
            raise CheckpointError(
                f"checkpoint {name} is missing or corrupt (not a pickle stream: {_refusal_detail(exc)})"
            ) from exc
        raise CheckpointError(
            f"checkpoint {name} holds a pickled object that is not plain data "
            f"(tensors, numbers, strings, lists, dicts), so it was refused: loading it could run code "
            f"({_refusal_detail(exc)})"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"checkpoint {name} is missing or corrupt ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {name} holds a {type(state).__name__}, not a state dict")
    return state


def _refusal_detail(exc: pickle.UnpicklingError) -> str:
    """The one line of torch's long refusal message that says what was refused."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it names {found.group(1)}"
    found = re.search(r"Unsupported [^\n]*", text)
    if found:
        return found.group(0).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
