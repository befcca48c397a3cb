"""Text classification (binary, multi-class, multi-label): rows of text + label(s), a sequence-classification
head, accuracy / macro-F1 against majority, TF-IDF and frozen-probe baselines. Facts in spec.py, behaviour in
task.py."""
