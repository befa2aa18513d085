"""Personalization at a site (``federation.personalization``): a private part that never leaves it.

The global adapter trains and travels exactly as without personalization; this module runs at the
site when an evaluation task brings the round's new global adapter (round 1 on):

- ``finetune``: a copy of the global adapter fine-tuned for ``personal_steps`` on the site's own
  training data (local fine-tuning: the baseline every personalization method must beat). It
  starts afresh from each round's global adapter.
- ``dual`` (FedDPA's dual adapters, Yang et al., NeurIPS 2024, their "-T" variant): a second LoRA
  adapter, :data:`PRIVATE`, of rank ``personal_rank``, sits beside the global one in the site's
  model and persists across rounds; each round it trains for ``personal_steps`` with the global
  adapter frozen at the round's value, and the personalized model is global + private (both
  adapters active: their effects add). FedDPA mixes the two by a learned per-input weight; here
  they are summed, so the sum saves as one plain LoRA adapter (:func:`stacked`).

Then the site scores its personalized model on the same examples as the global one, and reports
the scores only (:class:`fedtune.common.messages.EvalMetrics` ``personal_*``).

Where the private part lives (``state_dir``, chosen by the site, never by the coordinator; ftsim:
``OUT/sites/NAME``, ftclient: its ``--work-dir``):

- ``private/round-NNNN/``: the private state after round NNNN's evaluation, a PEFT folder with a
  manifest (:func:`fedtune.common.checkpoint.save_adapter`: written atomically, verified when read).
  The next round starts from the newest verified one *before* it, so an evaluation replayed after a
  crash (ftsim/ftserver ``--resume``) trains from the same state and ends with the same private
  part; a site that joined late or missed rounds starts from what it has (nothing: a fresh adapter).
  The last :data:`KEEP` rounds are kept.
- ``personalized/``: the newest personalized model as one PEFT adapter folder on the run's base
  (``PeftModel.from_pretrained(base, folder)``; ``fteval --adapter folder`` scores it). For
  ``finetune`` it is the fine-tuned adapter; for ``dual`` the global and private LoRA side by side
  as one adapter of rank ``peft.r + personal_rank`` whose B·A equals the sum exactly.

A virtual site's private part costs disk, not memory: the process's one model holds the private
adapter of whichever site it serves, loaded from disk for the task and written back after it.
"""

from __future__ import annotations

import copy
import logging
import re
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from fedtune.common import card, methods
from fedtune.common.checkpoint import load_adapter_state, save_adapter, verify_checkpoint
from fedtune.common.config import PERSONAL_STEPS, FedTuneConfig
from fedtune.common.evaluation import EvalResult, evaluate_examples

from .trainer import TrainStats, train_round

log = logging.getLogger("fedtune.client.personal")

PRIVATE = "private"  # the dual method's adapter name in the site's model
PRIVATE_DIR = "private"
ARTIFACT_DIR = "personalized"
KEEP = 2  # private rounds kept: the newest, and the one a replay of it starts from
_ROUND = re.compile(r"^round-(\d{4,})$")


@dataclass
class Personalized:
    """What a site's personalization of one round produced (its scores are what it reports)."""

    result: EvalResult
    stats: TrainStats
    folder: Path  # the round's private part


def steps(cfg: FedTuneConfig) -> int:
    """The private optimizer steps per round: federation.personal_steps, else train.local_steps, else PERSONAL_STEPS."""
    return cfg.federation.personal_steps or cfg.train.local_steps or PERSONAL_STEPS


def private_rounds(state_dir: str | Path) -> list[tuple[int, Path]]:
    """The site's private rounds on disk, oldest first (verified or not)."""
    root = Path(state_dir) / PRIVATE_DIR
    found = [(int(m.group(1)), p) for p in root.glob("round-*") if p.is_dir() and (m := _ROUND.match(p.name))]
    return sorted(found)


def latest_private(state_dir: str | Path, before: int) -> tuple[int, OrderedDict] | None:
    """The newest private state of a round before ``before`` whose manifest verifies -> (round,
    state); None when there is none (a torn or corrupted folder is skipped, with a warning)."""
    for rnd, folder in reversed(private_rounds(state_dir)):
        if rnd >= before:
            continue
        problem = verify_checkpoint(folder)
        if problem is None:
            return rnd, load_adapter_state(folder)
        log.warning("private part of round %d skipped: %s", rnd, problem)
    return None


def _prune(state_dir: str | Path) -> None:
    for _, folder in private_rounds(state_dir)[:-KEEP]:
        shutil.rmtree(folder, ignore_errors=True)


def _private_config(cfg: FedTuneConfig, model):
    """The dual method's private LoRA: the global adapter's targets, ``personal_rank``, the same
    scaling (alpha / r) as the global one."""
    pc = copy.deepcopy(model.peft_config[methods.ADAPTER_NAME])
    r = cfg.federation.personal_rank or cfg.peft.r
    pc.r, pc.lora_alpha = r, pc.lora_alpha * r / pc.r  # the site's global rank (mixed ranks: its own)
    pc.rank_pattern, pc.alpha_pattern = {}, {}
    return pc


def _ensure_private(cfg: FedTuneConfig, rt) -> OrderedDict:
    """The private adapter in the process's model (added once), -> its initial state. The method's
    key caches are read first: they describe the global adapter alone, as every message needs."""
    from peft import get_peft_model_state_dict

    model = rt.model
    want = _private_config(cfg, model)
    have = model.peft_config.get(PRIVATE)
    if have is not None and (have.r, have.lora_alpha) != (want.r, want.lora_alpha):
        model.delete_adapter(PRIVATE)  # an earlier run in this process used another personal_rank
    if PRIVATE not in model.peft_config:
        methods.trainable_capable(model)  # caches the global adapter's keys before a second adapter exists
        with torch.random.fork_rng():  # the same fresh private adapter in every process, the process's RNG untouched
            torch.manual_seed(cfg.train.seed)
            model.add_adapter(PRIVATE, want)
        model.base_model.set_adapter(methods.ADAPTER_NAME)
        model.fedtune_private_init = _cpu(get_peft_model_state_dict(model, adapter_name=PRIVATE))
    return model.fedtune_private_init


def _cpu(state) -> OrderedDict:
    return OrderedDict((k, v.detach().to("cpu", torch.float32).clone()) for k, v in state.items())


def _train(cfg: FedTuneConfig, rt, items: list, seed: int, server_round: int) -> TrainStats:
    """``steps(cfg)`` steps on what requires grad, each round its own complete schedule (warm-up,
    decay), no proximal term or anchor: the private part answers to the site's data alone."""
    train_cfg = cfg.train.model_copy(update={"local_steps": steps(cfg), "local_epochs": None, "local_patience": None})
    return train_round(
        rt.model,
        items,
        rt.tokenizer.pad_token_id,
        train_cfg,
        rt.device,
        server_round=1,
        total_rounds=1,
        seed=seed + 7919 * server_round,
        lr_groups=methods.lr_scales(rt.model, cfg.layers),
    )


def stacked(global_state, private_state, scaling: float, private_scaling: float) -> OrderedDict:
    """Two LoRA states as one of their ranks together whose B·A is the sum of theirs: A = [s_g A_g;
    s_p A_p] (r_g + r_p x in), B = [B_g, B_p] (out x r_g + r_p), to be saved with scaling 1
    (lora_alpha = r). Keys are the adapters' saved keys (the same for both)."""
    out = OrderedDict()
    for key, g in global_state.items():
        p = private_state[key]
        if ".lora_A." in key:
            out[key] = torch.cat([scaling * g, private_scaling * p], dim=0)
        elif ".lora_B." in key:
            out[key] = torch.cat([g, p], dim=1)
        else:
            raise ValueError(f"{key}: not a LoRA A or B tensor; the dual method stacks LoRA adapters only")
    return out


def _save_artifact(
    cfg: FedTuneConfig, rt, state_dir: Path, global_state, private_state, info: dict, card_facts: dict
) -> None:
    """``personalized/``: the personalized model as one PEFT adapter folder on the run's base, with
    the method record ``info`` and its model card (``card_facts``: the site, round, steps and score
    it describes)."""
    pc = methods.saved_peft_config(rt.model, methods.base_reference(cfg.model))
    if cfg.federation.personalization == "dual":
        priv = rt.model.peft_config[PRIVATE]
        state = stacked(global_state, private_state, pc.lora_alpha / pc.r, priv.lora_alpha / priv.r)
        pc.r = pc.lora_alpha = pc.r + priv.r
        pc.rank_pattern, pc.alpha_pattern, pc.use_rslora = {}, {}, False
    else:
        state = private_state
    folder = save_adapter(state_dir / ARTIFACT_DIR, state, pc, {methods.METHOD_FILE: info})
    facts = card.method_facts(cfg, info)
    facts["settings"] = {
        **facts["settings"],
        **({"r": pc.r, "alpha": pc.lora_alpha} if "r" in facts["settings"] else {}),
    }
    card.write_card(
        folder,
        card.CardFacts(
            kind="personalized",
            folder=str(folder),
            personalization=cfg.federation.personalization,
            **facts,
            **card_facts,
        ),
    )


def personalize(
    cfg: FedTuneConfig,
    rt,
    items: list,
    examples: list,
    global_state,
    state_dir: str | Path,
    seed: int,
    server_round: int,
    name: str = "",
) -> Personalized:
    """Round ``server_round``'s personalization at a site: train its private part on ``items``,
    score the personalized model on ``examples`` (as the global one is scored), write the private
    part and the personalized artifact (its card naming the site ``name``) under ``state_dir``.
    The model holds ``global_state`` on entry (handle_evaluate has just scored it) and is left
    holding it alone, active, as the other tasks expect."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    state_dir = Path(state_dir)
    model = rt.model
    dual = cfg.federation.personalization == "dual"
    who = name or state_dir.name
    try:
        if dual:
            init = _ensure_private(cfg, rt)
            kept = latest_private(state_dir, server_round)
            if kept and {k: v.shape for k, v in kept[1].items()} != {k: v.shape for k, v in init.items()}:
                log.warning(
                    "private part of round %d has other shapes than this run's (personal_rank?): starting afresh",
                    kept[0],
                )
                kept = None
            set_peft_model_state_dict(model, dict(kept[1] if kept else init), adapter_name=PRIVATE)
            model.base_model.set_adapter([methods.ADAPTER_NAME, PRIVATE])
            for param_name, p in model.named_parameters():  # the global adapter frozen, the private one trains
                p.requires_grad_(f".{PRIVATE}." in param_name)
        else:
            methods.set_trainable(model, methods.trainable_capable(model))
        stats = _train(cfg, rt, items, seed, server_round)
        result = evaluate_examples(model, rt.tokenizer, examples, cfg.data, cfg.eval, rt.device)
        if dual:
            private = _cpu(get_peft_model_state_dict(model, adapter_name=PRIVATE))
            pc = copy.deepcopy(model.peft_config[PRIVATE])
            pc.base_model_name_or_path = methods.base_reference(cfg.model)
        else:
            private = methods.get_state(model)
            pc = methods.saved_peft_config(model, methods.base_reference(cfg.model))
        folder = state_dir / PRIVATE_DIR / f"round-{server_round:04d}"
        info = methods.method_info(cfg)
        save_adapter(folder, private, pc, {methods.METHOD_FILE: info})
        site = card.SiteFacts(who, len(items), result.examples, None, card.Score(result.loss, result.exact_match))
        facts = {
            "baseline": card.Baseline(who, stats.steps, len(items), cfg.train.batch_size * cfg.train.grad_accum),
            "round": server_round,
            "sites": [site],
            "evaluated": True,
        }
        _save_artifact(cfg, rt, state_dir, global_state, private, info, facts)
        _prune(state_dir)
    finally:
        if dual and PRIVATE in model.peft_config:
            model.base_model.set_adapter(methods.ADAPTER_NAME)
        methods.set_state(model, global_state)
    return Personalized(result, stats, folder)
