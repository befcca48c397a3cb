"""Causal LM (generative LLM) fine-tuning: instruction pairs, chats and plain text (see task.py)."""
from tuneforge.tasks.causal_lm.task import CausalLMTask

TASK = CausalLMTask()
