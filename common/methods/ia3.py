"""IA3: a learned scaling vector per adapted layer."""

from __future__ import annotations

from .spec import Method


def build(model, peft, seed: int):
    import peft as P

    from .targets import block_linears, resolve_targets

    groups = block_linears(model)
    targets = resolve_targets(model, peft)
    if targets == "all-linear":
        targets = groups["all"]
    mlp = set(groups["mlp"])
    return P.IA3Config(target_modules=targets, feedforward_modules=[t for t in targets if t.rsplit(".", 1)[-1] in mlp])


IA3 = Method(
    "ia3", "IA3 (a scaling vector per adapted layer)", build, default_lr=3e-3, trained_keys=("ia3_l",), mergeable=True
)
