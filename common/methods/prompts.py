"""Prompt learning: prefix tuning (per-layer virtual keys and values) and prompt tuning (virtual
input tokens). One tensor for all layers, so layer-wise control does not apply; nothing merges."""

from __future__ import annotations

from .spec import Method, PeftBuilder

build_prefix = PeftBuilder("PrefixTuningConfig", {"num_virtual_tokens": "num_virtual_tokens"}, targets=False)
build_prompt = PeftBuilder("PromptTuningConfig", {"num_virtual_tokens": "num_virtual_tokens"}, targets=False)


def label(peft) -> str:
    return f"{peft.method} tuning, {peft.num_virtual_tokens} virtual tokens"


_PROMPTS = dict(trained_keys=("prompt_embeddings",), layered=False, targets=False, label=label)
PREFIX = Method(name="prefix", summary="prefix tuning", build=build_prefix, default_lr=5e-3, **_PROMPTS)
PROMPT = Method(name="prompt", summary="prompt tuning", build=build_prompt, default_lr=3e-2, **_PROMPTS)
