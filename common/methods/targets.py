"""Which modules of a model a method adapts: ``peft.target_modules`` resolved against the model,
and the decoder layers' count. Layer positions: the tensors under ``layers.i.`` belong to decoder
layer i (see :mod:`fedtune.common.methods.layers`)."""

from __future__ import annotations

import re

import torch

from ..config import ConfigError, PeftSettings

ATTENTION_PARTS = ("attn", "attention")
MLP_PARTS = ("mlp", "feed_forward", "ffn")
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def block_linears(model) -> dict[str, list[str]]:
    """Names (last part) of the linear modules inside the decoder layers, by kind:
    ``{"attention": [...], "mlp": [...], "all": [...]}``."""
    found: dict[str, set[str]] = {"attention": set(), "mlp": set(), "all": set()}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not LAYER_RE.search(name + "."):
            continue
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 1)[0].lower()
        found["all"].add(leaf)
        if any(p in parent for p in ATTENTION_PARTS):
            found["attention"].add(leaf)
        elif any(p in parent for p in MLP_PARTS):
            found["mlp"].add(leaf)
    return {k: sorted(v) for k, v in found.items()}


def resolve_targets(model, peft: PeftSettings) -> list[str] | str:
    """peft.target_modules as peft takes it: 'all-linear', or a list of module names. 'attention' and
    'mlp' become the names found in the model; a listed name must match some module."""
    tm = peft.target_modules
    if tm == "all-linear":
        return "all-linear"
    groups = block_linears(model)
    if isinstance(tm, str):
        if not groups[tm]:
            raise ConfigError(f"peft.target_modules {tm!r}: the model has no {tm} projections inside its layers")
        return groups[tm]
    names = [n for n, _ in model.named_modules()]
    for want in tm:
        if not any(n == want or n.endswith("." + want) for n in names):
            raise ConfigError(
                f"peft.target_modules: no module of the model is named {want!r} (e.g. {', '.join(groups['all'][:4])})"
            )
    return list(tm)


def n_layers_of(model) -> int:
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if isinstance(n, int) and n > 0:
        return n
    seen = {int(m.group(1)) for name, _ in model.named_parameters() if (m := LAYER_RE.search(name))}
    return max(seen) + 1 if seen else 0
