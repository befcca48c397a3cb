"""Causal LM (generative LLM) fine-tuning: instruction pairs, chats and plain text. Facts in spec.py, behaviour in
task.py."""
