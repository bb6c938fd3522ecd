"""Compatibility names for the modules that still import them from here (benchmarks/): nothing in the package does.

The switch's parts moved: the phases to `prelora_ray.strategies` (each declared by its strategy), the adapters
to `prelora_ray.adapters` (lora: PEFT's; lean: the kernel; lte: the heads; model: shared; names: which
parameters are an adapter's). `merge_lora` is `adapters.model.merge_adapters`. `PHASE_INDEX` and `Phase` list
the phases of the registered strategies. Import from the new places in new code.
"""

from __future__ import annotations

from typing import Any

from prelora_ray.adapters import lean
from prelora_ray.adapters.lean import lean_lora_forward
from prelora_ray.adapters.lora import (
    adapter_deltas,
    adapter_root,
    check_injection,
    fold_adapters,
    inject_lora,
    injected_ranks,
    rank_by_module,
    reinit_adapters,
)
from prelora_ray.adapters.model import effective_weight, set_trainable, unwrap, weights_checksum
from prelora_ray.adapters.model import merge_adapters as merge_lora
from prelora_ray.adapters.names import ADAPTER, is_adapter_param
from prelora_ray.strategies import Phase
from prelora_ray.strategies.phases import phase_index

__all__ = [
    "ADAPTER",
    "PHASE_INDEX",  # noqa: F822 (module __getattr__)
    "LeanLoraLinear",  # noqa: F822 (module __getattr__)
    "Phase",
    "adapter_deltas",
    "adapter_root",
    "check_injection",
    "effective_weight",
    "fold_adapters",
    "inject_lora",
    "injected_ranks",
    "is_adapter_param",
    "lean_lora_forward",
    "merge_lora",
    "rank_by_module",
    "reinit_adapters",
    "set_trainable",
    "unwrap",
    "weights_checksum",
]


def __getattr__(name: str) -> Any:
    """`PHASE_INDEX` (the registered phases now) and `LeanLoraLinear` (built on first use; old pickles name it here)."""
    if name == "PHASE_INDEX":
        return phase_index()
    if name == "LeanLoraLinear":
        return lean.LeanLoraLinear
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
