"""Sequence-to-sequence fine-tuning: an encoder-decoder (T5, BART, Pegasus, Marian, or the offline BERT2BERT
warm-started from the packaged MiniLM) trained to write a target text from a source text."""
