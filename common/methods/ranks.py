"""Mixed ranks across sites (HetLoRA, Cho et al. 2023), for the methods whose registry entry has
``rank_axes`` (an update that is a product B·A of rank r: the LoRA family).

A site of rank r_i < r trains the first r_i rows of every lora_A and the first r_i columns of every
lora_B of the global rank-r adapter, with alpha scaled by r_i / r so that alpha / r, and so every
retained rank's contribution, is the same. Which axis of which tensor is the rank comes from the
method's entry (``method``; the LoRA family's by default, the only one with mixed ranks today).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch

from ..config import FedTuneConfig
from .registry import get

DEFAULT = "lora"  # the entry whose axes apply when a caller names no method


def site_rank_problem(cfg: FedTuneConfig, rank: int | None) -> str | None:
    """Why a site of LoRA rank ``rank`` cannot train this run (None: it can; a None rank always can)."""
    if rank is None:
        return None
    if not get(cfg.peft.method).mixed_ranks:
        return f"this site trains LoRA rank {rank}, and the run's method {cfg.peft.method} has no LoRA rank"
    if rank > cfg.peft.r:
        return f"this site's LoRA rank {rank} is above the run's peft.r {cfg.peft.r}"
    return None


def site_config(cfg: FedTuneConfig, rank: int | None) -> FedTuneConfig:
    """The run's config as a site of LoRA rank ``rank`` builds its model (the run's own when None)."""
    if rank is None or rank == cfg.peft.r:
        return cfg
    peft = cfg.peft.model_copy(update={"r": rank, "alpha": cfg.peft.alpha * rank / cfg.peft.r})
    return cfg.model_copy(update={"peft": peft})


def truncate_rank(state: Mapping, rank: int, method: str = DEFAULT) -> OrderedDict:
    """The global adapter cut to rank ``rank`` (numpy arrays or tensors; other tensors as they are)."""
    spec = get(method)
    out = OrderedDict()
    for k, v in state.items():
        axis = spec.rank_axis(k)
        out[k] = v if axis is None else (v[:rank] if axis == 0 else v[:, :rank])
    return out


def pad_rank(state: Mapping, shapes: Mapping[str, tuple], method: str = DEFAULT) -> OrderedDict:
    """A lower-rank update zero-padded to the global adapter's shapes (HetLoRA's aggregation)."""
    spec = get(method)
    out = OrderedDict()
    for k, v in state.items():
        shape = tuple(shapes[k])
        if tuple(v.shape) == shape:
            out[k] = v
            continue
        axis = spec.rank_axis(k)
        r = v.shape[axis]
        z = torch.zeros(shape, dtype=v.dtype) if isinstance(v, torch.Tensor) else np.zeros(shape, dtype=v.dtype)
        if axis == 0:
            z[:r] = v
        else:
            z[:, :r] = v
        out[k] = z
    return out


def rank_of(state: Mapping, shapes: Mapping[str, tuple], method: str = DEFAULT) -> int | None:
    """The rank r_i an update was trained at, when every tensor has the global shape except the
    rank axis, which is the same r_i <= r in all of them; None when it does not fit."""
    spec = get(method)
    ranks = set()
    for k, v in state.items():
        if k not in shapes:
            return None
        got, want, axis = tuple(v.shape), tuple(shapes[k]), spec.rank_axis(k)
        if axis is None or len(got) != len(want):
            if got != want:
                return None
            continue
        if any(g != w for i, (g, w) in enumerate(zip(got, want)) if i != axis) or not 1 <= got[axis] <= want[axis]:
            return None
        ranks.add(got[axis])
    if len(ranks) > 1:
        return None
    return ranks.pop() if ranks else None


def lora_pairs(keys, method: str = DEFAULT) -> list[tuple[str, str]]:
    """(A key, B key) of every product B·A among ``keys`` (LoRA: lora_A's and lora_B's)."""
    spec = get(method)
    if not spec.rank_axes:
        return []
    (a, _), (b, _) = sorted((spec.rank_axes or {}).items(), key=lambda kv: kv[1])
    keys = set(keys)
    return sorted((k, k.replace(a, b)) for k in keys if spec.rank_axis(k) == 0 and k.replace(a, b) in keys)
