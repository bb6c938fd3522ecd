"""Adapters on a ViT: the only code that knows adapter classes and parameter names.

- `names`: which parameters and state-dict keys are an adapter's (pure string rules, no torch).
- `lora`: PEFT LoRA with per-layer ranks: inject (checked), fold into the base and re-initialise, deltas.
- `lean`: the cheaper forward of PEFT's LoRA linear and its one-node autograd kernel.
- `lte`: LoRA-the-Explorer's parallel heads on a linear and their reset-less merge.
- `model`: what every kind shares: the effective weight, requires_grad per phase, the export as a plain
  ViT (every adapter folded in), the DDP unwrap, a weights checksum.

Strategies (`prelora_ray.strategies`) decide when adapters go in and what trains; this package applies it.
Importing the package itself loads nothing: import the module you need (torch comes with it).
"""
