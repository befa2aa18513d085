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


def delta(local: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """local - base, key by key (same keys required)."""
    if set(local) != set(base):
        raise KeyError("delta: states have different keys")
    return OrderedDict((k, local[k].float() - base[k].float()) for k in base)


def apply_delta(base: Mapping[str, torch.Tensor], d: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    if set(d) != set(base):
        raise KeyError("apply_delta: states have different keys")
    return OrderedDict((k, base[k].float() + d[k].float()) for k in base)


LAYOUT_KEY = "adapter-layout"


def adapter_records(state: Mapping[str, torch.Tensor]) -> dict:
    """-> message records for an adapter (or a delta): ``{"arrays": ArrayRecord, LAYOUT_KEY: ConfigRecord}``.

    All tensors travel as ONE float32 vector (ArrayRecord key ``flat``; ArrayRecord rejects
    bfloat16), with the names and shapes beside it. Flower stores and transfers every array as
    separate objects, each fetched with its own signed request: one array per LoRA matrix
    (420 for the default model) cost tens of seconds per message in deployment, while one
    vector is a few 5 MB chunks.
    """
    from flwr.app import ArrayRecord, ConfigRecord

    names = list(state)
    tensors = [state[k].detach().to("cpu", torch.float32).reshape(-1) for k in names]
    flat = torch.cat(tensors) if tensors else torch.zeros(0)
    shapes = [list(state[k].shape) for k in names]
    layout = ConfigRecord({"names": names, "ndims": [len(s) for s in shapes], "dims": [d for s in shapes for d in s]})
    return {"arrays": ArrayRecord(OrderedDict([("flat", flat)])), LAYOUT_KEY: layout}


def read_adapter(
    content, max_values: int | None = None, max_tensors: int | None = None
) -> OrderedDict[str, np.ndarray]:
    """Message content -> name -> array (dtype as sent; validation checks it). ValueError when the
    records are missing or malformed, or do not describe the vector they came with.

    ``max_values``/``max_tensors``: the most the reply may hold (a site's reply may come from an
    attacker): its declared vector size, byte count and tensor count are checked against them
    before the vector is decoded, so an oversize reply is refused unread."""
    try:
        return _read_adapter(content, max_values, max_tensors)
    except (AttributeError, TypeError, KeyError, OverflowError) as e:  # records of the wrong kind or types
        raise ValueError(f"adapter records malformed ({type(e).__name__})") from None


def _read_adapter(content, max_values: int | None, max_tensors: int | None) -> OrderedDict[str, np.ndarray]:
    if "arrays" not in content or LAYOUT_KEY not in content:
        raise ValueError(f"no adapter in the message (expected records 'arrays' and {LAYOUT_KEY!r})")
    record, layout = content["arrays"], content[LAYOUT_KEY]
    if list(record.keys()) != ["flat"]:
        raise ValueError(f"adapter arrays: expected one vector 'flat', got {len(record.keys())} array(s)")
    array = record["flat"]
    declared = tuple(int(d) for d in array.shape)
    if len(declared) != 1:
        raise ValueError(f"adapter vector: expected 1-D, got shape {declared[:4]}")
    if max_values is not None and (declared[0] > max_values or len(array.data) > 4 * max_values + 1024):
        raise ValueError(
            f"adapter vector: declares {declared[0]:,} values ({len(array.data):,} bytes), more than the {max_values:,} "
            "this round's update can have; refused unread"
        )
    try:
        names, ndims, dims = list(layout["names"]), list(layout["ndims"]), list(layout["dims"])
    except KeyError as e:
        raise ValueError(f"adapter layout: missing {e}") from None
    if max_tensors is not None and len(names) > max_tensors:
        raise ValueError(f"adapter layout: {len(names):,} tensors, more than the {max_tensors:,} this round trains")
    if not all(isinstance(n, str) for n in names) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in [*ndims, *dims]
    ):
        raise ValueError("adapter layout: names must be strings, ndims and dims whole numbers")
    if len(names) != len(ndims) or sum(ndims) != len(dims) or any(n < 0 for n in ndims) or any(d < 0 for d in dims):
        raise ValueError("adapter layout: names, ndims and dims do not agree")
    flat = array.numpy()
    if flat.ndim != 1 or flat.size != declared[0]:
        raise ValueError(f"adapter vector: its data hold shape {flat.shape}, not the declared {declared}")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    pos = dpos = 0
    for name, nd in zip(names, ndims):
        shape = tuple(int(d) for d in dims[dpos : dpos + nd])
        dpos += nd
        size = int(np.prod(shape, dtype=np.int64))
        if size < 0 or pos + size > flat.size:
            raise ValueError(f"adapter vector: {flat.size} values, fewer than its layout describes")
        out[name] = flat[pos : pos + size].reshape(shape)
        pos += size
    if pos != flat.size:
        raise ValueError(f"adapter vector: {flat.size} values, its layout describes {pos}")
    if len(out) != len(names):
        raise ValueError("adapter layout: a tensor name appears twice")
    return out


def to_tensors(arrays: Mapping[str, np.ndarray]) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v)).float()) for k, v in arrays.items())


def record_nbytes(record) -> int:
    """Bytes of an update's serialised arrays: 4 per float32 value + a ~128-byte .npy header."""
    return int(sum(len(record[k].data) for k in record.keys()))


def num_params(state: Mapping[str, torch.Tensor]) -> int:
    return int(sum(v.numel() for v in state.values()))
