"""Image classification: a folder of class sub-folders (or a table of image paths) -> a fine-tuned vision model
(EfficientNet-Lite0 by default, or any local directory AutoModelForImageClassification loads)."""
