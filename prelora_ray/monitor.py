"""Measurements for Algorithm 1 and 2: per-layer weight norms and the sliding windows over them.

No Ray, no PEFT import. A layer's norm is the Frobenius norm of its effective weight: the plain weight
before the switch, W + s·B·A after it (`adapters.model.effective_weight`: the adapters package knows the
adapters, this one does not). The windows (`ConvergenceMonitor`) are plain numbers: this module is light
to import (the strategies hold a monitor; torch loads when norms are taken).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING

from prelora_ray.algorithms import (
    assign_ranks,
    family_means,
    last_window_changes,
    partial_convergence_test,
    window_values,
)

if TYPE_CHECKING:
    from torch import nn


def effective_weight_norm(module: nn.Module) -> float:
    """Frobenius norm of a linear's weight (bias excluded), with any active adapter's delta added."""
    import torch

    from prelora_ray.adapters.model import effective_weight

    with torch.no_grad():
        return float(torch.linalg.vector_norm(effective_weight(module).float()))


def layer_norms(model: nn.Module, names: Mapping[str, list[str]]) -> dict[str, list[float]]:
    """Family -> per-layer norms, for the module names of `models.family_module_names`.

    `model` is the unwrapped model: the plain ViT, or the PEFT model (its names resolved by
    `adapters.model.adapter_root`).
    """
    from prelora_ray.adapters.model import adapter_root

    root = adapter_root(model)
    return {
        family: [effective_weight_norm(root.get_submodule(n)) for n in layer_names]
        for family, layer_names in names.items()
    }


class ConvergenceMonitor:
    """The last k·m snapshots (one per window unit) and Algorithm 1/2 over them.

    A snapshot is (per-layer norms per family, the all-worker mean training loss of the unit). The
    test runs at window boundaries (every m snapshots) once k complete windows exist, over the last
    k·m snapshots (sliding).
    """

    def __init__(self, *, k: int, m: int, window_stat: str = "mean") -> None:
        self.k, self.m, self.window_stat = k, m, window_stat
        self.snapshots: deque[tuple[dict[str, list[float]], float]] = deque(maxlen=k * m)
        self.units = 0

    def record(self, norms: dict[str, list[float]], loss: float) -> None:
        """Add the snapshot of one window unit (epoch or optimizer step)."""
        self.snapshots.append((norms, float(loss)))
        self.units += 1

    def at_boundary(self) -> bool:
        """True at a window boundary with k complete windows recorded."""
        return self.units >= self.k * self.m and self.units % self.m == 0

    def windows(self) -> tuple[dict[str, list[list[float]]], list[float]]:
        """Per-layer window values (family -> window -> layer) and the window losses L_1..L_k."""
        return window_values(list(self.snapshots), self.k, self.m, self.window_stat)

    def family_windows(self) -> tuple[dict[str, list[float]], list[float]]:
        """W_t^a (mean over the family's layers) for t = 1..k, and the losses: Algorithm 1's input."""
        per_layer, losses = self.windows()
        return family_means(per_layer), losses

    def passed(self, tau: float, zeta: float) -> bool:
        """Algorithm 1 over the last k windows (False before k windows exist)."""
        if len(self.snapshots) < self.k * self.m:
            return False
        norms, losses = self.family_windows()
        return partial_convergence_test(norms, losses, tau, zeta)

    def layer_changes(self) -> dict[str, list[float]]:
        """ΔW_k per layer: % change of each layer's norm between the last two windows."""
        return last_window_changes(self.windows()[0])

    def ranks(self, r_min: int, r_max: int, **options: object) -> dict[str, list[int]]:
        """Algorithm 2 over the last two windows."""
        return assign_ranks(self.layer_changes(), r_min, r_max, **options)

    def state_dict(self) -> dict:
        """Everything needed to resume the test exactly."""
        return {"snapshots": list(self.snapshots), "units": self.units, "k": self.k, "m": self.m}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of state_dict; a checkpoint taken with other windows would change the decision silently."""
        if (state.get("k", self.k), state.get("m", self.m)) != (self.k, self.m):
            raise ValueError(
                f"the checkpoint's windows are k={state['k']}, m={state['m']} but prelora.k={self.k}, "
                f"prelora.m={self.m}: resume with the same values"
            )
        self.snapshots = deque(state["snapshots"], maxlen=self.k * self.m)
        self.units = state["units"]
