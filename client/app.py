"""The site: a Flower ClientApp (Message API) that trains and evaluates the global adapter.

What a site needs to know arrives two ways:
- from the coordinator, in each message (:mod:`fedtune.common.messages`: TrainTask, EvalTask,
  the secure stages' requests, read and checked there): the global adapter and the run's
  configuration (stripped of every site's paths) plus the round number. Everything that must
  be the same at every site (model, adapter, hyper-parameters) comes from there, so sites
  cannot drift apart; what a site takes of it is bounded by its own policy
  (:mod:`fedtune.client.policy`: plaintext, DP, model, paths), checked before anything loads
  or trains. A task that is not the message it should be is refused with the reason;
- locally, never sent: which files hold this site's data, its Flower node config
  (:class:`fedtune.common.messages.NodeConfig`). In deployment ftclient sets ``data-path``
  (and ``eval-data-path``, ``site-name``, ``lora-rank``, ``verbose``); in ftsim each virtual
  site's ``partition-id`` indexes the site table given to :func:`make_client_app`.

The base model and tokenizer are cached per process (``_RUNTIME``): in ftsim a Ray worker
lives for the whole run and serves many virtual sites, so it loads the model once and
memory does not grow with the number of sites; in deployment ftclient's resident executor
(:mod:`fedtune.client.worker`) is that process. Tokenized site data is cached per process too.

Only counts and metrics leave the site; data problems are logged locally and reported
upstream as counts and a category.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import Context, Message, MessageType
from flwr.clientapp import ClientApp

from fedtune.common import adapters, messages, methods, privacy
from fedtune.common.config import FedTuneConfig
from fedtune.common.data import DataError, Example, load_site_data, split_examples, tokenize_all
from fedtune.common.evaluation import answer_nll, evaluate_examples
from fedtune.common.messages import (
    EvalMetrics,
    EvalReply,
    EvalTask,
    MessageError,
    NodeConfig,
    RoundConfig,
    SiteStatus,
    StageReply,
    StageTask,
    TrainMetrics,
    TrainReply,
    TrainTask,
)
from fedtune.common.metrics import mean_loss
from fedtune.common.secagg import SecAggError, load_identity

from . import personal, secure
from . import policy as site_policy
from .policy import SitePolicy, SiteRefusal
from .trainer import TrainStats, train_round

log = logging.getLogger("fedtune.client")


@dataclass(frozen=True)
class SiteFiles:
    name: str
    train: str
    eval: str | None = None
    rank: int | None = None  # this site's LoRA rank when below the run's (mixed ranks)
    # federation.personalization: where this site keeps its private part (ftsim: OUT/sites/NAME). Never sent.
    state_dir: str | None = None
    # Secure aggregation: this site's signing key (PEM; ftsim makes one per virtual site). Never sent.
    key: bytes | None = field(default=None, repr=False, compare=False)


@dataclass
class Runtime:
    model: object  # PeftModel
    tokenizer: object
    device: object
    key: tuple
    base: dict | None = None  # train.anchor_mu: the trainable-capable weights as the base model has them


@dataclass
class SiteState:
    n_records: int
    n_invalid: int
    train_items: list
    dropped_too_long: int
    eval_examples: list[Example]
    problem: str | None = None  # a category only; details stay in the site's log


_RUNTIME: Runtime | None = None
_SITE_CACHE: dict[tuple, SiteState] = {}


def runtime(cfg: FedTuneConfig, device: str | None = None) -> Runtime:
    """The process's base model + adapter, loaded once and reused for every task."""
    global _RUNTIME
    anchored = cfg.train.anchor_mu > 0
    key = (
        cfg.model.model_dump_json(),
        cfg.peft.model_dump_json(),
        cfg.layers.model_dump_json(),
        cfg.train.seed,
        device,
        anchored,
    )
    if _RUNTIME is None or _RUNTIME.key != key:
        _RUNTIME = None  # drop the old model before loading another
        model, tokenizer, dev = methods.load_model(cfg, device)
        # The freshly built model is the base model plus the method's initial (for LoRA: zero-effect) weights.
        base = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} if anchored else None
        _RUNTIME = Runtime(model=model, tokenizer=tokenizer, device=dev, key=key, base=base)
    return _RUNTIME


def _file_key(path: str | None) -> tuple:
    if path is None:
        return (None,)
    try:
        st = os.stat(path)
        return (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    except OSError:
        return (path,)


def site_seed(cfg: FedTuneConfig, name: str) -> int:
    return (cfg.train.seed * 1_000_003 + zlib.crc32(name.encode())) % (2**32)


def site_state(site: SiteFiles, cfg: FedTuneConfig, rt: Runtime) -> SiteState:
    key = (_file_key(site.train), _file_key(site.eval), cfg.data.model_dump_json(), cfg.train.seed, rt.key)
    if key in _SITE_CACHE:
        return _SITE_CACHE[key]
    try:
        data = load_site_data(site.train, cfg.data)
        train_ex, eval_ex = data.examples, []
        if site.eval:
            eval_ex = load_site_data(site.eval, cfg.data).examples
        else:
            train_ex, eval_ex = split_examples(train_ex, cfg.data.eval_fraction, site_seed(cfg, site.name))
        tok = tokenize_all(train_ex, rt.tokenizer, cfg.data)
        state = SiteState(data.records_read, data.n_invalid, tok.items, tok.dropped_too_long, eval_ex)
        if data.invalid:
            log.warning("site %s: skipped %d of %d records as unusable", site.name, data.n_invalid, data.records_read)
    except DataError as e:
        # Full detail (file, line, field) stays in this site's log; upstream gets a category.
        print(f"[fedtune site {site.name}] data error: {e}", file=sys.stderr, flush=True)
        state = SiteState(0, 0, [], 0, [], problem="data-error")
    if not state.problem and not state.train_items:
        state.problem = "no-usable-examples"
    _SITE_CACHE[key] = state
    return state


def node_settings(context: Context) -> NodeConfig:
    """This site's own settings (its Flower node config); MessageError names a key it does not know."""
    return NodeConfig.from_record(context.node_config)


def resolve_site(context: Context, sites: list[SiteFiles] | None) -> SiteFiles:
    nc = node_settings(context)
    if nc.data_path is not None:
        name = nc.site_name or f"site-{context.node_id}"
        return SiteFiles(name, nc.data_path, nc.eval_data_path, nc.lora_rank, state_dir=nc.state_dir)
    if sites is not None and nc.partition_id is not None:
        pid = nc.partition_id
        if not 0 <= pid < len(sites):
            raise ValueError(f"partition-id {pid} has no site (there are {len(sites)})")
        return sites[pid]
    raise ValueError("this node has no data: set node_config data-path (ftclient --data FILE)")


def site_model(
    cfg: FedTuneConfig, site: SiteFiles, global_state: dict, device: str | None, policy: SitePolicy | None = None
) -> tuple[Runtime, SiteState, dict]:
    """This site's runtime (its own LoRA rank, when it has one), its data, and the global adapter
    as this site holds it (cut to its rank: HetLoRA). ``policy`` (default: the process's, see
    :mod:`fedtune.client.policy`) checks the model and every path before anything loads:
    SiteRefusal (defined there) when the site will not take the run's model."""
    policy = policy or site_policy.active()
    cfg = policy.admit(cfg)
    problem = methods.site_rank_problem(cfg, site.rank)
    if problem:
        raise SiteRefusal(problem)
    own = methods.site_config(cfg, site.rank)
    policy.check_weights(own)  # provisioned (in the site's own cache), not yet loaded
    rt = runtime(own, device)
    st = site_state(site, own, rt)
    return rt, st, (global_state if own is cfg else methods.truncate_rank(global_state, site.rank, cfg.peft.method))


def train_local(
    cfg: FedTuneConfig,
    rt: Runtime,
    items: list,
    seed: int,
    server_round: int,
    *,
    progress=None,
    proximal_mu: float = 0.0,
    steps: int | None = None,
    validation: list[Example] | None = None,
) -> TrainStats:
    """One round of a site's local training, exactly as a site runs it in the federation (the
    run's schedule, discriminative learning rates, the base-model anchor, local early stopping).
    ftsim's baselines call it too, so a site alone and the pooled data train the same way.
    ``steps``: this many optimizer steps instead of the run's train.local_steps / local_epochs.
    ``validation``: the examples local early stopping (train.local_patience) checks the loss on,
    the first eval.max_examples of them, as the site's evaluation does; none usable: every step runs."""
    train_cfg = (
        cfg.train if steps is None else cfg.train.model_copy(update={"local_steps": steps, "local_epochs": None})
    )
    return train_round(
        rt.model,
        items,
        rt.tokenizer.pad_token_id,
        train_cfg,
        rt.device,
        server_round=server_round,
        total_rounds=cfg.federation.rounds,
        seed=seed,
        progress=progress,
        lr_groups=methods.lr_scales(rt.model, cfg.layers),
        proximal_mu=proximal_mu,
        base_anchor=(cfg.train.anchor_mu, [rt.base[n] for n, p in rt.model.named_parameters() if p.requires_grad])
        if rt.base
        else None,
        validate=_validator(cfg, rt, validation),
    )


def _validator(cfg: FedTuneConfig, rt: Runtime, validation: list[Example] | None) -> Callable[[], float] | None:
    """The local validation loss for train.local_patience, or None: not configured, or no usable example."""
    if cfg.train.local_patience is None or not validation:
        return None
    # Tokenized once per round, not per check; loss only (generation would cost far more than the steps).
    items = tokenize_all(validation[: cfg.eval.max_examples], rt.tokenizer, cfg.data).items
    if not items:
        return None

    def validate() -> float:
        total, count, _ = answer_nll(rt.model, items, rt.tokenizer.pad_token_id, rt.device, cfg.eval.batch_size)
        return mean_loss(total, count)

    return validate


def local_stopping_metrics(stats: TrainStats) -> dict:
    """What a site reports of its local early stopping (:class:`TrainMetrics` fields): steps and losses only."""
    out = {"planned_steps": stats.planned_steps}
    if stats.val_losses:
        out.update(
            {"local_val_start": stats.val_start, "local_val_best": stats.val_best, "local_best_step": stats.best_step}
        )
    if stats.stopped_at is not None:
        out["local_stopped_at"] = stats.stopped_at
    return out


def _say_local_stopping(site: SiteFiles, server_round: int, stats: TrainStats) -> None:
    if not stats.val_losses:
        _say(
            site,
            f"round {server_round}: local early stopping is configured, but this site has no usable validation examples: trained all {stats.steps} steps",
        )
    elif stats.stopped_at is not None:
        _say(
            site,
            f"round {server_round}: stopped early at step {stats.stopped_at} of {stats.planned_steps} "
            f"(validation loss {stats.val_best:.3f} at step {stats.best_step} kept)",
        )
    elif stats.best_step != stats.steps:
        _say(
            site,
            f"round {server_round}: kept step {stats.best_step} of {stats.steps} (validation loss {stats.val_best:.3f})",
        )


def _status(site: SiteFiles, status: str, reason: str | None = None) -> SiteStatus:
    """``reason``: why the site refused (a protocol reason, never data), cut to what a reply may carry."""
    if reason and len(reason) > messages.MAX_REASON_CHARS:
        reason = reason[: messages.MAX_REASON_CHARS - 1] + "…"
    return SiteStatus(site.name[: messages.MAX_NAME_CHARS], status, reason or None)


def _reply(msg: Message, reply: TrainReply | EvalReply | StageReply) -> Message:
    return Message(content=reply.to_record(), reply_to=msg)


def _stage_reply(site: SiteFiles, kind: str, record) -> StageReply:
    """A secure stage's answer (the record client/secure.py built) in its typed envelope."""
    return StageReply(_status(site, "ok"), messages.STAGE_MESSAGES[kind][1].from_record(record))


def _refuse_train(msg: Message, site: SiteFiles, reason: str, metrics: TrainMetrics | None = None) -> Message:
    return _reply(msg, TrainReply(_status(site, "refused", reason), metrics or TrainMetrics(num_examples=0)))


def _say(site: SiteFiles, text: str) -> None:
    """Site-local progress (this site's own console/log; never sent): counts and losses only."""
    print(f"[{time.strftime('%H:%M:%S')}] site {site.name}: {text}", file=sys.stderr, flush=True)


def data_counts(st: SiteState) -> dict:
    """A site's data counts (:class:`TrainMetrics` fields), which every reply past loading its data carries."""
    return {"records": st.n_records, "invalid_records": st.n_invalid, "dropped_too_long": st.dropped_too_long}


class _Refused(Exception):
    """:func:`handle_train` ends early: the site refuses the round with ``reason`` (and the
    counts in ``metrics``); ``forget``: it also drops its part in a secure round."""

    def __init__(self, reason: str, metrics: TrainMetrics | None = None, forget: bool = False):
        super().__init__(reason)
        self.reason, self.metrics, self.forget = reason, metrics, forget


@dataclass
class _TrainRound:
    """One TRAIN task as this site runs it (what :func:`handle_train`'s steps share)."""

    task: TrainTask
    site: SiteFiles
    cfg: FedTuneConfig  # the run's config as the site's policy admitted it
    population: int  # the sites the DP noise is sized for (0: no DP)
    rt: Runtime
    st: SiteState
    full_global: dict  # the global adapter at the run's rank
    global_state: dict  # ... as this site holds it (cut to its rank: HetLoRA)
    verbose: bool  # a real site (ftclient) prints its progress; ftsim prints per round at the coordinator

    @property
    def secure(self) -> messages.SecureTrainRequest | None:
        return self.task.secure

    @property
    def refused(self) -> TrainMetrics:
        """The metrics of a refusal once the data is loaded: its counts, no examples trained."""
        return TrainMetrics(num_examples=0, **data_counts(self.st))


def _read_train_task(msg: Message, site: SiteFiles) -> TrainTask:
    try:
        return TrainTask.from_record(msg.content)
    except MessageError as e:  # not a train task: nothing loads, nothing trains
        _say(site, f"refused a malformed train task: {e}")
        raise _Refused(str(e), forget=messages.SECAGG in msg.content) from None


def _admit_round(
    task: TrainTask, site: SiteFiles, device: str | None, policy: SitePolicy, verbose: bool
) -> _TrainRound:
    """The site's policy on the round (plaintext, DP, model, paths), then its model and data."""
    cfg, full_global = task.config, adapters.to_tensors(task.adapter)
    population = (task.round.dp_population or 0) if cfg.privacy.enabled else 0
    try:
        policy.check_round(cfg, secure=task.secure is not None, population=population)
        cfg = policy.admit(cfg)
        rt, st, global_state = site_model(cfg, site, full_global, device, policy)
    except SiteRefusal as e:
        _say(site, f"round {task.server_round}: refused: {e}")
        raise _Refused(str(e), forget=task.secure is not None) from None
    return _TrainRound(task, site, cfg, population, rt, st, full_global, global_state, verbose)


def _prepare_model(context: Context, r: _TrainRound) -> None:
    """Before spending the round training: a secure round to mask for, the global adapter
    loaded, the coordinator's trainable set, and (DP) a population to size the noise for."""
    if r.secure is not None:
        try:
            secure.ready_to_train(context, r.secure)
        except SecAggError as e:
            raise _Refused(str(e), r.refused) from None
    methods.set_state(r.rt.model, r.global_state)
    try:
        methods.set_trainable(r.rt.model, r.task.trainable)
    except (KeyError, ValueError) as e:  # the coordinator and this site disagree on what trains
        raise _Refused(f"trainable set: {e}", r.refused, forget=r.secure is not None) from None
    if r.cfg.privacy.enabled and r.population < 1:  # the noise cannot be sized
        why = "differential privacy: the round names no site population"
        raise _Refused(why, r.refused, forget=r.secure is not None)


def _train(r: _TrainRound) -> TrainStats:
    """The round's local training (progress printed on a verbose site)."""
    site, server_round, cfg = r.site, r.task.server_round, r.cfg
    if r.verbose:
        _say(site, f"round {server_round}: training on {len(r.st.train_items)} examples")

    def progress(step: int, n: int, loss: float) -> None:
        if step == n or step % max(1, n // 4) == 0:
            _say(site, f"round {server_round}: step {step}/{n} loss {loss:.3f}")

    stats = train_local(
        cfg,
        r.rt,
        r.st.train_items,
        site_seed(cfg, site.name),
        server_round,
        progress=progress if r.verbose else None,
        proximal_mu=cfg.federation.proximal_mu if cfg.federation.strategy == "fedprox" else 0.0,
        validation=r.st.eval_examples,
    )
    if cfg.train.local_patience is not None and r.verbose:
        _say_local_stopping(site, server_round, stats)
    return stats


def _release(r: _TrainRound) -> tuple[dict, dict]:
    """The trained update (local - global over the trainable set) as it may leave the site
    (clipped, DP noise under secure aggregation) -> (update, its norm metrics)."""
    trainable = r.task.trainable
    local = methods.get_state(r.rt.model)
    delta = adapters.delta({k: local[k] for k in trainable}, {k: r.global_state[k] for k in trainable})
    try:
        return privacy.site_release(r.cfg, delta, secure=r.secure is not None, n_sites=r.population)
    except privacy.NonFiniteUpdate as e:  # a diverged model: refuse the round, never send zeros or NaN
        if r.verbose:
            _say(r.site, str(e))
        raise _Refused(str(e), r.refused, forget=r.secure is not None) from None


def _metric_fields(reported: dict) -> dict:
    """Metrics privacy.site_release and secure.masked_input report under their wire keys
    ('update-norm'), as :class:`TrainMetrics` fields ('update_norm')."""
    return {k.replace("-", "_"): v for k, v in reported.items()}


def train_metrics(
    site: SiteFiles,
    st: SiteState,
    stats: TrainStats,
    released: dict,
    *,
    received: float,
    arrived: float,
    local_stopping: bool,
) -> TrainMetrics:
    """What a site reports of a round it trained: its data counts, the training's losses, steps,
    time and tokens, the download (``arrived`` -> ``received``) and the start-up (``received`` ->
    the first step), its rank, the update's norm (``released``: privacy.site_release's) and, with
    ``local_stopping``, :func:`local_stopping_metrics`."""
    return TrainMetrics(
        num_examples=len(st.train_items),
        train_loss=stats.loss_mean,
        train_loss_first=stats.loss_first,
        train_loss_last=stats.loss_last,
        train_steps=stats.steps,
        train_seconds=stats.seconds,
        train_tokens=stats.tokens,
        receive_seconds=received - arrived,
        startup_seconds=stats.first_step_at - received,
        lora_rank=site.rank,
        **data_counts(st),
        **_metric_fields(released),  # the update's norm and whether it was clipped
        **(local_stopping_metrics(stats) if local_stopping else {}),
    )


def _mask(context: Context, r: _TrainRound, delta: dict, metrics: TrainMetrics) -> tuple[object, TrainMetrics]:
    """Secure round: the update goes straight from training to masking; only the masked vector
    leaves. -> (the masked vector, the metrics with the masking's)."""
    cfg, site = r.cfg, r.site
    try:
        reference = {k: r.full_global[k] for k in r.task.trainable}
        flat = secure.flatten_update(
            methods.pad_rank(delta, {k: v.shape for k, v in reference.items()}, cfg.peft.method), reference
        )
        # Under DP and federation.weighting "equal" every site weighs the same; else its
        # example count, which masked_input caps at the round's weight cap.
        weight = 1 if cfg.privacy.enabled or cfg.federation.weighting == "equal" else len(r.st.train_items)
        y, extra = secure.masked_input(context, r.secure, flat, weight, site_seed(cfg, site.name) + r.task.server_round)
    except SecAggError as e:  # a site that refuses is out of this round
        if r.verbose:
            _say(site, f"secure aggregation: {e}")
        raise _Refused(str(e), metrics, forget=True) from None
    return y, dataclasses.replace(metrics, **_metric_fields(extra))


def handle_train(
    msg: Message,
    context: Context,
    sites: list[SiteFiles] | None,
    device: str | None = None,
    arrived: float | None = None,
    received: float | None = None,
    policy: SitePolicy | None = None,
) -> Message:
    """``arrived``: when the site learnt of the task; ``received``: when its message (the global
    adapter) was in memory. The reply reports ``receive-seconds`` (arrived -> received: the
    download) and ``startup-seconds`` (received -> first training step: what a resident model
    keeps small). ``policy``: the site's own rules (plaintext, DP, model, paths), checked before
    anything loads or trains (default: the process's, :func:`fedtune.client.policy.active`)."""
    received = time.time() if received is None else received
    arrived = received if arrived is None else arrived
    site = resolve_site(context, sites)
    verbose = node_settings(context).verbose
    try:
        task = _read_train_task(msg, site)
        r = _admit_round(task, site, device, policy or site_policy.active(), verbose)
        if r.st.problem:  # a site with nothing usable never sends an update
            return _reply(msg, TrainReply(_status(site, r.st.problem), r.refused))
        _prepare_model(context, r)
        stats = _train(r)
        delta, released = _release(r)
        stopping = r.cfg.train.local_patience is not None
        metrics = train_metrics(
            site, r.st, stats, released, received=received, arrived=arrived, local_stopping=stopping
        )
        if r.secure is None:  # upload-bytes: the arrays' bytes
            return _reply(msg, TrainReply(_status(site, "ok"), metrics, update=delta))
        y, metrics = _mask(context, r, delta, metrics)
        return _reply(msg, TrainReply(_status(site, "ok"), metrics, masked=y))  # upload-bytes: 4 a value
    except _Refused as e:
        if e.forget:
            secure.forget(context)
        return _refuse_train(msg, site, e.reason, e.metrics)


def _example_count(round_config: RoundConfig | None, site: SiteFiles, device: str | None) -> int | None:
    """What a site reports at key advertisement: its example count when the run weights sites by
    examples (and has no DP), else None (also when the task carries no round config). SiteRefusal
    when it has nothing to train on."""
    if round_config is None:
        return None
    cfg = round_config.config
    if cfg.privacy.enabled or cfg.federation.weighting == "equal":
        return None
    _, st, _ = site_model(cfg, site, {}, device)  # the data as training will see it (cached)
    if st.problem:
        raise SiteRefusal(st.problem)
    return len(st.train_items)


def _stage_task(msg: Message, kind: str) -> StageTask:
    """The stage's task read by its class (records, keys, types, sizes); SecAggError naming the key when it is not one."""
    try:
        return StageTask.from_record(msg.content, kind)
    except MessageError as e:
        raise SecAggError(f"{e}: refused") from None


def handle_secure_stage(
    msg: Message,
    context: Context,
    sites: list[SiteFiles] | None,
    device: str | None = None,
    identity: secure.Identity | None = None,
) -> Message:
    """The stages of a secure round around training (key advertisement, key sharing, the
    consistency check, unmasking). The masked upload is the TRAIN reply (:func:`handle_train`).
    ``identity``: the site's signing key (ftclient's site key); else the site table's (ftsim),
    else one made for the run. Whether the task is for this site's round and its next stage is
    checked first (:func:`fedtune.client.secure.check_order`), then the task is read (keys, types,
    sizes) by its class in :mod:`fedtune.common.messages`; the protocol's checks are
    :mod:`fedtune.client.secure`'s."""
    site = resolve_site(context, sites)
    if identity is None and site.key is not None:
        identity = secure.Identity(load_identity(site.key))
    kind = msg.metadata.message_type
    if kind not in messages.STAGES:
        raise ValueError(f"this site does not handle {kind!r} messages")
    try:
        secure.check_order(context, kind, msg.content)
        task = _stage_task(msg, kind)
        if kind == messages.ADVERTISE:
            try:
                examples = _example_count(task.round, site, device)
            except SiteRefusal as e:
                secure.forget(context)
                return _reply(msg, StageReply(_status(site, "refused", str(e))))
            return _reply(msg, _stage_reply(site, kind, secure.advertise(context, task.request, identity, examples)))
        if kind == messages.SHARE_KEYS:
            return _reply(msg, _stage_reply(site, kind, secure.share_keys(context, task.request, identity)))
        if kind == messages.CONSISTENCY:
            return _reply(msg, _stage_reply(site, kind, secure.consistency(context, task.request, identity)))
        return _reply(msg, _stage_reply(site, kind, secure.unmask(context, task.request)))
    except SecAggError as e:  # the site has forgotten the round
        secure.forget(context)
        if node_settings(context).verbose:
            _say(site, f"secure aggregation: {e}")
        return _reply(msg, StageReply(_status(site, "refused", str(e))))


def handle_evaluate(
    msg: Message,
    context: Context,
    sites: list[SiteFiles] | None,
    device: str | None = None,
    policy: SitePolicy | None = None,
) -> Message:
    """No update leaves on evaluation, but the model and path checks of ``policy`` apply as in training."""
    site = resolve_site(context, sites)
    try:
        task = EvalTask.from_record(msg.content)
    except MessageError as e:
        _say(site, f"refused a malformed evaluation task: {e}")
        return _reply(msg, EvalReply(_status(site, "refused", str(e)), EvalMetrics(num_examples=0)))
    cfg = task.config
    policy = policy or site_policy.active()
    try:
        cfg = policy.admit(cfg)
        # a lower-rank site scores the adapter at its rank
        rt, st, global_state = site_model(cfg, site, adapters.to_tensors(task.adapter), device, policy)
    except SiteRefusal as e:
        _say(site, f"evaluation refused: {e}")
        return _reply(msg, EvalReply(_status(site, "refused", str(e)), EvalMetrics(num_examples=0)))
    if st.problem or not st.eval_examples:
        return _reply(msg, EvalReply(_status(site, st.problem or "no-eval-examples"), EvalMetrics(num_examples=0)))
    methods.set_state(rt.model, global_state)
    verbose = node_settings(context).verbose
    if verbose:
        _say(site, f"round {task.server_round}: evaluating on {len(st.eval_examples)} examples")
    res = evaluate_examples(rt.model, rt.tokenizer, st.eval_examples, cfg.data, cfg.eval, rt.device)
    metrics = EvalMetrics(
        num_examples=res.examples, eval_loss=res.loss, answer_tokens=res.answer_tokens, exact_match=res.exact_match
    )
    if verbose:
        _say(site, f"evaluation: {_scores(res)}")
    if cfg.federation.personalization != "none" and task.server_round >= 1:
        metrics = _personalize(cfg, rt, st, site, global_state, task.server_round, metrics, verbose)
    return _reply(msg, EvalReply(_status(site, "ok"), metrics))


def _scores(res) -> str:
    return f"loss {res.loss:.3f}" + (f", exact match {res.exact_match:.2f}" if res.exact_match is not None else "")


def _personalize(
    cfg: FedTuneConfig, rt: Runtime, st: SiteState, site: SiteFiles, global_state: dict, rnd: int, metrics, verbose
) -> EvalMetrics:
    """federation.personalization: train and score this site's private part (client/personal.py)
    -> the metrics with its scores. A site with nowhere to keep it reports the global scores alone."""
    if not site.state_dir:
        _say(site, f"round {rnd}: personalization needs a folder for the private part (ftclient --work-dir): skipped")
        return metrics
    if not st.train_items:
        return metrics
    p = personal.personalize(
        cfg,
        rt,
        st.train_items,
        st.eval_examples,
        global_state,
        site.state_dir,
        site_seed(cfg, site.name),
        rnd,
        site.name,
    )
    if verbose:
        _say(site, f"round {rnd}: personalized ({p.stats.steps} private steps): {_scores(p.result)}")
    return dataclasses.replace(
        metrics,
        personal_eval_loss=p.result.loss,
        personal_exact_match=p.result.exact_match,
        personal_steps=p.stats.steps,
    )


def handle(
    msg: Message,
    context: Context,
    arrived: float,
    received: float,
    device: str | None = None,
    identity: secure.Identity | None = None,
    policy: SitePolicy | None = None,
) -> Message:
    """One task for the resident executor (:mod:`fedtune.client.worker`), by message type.
    ``identity``: the site's signing key for secure aggregation (ftclient --key); ``policy``: the
    site's own rules (ftclient's flags; default: the process's installed policy)."""
    kind = msg.metadata.message_type
    if kind == MessageType.TRAIN:
        return handle_train(msg, context, None, device, arrived=arrived, received=received, policy=policy)
    if kind == MessageType.EVALUATE:
        return handle_evaluate(msg, context, None, device, policy)
    if kind in messages.STAGES:
        return handle_secure_stage(msg, context, None, device, identity)
    raise ValueError(f"this site does not handle {kind!r} messages")


def make_client_app(
    sites: list[SiteFiles] | None = None, device: str | None = None, policy: SitePolicy | None = None
) -> ClientApp:
    """``policy``: the sites' rules (default: the process's; ftsim's virtual sites are permissive)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, sites, device, policy=policy)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, sites, device, policy)

    for stage in messages.STAGES:
        app.train(stage.split(".", 1)[1])(lambda msg, context: handle_secure_stage(msg, context, sites, device))

    return app


def sites_from_config(cfg: FedTuneConfig, base_dir: str | Path | None = None) -> list[SiteFiles]:
    def _abs(p: str | None) -> str | None:
        if p is None:
            return None
        q = Path(p).expanduser()
        return str(q if q.is_absolute() or base_dir is None else Path(base_dir) / q)

    return [SiteFiles(s.name, _abs(s.train), _abs(s.eval), s.rank) for s in cfg.federation.sites]


# For deployment (`flwr` loads "fedtune.client.app:app"): data comes from node_config.
app = make_client_app()
