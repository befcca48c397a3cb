"""The sequence-classification model: a pre-trained encoder with a fresh head for the label space."""
from __future__ import annotations

from pathlib import Path

import torch

from tuneforge.errors import ModelNotFoundError
from tuneforge.models.load import quiet_transformers
from tuneforge.tasks.classification.labels import LabelSpace


def load_classifier(model_dir: Path, space: LabelSpace, seed: int, trust_remote_code: bool = False):
    """A sequence-classification model with a fresh head for `space`; the head init depends on `seed` only."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    with quiet_transformers():
        try:
            return AutoModelForSequenceClassification.from_pretrained(
                str(model_dir), num_labels=len(space.labels), problem_type=space.problem_type,
                id2label=dict(enumerate(space.labels)), label2id={lab: i for i, lab in enumerate(space.labels)},
                local_files_only=True, use_safetensors=True, dtype=torch.float32, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(f"cannot load a classifier from {model_dir} ({err})",
                                     fix="use a Hugging Face encoder directory with safetensors weights") from None
