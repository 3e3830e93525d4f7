"""Stage - evaluation: one harness scores every model's ranked lists on the same instances."""

from sigmarec.evaluation.harness import eval_instances, evaluate_rankings

__all__ = ["eval_instances", "evaluate_rankings"]
