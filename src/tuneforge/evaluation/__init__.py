"""Evaluation on the test split: the model beside baselines, with confidence intervals."""
from tuneforge.evaluation.evaluate import evaluate_all

__all__ = ["evaluate_all"]
