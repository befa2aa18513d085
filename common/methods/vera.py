"""VeRA: frozen random projections shared by every layer, and trained scaling vectors. The
projections are drawn from the run's seed, so every site has the same ones and they never travel."""

from __future__ import annotations

from .spec import Method


def build(model, peft, seed: int):
    import peft as P

    from .targets import resolve_targets

    return P.VeraConfig(
        r=peft.r, vera_dropout=peft.dropout, target_modules=resolve_targets(model, peft), projection_prng_key=seed
    )


VERA = Method(
    name="vera",
    summary="peft's VeRA",
    build=build,
    default_lr=4e-3,
    trained_keys=("vera_lambda",),
    options=("r", "dropout"),
    rank=True,
    mergeable=True,
)
