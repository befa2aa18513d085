"""OFT: a block-diagonal orthogonal rotation of each adapted layer's input."""

from __future__ import annotations

from .spec import Method, PeftBuilder

build = PeftBuilder("OFTConfig", {"oft_block_size": "oft_block_size", "module_dropout": "dropout"}, fixed={"r": 0})

OFT = Method("oft", "peft's OFT", build, default_lr=2e-4, trained_keys=("oft_",), mergeable=True)
