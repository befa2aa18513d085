"""peft's LyCORIS methods: LoHa (Hadamard product of two low-rank pairs) and LoKr (Kronecker product)."""

from __future__ import annotations

from .spec import Method, PeftBuilder

_ARGS = {"r": "r", "alpha": "alpha", "module_dropout": "dropout"}
build_loha = PeftBuilder("LoHaConfig", _ARGS)
build_lokr = PeftBuilder("LoKrConfig", _ARGS)

_LYCORIS = dict(default_lr=2e-4, rank=True, mergeable=True)
LOHA = Method(name="loha", summary="peft's LoHa", build=build_loha, trained_keys=("hada_",), **_LYCORIS)
LOKR = Method(name="lokr", summary="peft's LoKr", build=build_lokr, trained_keys=("lokr_",), **_LYCORIS)
