"""The names of the coordinator-site messages, kept for older imports: every message, its
records and keys are now declared in :mod:`fedtune.common.messages` (typed classes with
``to_record``/``from_record``); import from there."""

from .messages import CONFIG_KEY, DP_POPULATION_KEY, ROUND_KEY, TRAINABLE_KEY

__all__ = ["CONFIG_KEY", "DP_POPULATION_KEY", "ROUND_KEY", "TRAINABLE_KEY"]
