"""Tasks: how rows become model inputs and targets, and how predictions are scored."""
