"""`strategy: full`: the baseline. Every parameter trains, every epoch, in phase FULL."""

from __future__ import annotations

from prelora_ray.strategies.base import Strategy


class Full(Strategy):
    """Full-parameter training throughout (the base class's defaults)."""

    name = "full"
