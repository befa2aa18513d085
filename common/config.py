"""The one configuration schema, shared by ftsim, fteval, ftserver and ftclient.

A config file (YAML or TOML) and command-line overrides both feed the same pydantic
models. Every model forbids unknown keys and non-finite numbers, and every number has
bounds, so a typo or a NaN fails at start with a message that names the key.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import tomllib
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from .methods.registry import REGISTRY as METHOD_REGISTRY
from .methods.registry import get as method_spec
from .methods.registry import names as method_names

DEFAULT_MODEL = "default"
AUTO_BOUND_FACTOR = 10.0  # federation.update_norm_bound 'auto': see FedTuneConfig.norm_bound
AUTO_BOUND_STEPS = 1000


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-4 as a float, as YAML 1.2 and TOML do (PyYAML's 1.1 rules need '1.0e-4')."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


class ConfigError(ValueError):
    """A configuration problem a user can act on: names the file and the key."""


class _Strict(BaseModel):
    # strict: "3" is not an int, 1 is not a bool; allow_inf_nan: NaN/Inf never get in.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True)


# The tools whose command-line flags are declared here, on the Field each flag sets (see the
# flag section at the end of this module, which builds their argparse arguments).
FLAG_TOOLS = ("ftsim", "ftserver", "ftclient check", "ftsim tune")
_FLAG_NAME = re.compile(r"^--[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def flag(name: str, *tools: str, metavar: str | None = None, const: Any = None) -> dict[str, Any]:
    """A Field's ``json_schema_extra``: the command-line flag ``name`` sets this key in ``tools``
    (default: ftsim and ftserver). Its help is the Field's description; its type and choices come
    from the Field's annotation (a Literal gives the choices). ``const``: the flag takes no value and
    sets this one (a bool Field's flag sets true unless ``const`` says otherwise)."""
    tools = tools or ("ftsim", "ftserver")
    if not _FLAG_NAME.match(name) or not set(tools) <= set(FLAG_TOOLS):
        raise ValueError(f"flag {name!r} for {tools}: expected --lower-case-words for tools among {FLAG_TOOLS}")
    spec: dict[str, Any] = {"name": name, "tools": list(tools)}
    if metavar is not None:
        spec["metavar"] = metavar
    if const is not None:
        spec["const"] = const
    return {"flags": [spec]}


def flags(*declared: dict[str, Any]) -> dict[str, Any]:
    """Several flags on one key: ``flags(flag("--x", "ftsim", const=True), flag("--no-x", "ftserver", const=False))``."""
    return {"flags": [spec for d in declared for spec in d["flags"]]}


class ModelConfig(_Strict):
    """Which base model, and where it runs."""

    name: str = Field(
        DEFAULT_MODEL,
        description="'default' (SmolLM2-135M-Instruct, provisioned locally), a local HF directory, "
        "a .gguf file, or a hub id (the only case that reaches the network).",
        json_schema_extra=flag("--model", "ftsim", "ftclient check", metavar="NAME"),
    )
    gguf_file: str | None = Field(
        None, description="GGUF file name inside `name` when `name` is a directory or hub id."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: float32 on CPU, bfloat16 on a GPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where sites train: auto is cuda when torch sees a GPU, else cpu.",
        json_schema_extra=flag("--device", "ftsim"),
    )
    cache_dir: str | None = Field(
        None, description="Where provisioned models live (default: $FEDTUNE_CACHE or ~/.cache/fedtune)."
    )

    @field_validator("name")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a model: 'default', a directory, a .gguf file or a hub id")
        return v


# The methods and what each is come from the registry (common/methods/registry.py: one entry per
# method, no torch at import); the names below are views of it, not tables of their own.
PeftMethod = Literal[method_names()]
# Update folds into the base weights (merge_and_unload); peft.r sizes it; tensors per layer (layer-wise
# control applies); a product B·A of rank r (mixed ranks across sites, HetLoRA, and the aggregation-error measure).
MERGEABLE_METHODS = method_names(mergeable=True)
RANKED_METHODS = method_names(rank=True)
LAYERED_METHODS = method_names(layered=True)
MIXED_RANK_METHODS = method_names(mixed_ranks=True)
STACKABLE_METHODS = method_names(stackable=True)
PERSONAL_STEPS = 10  # federation.personal_steps under train.local_epochs (no step count to copy)
# train.lr when it is not set: what each method is usually trained with (its paper or peft's examples).
DEFAULT_LR = {name: m.default_lr for name, m in METHOD_REGISTRY.items()}


def _with_option(option: str) -> str:
    return ", ".join(n for n, m in METHOD_REGISTRY.items() if option in m.options)


class PeftSettings(_Strict):
    """The method sites train with, and what of the model it trains; only those tensors are averaged."""

    method: PeftMethod = Field(
        "lora",
        description=f"The fine-tuning method: {', '.join(METHOD_REGISTRY)} (what each is: its entry in "
        "common/methods/registry.py).",
        json_schema_extra=flag("--peft"),
    )
    r: int = Field(16, ge=1, le=1024, description=f"Rank ({_with_option('r')}).")
    alpha: float = Field(32.0, gt=0, le=1e4, description=f"Scaling ({_with_option('alpha')}).")
    dropout: float = Field(
        0.05, ge=0.0, lt=1.0, description=f"Dropout on the adapter's input ({_with_option('dropout')})."
    )
    target_modules: list[str] | Literal["all-linear", "attention", "mlp"] = Field(
        "all-linear",
        description="What is adapted (or, for full, trained): every linear layer of the blocks, the attention or the MLP "
        "projections, or a list of module names (peft's suffix match, e.g. [q_proj, v_proj] or [layers.11.mlp.down_proj]).",
    )
    num_virtual_tokens: int = Field(16, ge=1, le=4096, description="Virtual tokens (prefix, prompt).")
    adapter_len: int = Field(10, ge=1, le=4096, description="adapter: learned prompt length per adapted layer.")
    adapter_layers: int | None = Field(
        None, ge=1, le=100_000, description="adapter: how many top layers get one (default: all)."
    )
    oft_block_size: int = Field(
        32,
        ge=1,
        le=65536,
        description="oft: block size of the orthogonal matrices (must divide each adapted layer's input).",
    )
    n_frequency: int = Field(
        1000, ge=1, le=10_000_000, description="fourierft: learned spectral coefficients per adapted layer."
    )
    ffa: bool = Field(
        False,
        description="FFA-LoRA (lora, qlora): A stays frozen at its seeded init, shared by every site, and only B trains, "
        "so averaging the B's averages the products B·A exactly, and each update is B alone.",
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="qlora: the 4-bit data type of the frozen base.")
    double_quant: bool = Field(True, description="qlora: also quantize the quantization constants.")

    @field_validator("target_modules")
    @classmethod
    def _nonempty_modules(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and (not v or any(not m.strip() for m in v)):
            raise ValueError("must be 'all-linear', 'attention', 'mlp' or a non-empty list of module names")
        return v

    def describe(self) -> str:
        """One line for a run's header, e.g. 'qlora r=16 on a 4-bit nf4 base' (the method's entry words it)."""
        return method_spec(self.method).describe(self)

    @model_validator(mode="after")
    def _options_fit_method(self) -> "PeftSettings":
        spec = method_spec(self.method)
        if self.ffa and not spec.ffa_frozen:
            raise ValueError(
                f"peft.ffa (FFA-LoRA) freezes LoRA's A matrices: it needs method {' or '.join(n for n, m in METHOD_REGISTRY.items() if m.ffa_frozen)}, not {self.method!r}"
            )
        if spec.check is not None:
            spec.check(self)
        if not spec.targets and "target_modules" in self.model_fields_set and self.target_modules != "all-linear":
            raise ValueError(
                f"peft.target_modules does not apply to method {self.method!r} (it adds learned tokens, not per-module weights)"
            )
        return self


class LayerConfig(_Strict):
    """Layer-wise control: which decoder layers train, when, and at what learning rate. Layer i's
    tensors are those under ``layers.i``; embeddings sit below layer 0, the final norm and head
    (and any other tensor outside the layers) above the top one."""

    freeze_bottom: int = Field(0, ge=0, le=100_000, description="The bottom k layers (and the embeddings) never train.")
    only: list[int] | None = Field(
        None, description="Train only these layers (0 = bottom); tensors outside the layers then stay frozen."
    )
    unfreeze_start: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Progressive unfreezing: the top N layers train in round 1 (default: off, all train).",
    )
    unfreeze_every: int = Field(1, ge=1, le=100_000, description="Progressive unfreezing: rounds between steps.")
    unfreeze_step: int = Field(
        1, ge=1, le=100_000, description="Progressive unfreezing: layers added at each step, downwards."
    )
    lr_decay: float = Field(
        1.0,
        gt=0,
        le=1.0,
        description="Discriminative learning rates: layer i trains at lr * lr_decay^(top - i); 1 turns it off.",
    )

    @field_validator("only")
    @classmethod
    def _layers_listed(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(i < 0 for i in v) or len(set(v)) != len(v)):
            raise ValueError("must be a non-empty list of distinct layer indices >= 0")
        return v

    @property
    def active(self) -> bool:
        return (
            self.freeze_bottom > 0 or self.only is not None or self.unfreeze_start is not None or self.lr_decay != 1.0
        )


DataFormat = Literal["auto", "alpaca", "messages", "prompt_completion", "text"]


class DataConfig(_Strict):
    """How a site's file becomes training examples."""

    format: DataFormat = Field(
        "auto",
        description="How records are read: alpaca, messages, prompt_completion or text; auto: told by the first "
        "record's fields.",
        json_schema_extra=flag("--format", "ftclient check"),
    )
    max_length: int = Field(
        512,
        ge=8,
        le=131072,
        description="Tokens per example; longer ones are truncated.",
        json_schema_extra=flag("--max-length", "ftsim", "ftclient check", metavar="N"),
    )
    eval_fraction: float = Field(
        0.1, ge=0.0, le=0.9, description="Share of the train file held out for evaluation when a site has no eval file."
    )
    max_invalid_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Bad records skipped and counted up to this share of a file's records; above it the file is "
        "refused (ftclient check says NOT usable), the same rule in every tool.",
        json_schema_extra=flag("--max-invalid-fraction", "ftsim", "ftserver", "ftclient check", metavar="F"),
    )
    max_record_bytes: int = Field(
        1 << 20,
        ge=1024,
        le=1 << 30,
        description="Longest record read (a JSONL line, a JSON list item, a CSV row, a Parquet row); a longer one is "
        "reported at its line without being read whole, so memory stays bounded whatever the file holds.",
        json_schema_extra=flag("--max-record-bytes", "ftclient check", metavar="B"),
    )
    system_prompt: str | None = Field(
        None, description="Prepended as a system message (else the chat template's default)."
    )

    @field_validator("system_prompt")
    @classmethod
    def _encodable(cls, v: str | None) -> str | None:
        if v is not None and re.search("[\ud800-\udfff]", v):
            raise ValueError("is not valid Unicode (holds a lone surrogate)")
        return v


class TrainConfig(_Strict):
    """Local training at each site, per round."""

    local_steps: int | None = Field(
        10,
        ge=1,
        le=1_000_000,
        description="Optimizer steps per round.",
        json_schema_extra=flag("--local-steps", "ftsim", metavar="N"),
    )
    local_epochs: float | None = Field(None, gt=0, le=1000, description="Or: passes over the site's data per round.")
    batch_size: int = Field(
        4,
        ge=1,
        le=4096,
        description="Examples per micro-batch.",
        json_schema_extra=flag("--batch-size", "ftsim", metavar="N"),
    )
    grad_accum: int = Field(1, ge=1, le=4096, description="Micro-batches accumulated into each optimizer step.")
    lr: float | None = Field(
        None,
        gt=0,
        le=1.0,
        description="Peak learning rate (default: the method's own: "
        + ", ".join(f"{name} {lr:g}" for name, lr in DEFAULT_LR.items())
        + ").",
        json_schema_extra=flag("--lr", "ftsim"),
    )
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="AdamW's weight decay.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="The learning rate's schedule after the warm-up, over all rounds' steps."
    )
    warmup_ratio: float = Field(0.1, ge=0, le=1.0, description="Share of all steps (over all rounds) spent warming up.")
    max_grad_norm: float = Field(1.0, ge=0, le=1e6, description="Gradient clipping norm; 0 turns clipping off.")
    anchor_mu: float = Field(
        0.0,
        ge=0,
        le=1e4,
        description="Anchor to the base model: (mu/2)||w - w_base||^2 in every site's loss over the trainable weights "
        "(FedProx-style, toward the base instead of the round's global model); trades domain gain for less forgetting.",
    )
    local_patience: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Local early stopping: a site checks its loss on its validation split (the one it scores the global "
        "adapter on) at the round's start and every local_eval_every steps, stops the round after this many checks in a "
        "row without improvement, and sends the update of the best weights it checked (default: never; every step runs).",
    )
    local_eval_every: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Optimizer steps between local validation checks (default: a fifth of the round's steps, at least 1).",
    )
    local_min_delta: float = Field(
        0.0, ge=0, le=1e6, description="A local validation loss improvement smaller than this does not count."
    )
    seed: int = Field(
        0,
        ge=0,
        le=2**32 - 1,
        description="Seeds the adapter's init, the data order and the hold-out split.",
        json_schema_extra=flag("--seed", "ftsim", metavar="N"),
    )

    @model_validator(mode="after")
    def _local_stopping_is_on(self) -> TrainConfig:
        # Either setting alone would be silently ignored: say so instead of training as if it applied.
        if self.local_patience is None:
            stray = [f"train.{k}" for k in ("local_eval_every", "local_min_delta") if getattr(self, k)]
            if stray:
                raise ValueError(
                    f"{' and '.join(stray)} only apply to local early stopping: set train.local_patience too, or leave them out"
                )
        return self

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainConfig:
        if self.local_epochs is not None and self.local_steps is not None:
            # local_epochs given explicitly wins over the default local_steps.
            if "local_steps" in self.model_fields_set:
                raise ValueError("set one of train.local_steps and train.local_epochs, not both")
            object.__setattr__(self, "local_steps", None)
        if self.local_epochs is None and self.local_steps is None:
            raise ValueError("set train.local_steps or train.local_epochs")
        return self


class EvalConfig(_Strict):
    """What sites measure on their evaluation split each round."""

    max_examples: int = Field(
        64, ge=1, le=1_000_000, description="Evaluation examples per site (first N of the split)."
    )
    batch_size: int = Field(8, ge=1, le=4096, description="Evaluation examples per forward pass.")
    exact_match: bool = Field(True, description="Also generate greedy answers and score exact match.")
    max_new_tokens: int = Field(16, ge=1, le=4096, description="Tokens generated per answer for exact match.")
    select_metric: Literal["eval_loss", "exact_match"] = Field(
        "eval_loss",
        description="The federated validation metric (the sites' example-weighted mean) that picks the best round "
        "(lowest loss, or highest exact match) and drives early stopping.",
    )
    patience: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Stop when the federated validation metric (select_metric) has not improved for this many rounds "
        "(default: never); the best round's adapter is kept in best/.",
        json_schema_extra=flag("--patience", metavar="N"),
    )
    min_delta: float = Field(0.0, ge=0, le=1e6, description="An improvement smaller than this does not count.")
    forgetting: bool = Field(
        True,
        description="The coordinator scores the base model and the final global adapter on fedtune's general-knowledge set "
        "(common/general: public, no site data): what fine-tuning cost outside the domains.",
    )


class SiteConfig(_Strict):
    """A virtual site in ftsim: a name and its files."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="The site's name in the reports and the log."
    )
    train: str = Field(description="The site's training data file (a relative path is relative to the config file).")
    eval: str | None = Field(
        None, description="Its evaluation file (default: a held-out share of train, data.eval_fraction)."
    )
    rank: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="This site's LoRA rank, below peft.r for a site with less memory (mixed ranks: HetLoRA zero-padding; "
        "lora, qlora, dora). Default: peft.r.",
    )


Strategy = Literal["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]
# The strategies that add (a multiple of) the round's mean update: federation.server_lr 'sites' applies.
SUMMING_STRATEGIES = ("fedavg", "fedprox", "fedavgm")


class FederationConfig(_Strict):
    """The rounds: what the server does with the sites' updates, how they combine, and which sites take part."""

    rounds: int = Field(
        3, ge=1, le=100_000, description="Federated rounds.", json_schema_extra=flag("--rounds", metavar="N")
    )
    strategy: Strategy = Field(
        "fedavg",
        description="How the server applies the round's mean update: fedavg adds it; fedprox too, and each site's loss gets "
        "a proximal term (mu/2)||w - w_global||^2 (Li et al. 2020); fedavgm adds it with server momentum; "
        "fedadam, fedyogi and fedadagrad use it as a pseudo-gradient for an adaptive server optimizer (Reddi et al. 2021).",
        json_schema_extra=flag("--strategy"),
    )
    server_lr: Annotated[float, Field(gt=0, le=100.0)] | Literal["sites"] | None = Field(
        None,
        description="Server learning rate: fedavg, fedprox and fedavgm add it times the round's mean update; the adaptive ones "
        "take steps of about its size. 'sites' (fedavg, fedprox, fedavgm): the number of sites whose updates the round "
        "combined, so the global moves by their sum, about as far as pooled training would at the same compute. Default: "
        "'sites' for fedavg and fedprox (measured: benchmarks/README.md, 'Learning speed'; 1 is classic FedAvg's mean), 1.0 "
        "for fedavgm, 1e-3 for the adaptive ones.",
    )
    proximal_mu: float = Field(
        0.01, ge=0, le=1e4, description="fedprox: weight mu of the proximal term in each site's loss."
    )
    server_momentum: float = Field(0.9, ge=0, lt=1.0, description="fedavgm: momentum of the server's update.")
    server_beta1: float = Field(0.9, ge=0, lt=1.0, description="fedadam/fedyogi: first-moment decay.")
    server_beta2: float = Field(0.99, ge=0, lt=1.0, description="fedadam/fedyogi: second-moment decay.")
    server_tau: float = Field(
        1e-6,
        gt=0,
        le=1.0,
        description="fedadam/fedyogi/fedadagrad: adaptivity (added to the root of the second moment).",
    )
    aggregator: Literal["mean", "median", "trimmed-mean"] = Field(
        "mean",
        description="How sites' updates combine: the example-weighted mean; or, robust to outlying sites, the coordinate-wise "
        "median or trimmed mean (these inspect each site's update, so they cannot run under secure aggregation).",
    )
    trim_fraction: float = Field(
        0.1, ge=0.0, lt=0.5, description="trimmed-mean: share of sites dropped at each end, per coordinate."
    )
    update_norm_bound: Annotated[float, Field(gt=0, le=1e6)] | Literal["auto", "off"] | None = Field(
        "auto",
        description="Each site scales its update (all its tensors as one vector) down to this L2 norm before it leaves; the "
        "coordinator checks it again when it sees single updates. Works with secure aggregation (the clipping is at the site). "
        "'auto' (default): 10 x lr x local steps x sqrt(values in the update), well above what AdamW can move an honest "
        "update (see FedTuneConfig.norm_bound); a number: that bound; 'off' or null: none. Under differential privacy, privacy.clip is the bound.",
        json_schema_extra=flag("--update-norm-bound", metavar="C"),
    )
    min_sites: int = Field(
        1,
        ge=1,
        le=100_000,
        description="Fewest sites a round needs: with fewer connected, wait up to join_timeout_s, then stop; "
        "with fewer valid updates by round_timeout_s, the round fails and the run stops (resume it later).",
        json_schema_extra=flag("--min-sites", "ftserver", metavar="N"),
    )
    expected_sites: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Start as soon as this many sites have joined (default: the sites listed, else min_sites).",
        json_schema_extra=flag("--expected-sites", "ftserver", metavar="N"),
    )
    join_timeout_s: float = Field(
        600.0,
        gt=0,
        le=7 * 24 * 3600,
        description="How long to wait for sites to join; then start with those present if at least min_sites.",
        json_schema_extra=flag("--join-timeout", "ftserver", metavar="SECONDS"),
    )
    round_timeout_s: float = Field(
        3600.0,
        gt=0,
        le=7 * 24 * 3600,
        description="A site that has not answered by then is dropped from the round.",
        json_schema_extra=flag("--round-timeout", "ftserver", metavar="SECONDS"),
    )
    sites_per_round: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Train on a random sample of this many connected sites each round (default: all).",
    )
    max_examples_per_update: int = Field(
        10_000_000, ge=1, le=2**31 - 1, description="An update claiming more examples than this is rejected."
    )
    weighting: Literal["examples", "equal"] = Field(
        "examples",
        description="A site's weight in the mean: its example count (capped by weight_cap), or the same for every site.",
    )
    weight_cap: float | None = Field(
        3.0,
        ge=1.0,
        le=1e6,
        description="No site weighs more than weight_cap x the median example count of the round's sites, whatever it claims "
        "(null: no relative cap; max_examples_per_update and secure_aggregation.max_weight still bound it). Under secure "
        "aggregation the cap is applied by each site before masking and the weight travels inside the masked vector.",
    )
    personalization: Literal["none", "finetune", "dual"] = Field(
        "none",
        description="Each site also keeps a personalized model that never leaves it (in ftsim under OUT/sites/NAME, in "
        "deployment in the site's --work-dir), trained and scored on the site's own data at every evaluation from round 1; "
        "only its scores are reported. 'finetune': a copy of the round's global adapter fine-tuned for personal_steps (local "
        "fine-tuning, the baseline personalization must beat); 'dual': a private LoRA adapter (personal_rank) kept beside the "
        "global one across rounds and trained with the global frozen for personal_steps; the personalized model is their "
        "sum (FedDPA's dual adapters). The global adapter trains and travels as without it.",
        json_schema_extra=flag("--personalize", metavar="METHOD"),
    )
    personal_steps: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Personalization: the site's private optimizer steps at each evaluation (default: train.local_steps, "
        f"else {PERSONAL_STEPS}). They come on top of the federation's compute.",
    )
    personal_rank: int | None = Field(
        None, ge=1, le=1024, description="personalization 'dual': the private LoRA adapter's rank (default: peft.r)."
    )
    sites: list[SiteConfig] = Field(
        default_factory=list,
        description="ftsim's virtual sites, each a name and its files (ftserver: the sites bring their own data; "
        "a list here only says how many to wait for, as expected_sites).",
    )

    @model_validator(mode="after")
    def _consistent_counts(self) -> "FederationConfig":
        if self.sites_per_round is not None and self.sites_per_round < self.min_sites:
            raise ValueError(
                f"sites_per_round ({self.sites_per_round}) is below min_sites ({self.min_sites}): no round could succeed"
            )
        if self.expected_sites is not None and self.expected_sites < self.min_sites:
            raise ValueError(f"expected_sites ({self.expected_sites}) is below min_sites ({self.min_sites})")
        return self

    @model_validator(mode="after")
    def _sites_lr(self) -> "FederationConfig":
        if self.server_lr == "sites" and self.strategy not in SUMMING_STRATEGIES:
            raise ValueError(
                f"server_lr 'sites' scales the round's mean update, which {self.strategy} does not add (it is an adaptive "
                f"optimizer's pseudo-gradient): use it with {', '.join(SUMMING_STRATEGIES)}, or give {self.strategy} a number"
            )
        return self

    @field_validator("update_norm_bound", mode="before")
    @classmethod
    def _bound_words(cls, v: object) -> object:
        # YAML 1.1 reads a bare `off` as false; 'none'/'null' from a command line mean off too.
        if v is False or (isinstance(v, str) and v.strip().lower() in ("off", "none", "null", "false")):
            return "off"
        return v.strip().lower() if isinstance(v, str) and v.strip().lower() == "auto" else v

    @field_validator("sites")
    @classmethod
    def _unique_names(cls, v: list[SiteConfig]) -> list[SiteConfig]:
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"site names must be unique; repeated: {', '.join(dup)}")
        return v


class SecureAggregationConfig(_Strict):
    """SecAgg+ (Bell et al. 2020): the coordinator learns only the weighted mean of the updates."""

    enabled: bool | None = Field(
        None,
        description="Secure aggregation on or off (off: the coordinator sees each site's update); unset means the tool's "
        "default: on for ftserver, off for ftsim.",
        json_schema_extra=flags(
            flag("--secure-aggregation", "ftsim", const=True), flag("--no-secure-aggregation", "ftserver", const=False)
        ),
    )
    neighbours: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Sites each site shares its secrets with and masks against (default: every other site).",
    )
    threshold: int | None = Field(
        None,
        ge=2,
        le=100_000,
        description="Share holders needed to unmask, out of a site's neighbours and itself (default: a majority of them). "
        "Private against a coordinator colluding with fewer than this many sites; a round survives while at least this many remain.",
    )
    clip: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description="Each update value is clipped to [-clip, clip] before quantization (default: 0.1, or 2 x lr x local_steps "
        "when that is larger: an AdamW step moves a value by about lr, so a round's delta stays inside; LoRA deltas per round are ~1e-3).",
    )
    max_weight: int = Field(
        10_000,
        ge=1,
        le=2**31 - 1,
        description="A site's weight is its example count, capped at this (it bounds the 32-bit field's range).",
    )
    stage_timeout_s: float = Field(
        300.0,
        gt=0,
        le=24 * 3600,
        description="Deadline of each key-sharing, masked-upload and unmasking stage (training keeps federation.round_timeout_s).",
    )

    @model_validator(mode="after")
    def _threshold_fits(self) -> "SecureAggregationConfig":
        if self.threshold is not None and self.neighbours is not None:
            from fedtune.common.secagg.primitives import check_threshold  # the rule the sites apply

            holders = self.neighbours + 1
            if check_threshold(self.threshold, holders):
                raise ValueError(
                    f"threshold {self.threshold} with {self.neighbours} neighbours: expected more than half and at most all of "
                    f"the {holders} share holders (neighbours + the site), i.e. {holders // 2 + 1}..{holders}"
                )
        return self


class PrivacyConfig(_Strict):
    """Client-level differential privacy (DP-FedAvg): every site's update is clipped to ``clip`` and
    Gaussian noise hides any one site's presence in the sum (see fedtune.common.privacy)."""

    epsilon: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="The privacy budget; setting it turns DP on: each update clipped to clip, Gaussian noise on their sum, "
        "epsilon reported every round. The run stops before a round would spend more than this.",
        json_schema_extra=flag("--dp-epsilon", metavar="EPS"),
    )
    delta: float = Field(
        1e-5,
        gt=0,
        lt=0.1,
        description="The delta of (epsilon, delta)-DP; keep it below 1/(number of sites).",
        json_schema_extra=flag("--dp-delta", metavar="D"),
    )
    clip: float = Field(
        1.0,
        gt=0,
        le=1e6,
        description="L2 bound C on each site's update (its sensitivity). A LoRA r=16 update of the default model after 10 "
        "steps at lr 1e-3 has a norm of about 3.",
        json_schema_extra=flag("--dp-clip", metavar="C"),
    )
    noise_multiplier: float | None = Field(
        None,
        gt=0,
        le=1e6,
        description="Noise standard deviation on the sum, in units of clip. Default: the smallest that spends epsilon "
        "in federation.rounds rounds.",
        json_schema_extra=flag("--dp-noise-multiplier", metavar="Z"),
    )

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None


class SimulationConfig(_Strict):
    """ftsim only: Ray's resources per virtual site, and the baselines."""

    cpus_per_site: float = Field(
        2.0,
        gt=0,
        le=1024,
        description="Ray CPUs reserved per virtual site: sites train side by side only as the CPUs allow (2 on 2 cores: "
        "one at a time).",
        json_schema_extra=flag("--cpus-per-site", "ftsim", metavar="N"),
    )
    gpus_per_site: float = Field(0.0, ge=0, le=64, description="Ray GPUs per virtual site (0.5: two sites share one).")
    baselines: bool = Field(
        False,
        description="After the federation, also train each site alone and all the data pooled, with the federation's "
        "compute and seed, and score every site under the base model, alone, pooled and federated (about 2x the "
        "training time).",
        json_schema_extra=flag("--baselines", "ftsim"),
    )


class OutputConfig(_Strict):
    """What a run writes, and where."""

    dir: str | None = Field(
        None,
        description="Where a run writes its outputs (ftsim default: ftsim-runs/<time>).",
        json_schema_extra=flag("--out", "ftsim", metavar="DIR"),
    )
    plots: bool = Field(
        True,
        description="Whether report.md comes with its PNG plots.",
        json_schema_extra=flag("--no-plots", const=False),
    )
    merged: bool = Field(
        False,
        description="Also save merged/: the adapter folded into its base (a plain HF model folder); for the methods that merge (all but adapter, prefix, prompt and full).",
        json_schema_extra=flag("--merged"),
    )
    tensorboard: bool = Field(
        False,
        description="Also write every round's metrics as TensorBoard event files in tensorboard/ (the tensorboard extra).",
        json_schema_extra=flag("--tensorboard"),
    )
    keep_checkpoints: int | None = Field(
        3,
        ge=1,
        le=1_000_000,
        description="Round checkpoints kept in checkpoints/: the last this many, plus the best round's; older ones are deleted "
        "once a newer round is recorded (null: keep every round).",
    )


# The federated validation metrics a study can optimise (server/record.py's Scores), and which way.
TUNE_METRICS = {
    "eval_loss": "minimize",
    "exact_match": "maximize",
    "personal_eval_loss": "minimize",
    "personal_exact_match": "maximize",
}


class TuneParam(_Strict):
    """One key of a study's search space: a float or int range (log-uniform with ``log``, on a
    grid with ``step``) or a list of ``choices``. In a config file a bare list is the choices."""

    type: Literal["float", "int", "categorical"] = Field(description="float, int or categorical.")
    low: float | None = Field(None, description="The smallest value (float, int).")
    high: float | None = Field(None, description="The largest value (float, int).")
    log: bool = Field(False, description="Sample on a log scale (float, int; low > 0).")
    step: float | None = Field(None, gt=0, description="Only values low + k x step (float, int; not with log).")
    choices: list[Any] | None = Field(None, description="The values to choose among (categorical).")

    @model_validator(mode="before")
    @classmethod
    def _choices_alone(cls, data: Any) -> Any:
        # YAML: `peft.method: [lora, dora]` means the choices.
        return {"type": "categorical", "choices": data} if isinstance(data, list) else data

    @model_validator(mode="after")
    def _fits(self) -> "TuneParam":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical: give choices, a non-empty list")
            if any(not isinstance(c, (str, int, float, bool)) and c is not None for c in self.choices):
                raise ValueError("choices: each must be a number, a word, true/false or null")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("categorical: give choices only (low, high, log and step are for float and int)")
            return self
        if self.choices is not None:
            raise ValueError(f"{self.type}: give low and high, not choices (choices are for categorical)")
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"{self.type}: give low < high (got low {self.low}, high {self.high})")
        if self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError(f"int: low and high must be whole numbers (got {self.low}, {self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: low must be above 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("log and step: give one of them")
        return self


class TuneConfig(_Strict):
    """ftsim tune only: the hyperparameter study (Optuna). ftsim and ftserver ignore this section,
    so the file a study ran from also runs as it is."""

    space: dict[str, TuneParam] = Field(
        default_factory=dict,
        description="The search space: config key -> {type: float|int|categorical, low, high, log, step} or a list "
        "of choices, e.g. {train.lr: {type: float, low: 1e-4, high: 3e-3, log: true}, peft.r: [4, 8, 16]}.",
    )
    trials: int = Field(
        12,
        ge=1,
        le=100_000,
        description="Trials to finish (completed or pruned), counted over every process sharing the study.",
        json_schema_extra=flag("--trials", "ftsim tune", metavar="N"),
    )
    timeout_s: float | None = Field(
        None,
        gt=0,
        le=1e9,
        description="Start no new trial after this many seconds (this process; default: no limit).",
        json_schema_extra=flag("--timeout", "ftsim tune", metavar="SECONDS"),
    )
    metric: Literal["eval_loss", "exact_match", "personal_eval_loss", "personal_exact_match"] = Field(
        "eval_loss",
        description="The objective: the federated validation metric of a trial's last round (loss minimised, exact "
        "match maximised; personal_*: the sites' personalized models, with federation.personalization).",
    )
    sampler: Literal["tpe", "random", "gp", "qmc"] = Field(
        "tpe", description="Optuna's sampler: TPE, random, Gaussian process or quasi-Monte Carlo."
    )
    startup_trials: int | None = Field(
        None,
        ge=0,
        le=100_000,
        description="Random trials before TPE or GP models the results, and finished trials before the pruner "
        "prunes (default: a quarter of tune.trials, at least 2).",
    )
    pruner: Literal["median", "hyperband", "none"] = Field(
        "median",
        description="Stops a trial after a round whose federated metric is worse than the median of earlier trials' "
        "at that round (median), or by successive halving over rounds (hyperband); none: every trial runs all rounds.",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="The sampler's seed (a study's first process).")
    storage: str | None = Field(
        None,
        description="Optuna storage URL shared by every process of the study (sqlite:///PATH, postgresql://..., "
        "mysql://...); default: sqlite in the study folder (study.db).",
        json_schema_extra=flag("--storage", "ftsim tune", metavar="URL"),
    )
    study: str = Field(
        "fedtune",
        min_length=1,
        max_length=200,
        description="The study's name in the storage.",
        json_schema_extra=flag("--study", "ftsim tune", metavar="NAME"),
    )
    include_config: bool = Field(
        True,
        description="The study's first trial runs the config's own values of the searched keys (where they lie in "
        "the space), so the study measures what it improves on.",
    )
    keep: int = Field(3, ge=0, le=100_000, description="Completed trials whose folders are kept: the best this many.")
    keep_pruned: bool = Field(False, description="Keep pruned trials' folders too (default: removed).")

    @property
    def direction(self) -> str:
        return TUNE_METRICS[self.metric]

    @property
    def startup(self) -> int:
        return self.startup_trials if self.startup_trials is not None else max(2, self.trials // 4)


class FedTuneConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    peft: PeftSettings = Field(default_factory=PeftSettings)
    layers: LayerConfig = Field(default_factory=LayerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    secure_aggregation: SecureAggregationConfig = Field(default_factory=SecureAggregationConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    @model_validator(mode="after")
    def _method_defaults(self) -> "FedTuneConfig":
        spec = method_spec(self.peft.method)
        if self.output.merged and not spec.mergeable:
            raise ValueError(
                f"output.merged: a {self.peft.method} adapter cannot be folded into the base; "
                f"merging works for {', '.join(MERGEABLE_METHODS)}"
                + (" (full fine-tuning already saves model/)" if spec.artifact == "model" else "")
            )
        if self.train.lr is None:
            object.__setattr__(self.train, "lr", spec.default_lr)
        if self.layers.active and not spec.layered:
            raise ValueError(
                f"layers: layer-wise control needs per-layer tensors, and peft.method {self.peft.method!r} trains one tensor "
                f"for all layers; use one of {', '.join(LAYERED_METHODS)}, or leave the layers section out"
            )
        return self

    @model_validator(mode="after")
    def _privacy_and_ranks_fit(self) -> "FedTuneConfig":
        if self.privacy.enabled and self.federation.aggregator != "mean":
            raise ValueError(
                f"privacy: differential privacy bounds each site's influence on the mean; federation.aggregator "
                f"{self.federation.aggregator!r} has another sensitivity: use aggregator 'mean'"
            )
        ranked = [s for s in self.federation.sites if s.rank is not None]
        if ranked and not method_spec(self.peft.method).mixed_ranks:
            raise ValueError(
                f"federation.sites[{ranked[0].name}].rank: mixed ranks need a LoRA-family method ({', '.join(MIXED_RANK_METHODS)}); "
                f"peft.method is {self.peft.method!r}"
            )
        for s in ranked:
            if s.rank > self.peft.r:
                raise ValueError(
                    f"federation.sites[{s.name}].rank {s.rank}: at most peft.r ({self.peft.r}), the global adapter's rank"
                )
        return self

    @model_validator(mode="after")
    def _personalization_fits(self) -> "FedTuneConfig":
        fed, method = self.federation, self.peft.method
        if fed.personalization == "none":
            for key in ("personal_steps", "personal_rank"):
                if getattr(fed, key) is not None:
                    raise ValueError(f"federation.{key} is set, but federation.personalization is 'none': set a method")
            return self
        spec = method_spec(method)
        if spec.artifact == "model":
            raise ValueError(
                f"federation.personalization {fed.personalization!r}: with peft.method {method!r} every site would keep a "
                "whole private copy of the model; personalize an adapter method"
            )
        if fed.personalization == "dual" and not spec.stackable:
            raise ValueError(
                f"federation.personalization 'dual' adds a private LoRA beside the global adapter and saves their sum as one "
                f"adapter; peft.method {method!r} does not add that way: use one of {', '.join(STACKABLE_METHODS)}, or "
                "personalization 'finetune'"
            )
        if fed.personalization == "finetune" and fed.personal_rank is not None:
            raise ValueError(
                "federation.personal_rank sizes the 'dual' method's private adapter; 'finetune' fine-tunes the global "
                "adapter itself: leave personal_rank out"
            )
        return self

    @model_validator(mode="after")
    def _secure_aggregation_fits(self) -> "FedTuneConfig":
        problems = secure_aggregation_conflicts(self) if self.secure_aggregation.enabled else []
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def secure_clip(self) -> float:
        """secure_aggregation.clip, or its default: 0.1, or 2 x lr x local_steps when that is larger."""
        if self.secure_aggregation.clip is not None:
            return self.secure_aggregation.clip
        steps = self.train.local_steps or 100  # local_epochs: the count depends on the site's data
        return max(0.1, 2 * (self.train.lr or DEFAULT_LR[self.peft.method]) * steps)

    def norm_bound(self, n_values: int) -> float | None:
        """The L2 bound on one update of ``n_values`` values (federation.update_norm_bound; None: off).

        'auto' = AUTO_BOUND_FACTOR x lr x local steps x sqrt(n_values): an AdamW step moves a value by
        about lr (at most ~3.2 lr, for beta1 0.9 and beta2 0.999), so no honest update of that many
        values and steps reaches it (the demo's LoRA update, norm ~3, is ~30x inside), while an
        update of 3e38 is scaled down to it. Under train.local_epochs the steps are taken as
        AUTO_BOUND_STEPS (set a number for rounds of more steps)."""
        bound = self.federation.update_norm_bound
        if bound is None or bound == "off":
            return None
        if bound != "auto":
            return float(bound)
        steps = self.train.local_steps or AUTO_BOUND_STEPS
        return (
            AUTO_BOUND_FACTOR
            * (self.train.lr or DEFAULT_LR[self.peft.method])
            * steps
            * math.sqrt(max(int(n_values), 1))
        )

    def with_secure_default(self, enabled: bool) -> "FedTuneConfig":
        """This config with ``secure_aggregation.enabled`` set to the tool's default where it is
        unset, re-validated (a ConfigError names what conflicts with secure aggregation)."""
        if self.secure_aggregation.enabled is not None:
            return self
        data = json.loads(self.to_json())
        data["secure_aggregation"]["enabled"] = enabled
        try:
            return FedTuneConfig.model_validate(data)
        except ValidationError as e:
            raise ConfigError(
                _format_errors(
                    e,
                    "configuration (secure aggregation is on by default here; set secure_aggregation.enabled: false to turn it off)",
                )
            ) from None

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> FedTuneConfig:
        return cls.model_validate(json.loads(text))


def secure_aggregation_conflicts(cfg: "FedTuneConfig") -> list[str]:
    """What in ``cfg`` cannot run under secure aggregation (the coordinator sees only the sum)."""
    problems = []
    fed = cfg.federation
    if fed.aggregator != "mean":
        problems.append(
            f"federation.aggregator {fed.aggregator!r} inspects each site's update, which secure aggregation hides from the "
            "coordinator: use aggregator 'mean', or turn secure_aggregation.enabled off"
        )
    if fed.sites:
        n = len(fed.sites)
        sa = cfg.secure_aggregation
        if n < 2:
            problems.append(f"secure aggregation needs at least 2 sites; federation.sites lists {n}")
        elif sa.neighbours is not None and sa.neighbours > n - 1:
            problems.append(f"secure_aggregation.neighbours {sa.neighbours}: at most {n - 1} with the {n} sites listed")
        elif sa.threshold is not None and sa.threshold > (holders := min(n, (sa.neighbours or n - 1) + 1)):
            problems.append(
                f"secure_aggregation.threshold {sa.threshold}: at most {holders} share holders per site "
                f"with the {n} sites listed; no round could ever be unmasked"
            )
        if sa.max_weight >= (1 << 32) // n:
            problems.append(
                f"secure_aggregation.max_weight {sa.max_weight}: must be below {(1 << 32) // n} for {n} sites (32-bit field)"
            )
    return problems


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration ({err.error_count()} problem{'s' if err.error_count() != 1 else ''}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        else:
            msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = (
            "" if e["type"] in ("extra_forbidden", "missing") or isinstance(got, (dict, list)) else f" (got {got!r})"
        )
        lines.append(f"  - {key}: {msg}{shown}")
    return "\n".join(lines)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a YAML or TOML file into a plain dict; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    text = p.read_bytes()
    try:
        if p.suffix.lower() == ".toml":
            data = tomllib.loads(text.decode("utf-8"))
        elif p.suffix.lower() in (".yaml", ".yml", ".json"):
            data = yaml_load(text.decode("utf-8"))
        else:
            raise ConfigError(f"{p}: unknown config type {p.suffix!r}; expected .yaml, .yml, .toml or .json")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where}: YAML syntax error: {getattr(e, 'problem', e)}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: TOML syntax error: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections (model, peft, data, ...) at the top level")
    return data


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """tree['a']['b'] = value for key 'a.b', creating sections as needed."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key}: '{part}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=1e-4' -> ('train.lr', 0.0001). Values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
    source: str | None = None,
) -> FedTuneConfig:
    """Config file (or an already-parsed ``base`` mapping, named ``source`` in errors) + dotted overrides -> FedTuneConfig."""
    data = read_config_file(path) if path is not None else copy.deepcopy(base or {})
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    from_file = path is not None or base is not None
    source = source or (str(path) if path is not None else "configuration")
    if overrides:
        source += " (with command-line overrides)" if from_file else " from command line"
    try:
        return FedTuneConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


# ---------------------------------------------------------------------------------------------
# Command-line flags from the schema. Each flag is declared once, on the Field it sets
# (json_schema_extra=flag(...)); its help is the Field's description, its type and choices come
# from the Field's annotation. ftsim, ftserver and ftclient check add them with
# add_config_flags(parser, tool) and read them back with config_overrides(args, tool); their
# own flags (--config, --resume, --set, --certs, ...) stay in their CLI modules.
# docs/configuration.md is generated from the same walk (fedtune.common.config_reference).


@dataclass(frozen=True)
class ConfigKey:
    """One key of the schema: ``federation.rounds``; a key of a list of sections reads ``federation.sites[].rank``."""

    key: str
    field: FieldInfo


def config_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[ConfigKey]:
    """Every key of ``model`` (default: FedTuneConfig) in the order the schema declares them. A
    section is walked, not listed; a list of sections (federation.sites) is listed, then its items' keys."""
    keys = []
    for name, field in (model or FedTuneConfig).model_fields.items():
        key = prefix + name
        sub = _section_type(field.annotation)
        if sub is not None and get_origin(field.annotation) is not list:
            keys += config_keys(sub, key + ".")
            continue
        keys.append(ConfigKey(key, field))
        if sub is not None:
            keys += config_keys(sub, key + "[].")
    return keys


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if get_origin(annotation) is list:
        annotation = get_args(annotation)[0]
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def annotation_alternatives(annotation: Any) -> list[Any]:
    """``int | Literal['a'] | None`` -> [int, Literal['a'], NoneType]; anything else -> [it]."""
    import types
    import typing

    return list(get_args(annotation)) if get_origin(annotation) in (typing.Union, types.UnionType) else [annotation]


def yaml_text(value: Any) -> str:
    """A value as a config file writes it: true, null, 1e-05, auto, [q_proj, v_proj]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    return value if isinstance(value, str) else repr(value)


@dataclass(frozen=True)
class ConfigFlag:
    """A command-line flag that sets one config key (declared on its Field with :func:`flag`)."""

    name: str  # '--rounds'
    key: str  # 'federation.rounds'
    tools: tuple[str, ...]
    description: str  # the Field's description: the flag's help
    default: Any  # the schema's default (shown in the help; the flag itself defaults to None)
    metavar: str | None = None
    const: Any = None  # the value a switch sets; None: the flag takes a value
    choices: tuple[str, ...] | None = None  # a Literal's values
    type: Any = None  # str -> value, as argparse's type=

    @property
    def dest(self) -> str:
        return self.name[2:].replace("-", "_")

    @property
    def help(self) -> str:
        return self.help_with()

    def help_with(self, demo: Any = None) -> str:
        """The flag's help; ``demo``: the value a tool's built-in run gives the key (ftsim's demo
        config), said beside the default when it differs."""
        if self.const is not None:
            said = f"sets {self.key}: {yaml_text(self.const)}"
        else:
            said = self.key + ("" if self.default is None else f"; default {yaml_text(self.default)}")
            if demo is not None and demo != self.default:
                said += f"; the demo: {yaml_text(demo)}"
        return f"{self.description} [{said}]".replace("%", "%%")  # argparse formats help with %

    def usage(self) -> str:
        """How the flag is written: '--rounds ROUNDS', '--peft {lora,...}', '--merged'."""
        if self.const is not None:
            return self.name
        shown = self.metavar or ("{" + ",".join(self.choices) + "}" if self.choices else self.dest.upper())
        return f"{self.name} {shown}"


_FLAGS: list[ConfigFlag] = []  # every declared flag, built once on first use


def config_flags(tool: str | None = None) -> tuple[ConfigFlag, ...]:
    """The flags declared on the schema's Fields, in schema order: ``tool``'s (one of FLAG_TOOLS), or every one."""
    if tool is not None and tool not in FLAG_TOOLS:
        raise ValueError(f"unknown tool {tool!r}; flags are declared for {', '.join(FLAG_TOOLS)}")
    if not _FLAGS:
        found = [
            _config_flag(ck, spec)
            for ck in config_keys()
            if isinstance(ck.field.json_schema_extra, dict)
            for spec in ck.field.json_schema_extra.get("flags", [])
        ]
        owner: dict[tuple[str, str], str] = {}
        for f in found:
            for t in f.tools:
                if (t, f.name) in owner:
                    raise TypeError(f"{t}: flag {f.name} is declared on both {owner[t, f.name]} and {f.key}")
                owner[t, f.name] = f.key
        _FLAGS.extend(found)
    return tuple(f for f in _FLAGS if tool is None or tool in f.tools)


def _config_flag(ck: ConfigKey, spec: dict[str, Any]) -> ConfigFlag:
    name, field = spec["name"], ck.field
    if not field.description:
        raise TypeError(f"{ck.key}: flag {name} needs the Field's description (it is the flag's help)")
    options = [a for a in annotation_alternatives(field.annotation) if a is not type(None)]
    words = tuple(str(v) for a in options if get_origin(a) is Literal for v in get_args(a))
    kinds = [get_args(a)[0] if get_origin(a) is Annotated else a for a in options if get_origin(a) is not Literal]
    const, choices, parse = spec.get("const"), None, None
    if kinds == [bool]:
        const = True if const is None else const
    elif const is not None:
        raise TypeError(f"{ck.key}: flag {name} sets a constant, which only a bool key takes")
    elif not kinds:
        choices = words
    elif len(kinds) == 1 and kinds[0] in (int, float, str):
        parse = _value_or_word(kinds[0], words) if words else kinds[0]
    else:
        raise TypeError(f"{ck.key}: flag {name}: no command-line form for {field.annotation}")
    return ConfigFlag(
        name=name,
        key=ck.key,
        tools=tuple(spec["tools"]),
        description=field.description,
        default=None if field.is_required() else field.get_default(call_default_factory=True),
        metavar=spec.get("metavar"),
        const=const,
        choices=choices,
        type=parse,
    )


def _value_or_word(kind: type, words: tuple[str, ...]):
    """argparse type for a key that takes a number or a word (federation.update_norm_bound: 0.5, auto, off)."""

    def parse(text: str):
        if text in words:
            return text
        try:
            return kind(text)
        except ValueError:
            import argparse

            what = "a number" if kind in (int, float) else f"a {kind.__name__}"
            raise argparse.ArgumentTypeError(f"expected {what} or one of {', '.join(words)}, got {text!r}") from None

    parse.__name__ = f"{kind.__name__} or {'/'.join(words)}"
    return parse


def add_config_flags(parser, tool: str, description: str | None = None, demo: dict[str, Any] | None = None) -> None:
    """``tool``'s flags from the schema on an argparse parser, in a group of their own. Each
    defaults to None, meaning not given: the config's value stands. ``demo``: dotted key -> the
    value the tool's built-in run uses (ftsim with no config), shown in the help beside the default."""
    group = parser.add_argument_group(
        "config flags",
        description
        or "each sets the config key in brackets (every key: docs/configuration.md); a flag wins over --set and the config file",
    )
    for f in config_flags(tool):
        shown = f.help_with((demo or {}).get(f.key))
        if f.const is not None:
            group.add_argument(f.name, dest=f.dest, action="store_const", const=f.const, default=None, help=shown)
        else:
            group.add_argument(
                f.name, dest=f.dest, type=f.type, choices=f.choices, metavar=f.metavar, default=None, help=shown
            )


def config_overrides(args, tool: str) -> dict[str, Any]:
    """A command line's dotted-key overrides: every ``--set KEY=VALUE`` (where the tool has --set),
    then each of ``tool``'s config flags given. Flags win over ``--set``."""
    overrides = dict(parse_override(text) for text in getattr(args, "set", None) or [])
    for f in config_flags(tool):
        if getattr(args, f.dest) is not None:
            overrides[f.key] = getattr(args, f.dest)
    return overrides
