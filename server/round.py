"""A round in the shape of Flower's ``Strategy``: configure_train -> (the exchange) ->
aggregate_train, then configure_evaluate -> (the exchange) -> aggregate_evaluate.

Unlike Flower's ``aggregate_train(server_round, replies)``, which gets every reply at once, ours
folds each reply in as it arrives (:class:`TrainReplies`, through :mod:`fedtune.server.pipeline`),
so the coordinator's memory holds one accumulator, not every site's update; aggregate_train then
works from that accumulator. The exchange itself is :func:`fedtune.server.messaging.exchange`,
or under secure aggregation :func:`fedtune.server.secure.secure_mean` (which yields only the
weighted mean). :func:`run_training_round` and :func:`run_evaluation` put the pieces together.

What a message carries is built and read only here (``configure_*``, :func:`train_info`,
:func:`eval_info`, :func:`decode_update`), through the typed messages of :mod:`fedtune.common.messages`.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedtune.common import adapters, messages, methods, privacy
from fedtune.common.messages import EvalMetrics, TrainMetrics
from fedtune.common.metrics import PERSONAL_SCORES, weighted_scores

from .aggregation import (
    capped_weights,
    change_by_layer,
    l2_norm,
    lora_product_error,
    noised_mean,
    site_alignment,
    spec_of,
    unflatten,
)
from .messaging import (
    FederationError,
    Printer,
    clean,
    exchange,
    site_metrics,
    site_of,
    site_reason,
)
from .pipeline import Fold, Rejected, SiteUpdate, fold, prepare
from .secure import SecureOutcome, secure_mean
from .state import RunState, num

# What a refusing site's metrics may add to its record (counts of its data's problems).
REFUSAL_METRICS = ("num_examples", "records", "invalid_records", "dropped_too_long")
KEEP_MAX_VALUES = 16_000_000  # 64 MB a site: every adapter method; not full fine-tuning of a large model


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "?" if x is None else format(x, spec)


def dp_round(rs: RunState, population: int) -> tuple[float, float]:
    """-> (sampling rate, noise multiplier) of a DP round drawn from ``population`` sites."""
    return privacy.sampling_rate(rs.cfg, population), privacy.noise_multiplier(rs.cfg, population)


def broadcast_content(
    rs: RunState, rnd: int, trainable: list[str] | None = None, population: int | None = None
) -> RecordDict:
    """What every site gets: the global adapter, the run's config and the round number; for
    training also the round's trainable set, which every update must match exactly, and under
    DP the number of sites the round was drawn from (it sets the noise). The config travels as
    :func:`fedtune.common.messages.site_config` makes it: no site's paths, no output folder."""
    rc = messages.RoundConfig(rs.cfg, rnd, trainable, population)
    if trainable is None:
        return messages.EvalTask(rc, rs.global_state).to_record()
    return messages.TrainTask(rc, rs.global_state).to_record()


def metrics_of(m: Message, kind: type[TrainMetrics] | type[EvalMetrics]):
    """-> (the reply's metrics as ``kind``, how many keys were dropped). Read by messaging's
    tolerant reader (never raises on what a site sent), typed by the messages' declarations."""
    mr, dropped = site_metrics(m, kind.schema())
    return kind(**{k.replace("-", "_"): v for k, v in mr.items()}), dropped


# ---- training ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainPlan:
    """configure_train's answer: what the round sends, and what its replies are checked against."""

    rnd: int
    nodes: list[int]
    population: int  # the sites connected, which this round's were drawn from
    trainable: list[str]  # the tensors that train this round
    spec: dict  # their shapes: every update must match exactly
    n_values: int
    bound: float | None  # the update-norm bound (privacy.clip under DP), or None
    rank_method: str | None  # the method, when the registry says it has mixed ranks (lower ranks are padded)
    secure: bool
    dp: bool
    content: RecordDict  # the TRAIN message's content


def configure_train(rs: RunState, rnd: int, nodes: list[int], population: int | None = None) -> TrainPlan:
    """Round ``rnd``'s TRAIN message for ``nodes`` and what their replies are held to: the
    trainable set (layer-wise control), its shapes, the norm bound, whether ranks may be lower.
    ``population``: the sites connected, which ``nodes`` were drawn from (default: ``nodes``)."""
    cfg = rs.cfg
    dp = rs.accountant is not None
    population = population or len(nodes)
    trainable = rs.round_keys(rnd)
    spec = spec_of({k: rs.global_state[k] for k in trainable})
    n_values = sum(math.prod(s) for s in spec.values())
    return TrainPlan(
        rnd=rnd,
        nodes=nodes,
        population=population,
        trainable=trainable,
        spec=spec,
        n_values=n_values,
        bound=privacy.bound_of(cfg, n_values),
        rank_method=cfg.peft.method if methods.get(cfg.peft.method).mixed_ranks else None,
        secure=bool(cfg.secure_aggregation.enabled),
        dp=dp,
        content=broadcast_content(rs, rnd, trainable, population if dp else None),
    )


def new_fold(rs: RunState, plan: TrainPlan) -> Fold:
    """The round's accumulator. Every site weighs 1 under DP and with weighting 'equal'; else its
    example count, capped at weight_cap x the round's median count once every reply is in.
    Single updates are kept for the round's measures (where each site pulled; for LoRA the
    aggregation error) when the coordinator sees them and they are not huge (full fine-tuning).
    Not under DP: per-site statistics would be released outside the noise's protection."""
    fed = rs.cfg.federation
    equal = plan.dp or fed.weighting == "equal"
    keep = not plan.secure and not plan.dp and fed.aggregator == "mean" and plan.n_values <= KEEP_MAX_VALUES
    return Fold(
        aggregator=fed.aggregator,
        equal=equal,
        cap=None if equal else fed.weight_cap,
        keep_updates=keep,
        default_rank=rs.cfg.peft.r,
    )


def with_detail(rs: RunState, name: str, status: str, reason: str) -> str:
    """``reason``, and what ``rs.explain_site`` (ftsim) reads from the site's files about it."""
    detail = rs.explain_site(name, status) if rs.explain_site is not None and status != "ok" else None
    return f"{reason}: {detail}" if detail else reason


def refusal_info(m: Message, status: str, tm: TrainMetrics, dropped: int) -> dict:
    """The record of a site that sent no update: its status, its reason, its data's counts."""
    info = {"status": status, "reason": site_reason(m, status)}
    info.update({k: getattr(tm, k) for k in REFUSAL_METRICS if getattr(tm, k) is not None})
    if dropped:
        info["metrics_dropped"] = dropped
    return info


def train_info(tm: TrainMetrics, dropped: int) -> dict:
    """A training site's record from its (typed, checked) metrics."""
    info = {
        "train_loss": num(tm.train_loss),
        "train_loss_first": num(tm.train_loss_first),
        "train_loss_last": num(tm.train_loss_last),
        "examples": tm.num_examples,
        "steps": max(int(tm.train_steps or 0), 0),
        "train_seconds": num(tm.train_seconds),
        "receive_seconds": num(tm.receive_seconds),
        "startup_seconds": num(tm.startup_seconds),
        "invalid_records": max(int(tm.invalid_records or 0), 0),
        **({"rank": tm.lora_rank} if tm.lora_rank is not None else {}),
        **(
            {"update_norm_before_clip": num(tm.update_norm), "clipped": bool(tm.update_clipped)}
            if tm.update_clipped is not None
            else {}
        ),
        **({"planned_steps": max(tm.planned_steps, 0)} if tm.planned_steps is not None else {}),
        **({"metrics_dropped": dropped} if dropped else {}),
    }
    if (
        tm.local_best_step is not None
    ):  # train.local_patience: the site checked its validation loss, kept its best weights
        info["local_stop"] = {
            "stopped_at": max(int(tm.local_stopped_at or 0), 0) or None,  # a stop is at step 1 or later
            "best_step": max(int(tm.local_best_step or 0), 0),
            "val_start": num(tm.local_val_start),
            "val_best": num(tm.local_val_best),
        }
    return info


def trained_line(info: dict) -> str:
    """How a site's training reads in the log."""
    steps = f"{info['steps']} steps"
    stop = info.get("local_stop")
    if stop is not None:
        if stop["stopped_at"] is not None:
            steps = f"{info['steps']} of {info.get('planned_steps', '?')} steps (stopped early; kept step {stop['best_step']})"
        elif stop["best_step"] != info["steps"]:
            steps += f" (kept step {stop['best_step']})"
    return f"loss {_fmt(info['train_loss_first'])} -> {_fmt(info['train_loss_last'])} in {steps}, {_fmt(info['train_seconds'], '.1f')} s"


def decode_update(m: Message, site: str, tm: TrainMetrics, plan: TrainPlan) -> SiteUpdate:
    """A plain reply's update as arrays (at most the round's values and tensors; ValueError else)."""
    if tm.update_nonfinite:  # an older site zeroed a diverged update and said so: never average its zeros
        raise ValueError("the site's update was not finite (NaN/Inf; the site replaced it by zeros)")
    arrays = adapters.read_adapter(m.content, max_values=plan.n_values, max_tensors=len(plan.spec))
    return SiteUpdate(site, arrays, tm.num_examples)


@dataclass
class TrainReplies:
    """A round's training replies as they arrive (:meth:`on_reply`): each site's record, the
    rejected updates, and the accumulator the accepted ones are folded into. Nothing a site sent
    reaches a log or a record but through messaging's readers."""

    rs: RunState
    plan: TrainPlan
    say: Printer
    fold: Fold
    sites: dict[str, dict] = field(default_factory=dict)
    rejected: list[dict] = field(default_factory=list)
    t0: float = field(default_factory=time.time)

    def on_reply(self, m: Message, node: int) -> None:
        plan, rs = self.plan, self.rs
        name, status = site_of(m, node, rs.node_names)
        tm, dropped = metrics_of(m, TrainMetrics)
        where = f"round {plan.rnd}/{rs.cfg.federation.rounds} train | {name}"
        n, of = len(self.sites) + 1, len(plan.nodes)
        count = f"[{n}/{of} sites, {time.time() - self.t0:.0f} s] {rs.progress(plan.rnd, n, of)}"
        if status != "ok":
            info = self.sites[name] = refusal_info(m, status, tm, dropped)
            self.say(f"{where}: no update ({with_detail(rs, name, status, info['reason'])}) {count}")
            return
        info = self.sites[name] = train_info(tm, dropped)
        trained = trained_line(info)
        if plan.secure:  # a masked vector: server/secure.py checks and sums it
            info["status"] = "ok"
            info["clipped_values"] = max(int(tm.clipped_values or 0), 0)
            self.say(f"{where}: {trained}; masked update received {count}")
            return
        problems = None
        try:
            u = decode_update(m, name, tm, plan)
            info["bytes_sent"] = adapters.record_nbytes(m.content[messages.ARRAYS])
            u = prepare(u, plan.spec, plan.rank_method, rs.cfg.federation.max_examples_per_update, plan.bound)
        except Rejected as e:
            problems = e.problems
        except (ValueError, KeyError, TypeError) as e:
            problems = [str(e)]
        if problems:
            info.update(status="rejected", reason=clean("; ".join(problems[:5])), examples=None)
            self.rejected.append({"site": name, "reason": info["reason"]})
            self.say(f"{where}: REJECTED update: {info['reason']} {count}")
            return
        info["status"] = "ok"
        if u.clipped_by_coordinator is not None:
            info["clipped_by_coordinator"] = u.clipped_by_coordinator
        fold(self.fold, u)
        self.say(f"{where}: {trained} {count}")


def secure_result(rs: RunState, plan: TrainPlan, replies: TrainReplies, out: SecureOutcome, say: Printer):
    """-> (the round's mean update, sites summed, the record's additions) from the secure exchange."""
    update = unflatten(out.mean, plan.spec)
    for name, info in replies.sites.items():
        if info.get("status") == "ok":
            info["summed"] = name in out.summed
            info["bytes_sent"] = out.summed.get(name, 0)
    accepted = len(out.summed)
    fewest = privacy.min_summed(rs.cfg, plan.population) if plan.dp else 0
    if plan.dp and accepted < fewest:  # the protocol aborts first; never release less noise
        raise FederationError(
            f"round {plan.rnd}: {accepted} site(s) summed, fewer than the {fewest} the sites' noise is sized for"
        )
    say(
        f"round {plan.rnd} secure | weighted mean of {accepted} site(s) unmasked "
        f"(threshold {out.stats['threshold']}, quantization error <= {out.stats['quantization_error_bound']:.2e} per value; "
        f"stages {', '.join(f'{k} {v:.1f} s' for k, v in out.stats['stage_seconds'].items())})"
    )
    return update, accepted, {"secure_aggregation": out.stats}


def note_weights(rs: RunState, plan: TrainPlan, replies: TrainReplies, say: Printer) -> dict[str, float]:
    """Each site's weight in the mean on its record (and whether the cap lowered it) -> the weights."""
    acc, sites = replies.fold, replies.sites
    weight = acc.weights()
    for name, w in weight.items():
        sites[name]["weight"] = w
        if acc.cap is not None and w < sites[name]["examples"]:
            sites[name]["weight_capped"] = True
    if acc.cap is not None and any(i.get("weight_capped") for i in sites.values()):
        capped = ", ".join(n for n in acc.weighed if sites[n].get("weight_capped"))
        say(
            f"round {plan.rnd} | weight capped at {acc.mean.limit():g} (federation.weight_cap {acc.cap:g} x the median example count): {capped}"
        )
    return weight


def measures(rs: RunState, plan: TrainPlan, replies: TrainReplies, update: dict, weight: dict) -> dict:
    """Where each kept update pulled (on its site's record) -> for LoRA, the aggregation error."""
    measured = replies.fold.measured
    if not measured:
        return {}
    for (name, _, _), align in zip(measured, site_alignment([a for _, a, _ in measured], update, rs.layer_of)):
        replies.sites[name].update(align)
    if plan.rank_method is None:
        return {}
    return lora_product_error(
        rs.global_state, [a for _, a, _ in measured], [r for _, _, r in measured], [weight[n] for n, _, _ in measured],
        update, methods.lora_pairs(rs.global_state, plan.rank_method),
    )  # fmt: skip


def plain_result(rs: RunState, plan: TrainPlan, replies: TrainReplies, received: int, say: Printer):
    """-> (the round's mean update, sites accepted, the record's additions) from the plain exchange."""
    fed = rs.cfg.federation
    acc, rnd = replies.fold, plan.rnd
    missing = len(plan.nodes) - received
    if missing:
        say(
            f"round {rnd} | {missing} site(s) did not answer within {fed.round_timeout_s:.0f} s (federation.round_timeout_s): dropped from this round"
        )
    accepted = acc.count
    if accepted < fed.min_sites:
        raise FederationError(
            f"round {rnd}: only {accepted} valid update(s) of {len(plan.nodes)} site(s) asked "
            f"({missing} did not answer, {len(replies.rejected)} rejected, {len(replies.sites) - accepted - len(replies.rejected)} sent none); "
            f"federation.min_sites is {fed.min_sites}. The global adapter stays at round {rnd - 1}; "
            "the run can be resumed from its last checkpoint."
        )
    update = acc.result(fed.trim_fraction)
    weight = note_weights(rs, plan, replies, say)
    record = measures(rs, plan, replies, update, weight)
    if plan.dp:  # central DP: the coordinator, which saw the clipped updates, releases only their noised mean
        sigma = dp_round(rs, plan.population)[1]
        update = noised_mean(
            update, accepted, sigma * rs.cfg.privacy.clip, np.random.default_rng(secrets.randbits(128))
        )
    return update, accepted, record


def charge_privacy(rs: RunState, plan: TrainPlan) -> dict:
    """Under DP: the round composed into the accountant -> its record."""
    q, sigma = dp_round(rs, plan.population)
    rs.accountant.spend(q, sigma)
    return {
        "epsilon": rs.accountant.epsilon(),
        "delta": rs.cfg.privacy.delta,
        "noise_multiplier": sigma,
        "clip": rs.cfg.privacy.clip,
        "sampling_rate": q,
        "noise": "distributed: each site adds its share before masking"
        if plan.secure
        else "central: added by the coordinator",
    }


def aggregate_train(
    rs: RunState, plan: TrainPlan, replies: TrainReplies, say: Printer, received: int = 0, secure=None
) -> dict:
    """The round's mean update (``secure``: the SecureOutcome of a secure exchange; else from the
    fold of the ``received`` plain replies), charged to the DP accountant, applied by the server
    optimizer -> the round's training record."""
    if plan.secure:
        update, accepted, record = secure_result(rs, plan, replies, secure, say)
    else:
        update, accepted, record = plain_result(rs, plan, replies, received, say)
    sites = replies.sites
    if plan.bound is not None and not plan.dp:
        record["clipped_updates"] = sum(
            1 for i in sites.values() if i.get("clipped") or i.get("clipped_by_coordinator")
        )
    if plan.dp:
        record["privacy"] = charge_privacy(rs, plan)
    before = rs.global_state
    rs.global_state = rs.model.step(plan.rnd, update, accepted or 1)
    record["server_lr"] = rs.model.optimizer.round_lr(accepted or 1)
    record["layer_change"] = change_by_layer(before, rs.global_state, rs.layer_of)
    return {
        "sites": sites,
        "rejected": replies.rejected,
        "accepted": accepted,
        "applied": True,
        "update_norm": l2_norm(update),
        "trainable_tensors": len(plan.trainable),
        "trainable_params": plan.n_values,
        "update_bytes": max((s.get("bytes_sent") or 0 for s in sites.values()), default=0),
        "train_seconds": round(time.time() - replies.t0, 3),
        **record,
    }


def run_training_round(
    grid: Grid, nodes: list[int], rs: RunState, rnd: int, say: Printer, population: int | None = None
) -> dict:
    """One round of training: each site's update is validated (a lower-rank LoRA update is
    zero-padded to the global rank: HetLoRA), clipped to the update-norm bound if one is set, and
    folded into the example-weighted mean as it arrives (or, for a robust aggregator, kept for the
    coordinate-wise median or trimmed mean); under secure aggregation the sites' updates stay
    masked and only their weighted mean comes out (:mod:`fedtune.server.secure`). Under DP every
    site weighs 1 and the mean carries Gaussian noise (added here, or by the sites under secure
    aggregation). The server optimizer then applies the mean update.

    ``population``: the sites connected, which this round's were drawn from (default: ``nodes``)."""
    plan = configure_train(rs, rnd, nodes, population)
    replies = TrainReplies(rs, plan, say, new_fold(rs, plan))
    if plan.secure:
        out = secure_mean(
            grid, nodes, plan.content, rs.cfg, rnd, plan.n_values, replies.on_reply, rs.node_names, say,
            site_keys=rs.site_keys,
        )  # fmt: skip
        return aggregate_train(rs, plan, replies, say, secure=out)
    timeout = rs.cfg.federation.round_timeout_s
    received = exchange(grid, nodes, plan.content, MessageType.TRAIN, timeout, replies.on_reply)
    return aggregate_train(rs, plan, replies, say, received=received)


# ---- evaluation -------------------------------------------------------------------------------


def configure_evaluate(rs: RunState, rnd: int) -> RecordDict:
    """The EVALUATE message's content: the global adapter, the config, the round."""
    return broadcast_content(rs, rnd)


def eval_info(m: Message, node: int, rs: RunState) -> tuple[str, dict]:
    """One evaluation reply -> (its site, its record)."""
    name, status = site_of(m, node, rs.node_names)
    em, dropped = metrics_of(m, EvalMetrics)
    if status != "ok":
        return name, {"status": status}
    personal = {
        k: num(getattr(em, k)) for k in PERSONAL_SCORES if getattr(em, k) is not None
    }  # federation.personalization: the site's private model's scores (never the model)
    if em.personal_steps is not None:
        personal["personal_steps"] = em.personal_steps  # an int >= 0: EvalMetrics declares it so
    return name, {
        "eval_loss": num(em.eval_loss),
        "exact_match": num(em.exact_match),
        "eval_examples": max(int(em.num_examples or 0), 0),
        **personal,
        **({"eval_metrics_dropped": dropped} if dropped else {}),
    }


def aggregate_evaluate(rs: RunState, rnd: int, results: dict[str, dict], say: Printer) -> dict:
    """The sites' scores -> the round's evaluation record (``sites`` and the federated ``aggregate``).
    The federated score weighs sites by their (claimed) eval examples, capped as training weights
    are (weighting 'equal': every site alike), so no site sets the best round or early stopping alone."""
    ok = {k: v for k, v in results.items() if "eval_loss" in v and v["eval_examples"] > 0}
    fed = rs.cfg.federation
    counts = [v["eval_examples"] for v in ok.values()]
    weights = (
        [1.0] * len(counts) if fed.weighting == "equal" else capped_weights(counts, fed.weight_cap) if counts else []
    )
    agg = weighted_scores(
        [{**v, "eval_examples": w} for v, w in zip(ok.values(), weights)],
        ("eval_loss", "exact_match", *PERSONAL_SCORES),
    )
    summary = "  ".join(
        f"{n}: loss {_fmt(v['eval_loss'])}"
        + (f" EM {v['exact_match']:.2f}" if v.get("exact_match") is not None else "")
        + (
            f" (personalized {_fmt(v['personal_eval_loss'])}"
            + (f" EM {v['personal_exact_match']:.2f}" if v.get("personal_exact_match") is not None else "")
            + ")"
            if v.get("personal_eval_loss") is not None
            else ""
        )
        for n, v in sorted(ok.items())
    )
    silent = "  ".join(
        f"{n}: not evaluated ({with_detail(rs, n, status, status)})"
        for n, v in sorted(results.items())
        if n not in ok and (status := v.get("status", "no eval examples"))
    )
    say(f"round {rnd} eval  | " + ("  ".join(x for x in (summary, silent) if x) or "no site replied"))
    return {"sites": results, "aggregate": agg}


def run_evaluation(grid: Grid, nodes: list[int], rs: RunState, rnd: int, say: Printer) -> dict:
    results: dict[str, dict] = {}

    def absorb(m: Message, node: int) -> None:
        name, info = eval_info(m, node, rs)
        results[name] = info

    exchange(grid, nodes, configure_evaluate(rs, rnd), MessageType.EVALUATE, rs.cfg.federation.round_timeout_s, absorb)
    return aggregate_evaluate(rs, rnd, results, say)
