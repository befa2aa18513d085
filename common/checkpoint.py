"""Atomic save/load of global adapters in PEFT format, and of run state.

Each file is written to a temporary name in the same folder, fsync'd, then renamed over
the target, so a crash leaves either the old file or the new one, never half of one.
The adapter folder is what ``PeftModel.from_pretrained(base, path)`` reads as is:
``adapter_config.json`` + ``adapter_model.safetensors``, plus ``manifest.json`` with their
sha256 hashes, which resume uses to skip a torn or corrupted checkpoint. The manifest is typed
(:class:`Manifest`) and a checkpoint must list the files its reader needs, so an empty or
malformed manifest never "verifies".
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save as save_numpy
from safetensors.torch import load_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_private_file(path: str | Path, data: bytes) -> None:
    """Write a secret (a private key): created with mode 0600, never readable by others."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def save_adapter(
    directory: str | Path,
    state: Mapping[str, torch.Tensor],
    peft_config,
    extra_json: Mapping[str, Any] | None = None,
    extra_arrays: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> Path:
    """Write a PEFT adapter folder. ``peft_config``: a peft PeftConfig (e.g. LoraConfig); None for
    full fine-tuning's checkpoints (the weights alone, under the same manifest).
    ``extra_json``: more files (name -> JSON-able object) under the same manifest, e.g. the
    coordinator's RNG state; ``extra_arrays``: more safetensors files (name -> arrays by key),
    e.g. a server optimizer's moments. They verify (and resume) with the weights.

    The manifest (sha256 of each file) is written last, so a folder whose manifest verifies
    holds a complete checkpoint; a torn or corrupted one fails :func:`verify_checkpoint`.
    """
    from safetensors.torch import save as save_bytes

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    weights = save_bytes(tensors, metadata={"format": "pt"})
    (d / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until the new manifest lands
    atomic_write_bytes(d / ADAPTER_WEIGHTS, weights)
    manifest = {"files": {ADAPTER_WEIGHTS: _sha256(weights)}}
    if peft_config is not None:
        cfg = peft_config.to_dict()
        # peft writes sets as lists; json can't take sets.
        cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
        config_bytes = (json.dumps(cfg, indent=2) + "\n").encode("utf-8")
        atomic_write_bytes(d / ADAPTER_CONFIG, config_bytes)
        manifest["files"][ADAPTER_CONFIG] = _sha256(config_bytes)
    extra = {name: (json.dumps(obj, indent=2) + "\n").encode("utf-8") for name, obj in (extra_json or {}).items()}
    extra |= {
        name: save_numpy({k: np.ascontiguousarray(v) for k, v in arrays.items()})
        for name, arrays in (extra_arrays or {}).items()
    }
    for name, data in extra.items():
        atomic_write_bytes(d / name, data)
        manifest["files"][name] = _sha256(data)
    atomic_write_json(d / MANIFEST, manifest)
    return d


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


FileName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
]  # a file in the folder itself
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class Manifest(BaseModel):
    """``manifest.json``: {"files": {file name: sha256 hex}}, nothing else. A file name is a plain
    name inside the checkpoint folder (no path, no leading dot)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    files: dict[FileName, Sha256]


def read_manifest(directory: str | Path) -> Manifest:
    """The folder's manifest, typed. ValueError (naming the problem) when it is missing, not
    JSON, or not of the schema (e.g. ``"files"`` a list or null)."""
    path = Path(directory) / MANIFEST
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except OSError as e:
        raise ValueError(f"{path}: no readable {MANIFEST} ({type(e).__name__})") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "the document"
        raise ValueError(f"{path}: not a valid {MANIFEST} ({where}: {first.get('msg')})") from None


def verify_checkpoint(directory: str | Path, required: tuple[str, ...] | list[str] = (ADAPTER_WEIGHTS,)) -> str | None:
    """None when the folder's manifest is well-formed, lists every ``required`` file, and every
    file it lists is present with its recorded hash; else why not."""
    d = Path(directory)
    try:
        files = read_manifest(d).files
    except ValueError as e:
        return str(e)
    missing = [name for name in required if name not in files]
    if missing:
        return f"{d / MANIFEST}: lists no {missing[0]} (a checkpoint needs {', '.join(required)})"
    for name, digest in files.items():
        try:
            actual = _sha256((d / name).read_bytes())
        except OSError:
            return f"{d / name}: missing"
        if actual != digest:
            return f"{d / name}: hash mismatch (corrupted or torn)"
    return None


def load_adapter_state(directory: str | Path) -> OrderedDict[str, torch.Tensor]:
    d = Path(directory)
    f = d / ADAPTER_WEIGHTS
    if not f.is_file():
        raise FileNotFoundError(f"{d}: no {ADAPTER_WEIGHTS}; not a PEFT adapter folder")
    return OrderedDict(load_file(str(f)))


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """A safetensors file written through ``save_adapter(extra_arrays=...)``."""
    return dict(load_numpy(str(path)))
