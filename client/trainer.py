"""Local training at a site: a plain torch loop over a PEFT model.

A hand-written loop rather than transformers.Trainer: a round is a few dozen steps, and
Trainer's per-call set-up (accelerate, callbacks, dataloader workers) would cost more than
the steps themselves. The pieces that matter come from the libraries: AdamW from torch,
the warmup+decay schedules from ``transformers.get_scheduler``.

The LR schedule spans the whole federation (rounds x steps per round), and a site picks it
up at ``(round - 1) * steps`` so that warmup happens once and decay runs across rounds.

Local early stopping (train.local_patience) ends a round before its planned steps and keeps
the best weights checked. A round that stops early only skips its remaining steps: the
schedule and the data order of the next round start where they would have, so a site that
stops early is in step with one that did not.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedtune.common.config import TrainConfig
from fedtune.common.data import IGNORE_INDEX, collate
from fedtune.common.evaluation import text_logits, token_nll


@dataclass
class TrainStats:
    steps: int
    examples_seen: int
    loss_first: float  # mean loss of the first optimizer step
    loss_last: float  # mean loss of the last optimizer step
    loss_mean: float  # mean over all steps
    seconds: float
    tokens: int
    first_step_at: float = 0.0  # wall clock (time.time()) when the first forward pass began
    planned_steps: int = 0  # the round's steps (train.local_steps / local_epochs); ``steps`` ran
    stopped_at: int | None = None  # the step local early stopping ended the round at, if it did
    best_step: int = 0  # whose weights the round kept: 0 is the round's start
    val_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, local validation loss) of every check

    @property
    def val_start(self) -> float | None:
        return self.val_losses[0][1] if self.val_losses else None

    @property
    def val_best(self) -> float | None:
        return dict(self.val_losses).get(self.best_step)


def steps_per_round(cfg: TrainConfig, n_examples: int) -> int:
    if cfg.local_steps is not None:
        return cfg.local_steps
    per_step = cfg.batch_size * cfg.grad_accum
    return max(1, math.ceil(cfg.local_epochs * n_examples / per_step))


def batch_order(n_items: int, batch_size: int, n_batches: int, seed: int, start_batch: int) -> list[list[int]]:
    """Batches ``start_batch .. start_batch+n_batches`` of an endless, epoch-wise reshuffled stream.

    Deterministic in (seed, position), so a site continues through its data across rounds
    without keeping state, and two runs with one seed see the same batches.
    """
    out: list[list[int]] = []
    pos = start_batch * batch_size
    perm_epoch, perm = -1, []
    for _ in range(n_batches):
        batch = []
        for _ in range(batch_size):
            epoch, i = divmod(pos, n_items)
            if epoch != perm_epoch:
                perm = list(range(n_items))
                random.Random(seed * 1_000_003 + epoch).shuffle(perm)
                perm_epoch = epoch
            batch.append(perm[i])
            pos += 1
        out.append(batch)
    return out


def dropout_seed(seed: int, server_round: int) -> int:
    """The torch seed a site's round starts from: dropout draws are a function of (site seed,
    round), so a rerun, or a run resumed after a crash, trains exactly as the original."""
    return (seed * 1_000_003 + server_round * 7_919) % (2**63)


def make_optimizer(model, cfg: TrainConfig, lr_groups: list[tuple[float, list]] | None = None) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; ``lr_groups``: (lr multiplier, parameters) pairs for
    discriminative learning rates (:func:`fedtune.common.methods.lr_scales`)."""
    if lr_groups:
        groups = [{"params": ps, "lr": cfg.lr * scale} for scale, ps in lr_groups if ps]
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int, start_step: int):
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    warmup = int(round(cfg.warmup_ratio * total_steps))
    sched = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))
    # Fast-forward to where this round starts. LambdaLR.step is just a multiply per group;
    # torch warns that it precedes optimizer.step(), which is the point here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(start_step):
            sched.step()
    return sched


class LocalStopping:
    """The local early-stopping checks of one round (train.local_patience). The best weights are
    copied into buffers made once (trainable parameters only: for LoRA a few MB), since early in a
    round most checks find a new best."""

    def __init__(self, validate: Callable[[], float], params: list, cfg: TrainConfig, n_steps: int):
        self.validate, self.params, self.n_steps = validate, params, n_steps
        self.every = cfg.local_eval_every or max(1, n_steps // 5)
        self.patience, self.min_delta = cfg.local_patience, cfg.local_min_delta
        self.best: list | None = None
        self.best_step, self.best_loss, self.since = 0, math.nan, 0
        self.losses: list[tuple[int, float]] = []

    @classmethod
    def started(
        cls, validate: Callable[[], float] | None, params: list, cfg: TrainConfig, n_steps: int
    ) -> LocalStopping | None:
        """A round's local early stopping with its first check (the round's start) done, or None
        when it is off (no ``validate``, or no cfg.local_patience)."""
        if validate is None or cfg.local_patience is None:
            return None
        stopping = cls(validate, params, cfg, n_steps)
        stopping.stop_after(0)
        return stopping

    def stop_after(self, step: int) -> bool:
        """Check at ``step`` if one is due; True once ``patience`` checks in a row did not improve."""
        if step % self.every and step != self.n_steps:
            return False
        loss = float(self.validate())
        self.losses.append((step, loss))
        # The first check is the reference; a NaN loss never improves, and anything finite beats a NaN start.
        if len(self.losses) == 1 or (math.isfinite(loss) and not loss >= self.best_loss - self.min_delta):
            self.best_step, self.best_loss, self.since = step, loss, 0
            if step != self.n_steps:  # the final weights need no copy: they are the model's
                self._snapshot()
            return False
        self.since += 1
        return self.since >= self.patience

    @torch.no_grad()
    def _snapshot(self) -> None:
        if self.best is None:
            self.best = [p.detach().clone() for p in self.params]
        else:
            for b, p in zip(self.best, self.params):
                b.copy_(p)

    @torch.no_grad()
    def restore_best(self, last_step: int) -> None:
        """Put the best checked weights back, in place: the model keeps its parameter objects."""
        if self.best_step != last_step:
            for p, b in zip(self.params, self.best):
                p.copy_(b)


@torch.no_grad()
def add_proximal_grad(params: list, anchors: list, mu: float) -> None:
    """FedProx: the gradient of (mu/2)||w - w0||^2, i.e. mu (w - w0), added to each weight's
    gradient (before clipping, as if it were part of the loss)."""
    for p, p0 in zip(params, anchors):
        g = mu * (p - p0)
        if p.grad is None:
            p.grad = g
        else:
            p.grad.add_(g)


def _pulls(params: list, proximal_mu: float, base_anchor: tuple[float, list] | None) -> list[tuple[list, float]]:
    """The weights the loss pulls toward, as (weights, mu): FedProx's (the round's start, copied
    now) when ``proximal_mu`` > 0, then the base anchor's when its mu > 0."""
    pulls = [([p.detach().clone() for p in params], proximal_mu)] if proximal_mu > 0 else []
    if base_anchor is not None and base_anchor[0] > 0:
        pulls.append((base_anchor[1], base_anchor[0]))
    return pulls


def _backward(model, chunks: list[dict], n_tok: int, device) -> tuple[float, int]:
    """Forward and backward over one optimizer step's micro-batches, the loss weighted by answer
    token (``n_tok``: those of all the micro-batches) -> (the summed token loss, tokens seen)."""
    step_loss, tokens = 0.0, 0
    for batch in chunks:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss_sum = token_nll(text_logits(out.logits, batch["input_ids"])[:, :-1], batch["labels"][:, 1:]).sum()
        (loss_sum / max(n_tok, 1)).backward()
        step_loss += float(loss_sum.detach())
        tokens += int(batch["attention_mask"].sum())
    return step_loss, tokens


def _update(params: list, optimizer, scheduler, cfg: TrainConfig, pulls: list[tuple[list, float]]) -> None:
    """One optimizer step: each pull's gradient (``pulls``: (anchor weights, mu), FedProx's and
    the base anchor's, in that order), clipping at cfg.max_grad_norm, then the step and the schedule's."""
    for anchors, mu in pulls:
        add_proximal_grad(params, anchors, mu)
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _stats(
    losses: list[float],
    per_step: int,
    seconds: float,
    tokens: int,
    first_step_at: float,
    n_steps: int,
    stopped_at: int | None,
    stopping: LocalStopping | None,
) -> TrainStats:
    """The round's :class:`TrainStats` (``per_step``: examples an optimizer step sees)."""
    return TrainStats(
        steps=len(losses),
        examples_seen=len(losses) * per_step,
        loss_first=losses[0],
        loss_last=losses[-1],
        loss_mean=sum(losses) / len(losses),
        seconds=seconds,
        tokens=tokens,
        first_step_at=first_step_at,
        planned_steps=n_steps,
        stopped_at=stopped_at,
        best_step=stopping.best_step if stopping is not None else len(losses),
        val_losses=stopping.losses if stopping is not None else [],
    )


def train_round(
    model,
    items: list[dict],
    pad_id: int,
    cfg: TrainConfig,
    device,
    *,
    server_round: int,
    total_rounds: int,
    seed: int,
    progress=None,
    lr_groups: list[tuple[float, list]] | None = None,
    proximal_mu: float = 0.0,
    base_anchor: tuple[float, list] | None = None,
    validate: Callable[[], float] | None = None,
) -> TrainStats:
    """Run one round of local steps on tokenized items (each {input_ids, labels}). ``proximal_mu``
    > 0 (FedProx): the loss gets (mu/2)||w - w_start||^2 over the trainable weights, w_start being
    the global model the round started from. ``base_anchor`` = (mu, the trainable weights' values
    in the base model, in ``model.parameters()`` order): (mu/2)||w - w_base||^2 too, which trades
    domain gain for less forgetting (train.anchor_mu). ``validate``: the site's validation loss of
    the model as it is; with cfg.local_patience set it drives local early stopping (:class:`LocalStopping`)
    and the model ends with the best weights checked."""
    if not items:
        raise ValueError("train_round: no training examples")
    n_steps = steps_per_round(cfg, len(items))
    micro = cfg.grad_accum
    order = batch_order(len(items), cfg.batch_size, n_steps * micro, seed, (server_round - 1) * n_steps * micro)
    optimizer = make_optimizer(model, cfg, lr_groups)
    scheduler = make_scheduler(optimizer, cfg, n_steps * total_rounds, (server_round - 1) * n_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    pulls = _pulls(params, proximal_mu, base_anchor)
    torch.manual_seed(dropout_seed(seed, server_round))
    model.train()
    losses: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    first_step_at = time.time()
    # Checks count as training time (train-seconds): they are what local early stopping costs.
    stopping = LocalStopping.started(validate, params, cfg, n_steps)
    stopped_at = None
    for step in range(n_steps):
        chunks = [collate([items[i] for i in order[step * micro + m]], pad_id) for m in range(micro)]
        n_tok = sum(int((c["labels"][:, 1:] != IGNORE_INDEX).sum()) for c in chunks)
        step_loss, step_tokens = _backward(model, chunks, n_tok, device)
        tokens += step_tokens
        _update(params, optimizer, scheduler, cfg, pulls)
        losses.append(step_loss / max(n_tok, 1))
        if progress is not None:
            progress(step + 1, n_steps, losses[-1])
        if stopping is not None and stopping.stop_after(step + 1):
            stopped_at = step + 1 if step + 1 < n_steps else None  # the last check skips nothing
            break
    if stopping is not None:
        stopping.restore_best(len(losses))
    seconds = time.perf_counter() - t0
    return _stats(losses, micro * cfg.batch_size, seconds, tokens, first_step_at, n_steps, stopped_at, stopping)
