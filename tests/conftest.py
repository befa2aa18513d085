"""Shared fixtures: a tiny Llama causal LM and tokenizer, built offline in a couple of seconds.

The tokenizer is a byte-level BPE trained on the bundled sample data, with ChatML special
tokens and a ChatML chat template like SmolLM2's (minus its default system prompt), so the
same code paths run as with the real default model, only with a model small enough for
unit tests. Nothing here touches the network or the real default model.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

# Belt and braces: nothing in the unit tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "simulations" / "data"
CONFIG_DIR = REPO / "simulations" / "configs"

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<pad>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# A 32-wide model gains nothing from threads; one thread avoids contention on small CPUs.
torch.set_num_threads(1)


def pytest_configure(config):
    # Known noise from our dependencies, not from fedtune.
    config.addinivalue_line("filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
    # peft's prefix tuning still passes past_key_values, which transformers 5 has deprecated.
    config.addinivalue_line("filterwarnings", "ignore:`past_key_values` is deprecated:FutureWarning")
    # make_scheduler fast-forwards a fresh scheduler to the round's first step on purpose.
    config.addinivalue_line(
        "filterwarnings", "ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`:UserWarning"
    )


def seed_everything(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _corpus() -> list[str]:
    """Every string in the bundled train files (message contents), for training the BPE."""
    texts: list[str] = []
    for f in sorted(DATA_DIR.glob("*/train.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            for m in rec.get("messages", []):
                texts.append(m["content"])
            for k in ("instruction", "input", "output", "prompt", "completion", "text"):
                if isinstance(rec.get(k), str):
                    texts.append(rec[k])
    return texts


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        min_frequency=2,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        bos_token=IM_START,
        additional_special_tokens=[IM_START, IM_END],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local HF directory: tiny Llama (config.json + model.safetensors) and its tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden=32)


@pytest.fixture(scope="session")
def tiny_model_dir_64(tmp_path_factory) -> Path:
    """The tiny Llama 64 wide: bitsandbytes' CPU 4-bit kernels need inputs of at least one
    64-value quantization block (every real model's are)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-64"), hidden=64)


def save_tiny_llama(out: Path, hidden: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    seed_everything(0)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
        # Wider than the default 0.02: after the final RMSNorm the logits of a 32-wide model
        # span only about +-0.6 at 0.02, too little for a LoRA update to move the loss much.
        initializer_range=0.2,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """The tiny tokenizer as the library loads it (AutoTokenizer + ensure_chat_template)."""
    from fedtune.common.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model_dir), True)


@pytest.fixture
def tiny_config(tiny_model_dir):
    """A FedTuneConfig pointing at the tiny model, sized for seconds on a CPU."""
    from fedtune.common.config import FedTuneConfig

    return FedTuneConfig.model_validate(
        {
            "model": {"name": str(tiny_model_dir), "device": "cpu", "dtype": "float32"},
            "peft": {"r": 4, "alpha": 8.0, "dropout": 0.0},
            "data": {"max_length": 192},  # the bundled data needs at most 156 tiny-tokenizer tokens
            "train": {"local_steps": 2, "batch_size": 2, "lr": 1e-3, "seed": 0},
            "eval": {"max_examples": 4, "batch_size": 4, "max_new_tokens": 4},
            # server lr 1: the new global is the round's mean update, which the aggregation, secure
            # aggregation and privacy tests check exactly; the default ('sites') has its own tests.
            "federation": {"rounds": 2, "server_lr": 1.0},
        }
    )


@pytest.fixture
def tiny_peft_model(tiny_config):
    """A fresh tiny base model wrapped with a seeded LoRA adapter (function scope: tests may train it)."""
    from fedtune.common.methods import load_model

    seed_everything(0)
    return load_model(tiny_config, "cpu")


@pytest.fixture
def holds_no_private_row():
    """``check(private_dirs, folder)``: every site's private adapter (each ``private_dirs`` item, a
    PEFT folder) has nonzero LoRA B rows, and no file under the coordinator's ``folder`` holds one
    of those rows' bytes (personalization's promise: the private part never leaves the site)."""
    from fedtune.common.checkpoint import load_adapter_state

    def check(private_dirs, folder: Path) -> None:
        rows = []
        for d in private_dirs:
            private = load_adapter_state(d)
            rows += [v.numpy().astype(np.float32)[0].tobytes() for k, v in private.items() if ".lora_B." in k]
        assert rows and all(any(b) for b in rows)
        for f in Path(folder).rglob("*"):
            if f.is_file():
                blob = f.read_bytes()
                assert not any(row in blob for row in rows), f

    return check
