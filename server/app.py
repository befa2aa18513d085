"""The coordinator: a Flower ServerApp (Message API) running federated adapter training.

We drive the rounds ourselves with ``grid.push_messages``/``pull_messages`` instead of
``Strategy.start``: we need to validate every update before it is averaged, name sites in
per-round metrics, print progress as each site reports, and checkpoint every round, none of
which ``start`` lets us do. The maths lives in :mod:`fedtune.server.aggregation`.

Per round: TRAIN (global adapter + config) -> validate each delta -> weighted mean (or, under
secure aggregation, the five SecAgg+ exchanges of :mod:`fedtune.server.secure`, which yield only
the mean) -> server optimizer (FedAvg: add it) -> checkpoint ``checkpoints/round-NNNN`` and ``adapter/`` -> EVALUATE the new
adapter at every site -> ``metrics.json``. Round 0 is an evaluation of the untouched base
model, so the report can show each domain's change.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedtune.common import adapters, methods, privacy, progress
from fedtune.common.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    atomic_write_json,
    load_adapter_state,
    load_arrays,
    save_adapter,
    verify_checkpoint,
)
from fedtune.common.config import MIXED_RANK_METHODS, FedTuneConfig
from fedtune.common.metrics import weighted_scores
from fedtune.common.protocol import CONFIG_KEY, DP_POPULATION_KEY, ROUND_KEY, TRAINABLE_KEY

from .aggregation import (
    CappedMean,
    RunningMean,
    ServerOptimizer,
    capped_weights,
    change_by_layer,
    l2_norm,
    lora_product_error,
    noised_mean,
    robust_aggregate,
    site_alignment,
    spec_of,
    unflatten,
    validate_update,
)
from .messaging import (
    EVAL_METRICS,
    TRAIN_METRICS,
    FederationError,
    Printer,
    SiteNames,
    clean,
    exchange,
    site_metrics,
    site_of,
    site_reason,
)
from .report import write_report
from .secure import secure_mean


@dataclass
class RunState:
    cfg: FedTuneConfig
    out: Path
    global_state: OrderedDict  # name -> float32 ndarray
    peft_config: object  # the peft config of the adapter; None for full fine-tuning
    trainable_params: int  # parameters the method can train (the most a round's update carries)
    # State keys the method trains (e.g. VeRA's shared projections are in the state but never train),
    # and the model's layer count: together with cfg.layers they give each round's trainable set.
    trainable_keys: list = field(default_factory=list)
    n_layers: int = 0
    rounds: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    # The coordinator's own randomness (which sites train when sites_per_round is set); its
    # state is checkpointed with every round so a resumed run draws what the original would have.
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    # The server optimizer (federation.strategy) and its moments, checkpointed every round.
    optimizer: ServerOptimizer = field(default_factory=lambda: ServerOptimizer("fedavg"))
    # Flower node id -> the site name it reported, so a site that later fails is still named.
    node_names: dict = field(default_factory=SiteNames)
    events: object = None  # output.tensorboard: an events.EventWriter
    # Differential privacy: the rounds composed so far (checkpointed), and why the run stopped early.
    accountant: privacy.Accountant | None = None
    stopped: str | None = None
    forgetting: dict = field(default_factory=dict)  # general knowledge: {"base": ..., "final": ...}
    site_keys: object = (
        None  # secure aggregation: the registered sites' identity keys (SEC1 P-384; a KeyFolder), if known
    )
    first_round: int = 1  # where this process started training (after a resume, later)
    first_round_at: float | None = None

    def server_state(self, rnd: int) -> dict:
        return {
            "round": rnd,
            "strategy": self.cfg.federation.strategy,
            "rng": self.rng.bit_generator.state,
            "optimizer": self.optimizer.state()[0],
            **({"privacy": self.accountant.state()} if self.accountant is not None else {}),
        }

    def round_keys(self, rnd: int) -> list[str]:
        """The tensors that train in round ``rnd`` (layer-wise control), in state order."""
        keys = self.trainable_keys or list(self.global_state)
        chosen = methods.round_keys(keys, self.n_layers, self.cfg.layers, rnd) if self.cfg.layers.active else keys
        if not chosen:
            raise FederationError(
                f"round {rnd}: the layers section leaves nothing to train: {self.cfg.peft.method} has tensors in layers "
                f"{sorted({methods.position(k, self.n_layers) for k in keys})} (-1: embeddings, {self.n_layers}: above the top layer)"
            )
        return chosen

    def restore_server_state(self, doc: dict, optimizer_arrays: dict | None = None) -> None:
        self.rng.bit_generator.state = doc["rng"]
        self.optimizer.restore(doc.get("optimizer") or {}, optimizer_arrays or {})
        if self.accountant is not None:
            if "privacy" not in doc:
                raise ValueError(
                    "the run had no privacy accountant; differential privacy cannot be turned on in the middle of a run"
                )
            self.accountant = privacy.Accountant.restore(doc["privacy"])

    def layer_of(self, key: str) -> int:
        """The layer a state tensor belongs to (-1: embeddings, n_layers: above the top layer)."""
        return methods.position(key, self.n_layers)

    def progress(self, rnd: int, done: int, of: int) -> str:
        """A bar over the run's training rounds with an ETA, ``done`` of ``of`` sites into round
        ``rnd``: the time per round so far (training and evaluation) times what is left."""
        if self.first_round_at is None:
            return ""
        total = self.cfg.federation.rounds - self.first_round + 1
        return progress.bar((rnd - self.first_round + done / max(of, 1)) / total, time.time() - self.first_round_at)

    def best(self) -> dict | None:
        ev = self.cfg.eval
        rnd, value, since = best_round(self.rounds, ev.select_metric, ev.min_delta)
        return (
            None if rnd is None else {"round": rnd, "metric": ev.select_metric, "value": value, "rounds_since": since}
        )

    def metrics_doc(self) -> dict:
        return {
            "fedtune": {
                "peft": self.cfg.peft.method,
                "artifact": "model" if self.peft_config is None else "adapter",
                "strategy": self.cfg.federation.strategy,
                "aggregator": self.cfg.federation.aggregator,
                "secure_aggregation": bool(self.cfg.secure_aggregation.enabled),
                "differential_privacy": self.cfg.privacy.enabled,
                "update": "delta",
            },
            **({"stopped": self.stopped} if self.stopped else {}),
            **({"best": best} if (best := self.best()) else {}),
            **({"forgetting": self.forgetting} if self.forgetting else {}),
            "model": self.cfg.model.name,
            "trainable_params": self.trainable_params,
            "n_layers": self.n_layers,
            "config": self.cfg.model_dump(mode="json"),
            "rounds": self.rounds,
            "elapsed_s": round(time.time() - self.started, 2),
        }


def best_round(rounds: list[dict], metric: str, min_delta: float = 0.0) -> tuple[int | None, float | None, int]:
    """The round whose federated validation ``metric`` (its ``aggregate``: the sites'
    example-weighted mean) is best: lowest ``eval_loss``, highest ``exact_match``; round 0, the
    base model, included. A round beats the best so far only by more than ``min_delta``.
    -> (best round, its value, rounds since it); (None, None, 0) before any round has the metric.
    A round without the metric (skipped, or no site evaluated) counts as not improving."""
    sign = -1.0 if metric == "exact_match" else 1.0
    best, value, since = None, None, 0
    for r in rounds:
        v = _num((r.get("aggregate") or {}).get(metric))
        if v is not None and (value is None or sign * v < sign * value - min_delta):
            best, value, since = int(r["round"]), v, 0
        elif best is not None:
            since += 1
    return best, value, since


@dataclass
class InitialAdapter:
    state: OrderedDict  # name -> float32 ndarray: fresh adapter weights (seeded), or the base's for full
    peft_config: object  # None for full fine-tuning
    trainable_keys: list
    n_layers: int


def initial_adapter(cfg: FedTuneConfig) -> InitialAdapter:
    """The method's starting state and config, from one load of the base model (never quantized
    here: the coordinator needs the adapter's shapes, not a 4-bit base)."""
    model, _, _ = methods.load_model(cfg, device="cpu", quantized=False)
    state = methods.get_state(model)
    out = InitialAdapter(
        OrderedDict((k, v.numpy()) for k, v in state.items()),
        methods.saved_peft_config(model, cfg.model.name) if methods.is_peft(model) else None,
        methods.trainable_capable(model),
        methods.n_layers_of(model),
    )
    del model
    return out


def fewest_sites(cfg: FedTuneConfig) -> int:
    """Sites a round cannot do without: federation.min_sites, and under secure aggregation at
    least 2 and the threshold (a sum of one site is that site's update)."""
    if cfg.secure_aggregation.enabled:
        return max(cfg.federation.min_sites, 2, cfg.secure_aggregation.threshold or 2)
    return cfg.federation.min_sites


def wait_for_sites(grid: Grid, wanted: int, minimum: int, timeout: float, say: Printer) -> list[int]:
    """Connected sites, once ``wanted`` have joined; at the deadline, those present if at least
    ``minimum``, else a FederationError that says how many joined and how many were needed."""
    deadline = time.time() + timeout
    last = -1
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            return nodes
        if len(nodes) != last:
            say(
                f"waiting for sites: {len(nodes)} connected, {wanted} expected ({minimum} needed; deadline in {deadline - time.time():.0f} s)"
            )
            last = len(nodes)
        if time.time() > deadline:
            if len(nodes) >= minimum:
                say(f"join deadline passed: starting with the {len(nodes)} site(s) connected")
                return nodes
            raise FederationError(
                f"only {len(nodes)} site(s) joined within {timeout:.0f} s (federation.join_timeout_s); "
                f"{minimum} needed (federation.min_sites; under secure aggregation also at least 2 and secure_aggregation.threshold). "
                "Check that the sites are running, reach this server, and are registered."
            )
        time.sleep(0.5)


def sites_for_round(grid: Grid, rs: RunState, say: Printer) -> tuple[list[int], list[int]]:
    """-> (sites that train this round, sites that evaluate). Sites are re-read every round, so a
    site that dropped out is not waited for again and one that (re)joined takes part."""
    fed = rs.cfg.federation
    nodes = sorted(grid.get_node_ids())
    minimum = fewest_sites(rs.cfg)
    if len(nodes) < minimum:
        nodes = wait_for_sites(grid, minimum, minimum, fed.join_timeout_s, say)
    train = nodes
    if fed.sites_per_round is not None and fed.sites_per_round < len(nodes):
        if rs.accountant is not None:
            # Under DP: Poisson sampling, each site in with probability q, as the accountant assumes.
            q = privacy.sampling_rate(rs.cfg, len(nodes))
            train = [n for n, u in zip(nodes, rs.rng.random(len(nodes))) if u < q]
        else:
            pick = rs.rng.choice(len(nodes), size=fed.sites_per_round, replace=False)
            train = sorted(nodes[i] for i in pick)
    return train, nodes


# What a refusing site's metrics may add to its record (counts of its data's problems).
REFUSAL_METRICS = ("num-examples", "records", "invalid-records", "dropped-too-long")


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "?" if x is None else format(x, spec)


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(float(x)) else None


def broadcast_content(
    rs: RunState, rnd: int, trainable: list[str] | None = None, population: int | None = None
) -> RecordDict:
    """What every site gets: the global adapter, the run's config and the round number; for
    training also the round's trainable set, which every update must match exactly, and under
    DP the number of sites the round was drawn from (it sets the noise)."""
    conf = {CONFIG_KEY: rs.cfg.to_json(), ROUND_KEY: rnd} | (
        {TRAINABLE_KEY: trainable} if trainable is not None else {}
    )
    if population is not None:
        conf[DP_POPULATION_KEY] = population
    return RecordDict({**adapters.adapter_records(adapters.to_tensors(rs.global_state)), "config": ConfigRecord(conf)})


def run_evaluation(grid: Grid, nodes: list[int], rs: RunState, rnd: int, say: Printer) -> dict:
    content = broadcast_content(rs, rnd)
    results: dict[str, dict] = {}

    def absorb(m: Message, node: int) -> None:
        name, status = site_of(m, node, rs.node_names)
        mr, dropped = site_metrics(m, EVAL_METRICS)
        if status != "ok":
            results[name] = {"status": status}
            return
        results[name] = {
            "eval_loss": _num(mr.get("eval-loss")),
            "exact_match": _num(mr.get("exact-match")),
            "eval_examples": max(int(mr.get("num-examples") or 0), 0),
            **({"eval_metrics_dropped": dropped} if dropped else {}),
        }

    exchange(grid, nodes, content, MessageType.EVALUATE, rs.cfg.federation.round_timeout_s, absorb)
    ok = {k: v for k, v in results.items() if "eval_loss" in v and v["eval_examples"] > 0}
    # The federated score weighs sites by their (claimed) eval examples, capped as training weights are
    # (weighting 'equal': every site alike), so no site sets the best round or early stopping alone.
    fed = rs.cfg.federation
    counts = [v["eval_examples"] for v in ok.values()]
    weights = (
        [1.0] * len(counts) if fed.weighting == "equal" else capped_weights(counts, fed.weight_cap) if counts else []
    )
    agg = weighted_scores([{**v, "eval_examples": w} for v, w in zip(ok.values(), weights)])
    summary = "  ".join(
        f"{n}: loss {_fmt(v['eval_loss'])}"
        + (f" EM {v['exact_match']:.2f}" if v.get("exact_match") is not None else "")
        for n, v in sorted(ok.items())
    )
    say(f"round {rnd} eval  | {summary}" if summary else f"round {rnd} eval  | no site evaluated")
    return {"sites": results, "aggregate": agg}


def dp_round(rs: RunState, population: int) -> tuple[float, float]:
    """-> (sampling rate, noise multiplier) of a DP round drawn from ``population`` sites."""
    return privacy.sampling_rate(rs.cfg, population), privacy.noise_multiplier(rs.cfg, population)


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
    cfg = rs.cfg
    secure = bool(cfg.secure_aggregation.enabled)
    dp = rs.accountant is not None
    population = population or len(nodes)
    trainable = rs.round_keys(rnd)
    content = broadcast_content(rs, rnd, trainable, population if dp else None)
    spec = spec_of({k: rs.global_state[k] for k in trainable})
    n_values = sum(math.prod(s) for s in spec.values())
    bound = privacy.bound_of(cfg, n_values)
    ranked = cfg.peft.method in MIXED_RANK_METHODS
    # Single updates are kept for the round's measures (where each site pulled; for LoRA the
    # aggregation error) when the coordinator sees them and they are not huge (full fine-tuning).
    # Not under DP: per-site statistics would be released outside the noise's protection.
    keep = not secure and not dp and cfg.federation.aggregator == "mean" and n_values <= KEEP_MAX_VALUES
    measured: list[tuple[str, dict, int]] = []  # (site, update, rank), in the order they were added to the mean
    t0 = time.time()
    sites: dict[str, dict] = {}
    rejected: list[dict] = []
    # Every site weighs 1 under DP and with weighting 'equal'; else its example count, capped at
    # weight_cap x the round's median count once every reply is in (CappedMean).
    equal = dp or cfg.federation.weighting == "equal"
    cap = None if equal else cfg.federation.weight_cap
    mean = RunningMean() if cap is None else CappedMean(cap)
    weighed: list[str] = []  # the sites in the mean, in the order they were added
    kept: list[dict] = []  # robust aggregators only

    def absorb(m: Message, node: int) -> None:
        """Record one site's training reply; validate a plain update and fold it in as it arrives.
        Nothing the site sent reaches a log or a record but through messaging's readers."""
        name, status = site_of(m, node, rs.node_names)
        mr, dropped = site_metrics(m, TRAIN_METRICS)
        where = f"round {rnd}/{cfg.federation.rounds} train | {name}"
        count = f"[{len(sites) + 1}/{len(nodes)} sites, {time.time() - t0:.0f} s] {rs.progress(rnd, len(sites) + 1, len(nodes))}"
        if status != "ok":
            reason = site_reason(m, status)
            sites[name] = {"status": status, "reason": reason}
            sites[name].update({k.replace("-", "_"): v for k, v in mr.items() if k in REFUSAL_METRICS})
            if dropped:
                sites[name]["metrics_dropped"] = dropped
            say(f"{where}: no update ({reason}) {count}")
            return
        n_ex = mr.get("num-examples")
        info = {
            "train_loss": _num(mr.get("train-loss")),
            "train_loss_first": _num(mr.get("train-loss-first")),
            "train_loss_last": _num(mr.get("train-loss-last")),
            "examples": n_ex,
            "steps": max(int(mr.get("train-steps") or 0), 0),
            "train_seconds": _num(mr.get("train-seconds")),
            "receive_seconds": _num(mr.get("receive-seconds")),
            "startup_seconds": _num(mr.get("startup-seconds")),
            "invalid_records": max(int(mr.get("invalid-records") or 0), 0),
            **({"rank": mr["lora-rank"]} if "lora-rank" in mr else {}),
            **(
                {"update_norm_before_clip": _num(mr.get("update-norm")), "clipped": bool(mr.get("update-clipped"))}
                if "update-clipped" in mr
                else {}
            ),
            **({"planned_steps": max(mr["planned-steps"], 0)} if "planned-steps" in mr else {}),
            **({"metrics_dropped": dropped} if dropped else {}),
        }
        steps = f"{info['steps']} steps"
        if (
            "local-best-step" in mr
        ):  # train.local_patience: the site checked its validation loss and kept its best weights
            stop = info["local_stop"] = {
                "stopped_at": max(int(mr.get("local-stopped-at") or 0), 0) or None,  # a stop is at step 1 or later
                "best_step": max(int(mr.get("local-best-step") or 0), 0),
                "val_start": _num(mr.get("local-val-start")),
                "val_best": _num(mr.get("local-val-best")),
            }
            if stop["stopped_at"] is not None:
                steps = f"{info['steps']} of {info.get('planned_steps', '?')} steps (stopped early; kept step {stop['best_step']})"
            elif stop["best_step"] != info["steps"]:
                steps += f" (kept step {stop['best_step']})"
        trained = f"loss {_fmt(info['train_loss_first'])} -> {_fmt(info['train_loss_last'])} in {steps}, {_fmt(info['train_seconds'], '.1f')} s"
        sites[name] = info
        if secure:  # a masked vector: server/secure.py checks and sums it
            info["status"] = "ok"
            info["clipped_values"] = max(int(mr.get("clipped-values") or 0), 0)
            say(f"{where}: {trained}; masked update received {count}")
            return
        rank = None
        try:
            if mr.get(
                "update-nonfinite"
            ):  # an older site zeroed a diverged update and said so: never average its zeros
                raise ValueError("the site's update was not finite (NaN/Inf; the site replaced it by zeros)")
            arrays = adapters.read_adapter(m.content, max_values=n_values, max_tensors=len(spec))
            info["bytes_sent"] = adapters.record_nbytes(m.content["arrays"])
            rank = methods.rank_of(arrays, spec) if ranked else None
            if rank is not None:
                arrays = methods.pad_rank(arrays, spec)  # HetLoRA: a lower rank's missing rows/columns are zeros
            problems = validate_update(arrays, spec, n_ex, cfg.federation.max_examples_per_update)
        except (ValueError, KeyError, TypeError) as e:
            arrays, problems = {}, [str(e)]
        if problems:
            info.update(status="rejected", reason=clean("; ".join(problems[:5])), examples=None)
            rejected.append({"site": name, "reason": info["reason"]})
            say(f"{where}: REJECTED update: {info['reason']} {count}")
            return
        info["status"] = "ok"
        if bound is not None:  # the sites clip; a site that did not is clipped here
            c = privacy.clip_update(arrays, bound)
            arrays = c.update
            info["clipped_by_coordinator"] = bool(c.norm > bound * (1 + 1e-4))
        if cfg.federation.aggregator == "mean":
            mean.add(arrays, 1.0 if equal else float(n_ex))
            weighed.append(name)
            if keep:
                measured.append((name, arrays, rank or cfg.peft.r))
        else:
            kept.append(arrays)
        say(f"{where}: {trained} {count}")

    record: dict = {}
    if secure:
        out = secure_mean(grid, nodes, content, cfg, rnd, n_values, absorb, rs.node_names, say, site_keys=rs.site_keys)
        update = unflatten(out.mean, spec)
        for name, info in sites.items():
            if info.get("status") == "ok":
                info["summed"] = name in out.summed
                info["bytes_sent"] = out.summed.get(name, 0)
        accepted = len(out.summed)
        if dp and accepted < privacy.min_summed(cfg, population):  # the protocol aborts first; never release less noise
            raise FederationError(
                f"round {rnd}: {accepted} site(s) summed, fewer than the {privacy.min_summed(cfg, population)} the sites' noise is sized for"
            )
        record["secure_aggregation"] = out.stats
        say(
            f"round {rnd} secure | weighted mean of {accepted} site(s) unmasked "
            f"(threshold {out.stats['threshold']}, quantization error <= {out.stats['quantization_error_bound']:.2e} per value; "
            f"stages {', '.join(f'{k} {v:.1f} s' for k, v in out.stats['stage_seconds'].items())})"
        )
    else:
        received = exchange(grid, nodes, content, MessageType.TRAIN, cfg.federation.round_timeout_s, absorb)
        missing = len(nodes) - received
        if missing:
            say(
                f"round {rnd} | {missing} site(s) did not answer within {cfg.federation.round_timeout_s:.0f} s (federation.round_timeout_s): dropped from this round"
            )
        accepted = mean.count + len(kept)
        if accepted < cfg.federation.min_sites:
            raise FederationError(
                f"round {rnd}: only {accepted} valid update(s) of {len(nodes)} site(s) asked "
                f"({missing} did not answer, {len(rejected)} rejected, {len(sites) - accepted - len(rejected)} sent none); "
                f"federation.min_sites is {cfg.federation.min_sites}. The global adapter stays at round {rnd - 1}; "
                "the run can be resumed from its last checkpoint."
            )
        update = (
            mean.result()
            if cfg.federation.aggregator == "mean"
            else robust_aggregate(kept, cfg.federation.aggregator, cfg.federation.trim_fraction)
        )
        weight = {}
        if cfg.federation.aggregator == "mean":
            weight = dict(zip(weighed, mean.weights()))
            for name, w in weight.items():
                sites[name]["weight"] = w
                if cap is not None and w < sites[name]["examples"]:
                    sites[name]["weight_capped"] = True
            if cap is not None and any(i.get("weight_capped") for i in sites.values()):
                capped = ", ".join(n for n in weighed if sites[n].get("weight_capped"))
                say(
                    f"round {rnd} | weight capped at {mean.limit():g} (federation.weight_cap {cap:g} x the median example count): {capped}"
                )
        if measured:
            for (name, _, _), align in zip(measured, site_alignment([a for _, a, _ in measured], update, rs.layer_of)):
                sites[name].update(align)
            if ranked:
                record.update(
                    lora_product_error(
                        rs.global_state, [a for _, a, _ in measured], [r for _, _, r in measured], [weight[n] for n, _, _ in measured],
                        update, methods.lora_pairs(rs.global_state),
                    )
                )  # fmt: skip
        if dp:  # central DP: the coordinator, which saw the clipped updates, releases only their noised mean
            update = noised_mean(
                update,
                accepted,
                dp_round(rs, population)[1] * cfg.privacy.clip,
                np.random.default_rng(secrets.randbits(128)),
            )
    if bound is not None and not dp:
        record["clipped_updates"] = sum(
            1 for i in sites.values() if i.get("clipped") or i.get("clipped_by_coordinator")
        )
    if dp:
        q, sigma = dp_round(rs, population)
        rs.accountant.spend(q, sigma)
        record["privacy"] = {
            "epsilon": rs.accountant.epsilon(),
            "delta": cfg.privacy.delta,
            "noise_multiplier": sigma,
            "clip": cfg.privacy.clip,
            "sampling_rate": q,
            "noise": "distributed: each site adds its share before masking"
            if secure
            else "central: added by the coordinator",
        }
    before = rs.global_state
    rs.global_state = apply_update(rs, rnd, update)
    record["layer_change"] = change_by_layer(before, rs.global_state, rs.layer_of)
    return {
        "sites": sites,
        "rejected": rejected,
        "accepted": accepted,
        "applied": True,
        "update_norm": l2_norm(update),
        "trainable_tensors": len(trainable),
        "trainable_params": n_values,
        "update_bytes": max((s.get("bytes_sent") or 0 for s in sites.values()), default=0),
        "train_seconds": round(time.time() - t0, 3),
        **record,
    }


def apply_update(rs: RunState, rnd: int, update: dict) -> OrderedDict:
    """The server optimizer's step with the round's mean update -> the new global state, refused
    (FederationError; the global and the optimizer's moments stay at round ``rnd - 1``) when any
    value of it is not finite: clipped, finite updates can still overflow float32 over rounds."""
    opt = rs.optimizer
    saved = (opt.t, OrderedDict(opt.m), OrderedDict(opt.v))
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught just below
        new = opt.step(rs.global_state, update)
    bad = [k for k, v in new.items() if not np.isfinite(v).all()]
    if bad:
        opt.t, opt.m, opt.v = saved
        raise FederationError(
            f"round {rnd}: the new global adapter is not finite ({len(bad)} tensor(s), e.g. {bad[0]}); refused. "
            f"The global adapter stays at round {rnd - 1}; check the sites' updates (federation.update_norm_bound) and resume."
        )
    return new


SERVER_STATE = "server_state.json"
KEEP_MAX_VALUES = 16_000_000  # 64 MB a site: every adapter method; not full fine-tuning of a large model
OPTIMIZER_ARRAYS = "server_optimizer.safetensors"


def save_round(rs: RunState, rnd: int) -> None:
    """The round's checkpoint, and (adapter methods) ``adapter/``: the latest global adapter as a
    PEFT folder. Full fine-tuning writes its model folder once, at the end (:func:`save_artifacts`)."""
    state = adapters.to_tensors(rs.global_state)
    arrays = rs.optimizer.state()[1]
    info = {methods.METHOD_FILE: methods.method_info(rs.cfg)}
    save_adapter(
        rs.out / "checkpoints" / f"round-{rnd:04d}",
        state,
        rs.peft_config,
        {SERVER_STATE: rs.server_state(rnd), **info},
        {OPTIMIZER_ARRAYS: arrays} if arrays else None,
    )
    save_global_adapter(rs, "adapter")


def save_global_adapter(rs: RunState, folder: str) -> None:
    """``rs.out/folder``: the global adapter as a PEFT folder, with the method record beside it
    (adapter methods; full fine-tuning has no adapter folder)."""
    if rs.peft_config is not None:
        info = {methods.METHOD_FILE: methods.method_info(rs.cfg)}
        save_adapter(rs.out / folder, adapters.to_tensors(rs.global_state), rs.peft_config, info)


def general_knowledge(cfg: FedTuneConfig, state: OrderedDict | None) -> dict:
    """The model with ``state`` (the method's tensors; None: the base model alone, as the sites
    load it, in 4 bits for qlora) on the general-knowledge set (:mod:`fedtune.common.forgetting`)."""
    from fedtune.common.forgetting import general_knowledge as score
    from fedtune.common.modeling import load_base_model

    device = None if cfg.model.device == "auto" else cfg.model.device
    if state is None:
        model, tokenizer, device = load_base_model(
            cfg.model, device, four_bit=cfg.peft if cfg.peft.method == "qlora" else None
        )
    else:
        model, tokenizer, device = methods.load_model(cfg, device)
        methods.set_state(model, adapters.to_tensors(state))
    try:
        return score(model, tokenizer, device, max_length=cfg.data.max_length)
    finally:
        del model


def measure_forgetting(rs: RunState, which: str, state: OrderedDict | None, say: Printer) -> None:
    t = time.time()
    rs.forgetting[which] = general_knowledge(rs.cfg, state)
    f = rs.forgetting[which]
    say(
        f"general knowledge ({'the base model' if which == 'base' else 'the final adapter'}): text loss {f['text_loss']:.3f}, "
        f"question loss {f['qa_loss']:.3f}, questions answered {f['qa_accuracy']:.2f} ({time.time() - t:.0f} s)"
    )
    if "base" in rs.forgetting and "final" in rs.forgetting:
        base, final = rs.forgetting["base"], rs.forgetting["final"]
        rs.forgetting["change"] = {k: final[k] - base[k] for k in base}


def keep_best(rs: RunState, rnd: int, say: Printer) -> int:
    """After round ``rnd``'s evaluation: when it is the best so far, save its adapter as ``best/``
    (adapter methods; full fine-tuning keeps every round in ``checkpoints/``). -> rounds since the best."""
    best = rs.best()
    if best is None:
        return 0
    if best["round"] == rnd:
        save_global_adapter(rs, "best")
        if rnd > 0:
            say(f"round {rnd} is the best so far ({best['metric']} {best['value']:.4f})")
    return best["rounds_since"]


def save_artifacts(rs: RunState, say: Printer) -> None:
    """After the last round: full fine-tuning's Hugging Face model folder ``model/``; with
    output.merged, a LoRA-family adapter folded into its base as ``merged/``."""
    if rs.peft_config is None:
        path = methods.export_full(rs.cfg, adapters.to_tensors(rs.global_state), rs.out / "model")
        say(f"model: {path} (a Hugging Face model folder: AutoModelForCausalLM.from_pretrained)")
    if rs.cfg.output.merged:
        path = methods.export_merged(rs.cfg.model, rs.out / "adapter", rs.out / "merged")
        say(f"merged: {path} (the adapter folded into the base: a plain Hugging Face model folder)")


def prune_checkpoints(rs: RunState, say: Printer) -> None:
    """After a round is recorded: delete the round checkpoints that output.keep_checkpoints does
    not keep. Kept: the last ``keep`` rounds' (the newest is the resume point) and the best
    round's. Each goes by an atomic rename to ``.pruned-round-NNNN`` first, then is deleted, so a
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
    path = out / "metrics.json"
    try:
        doc = json.loads(path.read_text())
        rounds = list(doc["rounds"])
        recorded = sorted({int(r["round"]) for r in rounds}, reverse=True)
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


def resume_accountant(rs: RunState, say: Printer) -> None:
    """After a resume: the accountant is the checkpoint's or the ledger's, whichever has spent
    more. The ledger is ahead when the coordinator stopped after a round's release (its charge
    is on the ledger) but before that round's record: the round reruns, and is charged again."""
    ledger = privacy.ledger_accountant(rs.out / privacy.LEDGER, rs.cfg.privacy.delta)
    if ledger is not None and ledger.epsilon() > rs.accountant.epsilon():
        say(
            f"privacy ledger: {ledger.rounds} round(s) charged, the checkpoint's accountant {rs.accountant.rounds}: continuing from "
            f"the ledger (epsilon {ledger.epsilon():.3f}, not {rs.accountant.epsilon():.3f}); a round released before the stop stays charged"
        )
        rs.accountant = ledger


def run_federation(
    grid: Grid, cfg: FedTuneConfig, out: Path, say: Printer = print, resume: bool = False, site_keys=None
) -> RunState:
    """``site_keys``: the registered sites' identity keys (SEC1 P-384 bytes) that secure
    aggregation publishes to the sites; None: the keys the sites present."""
    out.mkdir(parents=True, exist_ok=True)
    say("preparing the initial adapter ...")
    init = initial_adapter(cfg)
    state, peft_config = init.state, init.peft_config
    rs = RunState(
        cfg=cfg,
        out=out,
        global_state=state,
        peft_config=peft_config,
        trainable_params=int(sum(state[k].size for k in init.trainable_keys)),
        trainable_keys=init.trainable_keys,
        n_layers=init.n_layers,
        rng=np.random.default_rng(cfg.train.seed),
        optimizer=ServerOptimizer.from_config(cfg.federation),
        accountant=privacy.Accountant(cfg.privacy.delta) if cfg.privacy.enabled else None,
        site_keys=site_keys,
    )
    if cfg.output.tensorboard:
        from .events import EventWriter

        try:
            rs.events = EventWriter(out)
        except RuntimeError as e:
            raise FederationError(str(e)) from None
    check_free_space(rs, resume)
    what = "weights (full fine-tuning)" if peft_config is None else "adapter"
    say(
        f"{cfg.peft.method} {what}: {rs.trainable_params:,} trainable parameters ({rs.trainable_params * 4 / 1e6:.1f} MB as float32)"
    )
    first = 1
    if resume:
        rp = resume_point(out, say, spec_of(state), peft=peft_config is not None)
        rs.global_state, rs.rounds, rs.started = rp.state, rp.rounds, time.time() - rp.elapsed
        if rp.server_state is not None:
            try:
                rs.restore_server_state(rp.server_state, rp.optimizer_arrays)
            except ValueError as e:
                raise FederationError(f"{out}: cannot resume round {rp.round}'s server state: {e}") from None
        if rs.accountant is not None:
            resume_accountant(rs, say)
        first = rp.round + 1
        save_global_adapter(rs, "adapter")
        say(f"resuming after round {rp.round} (verified checkpoint); rounds {first}..{cfg.federation.rounds} to go")
    else:
        if rs.accountant is not None:
            privacy.ledger_start(out / privacy.LEDGER, cfg.privacy.delta)
        save_round(rs, 0)
    fed = cfg.federation
    minimum = fewest_sites(cfg)
    wanted = max(fed.expected_sites or max(fed.min_sites, len(fed.sites)), minimum)
    nodes = wait_for_sites(grid, wanted, minimum, fed.join_timeout_s, say)
    say(f"{len(nodes)} site(s) connected")
    if cfg.eval.forgetting:
        measure_forgetting(rs, "base", None, say)
    if not resume:
        say("round 0 evaluates the base model")
        t = time.time()
        ev = run_evaluation(grid, nodes, rs, 0, say)
        rs.rounds.append({"round": 0, **ev, "seconds": round(time.time() - t, 3)})
        keep_best(rs, 0, say)
        if rs.events is not None:
            rs.events.round(rs.rounds[-1])
        atomic_write_json(out / "metrics.json", rs.metrics_doc())
    if rs.accountant is not None:
        q, sigma = dp_round(rs, len(nodes))
        say(
            f"differential privacy: clip {cfg.privacy.clip:g}, noise multiplier {sigma:.3f}, sampling rate {q:.3g}; "
            f"budget epsilon {cfg.privacy.epsilon:g} at delta {cfg.privacy.delta:g}; spent so far {rs.accountant.epsilon():.3f}"
        )
    rs.first_round, rs.first_round_at = first, time.time()
    for rnd in range(first, fed.rounds + 1):
        t = time.time()
        train_nodes, nodes = sites_for_round(grid, rs, say)
        if rs.accountant is not None:
            q, sigma = dp_round(rs, len(nodes))
            after = rs.accountant.epsilon(then=(q, sigma))
            if after > cfg.privacy.epsilon * (1 + 1e-9):
                rs.stopped = (
                    f"privacy budget: round {rnd} would bring epsilon to {after:.3f}, above privacy.epsilon {cfg.privacy.epsilon:g}; "
                    f"stopped after round {rnd - 1} at epsilon {rs.accountant.epsilon():.3f}"
                )
                say(f"stopping: {rs.stopped}")
                break
            if len(train_nodes) < fewest_sites(cfg):  # a Poisson draw too small to aggregate: nothing released
                rs.accountant.spend(q, sigma)  # charged all the same (conservative)
                say(
                    f"round {rnd}: only {len(train_nodes)} site(s) drawn (sampling rate {q:.3g}); skipped, epsilon now {rs.accountant.epsilon():.3f}"
                )
                rs.rounds.append(
                    {
                        "round": rnd,
                        "skipped": "too few sites drawn",
                        "privacy": {"epsilon": rs.accountant.epsilon()},
                        "sites": {},
                        "aggregate": rs.rounds[-1].get("aggregate", {}),
                    }
                )
                privacy.ledger_charge(
                    out / privacy.LEDGER, rnd, q, sigma, rs.rounds[-1]["privacy"]["epsilon"], released=False
                )
                save_round(rs, rnd)
                atomic_write_json(out / "metrics.json", rs.metrics_doc())
                prune_checkpoints(rs, say)
                continue
        tr = run_training_round(grid, train_nodes, rs, rnd, say, population=len(nodes))
        if "privacy" in tr:
            # The release: the noised adapter is written (adapter/, the checkpoint) and sent for evaluation
            # next. Its charge is on disk first, so no crash from here on can lose it (resume_accountant).
            p = tr["privacy"]
            privacy.ledger_charge(
                out / privacy.LEDGER, rnd, p["sampling_rate"], p["noise_multiplier"], p["epsilon"], released=True
            )
            say(
                f"round {rnd} privacy | epsilon {p['epsilon']:.3f} of {cfg.privacy.epsilon:g} spent (delta {cfg.privacy.delta:g})"
            )
        save_round(rs, rnd)
        ev = run_evaluation(grid, nodes, rs, rnd, say)
        sites = tr.pop("sites")
        for name, e in ev["sites"].items():
            entry = sites.setdefault(name, {})
            entry.update({k: v for k, v in e.items() if k != "status"})
            if e.get("status") not in (None, "ok"):  # why this site has no evaluation this round
                entry["eval_status"] = e["status"]
        rs.rounds.append(
            {"round": rnd, "sites": sites, "aggregate": ev["aggregate"], **tr, "seconds": round(time.time() - t, 3)}
        )
        since = keep_best(rs, rnd, say)
        if rs.events is not None:
            rs.events.round(rs.rounds[-1])
        patience = cfg.eval.patience
        if patience is not None and since >= patience and rnd < fed.rounds:
            best = rs.best()
            rs.stopped = (
                f"early stopping: the federated {best['metric']} has not improved for {since} round(s) since round {best['round']} "
                f"({best['value']:.4f}; eval.patience {patience}); stopped after round {rnd}"
            )
        atomic_write_json(out / "metrics.json", rs.metrics_doc())
        prune_checkpoints(rs, say)
        eta = (time.time() - t) * (fed.rounds - rnd)
        say(
            f"round {rnd}/{fed.rounds} done in {time.time() - t:.0f} s; checkpoint {out / 'checkpoints' / f'round-{rnd:04d}'}; ETA {progress.duration(eta)}"
        )
        if rs.stopped:
            say(f"stopping: {rs.stopped}")
            break
    if cfg.eval.forgetting:
        measure_forgetting(rs, "final", rs.global_state, say)
    atomic_write_json(out / "metrics.json", rs.metrics_doc())  # with the elapsed time and, if it stopped early, why
    if rs.events is not None:
        rs.events.close()
    save_artifacts(rs, say)
    write_report(out, rs.metrics_doc(), plots=cfg.output.plots)
    say(f"report: {out / 'report.md'}")
    return rs


def make_server_app(
    cfg: FedTuneConfig,
    out: Path,
    say: Printer = print,
    result: list | None = None,
    resume: bool = False,
    site_keys=None,
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            rs = run_federation(grid, cfg, out, say, resume=resume, site_keys=site_keys)
        except FederationError as e:
            say(f"FAILED: {e}")
            if result is not None:
                result.append(e)
            return
        if result is not None:
            result.append(rs)

    return app
