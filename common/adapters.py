"""Trainable adapter state: get/set on a PEFT model, deltas, and Flower ArrayRecords.

Wire format (documented choice): sites send the *delta* ``local - global`` of every trainable
adapter tensor, keyed by PEFT's saved-adapter names (``get_peft_model_state_dict``: the same
keys as ``adapter_model.safetensors``), as float32. Deltas are small and centred on zero,
which is what the secure-aggregation quantizer wants; the server adds their weighted mean to
the global adapter. Frozen base weights never travel.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch


def get_trainable_state(model) -> OrderedDict[str, torch.Tensor]:
    """The adapter's trainable tensors as float32 CPU copies (PEFT's saved-adapter keys)."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model)
    return OrderedDict((k, v.detach().to("cpu", torch.float32).clone()) for k, v in sd.items())


def set_trainable_state(model, state: Mapping[str, torch.Tensor]) -> None:
    """Load adapter tensors into the model; every adapter key must be given, no others."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = set(get_peft_model_state_dict(model))
    got = set(state)
    if expected != got:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise KeyError(f"adapter state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    result = set_peft_model_state_dict(model, dict(state))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"adapter keys not used by the model: {unexpected[:3]}")


def delta(local: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """local - base, key by key (same keys required)."""
    if set(local) != set(base):
        raise KeyError("delta: states have different keys")
    return OrderedDict((k, local[k].float() - base[k].float()) for k in base)


def apply_delta(base: Mapping[str, torch.Tensor], d: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    if set(d) != set(base):
        raise KeyError("apply_delta: states have different keys")
    return OrderedDict((k, base[k].float() + d[k].float()) for k in base)


def to_arrays(state: Mapping[str, torch.Tensor]):
    """-> flwr ArrayRecord of float32 arrays (ArrayRecord rejects bfloat16)."""
    from flwr.app import ArrayRecord

    return ArrayRecord(OrderedDict((k, v.detach().to("cpu", torch.float32)) for k, v in state.items()))


def from_arrays(record) -> OrderedDict[str, np.ndarray]:
    """flwr ArrayRecord -> name -> numpy array (dtype as sent; validation checks it)."""
    return OrderedDict((k, record[k].numpy()) for k in record.keys())


def to_tensors(arrays: Mapping[str, np.ndarray]) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v)).float()) for k, v in arrays.items())


def record_nbytes(record) -> int:
    """Bytes of an update's serialised arrays: 4 per float32 value + a ~128-byte .npy header per tensor."""
    return int(sum(len(record[k].data) for k in record.keys()))


def num_params(state: Mapping[str, torch.Tensor]) -> int:
    return int(sum(v.numel() for v in state.values()))
