"""prelora-ray: PreLoRA pre-training of vision transformers, tuned with Ray Tune.

Importing this package imports neither Ray nor PEFT nor MLflow: the algorithms and the training loop
work on their own (`prelora_ray.trainer.train`), and Ray lives in `prelora_ray.orchestration`.
"""

from prelora_ray.algorithms import assign_ranks, candidate_ranks, partial_convergence_test

__all__ = ["assign_ranks", "candidate_ranks", "partial_convergence_test"]
__version__ = "0.1.0"
