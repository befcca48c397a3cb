"""tuneforge: fine-tune a pre-trained model for a task in one command, measured against cheap baselines."""
__version__ = "0.1.0"
