"""LoRA and its two variants: QLoRA (LoRA on a 4-bit base) and DoRA (LoRA plus a magnitude per column)."""

from __future__ import annotations

from .spec import Method

LORA_OPTIONS = ("r", "alpha", "dropout", "ffa")
RANK_AXES = {"lora_A": 0, "lora_B": 1}  # lora_A is r x in, lora_B out x r


def build(model, peft, seed: int):
    import peft as P

    from .targets import resolve_targets

    return P.LoraConfig(
        r=peft.r,
        lora_alpha=peft.alpha,
        lora_dropout=peft.dropout,
        target_modules=resolve_targets(model, peft),
        bias="none",
        use_dora=peft.method == "dora",
    )


def label(peft) -> str:
    return (
        f"{peft.method} r={peft.r}"
        + (" (FFA: A frozen)" if peft.ffa else "")
        + (f" on a 4-bit {peft.quant_type} base" if peft.method == "qlora" else "")
    )


_LORA = dict(
    build=build,
    default_lr=2e-4,
    trained_keys=("lora_",),
    rank=True,
    rank_axes=RANK_AXES,
    mergeable=True,
    label=label,
)

LORA = Method(
    name="lora", summary="LoRA (peft LoraConfig)", options=LORA_OPTIONS, ffa_frozen=".lora_A.", stackable=True, **_LORA
)
QLORA = Method(
    name="qlora",
    summary="QLoRA: a 4-bit NF4 base (bitsandbytes) with LoRA on top",
    options=(*LORA_OPTIONS, "quant_type", "double_quant"),
    four_bit=True,
    ffa_frozen=".lora_A.",
    stackable=True,
    **_LORA,
)
DORA = Method(name="dora", summary="DoRA (LoRA with a learned magnitude per column)", options=LORA_OPTIONS[:3], **_LORA)
