"""FourierFT: learned spectral coefficients of each adapted layer's update."""

from __future__ import annotations

from .spec import Method


def build(model, peft, seed: int):
    import peft as P

    from .targets import resolve_targets

    # The spectral locations are drawn from random_loc_seed (peft's default 777) at every site alike;
    # the update is linear in the trained coefficients, so averaging them is exact.
    return P.FourierFTConfig(n_frequency=peft.n_frequency, target_modules=resolve_targets(model, peft))


FOURIERFT = Method(
    name="fourierft",
    summary="peft's FourierFT",
    build=build,
    default_lr=1e-2,
    trained_keys=("fourierft_",),
    options=("n_frequency",),
    mergeable=True,
)
