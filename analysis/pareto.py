"""Pareto fronts on bare arrays: front, knee, hypervolume, speed-up at equal accuracy.

The computations live in the package (prelora_ray.front) because the sweep needs them too, and
the package never imports analysis/; this module keeps the analysis-side name.
"""

from __future__ import annotations

from prelora_ray.front import hypervolume, knee_point, pareto_front, pareto_mask, speedup_at_equal_accuracy

__all__ = ["hypervolume", "knee_point", "pareto_front", "pareto_mask", "speedup_at_equal_accuracy"]
