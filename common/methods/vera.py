"""VeRA: frozen random projections shared by every layer, and trained scaling vectors. The
projections are drawn from the run's seed, so every site has the same ones and they never travel."""

from __future__ import annotations

from .spec import Method, PeftBuilder

build = PeftBuilder("VeraConfig", {"r": "r", "vera_dropout": "dropout"}, seed_arg="projection_prng_key")

VERA = Method("vera", "peft's VeRA", build, default_lr=4e-3, trained_keys=("vera_lambda",), rank=True, mergeable=True)
