"""Generic evaluation outputs: the HTML report and the model card, built from a run's stored JSON.
Each task computes its own test metrics (tasks/<task>/evaluate.py)."""
