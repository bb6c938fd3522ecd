"""Compatibility names for the modules that still import them from here (benchmarks/ddp_comm.py): the LTE heads
moved to `prelora_ray.adapters.lte` (see docs/algorithms.md, "LTE"). Import from there in new code."""

from __future__ import annotations

from prelora_ray.adapters.lte import *  # noqa: F403 (the whole public surface, re-exported)
