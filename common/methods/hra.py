"""HRA (Householder reflection adaptation, Yuan et al., NeurIPS 2024): each adapted layer's input is
multiplied by a chain of ``peft.r`` learned Householder reflections, an orthogonal map like OFT's.
peft starts the reflections in equal pairs (so an even ``r``), which cancel: the fresh adapter is the
base model. The trained tensors are ``hra_u`` (in_features x r); merging multiplies them into the base.

Added through the registry as one file and one entry in :data:`fedtune.common.methods.registry.REGISTRY`.
"""

from __future__ import annotations

from .spec import Method, PeftBuilder

build = PeftBuilder("HRAConfig", {"r": "r"})


def check(peft) -> None:
    if peft.r % 2:  # peft would fall back to a random init that is not the identity (it warns, no more)
        raise ValueError(f"peft.r {peft.r}: hra starts its reflections in cancelling pairs, so r must be even")


HRA = Method(
    "hra",
    "peft's HRA (Householder reflections)",
    build,
    default_lr=2e-4,
    trained_keys=("hra_u",),
    rank=True,
    mergeable=True,
    check=check,
)
