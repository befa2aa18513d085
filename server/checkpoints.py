"""The coordinator's checkpoint store: ``checkpoints/round-NNNN`` (the global adapter, the
coordinator's state, the server optimizer's moments), ``adapter/`` and ``best/`` (the global
adapter as a PEFT folder, with its model card: README.md, :mod:`fedtune.common.card`), pruning by output.keep_checkpoints, the disk-space check before a run,
and the resume point: the last recorded round whose checkpoint verifies and loads."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from fedtune.common import adapters, card, methods
from fedtune.common.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapter_state,
    load_arrays,
    save_adapter,
    verify_checkpoint,
)

from .aggregation import spec_of
from .messaging import FederationError, Printer
from .record import FILE as RECORD_FILE
from .record import RecordError, RoundRecord, read_document, validate_record
from .state import RunState

log = logging.getLogger("fedtune.checkpoints")

SERVER_STATE = "server_state.json"
OPTIMIZER_ARRAYS = "server_optimizer.safetensors"


def save_round(rs: RunState, rnd: int) -> None:
    """The round's checkpoint, and (adapter methods) ``adapter/``: the latest global adapter as a
    PEFT folder. Full fine-tuning writes its model folder once, at the end (:func:`save_artifacts`)."""
    state = adapters.to_tensors(rs.global_state)
    arrays = rs.optimizer.state()[1]
    info = methods.method_info(rs.cfg)
    save_adapter(
        rs.out / "checkpoints" / f"round-{rnd:04d}",
        state,
        rs.peft_config,
        {SERVER_STATE: rs.server_state(rnd), methods.METHOD_FILE: info},
        {OPTIMIZER_ARRAYS: arrays} if arrays else None,
    )
    save_global_adapter(rs, "adapter", rnd, info)


def save_global_adapter(rs: RunState, folder: str, rnd: int | None = None, info: dict | None = None) -> None:
    """``rs.out/folder``: the global adapter as a PEFT folder, with the method record beside it
    and its model card (adapter methods; full fine-tuning has no adapter folder). ``rnd``: the
    round the global adapter is of (default: the last recorded round)."""
    if rs.peft_config is not None:
        info = info or methods.method_info(rs.cfg)
        save_adapter(rs.out / folder, adapters.to_tensors(rs.global_state), rs.peft_config, {methods.METHOD_FILE: info})
        write_model_card(rs, folder, rnd, info)


# ---- model cards ------------------------------------------------------------------------------

CARD_FOLDERS: dict[str, card.Kind] = {"adapter": "adapter", "best": "best", "merged": "merged", "model": "model"}


def _evaluation_of(rounds: list[RoundRecord], rnd: int) -> RoundRecord | None:
    """The recorded evaluation of round ``rnd``'s global weights: that round's record, or (a DP
    round skipped: nothing released, the weights unchanged) the last trained one before it.
    None: round ``rnd`` is not recorded yet (its checkpoint is written before its evaluation)."""
    if not any(r.round == rnd for r in rounds):
        return None
    return next((r for r in reversed(rounds) if r.round <= rnd and not r.skipped), None)


def _site_facts(rounds: list[RoundRecord], evaluation: RoundRecord | None, rnd: int) -> list[card.SiteFacts]:
    """Each site of the record: its latest example counts up to round ``rnd``, its round-0 score
    (the base model) and its score in ``evaluation``. Counts and scores only, never a reason or
    a status (the sites write those)."""
    first = rounds[0] if rounds and rounds[0].round == 0 else None
    names = sorted({n for r in rounds if r.round <= rnd for n in r.sites})
    out = []
    for name in names:
        train = evals = None
        for r in rounds:
            s = r.sites.get(name)
            if r.round > rnd or s is None:
                continue
            train = s.examples if s.examples is not None else train
            evals = s.eval_examples if s.eval_examples is not None else evals
        base = first.sites.get(name) if first else None
        final = evaluation.sites.get(name) if evaluation else None
        out.append(
            card.SiteFacts(
                name,
                train,
                evals,
                card.Score(base.eval_loss, base.exact_match) if base else None,
                card.Score(final.eval_loss, final.exact_match) if final else None,
            )
        )
    return out


def card_facts(
    rs: RunState, folder: str, rnd: int | None = None, info: dict | None = None, finished: bool = False
) -> card.CardFacts:
    """The facts of ``rs.out/folder``'s model card, from the run state and its typed record:
    ``rnd``, the round the folder's weights are of (default: best/'s the best round, the others'
    the last recorded); ``info``: the folder's fedtune_method.json (default: the config's)."""
    kind = CARD_FOLDERS[folder]
    cfg = rs.cfg
    record = validate_record(rs.metrics_doc())
    rounds = record.rounds
    best = rs.best()
    if kind == "best" and best is not None:
        rnd = best["round"]
    if rnd is None:
        rnd = rounds[-1].round if rounds else 0
    evaluation = _evaluation_of(rounds, rnd)
    first = rounds[0] if rounds and rounds[0].round == 0 else None
    dp = cfg.privacy
    privacy = (
        {"epsilon": rs.accountant.epsilon(), "delta": dp.delta, "budget": dp.epsilon, "clip": dp.clip}
        if rs.accountant is not None
        else None
    )
    return card.CardFacts(
        kind=kind,
        folder=str(rs.out / folder),
        **card.method_facts(cfg, methods.method_info(cfg) if info is None else info),
        sites=_site_facts(rounds, evaluation, rnd),
        round=rnd,
        evaluated=evaluation is not None,
        rounds_planned=cfg.federation.rounds,
        finished=finished,
        stopped=rs.stopped if finished else None,
        strategy=cfg.federation.strategy,
        aggregator=cfg.federation.aggregator,
        secure_aggregation=bool(cfg.secure_aggregation.enabled),
        privacy=privacy,
        federated=(
            card.Score(first.aggregate.eval_loss, first.aggregate.exact_match) if first else None,
            card.Score(evaluation.aggregate.eval_loss, evaluation.aggregate.exact_match) if evaluation else None,
        ),
        best=best,
        forgetting=rs.forgetting or None,
    )


def write_model_card(
    rs: RunState, folder: str, rnd: int | None = None, info: dict | None = None, finished: bool = False
) -> None:
    """``rs.out/folder/README.md``: the folder's model card (:func:`card_facts`), written atomically,
    outside the folder's manifest. ``adapter/``'s is rewritten with every round's checkpoint and
    with the final figures at the end (:func:`write_final_cards`). A card that cannot be written
    is a warning: the adapter beside it is saved and the run goes on."""
    try:
        card.write_card(rs.out / folder, card_facts(rs, folder, rnd, info, finished))
    except (RecordError, OSError, ValueError) as e:
        log.warning("%s/README.md: the model card is not written: %s", folder, e)


def write_final_cards(rs: RunState) -> None:
    """After the last round and the exports: the cards of the run's folders with the final
    figures (the last round's scores, forgetting, the best round of the whole run): ``adapter/``
    and ``best/`` (adapter methods), ``merged/`` (output.merged), ``model/`` (full fine-tuning)."""
    wanted = []
    if rs.peft_config is not None:
        wanted += ["adapter", "best"]
    if rs.cfg.output.merged:
        wanted.append("merged")
    if methods.get(rs.cfg.peft.method).artifact == "model":
        wanted.append("model")
    for folder in wanted:
        if (rs.out / folder).is_dir():
            write_model_card(rs, folder, finished=True)


def prune_checkpoints(rs: RunState, say: Printer) -> None:
    """After a round is recorded: delete the round checkpoints that output.keep_checkpoints does
    not keep. Kept: the last ``keep`` rounds' (the newest is the resume point) and the best
    round's, and under ``simulation.baselines`` round 0's (the start every baseline trains from). Each goes by an atomic rename to ``.pruned-round-NNNN`` first, then is deleted, so a
    crash midway never leaves a torn ``round-NNNN`` (and the next prune finishes the deletion)."""
    keep = rs.cfg.output.keep_checkpoints
    root = rs.out / "checkpoints"
    if keep is None or not root.is_dir():
        return
    rounds = sorted(int(p.name[6:]) for p in root.glob("round-[0-9][0-9][0-9][0-9]*") if p.name[6:].isdigit())
    recorded = [int(r["round"]) for r in rs.rounds]
    latest = max(recorded, default=-1)
    best = rs.best()
    kept = set(rounds[-keep:]) | {latest} | ({best["round"]} if best else set())
    if rs.cfg.simulation.baselines:
        kept.add(0)
    for rnd in rounds:
        if rnd in kept or rnd > latest:  # never one not yet recorded (the round in progress)
            continue
        src = root / f"round-{rnd:04d}"
        trash = root / f".pruned-round-{rnd:04d}"
        try:
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(src, trash)
        except OSError as e:
            say(f"checkpoints: could not prune {src}: {e}")
            continue
    for trash in root.glob(".pruned-round-*"):
        shutil.rmtree(trash, ignore_errors=True)


def checkpoint_bytes(rs: RunState) -> int:
    """About what one round checkpoint takes: the global state (float32) and the server
    optimizer's moments (float64: one array for fedavgm, two for the adaptive ones)."""
    state = sum(int(v.size) * 4 for v in rs.global_state.values())
    moments = {"fedavgm": 1, "fedadam": 2, "fedyogi": 2, "fedadagrad": 2}.get(rs.cfg.federation.strategy, 0)
    return state + moments * 8 * rs.trainable_params + (64 << 10)  # + config, state and manifest files


def check_free_space(rs: RunState, resume: bool) -> None:
    """Refuse to start (FederationError, with the figures) when the output folder's disk cannot
    hold what the run keeps: checkpoint size x (keep_checkpoints + 3: the best round's, the one
    being written, and adapter/ with best/), or every round's with keep_checkpoints null. On a
    resume, what checkpoints/ holds already counts as available (pruning reuses it)."""
    keep = rs.cfg.output.keep_checkpoints
    copies = (keep if keep is not None else rs.cfg.federation.rounds + 1) + 3
    one = checkpoint_bytes(rs)
    need = one * copies
    if resume:
        held = (
            sum(f.stat().st_size for f in (rs.out / "checkpoints").rglob("*") if f.is_file())
            if (rs.out / "checkpoints").is_dir()
            else 0
        )
        need = max(need - held, 2 * one)
    free = shutil.disk_usage(rs.out).free
    if free < need:
        what = (
            f"output.keep_checkpoints {keep}"
            if keep is not None
            else f"output.keep_checkpoints null: all {rs.cfg.federation.rounds + 1} rounds"
        )
        raise FederationError(
            f"{rs.out}: {free / 1e6:,.1f} MB free on its disk, about {need / 1e6:,.1f} MB needed: {copies} copies of a "
            f"{one / 1e6:,.1f} MB checkpoint ({what}, plus the best round's, the one being written, adapter/ and best/). "
            "Free space, lower output.keep_checkpoints, or choose another output.dir."
        )


@dataclass
class ResumePoint:
    round: int
    rounds: list[dict]
    state: OrderedDict
    elapsed: float
    server_state: dict | None
    optimizer_arrays: dict | None = None


def resume_point(out: Path, say: Printer, spec: dict | None = None, peft: bool = True) -> ResumePoint:
    """The last round whose metrics were recorded and whose checkpoint verifies and loads.

    -> that round, the round records up to it, the global adapter, the coordinator's RNG and
    optimizer state as they were after it, and the seconds the run had taken so far.
    A round's checkpoint is written before its evaluation and its metrics after, so a
    crash in between leaves the previous round as the resume point, and the round reruns.
    Any checkpoint that does not verify (its manifest must list the weights, server_state.json
    and, for an adapter, adapter_config.json) or does not load (or, given ``spec``, does not fit
    it) is passed over with its reason, one round further back each time.
    """
    path = out / RECORD_FILE
    try:
        doc = read_document(path)  # checked against the record's schema (an earlier release's too)
        rounds = list(doc["rounds"])
        recorded = sorted({int(r["round"]) for r in rounds}, reverse=True)
    except RecordError as e:  # its message starts with the path
        raise FederationError(f"cannot resume, no readable run record: {e}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FederationError(f"{path}: cannot resume, no readable run record ({type(e).__name__})") from None
    required = (ADAPTER_WEIGHTS, SERVER_STATE, *((ADAPTER_CONFIG,) if peft else ()))
    for rnd in recorded:
        ck = out / "checkpoints" / f"round-{rnd:04d}"
        why = verify_checkpoint(ck, required)
        if why is None:
            try:
                state = OrderedDict((k, v.float().numpy()) for k, v in load_adapter_state(ck).items())
                server_state = json.loads((ck / SERVER_STATE).read_text())
                if not isinstance(server_state, dict) or "rng" not in server_state:
                    raise ValueError(f"{SERVER_STATE} holds no coordinator state")
                arrays = load_arrays(ck / OPTIMIZER_ARRAYS) if (ck / OPTIMIZER_ARRAYS).is_file() else None
                if spec is not None and spec_of(state) != spec:
                    raise ValueError("its tensors' keys or shapes differ from this config's adapter")
            except Exception as e:  # noqa: BLE001 - whatever fails to load, fall back a round
                why = f"{ck}: cannot be loaded: {type(e).__name__}: {e}"
            else:
                kept = [r for r in rounds if int(r["round"]) <= rnd]
                return ResumePoint(rnd, kept, state, float(doc.get("elapsed_s", 0.0)), server_state, arrays)
        say(f"resume: not using round {rnd}: {why}")
    raise FederationError(f"{out}: no checkpoint verifies and loads; nothing to resume from (the reasons are above)")
