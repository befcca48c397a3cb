"""The training run: batching, mixed precision, early stopping, checkpoints and resume."""
