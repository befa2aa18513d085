"""peft's LyCORIS methods: LoHa (Hadamard product of two low-rank pairs) and LoKr (Kronecker product)."""

from __future__ import annotations

from .spec import Method


def build_loha(model, peft, seed: int):
    import peft as P

    from .targets import resolve_targets

    return P.LoHaConfig(
        r=peft.r, alpha=peft.alpha, module_dropout=peft.dropout, target_modules=resolve_targets(model, peft)
    )


def build_lokr(model, peft, seed: int):
    import peft as P

    from .targets import resolve_targets

    return P.LoKrConfig(
        r=peft.r, alpha=peft.alpha, module_dropout=peft.dropout, target_modules=resolve_targets(model, peft)
    )


_LYCORIS = dict(default_lr=2e-4, options=("r", "alpha", "dropout"), rank=True, mergeable=True)
LOHA = Method(name="loha", summary="peft's LoHa", build=build_loha, trained_keys=("hada_",), **_LYCORIS)
LOKR = Method(name="lokr", summary="peft's LoKr", build=build_lokr, trained_keys=("lokr_",), **_LYCORIS)
