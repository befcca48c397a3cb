"""Find, load, adapt (freeze / LoRA), run and export pre-trained models."""
