"""The fine-tuning methods: one :class:`~fedtune.common.methods.spec.Method` entry each, in one table.

Config validation (``peft.method``'s allowed values, the default learning rate, which options fit
which method), the trainable model (:func:`fedtune.common.methods.peft_config`), the rank
operations, the apps and the report ask this table what a method is; nothing else keeps a list of
method names. Declarative: importing it loads neither torch nor peft.

Adding a method
---------------

One file and one entry. Say peft has ``FooConfig``:

1. ``common/methods/foo.py``: its builder, as data when its config is its settings passed on
   (``build = PeftBuilder("FooConfig", {"r": "r", "foo_dropout": "dropout"})``: peft's class, its
   arguments' settings, fixed arguments, the seed's argument, ``target_modules`` resolved; see
   :mod:`fedtune.common.methods.vera`), or a function ``build(model, peft, seed) -> FooConfig`` for
   one with quirks (import peft inside it; :mod:`fedtune.common.methods.ia3`), and ``FOO = Method("foo", summary, build, default_lr=...,
   trained_keys=("foo_",), ...)`` declaring what it is (the ``peft.*`` settings it reads are
   its ``PeftBuilder``'s; a builder function's are its ``options=``): whether ``peft.r`` sizes it (``rank``),
   whether its update is a B·A product whose rank sites may lower (``rank_axes``), whether it merges
   into the base (``mergeable``), whether the ``layers`` section applies (``layered``), whether
   ``peft.target_modules`` does (``targets``), a 4-bit base (``four_bit``), its own setting checks
   (``check``). A setting it needs that ``peft`` lacks is a field of ``PeftSettings`` (common/config.py).
2. ``foo.FOO`` in :data:`REGISTRY` below (its position is where ``--peft`` lists it).

That is all the code: ``--peft foo`` and ``peft.method: foo`` are accepted, the schema lists it,
and the tests pick it up: ``tests/unit/test_registry.py`` builds every entry on the tiny model,
trains it a step and round-trips its state (and merges it, when it says it merges);
``tests/unit/test_methods.py`` runs one federated round with it. :mod:`fedtune.common.methods.hra`
was added this way. The docs' method table (docs/) is written by hand.
"""

from __future__ import annotations

from . import adapter, fourierft, full, hra, ia3, lora, lycoris, oft, prompts, vera
from .spec import Method

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        lora.LORA,
        lora.QLORA,
        lora.DORA,
        ia3.IA3,
        adapter.ADAPTER,
        prompts.PREFIX,
        prompts.PROMPT,
        full.FULL,
        lycoris.LOHA,
        lycoris.LOKR,
        vera.VERA,
        oft.OFT,
        fourierft.FOURIERFT,
        hra.HRA,
    )
}
"""Every method, by name, in the order ``--peft`` and the schema list them."""


def names(**traits) -> tuple[str, ...]:
    """The methods whose entries have these values, e.g. ``names(mergeable=True)``; all of them
    with no arguments. A trait may be any field or property of :class:`Method` (``mixed_ranks``)."""
    return tuple(n for n, m in REGISTRY.items() if all(getattr(m, k) == v for k, v in traits.items()))


def get(name: str) -> Method:
    """The entry of ``name``; a ConfigError listing the methods for a name that is not one."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        from ..config import ConfigError

        raise ConfigError(f"peft.method {name!r} is not a method; one of {', '.join(REGISTRY)}") from None
