"""OFT: a block-diagonal orthogonal rotation of each adapted layer's input."""

from __future__ import annotations

from .spec import Method


def build(model, peft, seed: int):
    import peft as P

    from .targets import resolve_targets

    return P.OFTConfig(
        oft_block_size=peft.oft_block_size,
        r=0,
        module_dropout=peft.dropout,
        target_modules=resolve_targets(model, peft),
    )


OFT = Method(
    name="oft",
    summary="peft's OFT",
    build=build,
    default_lr=2e-4,
    trained_keys=("oft_",),
    options=("oft_block_size", "dropout"),
    mergeable=True,
)
