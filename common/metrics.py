"""Pure metric functions: loss, perplexity, exact match, label accuracy."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

# The personalized model's scores a site reports beside the global adapter's (federation.personalization).
PERSONAL_SCORES = ("personal_eval_loss", "personal_exact_match")


def mean_loss(total_nll: float, n_tokens: int) -> float:
    """Mean negative log-likelihood per answer token (nan when there are none)."""
    return total_nll / n_tokens if n_tokens > 0 else float("nan")


def perplexity(loss: float) -> float:
    if not math.isfinite(loss):
        return float("nan")
    return math.exp(min(loss, 700.0))  # exp(>709) overflows a float


def normalize_answer(text: str) -> str:
    """First non-empty line, trimmed, lower-case, inner whitespace collapsed, trailing period dropped."""
    for line in text.splitlines():
        line = line.strip()
        if line:
            return re.sub(r"\s+", " ", line).lower().rstrip(".").strip()
    return ""


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"exact_match: {len(predictions)} predictions for {len(references)} references")
    if not references:
        return float("nan")
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(references)


def label_accuracy(chosen: Sequence[str], references: Sequence[str]) -> float:
    """Share of examples whose most likely label equals the reference (normalised)."""
    return exact_match(chosen, references)


def lower_median(values: Sequence[float]) -> float:
    """The median, and of an even count the lower of the two middle values: with two sites, one
    site's claim alone never moves it (the plain median of 100 and 10,000,000 is 5,000,050).
    Plain rounds (server.aggregation) and secure rounds (secagg.round_weight_cap) both cap
    weights with it, so a site weighs the same either way."""
    if not values:
        raise ValueError("lower_median: no values")
    return float(sorted(values)[(len(values) - 1) // 2])


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    pairs = [(v, w) for v, w in zip(values, weights) if w > 0 and math.isfinite(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else float("nan")


def weighted_scores(
    scores: Iterable[Mapping | None], keys: Sequence[str] = ("eval_loss", "exact_match")
) -> dict[str, float]:
    """The federated metrics: each key's mean over the sites' scores that have it (finite), weighted
    by their ``eval_examples``; a key no site has is left out."""
    scores = [s for s in scores if s and s.get("eval_examples")]
    out = {}
    for key in keys:
        pairs = [(s[key], s["eval_examples"]) for s in scores if s.get(key) is not None and math.isfinite(s[key])]
        if pairs:
            out[key] = weighted_mean([v for v, _ in pairs], [n for _, n in pairs])
    return out
