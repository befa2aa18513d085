"""What a fine-tuning method declares about itself (see :mod:`fedtune.common.methods.registry`).

Declarative on purpose: this module, the registry and every method file import neither torch nor
peft, so ``common/config.py`` can validate a config against the registry without loading them.
A method's builder imports peft itself, when it is called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # only for the annotations: config imports this package
    from ..config import PeftSettings

# (model, peft settings, seed) -> the method's peft config (task type and base name are set by the caller).
Builder = Callable[[Any, "PeftSettings", int], Any]
Label = Callable[["PeftSettings"], str]
Check = Callable[["PeftSettings"], None]


@dataclass(frozen=True)
class PeftBuilder:
    """A builder written as data, for a method whose peft config is its settings passed on: peft's class
    ``config`` (by name: this module imports no peft) called with ``settings`` (its argument -> the
    ``peft.*`` setting it takes), the ``fixed`` arguments, the run's seed as ``seed_arg`` (when given) and,
    when ``targets``, ``target_modules`` from :func:`~fedtune.common.methods.targets.resolve_targets`."""

    config: str
    settings: Mapping[str, str] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    seed_arg: str | None = None
    targets: bool = True

    def __call__(self, model, peft: PeftSettings, seed: int):
        import peft as P

        kwargs = {arg: getattr(peft, name) for arg, name in self.settings.items()} | dict(self.fixed)
        if self.seed_arg:
            kwargs[self.seed_arg] = seed
        if self.targets:
            from .targets import resolve_targets

            kwargs["target_modules"] = resolve_targets(model, peft)
        return getattr(P, self.config)(**kwargs)


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: what it is, how it is built, and what the federation may do with it.

    Config validation, the trainable model and the rank operations ask these fields instead of
    keeping lists of method names; so should the apps (``methods.get(cfg.peft.method).four_bit``)."""

    name: str
    """``peft.method``: what a config file and ``--peft`` say."""
    summary: str
    """What it is, in a few words (the schema's description, the docs)."""
    build: Builder | None
    """Its peft config from the model and the settings; None: full fine-tuning (the model's own weights train)."""
    default_lr: float
    """``train.lr`` when the config leaves it unset: what the method is usually trained with."""
    trained_keys: tuple[str, ...]
    """Every state key it trains contains one of these (e.g. ``lora_``); empty: the model's own parameter names."""
    options: tuple[str, ...] | None = None
    """The ``peft.*`` settings it reads besides ``method`` (and ``target_modules`` when :attr:`targets`);
    None: those its :class:`PeftBuilder` passes on (none for a builder function)."""
    rank: bool = False
    """``peft.r`` sets its size (the run's header says ``r=``)."""
    rank_axes: Mapping[str, int] | None = None
    """For an update that is a product B·A of rank r: tensor-name part -> the axis of r in it (LoRA:
    ``{"lora_A": 0, "lora_B": 1}``). Given, sites may train lower ranks (HetLoRA truncation and
    zero-padding) and the coordinator measures the product's aggregation error."""
    mergeable: bool = False
    """Its update folds into the base weights (``merge_and_unload``: ``output.merged``, ``fteval --export-merged``)."""
    layered: bool = True
    """Its tensors live per decoder layer, so the ``layers`` section (freezing, progressive unfreezing,
    discriminative learning rates) applies."""
    targets: bool = True
    """``peft.target_modules`` chooses what it adapts (False for methods that add learned tokens)."""
    four_bit: bool = False
    """The base loads in 4 bits through bitsandbytes (the ``qlora`` extra); recorded beside the adapter."""
    stackable: bool = False
    """A second adapter of its kind can sit beside it and their effects add (personalization 'dual'),
    and the sum saves as one adapter of the two ranks together (LoRA: B·A products side by side)."""
    ffa_frozen: str | None = None
    """FFA-LoRA (``peft.ffa``) applies: the state-key part frozen at the shared init (LoRA: ``.lora_A.``)."""
    label: Label | None = field(default=None, compare=False)
    """The run's header line, e.g. ``prefix tuning, 16 virtual tokens`` (default: ``NAME r=R`` or ``NAME``)."""
    check: Check | None = field(default=None, compare=False)
    """Its own constraints on the settings, checked with the config: raises ValueError naming the key."""

    def __post_init__(self) -> None:
        if self.options is None:
            passed = self.build.settings.values() if isinstance(self.build, PeftBuilder) else ()
            object.__setattr__(self, "options", tuple(dict.fromkeys(passed)))

    @property
    def artifact(self) -> Literal["adapter", "model"]:
        """What a run saves: ``adapter/`` (a PEFT adapter folder) or ``model/`` (full weights, a HF model folder)."""
        return "model" if self.build is None else "adapter"

    @property
    def mixed_ranks(self) -> bool:
        """Sites may train at a lower LoRA rank than ``peft.r`` (federation.sites[].rank)."""
        return self.rank_axes is not None

    def rank_axis(self, key: str) -> int | None:
        """Which axis of the state tensor ``key`` is the rank (None: the tensor has no rank axis)."""
        for part, axis in (self.rank_axes or {}).items():
            if f".{part}." in key or key.endswith(f".{part}"):
                return axis
        return None

    def describe(self, peft: PeftSettings) -> str:
        """One line for a run's header, e.g. 'qlora r=16 on a 4-bit nf4 base'."""
        if self.label is not None:
            text = self.label(peft)
        else:
            text = f"{self.name} r={peft.r}" if self.rank else self.name
        if self.targets and peft.target_modules != "all-linear":
            tm = peft.target_modules
            text += f" on {tm if isinstance(tm, str) else ', '.join(tm)}"
        return text
