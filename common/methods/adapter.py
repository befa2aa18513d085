"""LLaMA-Adapter (peft's adaption prompt): learned prompts and gates in the top layers."""

from __future__ import annotations

from .spec import Method


def build(model, peft, seed: int):
    import peft as P

    from ..config import ConfigError
    from .targets import n_layers_of

    n = n_layers_of(model)
    if peft.adapter_layers is not None and peft.adapter_layers > n:
        raise ConfigError(f"peft.adapter_layers {peft.adapter_layers}: the model has {n} layers")
    return P.AdaptionPromptConfig(adapter_len=peft.adapter_len, adapter_layers=peft.adapter_layers or n)


def label(peft) -> str:
    return f"adapter (LLaMA-Adapter, {peft.adapter_len} tokens on {peft.adapter_layers or 'every'} layer(s))"


ADAPTER = Method(
    name="adapter",
    summary="LLaMA-Adapter (peft AdaptionPromptConfig)",
    build=build,
    default_lr=5e-3,
    trained_keys=("adaption_",),
    options=("adapter_len", "adapter_layers"),
    targets=False,
    label=label,
)
