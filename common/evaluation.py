"""Scoring a model (with or without an adapter) on examples: used by sites each round and by fteval.

- loss: mean negative log-likelihood of the answer tokens (the same tokens training learns);
- exact match: greedy generation, compared on the normalised first line;
- label accuracy: for classification, the label whose answer the model finds most likely.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import metrics
from .config import DataConfig, EvalConfig
from .data import IGNORE_INDEX, Example, collate, prompt_and_reference, tokenize_all, tokenize_example


@dataclass
class EvalResult:
    examples: int
    loss: float
    perplexity: float
    answer_tokens: int
    exact_match: float | None = None
    label_accuracy: float | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token NLL [B, T] (0 where label is IGNORE_INDEX) from logits [B, T, V].

    Flattened to [B*T, V] rows: log-softmax over a transposed [B, V, T] view walks memory
    with a stride of T and is several times slower on CPU.
    """
    b, t, v = logits.shape
    flat = F.cross_entropy(
        logits.reshape(b * t, v).float(), labels.reshape(b * t), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return flat.view(b, t)


def text_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits of the input's own positions: prompt tuning prepends virtual tokens, whose
    positions come first in the output and predict nothing of the text."""
    return logits[:, logits.shape[1] - input_ids.shape[1] :]


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def answer_nll(model, items: list[dict], pad_id: int, device, batch_size: int) -> tuple[float, int, list[float]]:
    """-> (total NLL over answer tokens, number of answer tokens, per-item NLL sums)."""
    was_training = model.training
    model.eval()
    total, count, per_item = 0.0, 0, []
    for chunk in _batches(items, batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        logits = text_logits(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["input_ids"]
        )
        # logits[:, t] predicts token t+1: [B, T-1, V] against labels [B, T-1].
        shift_labels = batch["labels"][:, 1:]
        nll = token_nll(logits[:, :-1], shift_labels)
        per_item.extend(nll.sum(dim=1).tolist())
        total += float(nll.sum())
        count += int((shift_labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total, count, per_item


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], device, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers for chat-rendered prompts (left-padded batches)."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for chunk in _batches(prompts, batch_size):
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with warnings.catch_warnings():
                # peft's prompt learning ignores position ids by design and warns on every call.
                warnings.filterwarnings(
                    "ignore", message="Position ids are not supported for parameter efficient tuning"
                )
                # and prefix tuning's cache, handed to generate, meets transformers' own (harmless).
                warnings.filterwarnings("ignore", message="Both `past_key_values` and `cache` are set")
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def choose_labels(
    model, tokenizer, examples: list[Example], labels: list[str], data_cfg: DataConfig, device, batch_size: int
) -> list[str]:
    """For each chat example, the label whose rendered answer (label + end of turn) has the lowest NLL."""
    items = []
    for ex in examples:
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        for label in labels:
            answer = Example(messages=[*ex.messages[:last], {"role": "assistant", "content": label}])
            items.append(tokenize_example(answer, tokenizer, 10**9, data_cfg.system_prompt))
    _, _, nll = answer_nll(model, items, tokenizer.pad_token_id, device, batch_size)
    k = len(labels)
    return [labels[min(range(k), key=lambda j: nll[i * k + j])] for i in range(len(examples))]


def evaluate_examples(
    model,
    tokenizer,
    examples: list[Example],
    data_cfg: DataConfig,
    eval_cfg: EvalConfig,
    device,
    labels: list[str] | None = None,
) -> EvalResult:
    examples = examples[: eval_cfg.max_examples]
    tok = tokenize_all(examples, tokenizer, data_cfg)
    total, count, _ = answer_nll(model, tok.items, tokenizer.pad_token_id, device, eval_cfg.batch_size)
    loss = metrics.mean_loss(total, count)
    result = EvalResult(examples=len(tok.items), loss=loss, perplexity=metrics.perplexity(loss), answer_tokens=count)
    chat = [ex for ex in examples if ex.is_chat]
    if chat and eval_cfg.exact_match:
        pairs = [prompt_and_reference(ex, tokenizer, data_cfg.system_prompt) for ex in chat]
        preds = generate_answers(
            model, tokenizer, [p for p, _ in pairs], device, eval_cfg.max_new_tokens, eval_cfg.batch_size
        )
        result.exact_match = metrics.exact_match(preds, [r for _, r in pairs])
    if chat and labels:
        chosen = choose_labels(model, tokenizer, chat, labels, data_cfg, device, eval_cfg.batch_size)
        refs = [
            ex.messages[max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")]["content"] for ex in chat
        ]
        result.label_accuracy = metrics.label_accuracy(chosen, refs)
    return result
