"""FourierFT: learned spectral coefficients of each adapted layer's update."""

from __future__ import annotations

from .spec import Method, PeftBuilder

# The spectral locations are drawn from random_loc_seed (peft's default 777) at every site alike;
# the update is linear in the trained coefficients, so averaging them is exact.
build = PeftBuilder("FourierFTConfig", {"n_frequency": "n_frequency"})

FOURIERFT = Method(
    "fourierft", "peft's FourierFT", build, default_lr=1e-2, trained_keys=("fourierft_",), mergeable=True
)
