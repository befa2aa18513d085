"""client/trainer.py: batch order, the local loop on the tiny model, the LR schedule across rounds."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from fedtune.client import trainer
from fedtune.client.trainer import batch_order, make_scheduler, steps_per_round, train_round
from fedtune.common import methods
from fedtune.common.config import DataConfig, TrainConfig
from fedtune.common.data import Example, tokenize_all
from fedtune.common.evaluation import answer_nll

QA = [
    ("Triage: chest pain radiating to the left arm.", "emergency"),
    ("Triage: a small wart on the finger.", "routine"),
    ("Triage: fever of 39 degrees for two days.", "urgent"),
    ("Triage: itchy rash since last week.", "routine"),
]


@pytest.fixture
def items(tiny_tokenizer):
    exs = [Example(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in QA]
    tok = tokenize_all(exs, tiny_tokenizer, DataConfig(max_length=128))
    assert len(tok) == len(QA)
    return tok.items


def _cfg(**kw) -> TrainConfig:
    base = dict(local_steps=2, batch_size=2, lr=1e-3, warmup_ratio=0.0, lr_scheduler="constant", seed=0)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------ batch order


def test_batch_order_deterministic_and_seeded():
    a = batch_order(10, 3, 8, seed=1, start_batch=0)
    assert a == batch_order(10, 3, 8, seed=1, start_batch=0)
    assert a != batch_order(10, 3, 8, seed=2, start_batch=0)
    assert all(len(b) == 3 for b in a) and len(a) == 8


@pytest.mark.parametrize("n_items, batch_size", [(10, 5), (7, 3), (5, 8), (1, 2)])
def test_batch_order_covers_each_item_once_per_epoch(n_items, batch_size):
    n_batches = math.ceil(3 * n_items / batch_size) + 1
    flat = [i for b in batch_order(n_items, batch_size, n_batches, seed=0, start_batch=0) for i in b]
    epochs = [flat[e * n_items : (e + 1) * n_items] for e in range(3)]
    for ep in epochs:
        assert sorted(ep) == list(range(n_items))
    if n_items > 3:
        assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_batch_order_continues_across_rounds():
    whole = batch_order(7, 2, 12, seed=3, start_batch=0)
    parts = (
        batch_order(7, 2, 5, seed=3, start_batch=0)
        + batch_order(7, 2, 4, seed=3, start_batch=5)
        + batch_order(7, 2, 3, seed=3, start_batch=9)
    )
    assert parts == whole


def test_steps_per_round():
    assert steps_per_round(_cfg(local_steps=7), 1000) == 7
    # ceil(1.5 * 10 / (2 * 2)) = ceil(3.75) = 4
    assert steps_per_round(TrainConfig(local_epochs=1.5, batch_size=2, grad_accum=2), 10) == 4
    assert steps_per_round(TrainConfig(local_epochs=0.01, batch_size=4), 3) == 1


# ------------------------------------------------------------------ the local loop


def test_train_round_lowers_loss(tiny_peft_model, items):
    model, tok, dev = tiny_peft_model
    before, n_tok, _ = answer_nll(model, items, tok.pad_token_id, dev, 4)
    cfg = _cfg(local_steps=10, batch_size=4, lr=1e-2)
    seen = []
    stats = train_round(
        model,
        items,
        tok.pad_token_id,
        cfg,
        dev,
        server_round=1,
        total_rounds=1,
        seed=0,
        progress=lambda s, n, l: seen.append((s, n, l)),
    )
    after, n_tok2, _ = answer_nll(model, items, tok.pad_token_id, dev, 4)
    assert n_tok == n_tok2 > 0
    assert stats.steps == 10 and stats.examples_seen == 40
    assert [s for s, _, _ in seen] == list(range(1, 11)) and all(n == 10 for _, n, _ in seen)
    assert stats.loss_first == pytest.approx(seen[0][2]) and stats.loss_last == pytest.approx(seen[-1][2])
    assert stats.loss_mean == pytest.approx(sum(l for _, _, l in seen) / 10)
    # The first step sees the untouched model: its loss is the eval loss before training.
    assert stats.loss_first == pytest.approx(before / n_tok, rel=1e-4)
    assert stats.loss_last < 0.6 * stats.loss_first
    assert after / n_tok < 0.6 * before / n_tok
    assert stats.tokens == 10 * sum(len(i["input_ids"]) for i in items)
    assert stats.seconds > 0


def test_only_lora_parameters_change(tiny_peft_model, items):
    model, tok, dev = tiny_peft_model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_round(
        model, items, tok.pad_token_id, _cfg(local_steps=3, lr=1e-2), dev, server_round=1, total_rounds=1, seed=0
    )
    after = dict(model.named_parameters())
    lora = [n for n in before if "lora_" in n]
    base = [n for n in before if "lora_" not in n]
    assert lora and base
    assert all(torch.equal(before[n], after[n]) for n in base)
    assert all(not torch.equal(before[n], after[n]) for n in lora)


def test_train_round_is_deterministic(tiny_peft_model, items):
    model, tok, dev = tiny_peft_model
    init = methods.get_state(model)
    cfg = _cfg(local_steps=3, batch_size=3, lr=5e-3)
    s1 = train_round(model, items, tok.pad_token_id, cfg, dev, server_round=2, total_rounds=3, seed=9)
    a = methods.get_state(model)
    methods.set_state(model, init)
    s2 = train_round(model, items, tok.pad_token_id, cfg, dev, server_round=2, total_rounds=3, seed=9)
    b = methods.get_state(model)
    assert s1.loss_first == s2.loss_first and s1.loss_last == s2.loss_last
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dropout_draws_are_a_function_of_site_and_round(tiny_config, items):
    """With dropout on, a round repeats exactly whatever the process's RNG did before (a resumed
    run or another virtual site in between), and another round draws differently."""
    from fedtune.common.methods import wrap
    from fedtune.common.modeling import load_base_model

    peft = tiny_config.peft.model_copy(update={"dropout": 0.3})
    base, tok, dev = load_base_model(tiny_config.model, "cpu")
    model = wrap(base, peft, seed=0)
    init = methods.get_state(model)
    cfg = _cfg(local_steps=2, batch_size=3, lr=5e-3)

    def run(rnd: int) -> float:
        methods.set_state(model, init)
        torch.rand(1000)  # whatever else used the global RNG before this round
        return train_round(
            model, items, tok.pad_token_id, cfg, dev, server_round=rnd, total_rounds=3, seed=9
        ).loss_first

    first = run(2)
    assert run(2) == first
    assert run(3) != first  # different draws (and data) in another round


def test_grad_accum_matches_one_big_batch(tiny_peft_model, items):
    """Token-weighted accumulation: 2 micro-batches of 1 == 1 batch of 2 (same items, same step)."""
    model, tok, dev = tiny_peft_model
    init = methods.get_state(model)
    one = train_round(
        model,
        items,
        tok.pad_token_id,
        _cfg(local_steps=1, batch_size=2, grad_accum=1, lr=1e-2),
        dev,
        server_round=1,
        total_rounds=1,
        seed=4,
    )
    big = methods.get_state(model)
    methods.set_state(model, init)
    acc = train_round(
        model,
        items,
        tok.pad_token_id,
        _cfg(local_steps=1, batch_size=1, grad_accum=2, lr=1e-2),
        dev,
        server_round=1,
        total_rounds=1,
        seed=4,
    )
    small = methods.get_state(model)
    assert acc.steps == 1 and acc.examples_seen == one.examples_seen == 2
    assert acc.loss_first == pytest.approx(one.loss_first, rel=1e-5)
    assert any(not torch.equal(big[k], init[k]) for k in big)
    for k in big:
        torch.testing.assert_close(small[k], big[k], rtol=1e-4, atol=1e-6)


def test_grad_clipping_is_applied(tiny_peft_model, items, monkeypatch):
    model, tok, dev = tiny_peft_model
    calls = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):
        params = list(params)
        calls.append((len(params), max_norm))
        norm = real(params, max_norm, *a, **kw)
        total = torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in params))
        assert float(total) <= max_norm * (1 + 1e-4)  # clipped in place
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    n_lora = sum(1 for n, p in model.named_parameters() if p.requires_grad)
    train_round(
        model,
        items,
        tok.pad_token_id,
        _cfg(local_steps=3, max_grad_norm=1e-3, grad_accum=2),
        dev,
        server_round=1,
        total_rounds=1,
        seed=0,
    )
    assert calls == [(n_lora, 1e-3)] * 3
    calls.clear()
    train_round(
        model,
        items,
        tok.pad_token_id,
        _cfg(local_steps=2, max_grad_norm=0.0),
        dev,
        server_round=1,
        total_rounds=1,
        seed=0,
    )
    assert calls == []  # 0 turns clipping off


def test_train_round_needs_items(tiny_peft_model):
    model, tok, dev = tiny_peft_model
    with pytest.raises(ValueError, match="no training examples"):
        train_round(model, [], tok.pad_token_id, _cfg(), dev, server_round=1, total_rounds=1, seed=0)


def test_train_round_picks_up_schedule_and_data_where_the_round_starts(tiny_peft_model, items, monkeypatch):
    model, tok, dev = tiny_peft_model
    seen = {}
    real_sched, real_order = trainer.make_scheduler, trainer.batch_order

    def sched(opt, cfg, total, start):
        seen["sched"] = (total, start)
        seen["scheduler"] = s = real_sched(opt, cfg, total, start)
        return s

    def order(n, bs, nb, seed, start):
        seen["order"] = (n, bs, nb, seed, start)
        return real_order(n, bs, nb, seed, start)

    monkeypatch.setattr(trainer, "make_scheduler", sched)
    monkeypatch.setattr(trainer, "batch_order", order)
    cfg = _cfg(local_steps=3, batch_size=2, grad_accum=2, lr_scheduler="linear", warmup_ratio=0.2)
    train_round(model, items, tok.pad_token_id, cfg, dev, server_round=3, total_rounds=4, seed=11)
    assert seen["sched"] == (3 * 4, 2 * 3)
    assert seen["order"] == (len(items), 2, 3 * 2, 11, 2 * 3 * 2)
    assert seen["scheduler"].last_epoch == 2 * 3 + 3


# ------------------------------------------------------------------ LR schedule


def _opt(lr: float = 1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(cfg: TrainConfig, total: int, start: int, n: int) -> list[float]:
    opt = _opt(cfg.lr)
    sched = make_scheduler(opt, cfg, total, start)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_linear_warmup_then_decay_across_rounds():
    cfg = TrainConfig(lr=1.0, lr_scheduler="linear", warmup_ratio=0.25, local_steps=4)
    # total 8 steps (2 rounds x 4), warmup round(0.25*8) = 2: s/2 for s < 2, then (8 - s) / 6
    r1 = _lrs(cfg, 8, 0, 4)
    r2 = _lrs(cfg, 8, 4, 4)
    assert r1 == pytest.approx([0.0, 0.5, 1.0, 5 / 6])
    assert r2 == pytest.approx([4 / 6, 3 / 6, 2 / 6, 1 / 6])


def test_cosine_decay_across_rounds():
    cfg = TrainConfig(lr=2e-3, lr_scheduler="cosine", warmup_ratio=0.25, local_steps=4)
    # warmup 2 of 8; afterwards 0.5 * (1 + cos(pi * (s - 2) / 6)) * lr
    expected = [2e-3 * (s / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / 6))) for s in range(8)]
    assert _lrs(cfg, 8, 0, 4) + _lrs(cfg, 8, 4, 4) == pytest.approx(expected, abs=1e-12)


def test_constant_with_warmup():
    cfg = TrainConfig(lr=0.5, lr_scheduler="constant", warmup_ratio=0.5, local_steps=2)
    assert _lrs(cfg, 4, 0, 2) + _lrs(cfg, 4, 2, 2) == pytest.approx([0.0, 0.25, 0.5, 0.5])


def test_no_warmup_starts_at_full_lr():
    cfg = TrainConfig(lr=1.0, lr_scheduler="linear", warmup_ratio=0.0, local_steps=5)
    assert _lrs(cfg, 5, 0, 5) == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])


def test_optimizer_only_gets_trainable_params(tiny_peft_model):
    model, _, _ = tiny_peft_model
    opt = trainer.make_optimizer(model, TrainConfig(lr=0.1, weight_decay=0.01))
    params = opt.param_groups[0]["params"]
    assert len(params) == sum(1 for p in model.parameters() if p.requires_grad) == 28
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["weight_decay"] == 0.01
    assert Counter(p.requires_grad for p in params) == Counter({True: 28})


def test_proximal_gradient_is_mu_times_the_distance_from_the_start():
    from fedtune.client.trainer import add_proximal_grad

    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, -3.0]))
    q = torch.nn.Parameter(torch.tensor([0.5]))
    p.grad = torch.tensor([0.1, 0.1, 0.1])  # the loss's own gradient is kept
    add_proximal_grad([p, q], [torch.zeros(3), torch.tensor([1.5])], mu=0.5)
    assert torch.allclose(p.grad, torch.tensor([0.6, 1.1, -1.4]))
    assert torch.allclose(q.grad, torch.tensor([-0.5]))  # no gradient before: the term alone


def test_the_base_anchor_pulls_the_weights_toward_the_base_model(tiny_peft_model, items):
    """train.anchor_mu: the same round from a global adapter away from the base ends closer to
    the base the larger mu is; FedProx's term (toward the round's start) is a different pull."""
    model, tok, dev = tiny_peft_model
    base = methods.get_state(model)  # the fresh LoRA model is the base model (B = 0)
    base_params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    start = {k: v + 0.05 * torch.randn_like(v) for k, v in base.items()}  # a global adapter some rounds in
    cfg = _cfg(local_steps=8, batch_size=3, lr=1e-2)
    dist = []
    for mu in (0.0, 1.0, 30.0):
        methods.set_state(model, start)
        train_round(
            model,
            items,
            tok.pad_token_id,
            cfg,
            dev,
            server_round=1,
            total_rounds=1,
            seed=5,
            base_anchor=(mu, base_params),
        )
        after = methods.get_state(model)
        dist.append(float(sum(((after[k] - base[k]) ** 2).sum() for k in base)) ** 0.5)
    assert dist[0] > dist[1] > dist[2], dist


def test_fedprox_pulls_the_update_toward_the_global_model(tiny_peft_model, items):
    """Same start, data and seed: the larger mu, the smaller the round's update."""
    model, tok, dev = tiny_peft_model
    init = methods.get_state(model)
    cfg = _cfg(local_steps=8, batch_size=3, lr=1e-2)
    norms = []
    for mu in (0.0, 1.0, 100.0):
        methods.set_state(model, init)
        train_round(model, items, tok.pad_token_id, cfg, dev, server_round=1, total_rounds=1, seed=5, proximal_mu=mu)
        after = methods.get_state(model)
        norms.append(float(sum(((after[k] - init[k]) ** 2).sum() for k in init)) ** 0.5)
    assert norms[0] > norms[1] > norms[2] > 0, norms


# ------------------------------------------------------------------ local early stopping


def _scripted(model, losses: list[float]):
    """A validate callback returning ``losses`` in turn and recording the trainable weights it saw."""
    seen: list[list[torch.Tensor]] = []

    def validate() -> float:
        seen.append(_trainable(model))
        return losses[len(seen) - 1]

    return validate, seen


def _trainable(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("script", [[3.0, 2.0, 2.5, 2.6, 1.0, 1.0, 1.0], [math.nan, 2.0, 2.5, math.nan, 1.0, 1.0, 1.0]])
def test_local_early_stopping_stops_after_patience_checks_and_keeps_the_best(tiny_peft_model, items, script):
    model, tok, dev = tiny_peft_model
    validate, seen = _scripted(model, script)
    cfg = _cfg(local_steps=6, lr=1e-2, local_patience=2, local_eval_every=1)
    steps = []
    stats = train_round(
        model,
        items,
        tok.pad_token_id,
        cfg,
        dev,
        server_round=1,
        total_rounds=1,
        seed=0,
        progress=lambda s, n, l: steps.append(s),
        validate=validate,
    )
    # Checks at 0 (the start), 1 (best), 2 and 3 (two without improvement): the 1.0 at step 4 is never reached.
    assert [s for s, _ in stats.val_losses] == [0, 1, 2, 3] and len(seen) == 4
    assert stats.steps == 3 and steps == [1, 2, 3] and stats.planned_steps == 6
    assert stats.stopped_at == 3 and stats.best_step == 1
    assert stats.examples_seen == 3 * cfg.batch_size
    assert stats.val_best == 2.0 and (stats.val_start == 3.0 or math.isnan(stats.val_start))
    after = _trainable(model)
    assert all(torch.equal(a, b) for a, b in zip(after, seen[1]))  # the best check's weights, restored in place
    assert not all(torch.equal(a, b) for a, b in zip(after, seen[3]))


@pytest.mark.parametrize("script, min_delta", [([1.0, 2.0, 3.0, 0.5], 0.0), ([3.0, 2.95, 2.9, 0.5], 0.1)])
def test_a_best_at_the_round_start_restores_the_start_weights(tiny_peft_model, items, script, min_delta):
    """No check beat the start (by more than min_delta): the site sends a zero update."""
    model, tok, dev = tiny_peft_model
    start = _trainable(model)
    validate, _ = _scripted(model, script)
    cfg = _cfg(local_steps=5, lr=1e-2, local_patience=2, local_eval_every=1, local_min_delta=min_delta)
    stats = train_round(
        model, items, tok.pad_token_id, cfg, dev, server_round=1, total_rounds=1, seed=0, validate=validate
    )
    assert stats.steps == 2 and stats.stopped_at == 2 and stats.best_step == 0
    assert all(torch.equal(a, b) for a, b in zip(_trainable(model), start))


@pytest.mark.parametrize(
    "n_steps, every, checked", [(7, 3, [0, 3, 6, 7]), (10, None, [0, 2, 4, 6, 8, 10]), (3, None, [0, 1, 2, 3])]
)
def test_local_checks_come_every_n_steps_and_at_the_last(tiny_peft_model, items, n_steps, every, checked):
    model, tok, dev = tiny_peft_model
    validate, _ = _scripted(model, [10.0 - i for i in range(20)])  # always better: never stops
    cfg = _cfg(local_steps=n_steps, local_patience=1, local_eval_every=every)
    stats = train_round(
        model, items, tok.pad_token_id, cfg, dev, server_round=1, total_rounds=1, seed=0, validate=validate
    )
    assert [s for s, _ in stats.val_losses] == checked
    assert stats.steps == stats.best_step == n_steps and stats.stopped_at is None


def test_local_early_stopping_leaves_training_as_it_was_until_it_stops(tiny_peft_model, items):
    """Without train.local_patience a validate callback is never called; with it, checks that keep
    improving (real validation passes: eval mode, no grad) change neither the steps nor the weights."""
    model, tok, dev = tiny_peft_model
    init = methods.get_state(model)
    cfg = _cfg(local_steps=4, batch_size=3, lr=1e-2)
    plain = train_round(model, items, tok.pad_token_id, cfg, dev, server_round=2, total_rounds=3, seed=7)
    reference = methods.get_state(model)
    assert (
        plain.steps == plain.planned_steps == plain.best_step == 4
        and plain.stopped_at is None
        and plain.val_losses == []
    )

    calls = []
    methods.set_state(model, init)
    unused = train_round(
        model,
        items,
        tok.pad_token_id,
        cfg,
        dev,
        server_round=2,
        total_rounds=3,
        seed=7,
        validate=lambda: calls.append(1) or 0.0,
    )
    assert calls == [] and unused.steps == 4
    assert all(torch.equal(v, reference[k]) for k, v in methods.get_state(model).items())

    improving = iter(range(100, 0, -1))

    def validate() -> float:
        answer_nll(model, items, tok.pad_token_id, dev, 4)
        return float(next(improving))

    methods.set_state(model, init)
    checked = train_round(
        model,
        items,
        tok.pad_token_id,
        cfg.model_copy(update={"local_patience": 1, "local_eval_every": 1}),
        dev,
        server_round=2,
        total_rounds=3,
        seed=7,
        validate=validate,
    )
    assert checked.steps == 4 and checked.best_step == 4 and len(checked.val_losses) == 5
    assert checked.loss_first == plain.loss_first and checked.loss_last == plain.loss_last
    assert all(torch.equal(v, reference[k]) for k, v in methods.get_state(model).items())
