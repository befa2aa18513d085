"""Fine-tuning methods: what each ``peft.method`` is, the trainable model it builds, the tensors the
federation averages, and which of them train in a given round (layer-wise control).

- :mod:`.registry`: one entry per method (:class:`~.spec.Method`), one small file per method or
  family (:mod:`.lora`, :mod:`.ia3`, :mod:`.hra`, ...); how to add one is in its docstring.
- :mod:`.model`: the trainable model (:func:`wrap`, :func:`load_model`), its state, saving, merging.
- :mod:`.targets`: which modules; :mod:`.layers`: layer-wise control; :mod:`.ranks`: mixed ranks.

This package's own import is light (the registry: no torch, no peft), because ``common/config.py``
validates against the registry; the names of the other modules are loaded on first use, so
``from fedtune.common.methods import wrap`` and ``methods.get_state(...)`` work as they always did.
"""

from __future__ import annotations

import importlib

from .registry import REGISTRY, get, names
from .spec import Method

_LAZY = {
    "targets": ("ATTENTION_PARTS", "MLP_PARTS", "LAYER_RE", "block_linears", "resolve_targets", "n_layers_of"),
    "layers": ("position", "check_layers", "active_positions", "round_keys", "lr_scales"),
    "model": (
        "ADAPTER_NAME",
        "METHOD_FILE",
        "peft_config",
        "wrap",
        "is_peft",
        "param_keys",
        "get_state",
        "set_state",
        "trainable_capable",
        "set_trainable",
        "load_model",
        "saved_peft_config",
        "base_reference",
        "base_fingerprint",
        "method_info",
        "read_method_info",
        "relink",
        "load_trained",
        "export_merged",
        "export_full",
    ),
    "ranks": ("site_rank_problem", "site_config", "truncate_rank", "pad_rank", "rank_of", "lora_pairs"),
}
_HOME = {name: module for module, names_ in _LAZY.items() for name in names_}

__all__ = ["REGISTRY", "Method", "get", "names", *_HOME]


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
