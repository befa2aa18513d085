"""Layer-wise control: which tensors train in a given round (freezing, progressive unfreezing) and
at what learning rate (discriminative rates). For every method whose entry is ``layered``.

Layer positions: the tensors under ``layers.i.`` belong to decoder layer i; embeddings sit below
layer 0 (position -1), and everything else outside the layers (the final norm, the head, learned
prompt tokens) above the top layer (position ``n_layers``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..config import ConfigError, LayerConfig
from .targets import LAYER_RE, n_layers_of


def position(key: str, n_layers: int) -> int:
    """Layer of a tensor: i under ``layers.i.``, -1 for embeddings, ``n_layers`` for anything else."""
    m = LAYER_RE.search(key)
    if m:
        return int(m.group(1))
    modules = key.lower().split(".")[:-1]
    return -1 if any(m.startswith("embed") or m in ("wte", "wpe", "word_embeddings") for m in modules) else n_layers


def check_layers(lc: LayerConfig, n_layers: int) -> None:
    """ConfigError when the layers section cannot fit a model of ``n_layers`` layers."""
    if lc.freeze_bottom >= n_layers and lc.freeze_bottom > 0:
        raise ConfigError(
            f"layers.freeze_bottom {lc.freeze_bottom}: the model has {n_layers} layers, so none would train"
        )
    bad = [i for i in lc.only or [] if i >= n_layers]
    if bad:
        raise ConfigError(f"layers.only: layer(s) {bad} do not exist; the model has layers 0..{n_layers - 1}")
    if lc.only is not None and lc.freeze_bottom and all(i < lc.freeze_bottom for i in lc.only):
        raise ConfigError(
            f"layers.only {lc.only} are all below layers.freeze_bottom {lc.freeze_bottom}: nothing would train"
        )


def active_positions(lc: LayerConfig, n_layers: int, rnd: int) -> set[int]:
    """Layer positions that train in round ``rnd`` (see :func:`position`)."""
    allowed = set(range(lc.freeze_bottom, n_layers))
    if lc.only is not None:
        allowed &= set(lc.only)
    else:
        allowed |= {n_layers} | ({-1} if lc.freeze_bottom == 0 else set())
    if lc.unfreeze_start is None:
        return allowed
    layers = sorted((p for p in allowed if 0 <= p < n_layers), reverse=True)
    k = lc.unfreeze_start + lc.unfreeze_step * ((rnd - 1) // lc.unfreeze_every)
    active = set(layers[:k]) | ({n_layers} & allowed)
    if k >= len(layers) and -1 in allowed:  # embeddings last, once every layer trains
        active.add(-1)
    return active


def round_keys(keys: Iterable[str], n_layers: int, lc: LayerConfig, rnd: int) -> list[str]:
    """The trainable set of round ``rnd``: the keys (in order) whose layer trains then."""
    active = active_positions(lc, n_layers, rnd)
    return [k for k in keys if position(k, n_layers) in active]


def lr_scales(model, lc: LayerConfig) -> list[tuple[float, list[torch.nn.Parameter]]]:
    """Discriminative learning rates: trainable parameters grouped by lr multiplier
    ``lr_decay ** (top - layer)`` (the top layer and the head at 1, embeddings lowest)."""
    n = n_layers_of(model)
    groups: dict[float, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            depth = max(0, (n - 1) - position(name, n))
            groups.setdefault(lc.lr_decay**depth, []).append(p)
    return sorted(groups.items(), reverse=True)
