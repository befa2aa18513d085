"""The site: a Flower ClientApp (Message API) that trains and evaluates the global adapter.

What a site needs to know arrives two ways:
- from the coordinator, in each message: the global adapter (``arrays``) and the run's
  configuration (``config["fedtune-config"]``, JSON of FedTuneConfig) plus ``server-round``.
  Everything that must be the same at every site (model, adapter, hyper-parameters) comes
  from there, so sites cannot drift apart; what a site takes of it is bounded by its own
  policy (:mod:`fedtune.client.policy`: plaintext, DP, model, paths), checked before anything
  loads or trains;
- locally, never sent: which files hold this site's data. In deployment that is
  ``node_config["data-path"]`` (and ``eval-data-path``, ``site-name``); in ftsim each virtual
  site's ``partition-id`` indexes the site table given to :func:`make_client_app`.

The base model and tokenizer are cached per process (``_RUNTIME``): in ftsim a Ray worker
lives for the whole run and serves many virtual sites, so it loads the model once and
memory does not grow with the number of sites; in deployment ftclient's resident executor
(:mod:`fedtune.client.worker`) is that process. Tokenized site data is cached per process too.

Only counts and metrics leave the site; data problems are logged locally and reported
upstream as counts and a category.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtune.common import adapters, methods, privacy
from fedtune.common.config import MIXED_RANK_METHODS, FedTuneConfig
from fedtune.common.data import DataError, Example, load_site_data, split_examples, tokenize_all
from fedtune.common.evaluation import answer_nll, evaluate_examples
from fedtune.common.metrics import mean_loss
from fedtune.common.protocol import CONFIG_KEY, DP_POPULATION_KEY, ROUND_KEY, TRAINABLE_KEY
from fedtune.common.secagg import SecAggError, load_identity
from fedtune.common.secagg import protocol as secagg

from . import policy as site_policy
from . import secure
from .policy import SitePolicy, SiteRefusal
from .trainer import TrainStats, train_round

log = logging.getLogger("fedtune.client")


@dataclass(frozen=True)
class SiteFiles:
    name: str
    train: str
    eval: str | None = None
    rank: int | None = None  # this site's LoRA rank when below the run's (mixed ranks)
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


def resolve_site(context: Context, sites: list[SiteFiles] | None) -> SiteFiles:
    nc = context.node_config
    if "data-path" in nc:
        name = str(nc.get("site-name") or f"site-{context.node_id}")
        rank = int(nc["lora-rank"]) if nc.get("lora-rank") not in (None, "", 0) else None
        return SiteFiles(
            name, str(nc["data-path"]), str(nc["eval-data-path"]) if nc.get("eval-data-path") else None, rank
        )
    if sites is not None and "partition-id" in nc:
        pid = int(nc["partition-id"])
        if not 0 <= pid < len(sites):
            raise ValueError(f"partition-id {pid} has no site (there are {len(sites)})")
        return sites[pid]
    raise ValueError("this node has no data: set node_config data-path (ftclient --data FILE)")


def _read_message(msg: Message) -> tuple[FedTuneConfig, int, dict]:
    conf = msg.content["config"]
    cfg = FedTuneConfig.from_json(str(conf[CONFIG_KEY]))
    return cfg, int(conf[ROUND_KEY]), adapters.to_tensors(adapters.read_adapter(msg.content))


def site_model(
    cfg: FedTuneConfig, site: SiteFiles, global_state: dict, device: str | None, policy: SitePolicy | None = None
) -> tuple[Runtime, SiteState, dict]:
    """This site's runtime (its own LoRA rank, when it has one), its data, and the global adapter
    as this site holds it (cut to its rank: HetLoRA). ``policy`` (default: the process's, see
    :mod:`fedtune.client.policy`) checks the model and every path before anything loads:
    SiteRefusal (defined there) when the site will not take the run's model."""
    policy = policy or site_policy.active()
    cfg = policy.admit(cfg)
    if site.rank is not None and cfg.peft.method not in MIXED_RANK_METHODS:
        raise SiteRefusal(
            f"this site trains LoRA rank {site.rank}, and the run's method {cfg.peft.method} has no LoRA rank"
        )
    if site.rank is not None and site.rank > cfg.peft.r:
        raise SiteRefusal(f"this site's LoRA rank {site.rank} is above the run's peft.r {cfg.peft.r}")
    own = methods.site_config(cfg, site.rank)
    policy.check_weights(own)  # provisioned (in the site's own cache), not yet loaded
    rt = runtime(own, device)
    st = site_state(site, own, rt)
    return rt, st, (global_state if own is cfg else methods.truncate_rank(global_state, site.rank))


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
    """What a site reports of its local early stopping: steps and losses only."""
    out = {"planned-steps": stats.planned_steps}
    if stats.val_losses:
        out.update(
            {"local-val-start": stats.val_start, "local-val-best": stats.val_best, "local-best-step": stats.best_step}
        )
    if stats.stopped_at is not None:
        out["local-stopped-at"] = stats.stopped_at
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


def _reply(
    msg: Message, site: SiteFiles, status: str, metrics: dict, records: dict | None = None, reason: str | None = None
) -> Message:
    """``records``: more records to send, e.g. the update (:func:`fedtune.common.adapters.adapter_records`).
    ``reason``: why the site refused (a protocol reason, never data)."""
    info = {"name": site.name, "status": status, **({"reason": reason} if reason else {})}
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord(info), **(records or {})})
    return Message(content=content, reply_to=msg)


def _say(site: SiteFiles, text: str) -> None:
    """Site-local progress (this site's own console/log; never sent): counts and losses only."""
    print(f"[{time.strftime('%H:%M:%S')}] site {site.name}: {text}", file=sys.stderr, flush=True)


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
    cfg, server_round, full_global = _read_message(msg)
    site = resolve_site(context, sites)
    policy = policy or site_policy.active()
    try:
        dp_population = int(msg.content["config"].get(DP_POPULATION_KEY, 0)) if cfg.privacy.enabled else 0
        policy.check_round(cfg, secure=secagg.RECORD in msg.content, population=dp_population)
        cfg = policy.admit(cfg)
        rt, st, global_state = site_model(cfg, site, full_global, device, policy)
    except SiteRefusal as e:
        _say(site, f"round {server_round}: refused: {e}")
        if secagg.RECORD in msg.content:
            secure.forget(context)
        return _reply(msg, site, "refused", {"num-examples": 0}, reason=str(e))
    counts = {"records": st.n_records, "invalid-records": st.n_invalid, "dropped-too-long": st.dropped_too_long}
    if st.problem:
        # A site with nothing usable never sends an update.
        return _reply(msg, site, st.problem, {"num-examples": 0, **counts})
    verbose = "data-path" in context.node_config  # a real site (ftclient); ftsim prints per round at the coordinator
    sa = msg.content[secagg.RECORD] if secagg.RECORD in msg.content else None
    if sa is not None:
        try:
            secure.ready_to_train(context, sa)  # before spending the round training for nothing
        except SecAggError as e:
            return _reply(msg, site, "refused", {"num-examples": 0, **counts}, reason=str(e))
    methods.set_state(rt.model, global_state)
    try:
        trainable = list(msg.content["config"][TRAINABLE_KEY])
        methods.set_trainable(rt.model, trainable)
    except (KeyError, ValueError) as e:  # the coordinator and this site disagree on what trains
        if sa is not None:
            secure.forget(context)
        return _reply(msg, site, "refused", {"num-examples": 0, **counts}, reason=f"trainable set: {e}")
    population = int(msg.content["config"].get(DP_POPULATION_KEY, 0)) if cfg.privacy.enabled else 0
    if cfg.privacy.enabled and population < 1:  # the noise cannot be sized: refuse before spending the round training
        if sa is not None:
            secure.forget(context)
        return _reply(
            msg,
            site,
            "refused",
            {"num-examples": 0, **counts},
            reason="differential privacy: the round names no site population",
        )
    if verbose:
        _say(site, f"round {server_round}: training on {len(st.train_items)} examples")

    def progress(step: int, n: int, loss: float) -> None:
        if step == n or step % max(1, n // 4) == 0:
            _say(site, f"round {server_round}: step {step}/{n} loss {loss:.3f}")

    stats = train_local(
        cfg,
        rt,
        st.train_items,
        site_seed(cfg, site.name),
        server_round,
        progress=progress if verbose else None,
        proximal_mu=cfg.federation.proximal_mu if cfg.federation.strategy == "fedprox" else 0.0,
        validation=st.eval_examples,
    )
    stopping = cfg.train.local_patience is not None
    if stopping and verbose:
        _say_local_stopping(site, server_round, stats)
    local = methods.get_state(rt.model)
    delta = adapters.delta({k: local[k] for k in trainable}, {k: global_state[k] for k in trainable})
    try:
        delta, bounded = privacy.site_release(cfg, delta, secure=sa is not None, n_sites=population)
    except privacy.NonFiniteUpdate as e:  # a diverged model: refuse the round, never send zeros or NaN
        if sa is not None:
            secure.forget(context)
        if verbose:
            _say(site, str(e))
        return _reply(msg, site, "refused", {"num-examples": 0, **counts}, reason=str(e))
    metrics = {
        "num-examples": len(st.train_items),
        "train-loss": stats.loss_mean,
        "train-loss-first": stats.loss_first,
        "train-loss-last": stats.loss_last,
        "train-steps": stats.steps,
        "train-seconds": stats.seconds,
        "train-tokens": stats.tokens,
        "receive-seconds": received - arrived,
        "startup-seconds": stats.first_step_at - received,
        **counts,
        **bounded,
        **({"lora-rank": site.rank} if site.rank is not None else {}),
        **(local_stopping_metrics(stats) if stopping else {}),
    }
    if sa is not None:
        # Secure round: the update goes straight from training to masking; only the masked vector leaves.
        try:
            reference = {k: full_global[k] for k in trainable}
            flat = secure.flatten_update(methods.pad_rank(delta, {k: v.shape for k, v in reference.items()}), reference)
            # Under DP and federation.weighting "equal" every site weighs the same; else its
            # example count, which masked_input caps at the round's weight cap.
            weight = 1 if cfg.privacy.enabled or cfg.federation.weighting == "equal" else len(st.train_items)
            y, extra = secure.masked_input(context, sa, flat, weight, site_seed(cfg, site.name) + server_round)
        except SecAggError as e:
            secure.forget(context)  # a site that refuses is out of this round
            if verbose:
                _say(site, f"secure aggregation: {e}")
            return _reply(msg, site, "refused", metrics, reason=str(e))
        metrics["upload-bytes"] = 4 * y.size
        return _reply(msg, site, "ok", {**metrics, **extra}, {secagg.MASKED: secagg.masked_record(y)})
    update = adapters.adapter_records(delta)
    metrics["upload-bytes"] = adapters.record_nbytes(update["arrays"])
    return _reply(msg, site, "ok", metrics, update)


def _example_count(msg: Message, site: SiteFiles, device: str | None) -> int | None:
    """What a site reports at key advertisement: its example count when the run weights sites by
    examples (and has no DP), else None. SiteRefusal when it has nothing to train on."""
    cfg = FedTuneConfig.from_json(str(msg.content["config"][CONFIG_KEY]))
    if cfg.privacy.enabled or cfg.federation.weighting == "equal":
        return None
    _, st, _ = site_model(cfg, site, {}, device)  # the data as training will see it (cached)
    if st.problem:
        raise SiteRefusal(st.problem)
    return len(st.train_items)


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
    else one made for the run."""
    site = resolve_site(context, sites)
    if identity is None and site.key is not None:
        identity = secure.Identity(load_identity(site.key))
    kind = msg.metadata.message_type
    sa = msg.content[secagg.RECORD]
    try:
        if kind == secagg.ADVERTISE:
            try:
                examples = _example_count(msg, site, device) if "config" in msg.content else None
            except SiteRefusal as e:
                secure.forget(context)
                return _reply(msg, site, "refused", {}, reason=str(e))
            return _reply(msg, site, "ok", {}, {secagg.RECORD: secure.advertise(context, sa, identity, examples)})
        if kind == secagg.SHARE_KEYS:
            return _reply(msg, site, "ok", {}, {secagg.RECORD: secure.share_keys(context, sa, identity)})
        if kind == secagg.CONSISTENCY:
            return _reply(msg, site, "ok", {}, {secagg.RECORD: secure.consistency(context, sa, identity)})
        if kind == secagg.UNMASK:
            return _reply(msg, site, "ok", {}, {secagg.RECORD: secure.unmask(context, sa)})
    except SecAggError as e:  # the site has forgotten the round
        if "data-path" in context.node_config:
            _say(site, f"secure aggregation: {e}")
        return _reply(msg, site, "refused", {}, reason=str(e))
    raise ValueError(f"this site does not handle {kind!r} messages")


def handle_evaluate(
    msg: Message,
    context: Context,
    sites: list[SiteFiles] | None,
    device: str | None = None,
    policy: SitePolicy | None = None,
) -> Message:
    """No update leaves on evaluation, but the model and path checks of ``policy`` apply as in training."""
    cfg, _, global_state = _read_message(msg)
    site = resolve_site(context, sites)
    policy = policy or site_policy.active()
    try:
        cfg = policy.admit(cfg)
        rt, st, global_state = site_model(
            cfg, site, global_state, device, policy
        )  # a lower-rank site scores the adapter at its rank
    except SiteRefusal as e:
        _say(site, f"evaluation refused: {e}")
        return _reply(msg, site, "refused", {"num-examples": 0}, reason=str(e))
    if st.problem or not st.eval_examples:
        return _reply(msg, site, st.problem or "no-eval-examples", {"num-examples": 0})
    methods.set_state(rt.model, global_state)
    verbose = "data-path" in context.node_config
    if verbose:
        _say(site, f"round {int(msg.content['config'][ROUND_KEY])}: evaluating on {len(st.eval_examples)} examples")
    res = evaluate_examples(rt.model, rt.tokenizer, st.eval_examples, cfg.data, cfg.eval, rt.device)
    metrics = {"num-examples": res.examples, "eval-loss": res.loss, "answer-tokens": res.answer_tokens}
    if res.exact_match is not None:
        metrics["exact-match"] = res.exact_match
    if verbose:
        _say(
            site,
            f"evaluation: loss {res.loss:.3f}"
            + (f", exact match {res.exact_match:.2f}" if res.exact_match is not None else ""),
        )
    return _reply(msg, site, "ok", metrics)


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
    if kind in secagg.STAGES:
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

    for stage in secagg.STAGES:
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
