"""Full fine-tuning: the model's own weights train (those of ``peft.target_modules``), no peft tuner.
The update is the full delta and the artifact a Hugging Face model folder: for small models."""

from __future__ import annotations

from .spec import Method

FULL = Method(
    name="full",
    summary="full fine-tuning (every weight; for small models)",
    build=None,
    default_lr=2e-5,
    trained_keys=(),
    label=lambda peft: "full fine-tuning",
)
