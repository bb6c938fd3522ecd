"""Which parameters and state-dict keys belong to an adapter: string rules only (no torch, light to import).

PEFT names every LoRA tensor `lora_<part>` (`lora_A`, `lora_B`, `lora_embedding_A`, DoRA's
`lora_magnitude_vector`); base weights, `modules_to_save` copies and the head never carry it. LTE heads
(`adapters.lte`) are parameters `lte_A`, `lte_B` with buffers `lte_prev_A`, `lte_prev_B`. Both kinds wrap
the adapted linear, whose own weight is then `<module>.base_layer.weight`.
"""

from __future__ import annotations

ADAPTER = "default"
"""The name of the one PEFT adapter a model carries."""
LORA_MARK = "lora_"
"""In the name of every PEFT LoRA tensor."""
HEAD_PARAMS = ("lte_A", "lte_B")
"""Parameter names of the LTE heads."""
PREV_BUFFERS = ("lte_prev_A", "lte_prev_B")
"""Buffers holding each LTE head's A and B at the last merge."""
BASE_WEIGHT = ".base_layer.weight"
"""How an adapted linear's own weight ends, under PEFT and under LTE heads alike."""


def is_head_param(name: str) -> bool:
    """Whether a parameter (by name, with or without a DDP prefix) is an LTE head's A or B."""
    return name.rpartition(".")[2] in HEAD_PARAMS


def is_head_state(name: str) -> bool:
    """Whether a state-dict key is an LTE head's A, B or their copies at the last merge (per-worker state)."""
    return name.rpartition(".")[2] in HEAD_PARAMS + PREV_BUFFERS


def is_adapter_param(name: str) -> bool:
    """Whether a parameter (by its name in the adapted model, with or without a DDP prefix) is an adapter's."""
    return LORA_MARK in name or is_head_param(name)


def is_adapted_base_weight(name: str) -> bool:
    """Whether a parameter is an adapted linear's own weight (frozen while its adapter trains: ReLoRA, LTE)."""
    return name.endswith(BASE_WEIGHT)
