"""Fine-tuning methods: the trainable model for each ``peft.method``, the tensors the federation
averages, and which of them train in a given round (layer-wise control).

Every method but ``full`` is a peft tuner: its state is what ``get_peft_model_state_dict`` saves
(the keys of ``adapter_model.safetensors``), so a global adapter is a PEFT adapter folder as is.
For ``full`` the state is the model's own parameters (the selected ones), and the final artifact
is a Hugging Face model folder. In both cases only the tensors that train this round travel:
frozen ones (VeRA's shared projections, layers still frozen by the unfreezing schedule, a QLoRA
base in 4 bits) are never sent or averaged.

Layer positions: the tensors under ``layers.i.`` belong to decoder layer i; embeddings sit below
layer 0 (position -1), and everything else outside the layers (the final norm, the head, learned
prompt tokens) above the top layer (position ``n_layers``).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .config import MERGEABLE_METHODS, ConfigError, FedTuneConfig, LayerConfig, ModelConfig, PeftSettings

ATTENTION_PARTS = ("attn", "attention")
MLP_PARTS = ("mlp", "feed_forward", "ffn")
LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
ADAPTER_NAME = "default"
METHOD_FILE = "fedtune_method.json"  # beside adapter_config.json: how to load the base the adapter was trained on


# ---- which modules ---------------------------------------------------------------------------


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


# ---- building the trainable model ---------------------------------------------------------------


def peft_config(model, peft: PeftSettings, seed: int, base_name: str | None = None):
    """The peft config of ``peft.method`` for this model (None for full fine-tuning).
    ``base_name``: the base as a saved adapter names it (see :func:`saved_peft_config`)."""
    import peft as P

    m = peft.method
    task = P.TaskType.CAUSAL_LM
    if m == "full":
        return None
    if m in ("lora", "qlora", "dora"):
        cfg = P.LoraConfig(
            r=peft.r,
            lora_alpha=peft.alpha,
            lora_dropout=peft.dropout,
            target_modules=resolve_targets(model, peft),
            task_type=task,
            bias="none",
            use_dora=m == "dora",
        )
    elif m == "ia3":
        groups = block_linears(model)
        targets = resolve_targets(model, peft)
        if targets == "all-linear":
            targets = groups["all"]
        mlp = set(groups["mlp"])
        cfg = P.IA3Config(
            target_modules=targets,
            feedforward_modules=[t for t in targets if t.rsplit(".", 1)[-1] in mlp],
            task_type=task,
        )
    elif m == "adapter":
        n = n_layers_of(model)
        if peft.adapter_layers is not None and peft.adapter_layers > n:
            raise ConfigError(f"peft.adapter_layers {peft.adapter_layers}: the model has {n} layers")
        cfg = P.AdaptionPromptConfig(
            adapter_len=peft.adapter_len, adapter_layers=peft.adapter_layers or n, task_type=task
        )
    elif m == "prefix":
        cfg = P.PrefixTuningConfig(num_virtual_tokens=peft.num_virtual_tokens, task_type=task)
    elif m == "prompt":
        cfg = P.PromptTuningConfig(num_virtual_tokens=peft.num_virtual_tokens, task_type=task)
    elif m == "loha":
        cfg = P.LoHaConfig(
            r=peft.r,
            alpha=peft.alpha,
            module_dropout=peft.dropout,
            target_modules=resolve_targets(model, peft),
            task_type=task,
        )
    elif m == "lokr":
        cfg = P.LoKrConfig(
            r=peft.r,
            alpha=peft.alpha,
            module_dropout=peft.dropout,
            target_modules=resolve_targets(model, peft),
            task_type=task,
        )
    elif m == "vera":
        # The frozen random projections are drawn from this key, so every site has the same ones.
        cfg = P.VeraConfig(
            r=peft.r,
            vera_dropout=peft.dropout,
            target_modules=resolve_targets(model, peft),
            projection_prng_key=seed,
            task_type=task,
        )
    elif m == "oft":
        cfg = P.OFTConfig(
            oft_block_size=peft.oft_block_size,
            r=0,
            module_dropout=peft.dropout,
            target_modules=resolve_targets(model, peft),
            task_type=task,
        )
    elif m == "fourierft":
        # The spectral locations are drawn from random_loc_seed (peft's default 777) at every site alike;
        # the update is linear in the trained coefficients, so averaging them is exact.
        cfg = P.FourierFTConfig(
            n_frequency=peft.n_frequency, target_modules=resolve_targets(model, peft), task_type=task
        )
    else:  # pragma: no cover - the config's Literal lists the methods
        raise ConfigError(f"peft.method {m!r} is not supported")
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

    from .modeling import quiet_peft

    with quiet_peft():
        model = get_peft_model(model, pc)
    if peft.ffa:  # FFA-LoRA: A keeps its seeded init (the same at every site, from the coordinator)
        for name, p in model.named_parameters():
            if ".lora_A." in name:
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


# ---- layer-wise control ---------------------------------------------------------------------------


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


# ---- the model a site or the coordinator builds ------------------------------------------------------


def load_model(cfg: FedTuneConfig, device: str | None = None, quantized: bool = True):
    """-> (trainable model, tokenizer, device): the base (in 4 bits for qlora unless
    ``quantized=False``, which the coordinator uses: it only needs the adapter's shapes) made
    trainable for the method, with layer-wise control checked against the model."""
    from .modeling import load_base_model

    model, tokenizer, dev = load_base_model(
        cfg.model, device, four_bit=cfg.peft if quantized and cfg.peft.method == "qlora" else None
    )
    check_layers(cfg.layers, n_layers_of(model))
    return wrap(model, cfg.peft, seed=cfg.train.seed), tokenizer, dev


def saved_peft_config(model, base_name: str):
    """The peft config to save with the adapter: the model's own, naming the base as the user
    named it (e.g. 'default', which fteval resolves), not the cache path it loaded from."""
    import copy

    pc = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    pc.base_model_name_or_path = base_name
    return pc


def method_info(cfg: FedTuneConfig) -> dict:
    """What :data:`METHOD_FILE` records: enough to load the base the way the adapter was trained."""
    info = {"method": cfg.peft.method, "base_model": cfg.model.name}
    if cfg.peft.method == "qlora":
        info |= {"quant_type": cfg.peft.quant_type, "double_quant": cfg.peft.double_quant}
    return info


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
    from .modeling import load_adapter, load_base_model

    info = read_method_info(adapter_dir) if adapter_dir else {}
    four_bit = None
    if info.get("method") == "qlora" and not merged_precision:
        four_bit = PeftSettings(
            method="qlora", quant_type=info.get("quant_type", "nf4"), double_quant=bool(info.get("double_quant", True))
        )
    model, tokenizer, dev = load_base_model(model_cfg, device, four_bit=four_bit)
    if adapter_dir:
        model = load_adapter(model, adapter_dir)
    return model, tokenizer, dev


def export_merged(
    model_cfg: ModelConfig, adapter_dir: str | Path, out_dir: str | Path, device: str | None = "cpu"
) -> Path:
    """Fold a LoRA-family adapter into its full-precision base and save a plain Hugging Face model
    folder (atomically). A qlora adapter merges into the unquantized base: its outputs differ from
    the 4-bit model by the quantization error."""
    info = read_method_info(adapter_dir)
    method = info.get("method", "lora")
    if method not in MERGEABLE_METHODS:
        raise ConfigError(
            f"{adapter_dir}: a {method} adapter cannot be merged into the base (only {', '.join(MERGEABLE_METHODS)})"
        )
    model, tokenizer, _ = load_trained(model_cfg, adapter_dir, device, merged_precision=True)
    from .modeling import save_model_dir

    merged = model.merge_and_unload()
    return save_model_dir(merged, tokenizer, out_dir)


def export_full(cfg: FedTuneConfig, state: Mapping[str, torch.Tensor], out_dir: str | Path) -> Path:
    """Full fine-tuning's artifact: the base model with the trained weights, as a HF model folder."""
    from .modeling import load_base_model, save_model_dir

    model, tokenizer, _ = load_base_model(cfg.model, "cpu")
    model = _select_full(model, cfg.peft)
    set_state(model, state)
    return save_model_dir(model, tokenizer, out_dir)


# Mixed ranks across sites (HetLoRA, Cho et al. 2023): a site of rank r_i < r trains the first r_i
# rows of every lora_A and the first r_i columns of every lora_B of the global rank-r adapter, with
# alpha scaled by r_i / r so that alpha / r, and so every retained rank's contribution, is the same.


def _rank_axis(key: str) -> int | None:
    """Which axis of a state tensor is the LoRA rank: 0 for lora_A (r x in), 1 for lora_B (out x r)."""
    if ".lora_A." in key or key.endswith(".lora_A"):
        return 0
    if ".lora_B." in key or key.endswith(".lora_B"):
        return 1
    return None


def site_config(cfg: FedTuneConfig, rank: int | None) -> FedTuneConfig:
    """The run's config as a site of LoRA rank ``rank`` builds its model (the run's own when None)."""
    if rank is None or rank == cfg.peft.r:
        return cfg
    peft = cfg.peft.model_copy(update={"r": rank, "alpha": cfg.peft.alpha * rank / cfg.peft.r})
    return cfg.model_copy(update={"peft": peft})


def truncate_rank(state: Mapping, rank: int) -> OrderedDict:
    """The global adapter cut to rank ``rank`` (numpy arrays or tensors; other tensors as they are)."""
    out = OrderedDict()
    for k, v in state.items():
        axis = _rank_axis(k)
        out[k] = v if axis is None else (v[:rank] if axis == 0 else v[:, :rank])
    return out


def pad_rank(state: Mapping, shapes: Mapping[str, tuple]) -> OrderedDict:
    """A lower-rank update zero-padded to the global adapter's shapes (HetLoRA's aggregation)."""
    import numpy as np

    out = OrderedDict()
    for k, v in state.items():
        shape = tuple(shapes[k])
        if tuple(v.shape) == shape:
            out[k] = v
            continue
        r = v.shape[_rank_axis(k)]
        if isinstance(v, torch.Tensor):
            z = torch.zeros(shape, dtype=v.dtype)
        else:
            z = np.zeros(shape, dtype=v.dtype)
        if _rank_axis(k) == 0:
            z[:r] = v
        else:
            z[:, :r] = v
        out[k] = z
    return out


def rank_of(state: Mapping, shapes: Mapping[str, tuple]) -> int | None:
    """The rank r_i an update was trained at, when every tensor has the global shape except the
    LoRA rank axis, which is the same r_i <= r in all of them; None when it does not fit."""
    ranks = set()
    for k, v in state.items():
        if k not in shapes:
            return None
        got, want, axis = tuple(v.shape), tuple(shapes[k]), _rank_axis(k)
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


def lora_pairs(keys) -> list[tuple[str, str]]:
    """(lora_A key, lora_B key) of every LoRA layer among ``keys``."""
    keys = set(keys)
    return sorted(
        (k, k.replace("lora_A", "lora_B")) for k in keys if _rank_axis(k) == 0 and k.replace("lora_A", "lora_B") in keys
    )
