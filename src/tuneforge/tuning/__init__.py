"""Hyperparameter search (`tuneforge tune`): Optuna over the config's own keys, data prepared once, trials pruned on
validation, the best configuration trained and evaluated on the test split once."""
