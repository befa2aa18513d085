"""What the model forgot: a small general-knowledge set written for fedtune (``general/``),
scored before fine-tuning (the base model) and after it (the final global adapter).

- ``text_loss``: loss on every token of 16 short general-text paragraphs;
- ``qa_loss``: answer-token loss on 32 short general questions;
- ``qa_accuracy``: the share of those questions whose greedy answer contains the expected
  one as a whole phrase (the default model answers in sentences: "The capital of France is
  Paris."), so exact match would score a knowledgeable model 0;
- ``qa_wrong_loss``: the same questions' answer-token loss on a wrong answer of the same form
  (the next question's: "Tokyo" for France). Fine-tuning on terse templated answers lowers
  ``qa_loss`` by teaching the form; whether the facts survived is the gap ``qa_wrong_loss -
  qa_loss`` (a model that knows them puts the right answer well above a wrong one);
- ``qa_reply_words``: the mean length, in words, of those greedy replies' first lines (the base
  model answers in sentences; a model fine-tuned on one-word labels answers in one word).

The coordinator computes it on public data only: no site record is involved.
"""

from __future__ import annotations

import re
from pathlib import Path

from . import metrics
from .config import DataConfig
from .data import Example, load_site_data, prompt_and_reference, tokenize_all
from .evaluation import answer_nll, generate_answers

GENERAL_DIR = Path(__file__).resolve().parent / "general"
MAX_NEW_TOKENS = 16


def contains_answer(prediction: str, reference: str) -> bool:
    """The reference, normalised, appears in the prediction's first line as a whole phrase."""
    ref = metrics.normalize_answer(reference)
    return bool(ref) and re.search(rf"(?<!\w){re.escape(ref)}(?!\w)", metrics.normalize_answer(prediction)) is not None


def wrong_answers(questions: list[Example]) -> list[Example]:
    """Each question with the next one's answer (the last with the first's): wrong, same form."""
    answers = [ex.messages[-1]["content"] for ex in questions]
    return [
        Example(messages=[*ex.messages[:-1], {"role": "assistant", "content": answers[(i + 1) % len(answers)]}])
        for i, ex in enumerate(questions)
    ]


def general_knowledge(model, tokenizer, device, max_length: int = 256, batch_size: int = 8) -> dict[str, float]:
    """-> {text_loss, qa_loss, qa_wrong_loss, qa_accuracy, qa_reply_words} of ``model`` (with
    whatever adapter it carries)."""
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    examples = {}

    def answer_loss(exs: list[Example], cfg: DataConfig) -> float:
        total, count, _ = answer_nll(
            model, tokenize_all(exs, tokenizer, cfg).items, tokenizer.pad_token_id, device, batch_size
        )
        return metrics.mean_loss(total, count)

    for name, fmt in (("text", "text"), ("qa", "messages")):
        cfg = DataConfig(format=fmt, max_length=max_length)
        examples[name] = load_site_data(GENERAL_DIR / f"{name}.jsonl", cfg).examples
        out[f"{name}_loss"] = answer_loss(examples[name], cfg)
    out["qa_wrong_loss"] = answer_loss(
        wrong_answers(examples["qa"]), DataConfig(format="messages", max_length=max_length)
    )
    pairs = [prompt_and_reference(ex, tokenizer) for ex in examples["qa"]]
    preds = generate_answers(model, tokenizer, [p for p, _ in pairs], device, MAX_NEW_TOKENS, batch_size)
    out["qa_accuracy"] = sum(contains_answer(p, r) for p, (_, r) in zip(preds, pairs)) / len(pairs)
    out["qa_reply_words"] = sum(len((p.strip().splitlines() or [""])[0].split()) for p in preds) / len(preds)
    if was_training:
        model.train()
    return out
