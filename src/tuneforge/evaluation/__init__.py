"""Evaluation on the test split: the model beside baselines, with confidence intervals."""
from tuneforge.evaluation.evaluate import baseline_predictions, evaluate_all

__all__ = ["baseline_predictions", "evaluate_all"]
