"""The coordinator: a Flower ServerApp (Message API) running federated adapter training.

We drive the rounds ourselves with ``grid.push_messages``/``pull_messages`` instead of
``Strategy.start``: we need to validate every update before it is averaged, name sites in
per-round metrics, print progress as each site reports, and checkpoint every round, none of
which ``start`` lets us do. The round keeps Flower's Strategy shape all the same
(:mod:`fedtune.server.round`: configure_train, aggregate_train, configure_evaluate,
aggregate_evaluate), what happens to each update is a pipeline of plain functions
(:mod:`fedtune.server.pipeline`), the maths lives in :mod:`fedtune.server.aggregation`, the run's
state in :mod:`fedtune.server.state` and its checkpoints in :mod:`fedtune.server.checkpoints`.

Per round: TRAIN (global adapter + config) -> validate each delta -> weighted mean (or, under
secure aggregation, the five SecAgg+ exchanges of :mod:`fedtune.server.secure`, which yield only
the mean) -> server optimizer (FedAvg: add it) -> checkpoint ``checkpoints/round-NNNN`` and ``adapter/`` -> EVALUATE the new
adapter at every site -> ``metrics.json``. Round 0 is an evaluation of the untouched base
model, so the report can show each domain's change. This module is the run: its start (or
resume), the loop over rounds with its stop conditions (:data:`STOP_BEFORE`, :data:`STOP_AFTER`),
and its end (forgetting, export, the report).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.common import adapters, methods, privacy, progress
from fedtune.common.checkpoint import load_adapter_state  # noqa: F401  (tests reach it here)
from fedtune.common.config import FedTuneConfig

from .aggregation import ServerOptimizer, l2_norm, spec_of  # noqa: F401  (l2_norm: tests)
from .checkpoints import (  # noqa: F401  (re-exported: tests and tools reach them here)
    OPTIMIZER_ARRAYS,
    SERVER_STATE,
    ResumePoint,
    check_free_space,
    checkpoint_bytes,
    prune_checkpoints,
    resume_point,
    save_global_adapter,
    save_round,
)
from .messaging import FederationError, Printer
from .record import FILE as RECORD_FILE
from .record import RecordError, write_record
from .report import ReportSection, write_report
from .round import (  # noqa: F401  (re-exported)
    KEEP_MAX_VALUES,
    aggregate_evaluate,
    aggregate_train,
    broadcast_content,
    configure_evaluate,
    configure_train,
    dp_round,
    run_evaluation,
    run_training_round,
)
from .state import GlobalModel, History, InitialAdapter, RunState, best_round, initial_adapter  # noqa: F401


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


def general_knowledge(cfg: FedTuneConfig, state: OrderedDict | None) -> dict:
    """The model with ``state`` (the method's tensors; None: the base model alone, as the sites
    load it, in 4 bits for qlora) on the general-knowledge set (:mod:`fedtune.common.forgetting`)."""
    from fedtune.common.forgetting import general_knowledge as score
    from fedtune.common.modeling import load_base_model

    device = None if cfg.model.device == "auto" else cfg.model.device
    if state is None:
        model, tokenizer, device = load_base_model(
            cfg.model, device, four_bit=cfg.peft if methods.get(cfg.peft.method).four_bit else None
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
    output.merged, a LoRA-family adapter folded into its base as ``merged/``; then every
    artifact folder's model card (README.md) with the run's final figures."""
    if methods.get(rs.cfg.peft.method).artifact == "model":
        path = methods.export_full(rs.cfg, adapters.to_tensors(rs.global_state), rs.out / "model")
        say(f"model: {path} (a Hugging Face model folder: AutoModelForCausalLM.from_pretrained)")
    if rs.cfg.output.merged:
        path = methods.export_merged(rs.cfg.model, rs.out / "adapter", rs.out / "merged")
        say(f"merged: {path} (the adapter folded into the base: a plain Hugging Face model folder)")
    from .checkpoints import write_final_cards

    write_final_cards(rs)  # README.md of adapter/, best/, merged/, model/: the final figures


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


def write_metrics(rs: RunState) -> None:
    """metrics.json: the run record as it stands (after round 0, every round and at the end),
    checked against the record's schema (:func:`fedtune.server.record.write_record`)."""
    try:
        write_record(rs.out / RECORD_FILE, rs.metrics_doc())
    except RecordError as e:  # a key the schema does not know: our bug, but the run ends cleanly
        raise FederationError(f"the run record does not match its schema: {e}") from None


# ---- stop conditions --------------------------------------------------------------------------
# Each takes (run state, round, sites connected) and returns why the run stops, or None.
# STOP_BEFORE are asked before a round trains (nothing of it is spent yet); STOP_AFTER once the
# round is recorded (it is kept; the run ends after it). A new condition is one function here.

StopCondition = Callable[[RunState, int, int], "str | None"]


def privacy_budget(rs: RunState, rnd: int, population: int) -> str | None:
    """Under DP: round ``rnd`` would spend more than privacy.epsilon."""
    if rs.accountant is None:
        return None
    eps = rs.cfg.privacy.epsilon
    after = rs.accountant.epsilon(then=dp_round(rs, population))
    if after <= eps * (1 + 1e-9):
        return None
    return (
        f"privacy budget: round {rnd} would bring epsilon to {after:.3f}, above privacy.epsilon {eps:g}; "
        f"stopped after round {rnd - 1} at epsilon {rs.accountant.epsilon():.3f}"
    )


def patience(rs: RunState, rnd: int, population: int) -> str | None:
    """eval.patience: the federated score has not improved for that many rounds (and rounds are left)."""
    limit, best = rs.cfg.eval.patience, rs.best()
    since = best["rounds_since"] if best else 0
    if limit is None or since < limit or rnd >= rs.cfg.federation.rounds:
        return None
    return (
        f"early stopping: the federated {best['metric']} has not improved for {since} round(s) since round {best['round']} "
        f"({best['value']:.4f}; eval.patience {limit}); stopped after round {rnd}"
    )


STOP_BEFORE: tuple[StopCondition, ...] = (privacy_budget,)
STOP_AFTER: tuple[StopCondition, ...] = (patience,)


def why_stop(conditions, rs: RunState, rnd: int, population: int) -> str | None:
    return next((why for c in conditions if (why := c(rs, rnd, population))), None)


# ---- the run ----------------------------------------------------------------------------------


def start_run(cfg: FedTuneConfig, out: Path, say: Printer, resume: bool, site_keys) -> RunState:
    """The run state from the method's initial adapter, its TensorBoard writer, the disk checked."""
    out.mkdir(parents=True, exist_ok=True)
    say("preparing the initial adapter ...")
    init = initial_adapter(cfg)
    rs = RunState(
        cfg=cfg,
        out=out,
        global_state=init.state,
        peft_config=init.peft_config,
        trainable_params=int(sum(init.state[k].size for k in init.trainable_keys)),
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
    what = "weights (full fine-tuning)" if methods.get(cfg.peft.method).artifact == "model" else "adapter"
    n = rs.trainable_params
    say(f"{cfg.peft.method} {what}: {n:,} trainable parameters ({n * 4 / 1e6:.1f} MB as float32)")
    return rs


def resume_run(rs: RunState, say: Printer) -> int:
    """The global adapter, the round records and the coordinator's state of the resume point
    (:func:`resume_point`), the DP accountant reconciled with the ledger -> the first round to run."""
    rp = resume_point(rs.out, say, spec_of(rs.global_state), peft=rs.peft_config is not None)
    # The wall time goes on from where it stopped: this session's from its start, plus the earlier ones'.
    rs.global_state, rs.rounds, rs.started = rp.state, rp.rounds, rs.started - rp.elapsed
    if rp.server_state is not None:
        try:
            rs.restore_server_state(rp.server_state, rp.optimizer_arrays)
        except ValueError as e:
            raise FederationError(f"{rs.out}: cannot resume round {rp.round}'s server state: {e}") from None
    if rs.accountant is not None:
        resume_accountant(rs, say)
    save_global_adapter(rs, "adapter")
    say(
        f"resuming after round {rp.round} (verified checkpoint); rounds {rp.round + 1}..{rs.cfg.federation.rounds} to go"
    )
    return rp.round + 1


def begin_run(rs: RunState) -> int:
    """A fresh run: the DP ledger opened, round 0's checkpoint (the initial adapter) -> round 1."""
    if rs.accountant is not None:
        privacy.ledger_start(rs.out / privacy.LEDGER, rs.cfg.privacy.delta)
    save_round(rs, 0)
    return 1


def evaluate_base(grid: Grid, nodes: list[int], rs: RunState, say: Printer) -> None:
    """Round 0: the untouched base model evaluated at every site, recorded."""
    say("round 0 evaluates the base model")
    t = time.time()
    ev = run_evaluation(grid, nodes, rs, 0, say)
    rs.rounds.append({"round": 0, **ev, "seconds": round(time.time() - t, 3)})
    keep_best(rs, 0, say)
    if rs.events is not None:
        rs.events.round(rs.rounds[-1])
    write_metrics(rs)


def skip_round(rs: RunState, rnd: int, drawn: int, population: int, say: Printer) -> None:
    """Under DP, a Poisson draw too small to aggregate: nothing is released, but the round is
    charged all the same (conservative), recorded and checkpointed."""
    q, sigma = dp_round(rs, population)
    rs.accountant.spend(q, sigma)
    eps = rs.accountant.epsilon()
    say(f"round {rnd}: only {drawn} site(s) drawn (sampling rate {q:.3g}); skipped, epsilon now {eps:.3f}")
    rs.rounds.append(
        {
            "round": rnd,
            "skipped": "too few sites drawn",
            "privacy": {"epsilon": eps},
            "sites": {},
            "aggregate": rs.rounds[-1].get("aggregate", {}),
        }
    )
    privacy.ledger_charge(rs.out / privacy.LEDGER, rnd, q, sigma, eps, released=False)
    save_round(rs, rnd)
    write_metrics(rs)
    prune_checkpoints(rs, say)


def train_and_evaluate(
    grid: Grid, rs: RunState, rnd: int, train: list[int], nodes: list[int], t: float, say: Printer
) -> None:
    """Round ``rnd``: training at ``train``, the release (ledger, checkpoint), evaluation at
    ``nodes``; the round's record appended (``seconds``: since ``t``), the best round kept."""
    tr = run_training_round(grid, train, rs, rnd, say, population=len(nodes))
    if "privacy" in tr:
        # The release: the noised adapter is written (adapter/, the checkpoint) and sent for evaluation
        # next. Its charge is on disk first, so no crash from here on can lose it (resume_accountant).
        p, dp = tr["privacy"], rs.cfg.privacy
        privacy.ledger_charge(
            rs.out / privacy.LEDGER, rnd, p["sampling_rate"], p["noise_multiplier"], p["epsilon"], released=True
        )
        say(f"round {rnd} privacy | epsilon {p['epsilon']:.3f} of {dp.epsilon:g} spent (delta {dp.delta:g})")
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
    keep_best(rs, rnd, say)


def run_rounds(grid: Grid, rs: RunState, first: int, say: Printer, stop_after: Sequence[StopCondition] = ()) -> None:
    """Rounds ``first``..federation.rounds, until a stop condition (:data:`STOP_BEFORE`,
    :data:`STOP_AFTER`, then the caller's ``stop_after``) says otherwise."""
    last = rs.cfg.federation.rounds
    after = (*STOP_AFTER, *stop_after)
    for rnd in range(first, last + 1):
        t = time.time()
        train, nodes = sites_for_round(grid, rs, say)
        if stop := why_stop(STOP_BEFORE, rs, rnd, len(nodes)):
            rs.stopped = stop
            say(f"stopping: {stop}")
            break
        if rs.accountant is not None and len(train) < fewest_sites(rs.cfg):
            skip_round(rs, rnd, len(train), len(nodes), say)
            continue
        train_and_evaluate(grid, rs, rnd, train, nodes, t, say)
        if rs.events is not None:
            rs.events.round(rs.rounds[-1])
        if stop := why_stop(after, rs, rnd, len(nodes)):
            rs.stopped = stop
        write_metrics(rs)
        prune_checkpoints(rs, say)
        took = time.time() - t
        where = rs.out / "checkpoints" / f"round-{rnd:04d}"
        say(
            f"round {rnd}/{last} done in {took:.0f} s; checkpoint {where}; ETA {progress.duration(took * (last - rnd))}"
        )
        if rs.stopped:
            say(f"stopping: {rs.stopped}")
            break


def finish_run(rs: RunState, say: Printer, report_sections: Sequence[ReportSection] = ()) -> None:
    """After the last round: the final general-knowledge score, metrics.json with the elapsed time
    (and, if it stopped early, why), the exported artifacts, the report (with ``report_sections``,
    the parts the program running the coordinator contributes: :class:`~fedtune.server.report.ReportSection`)."""
    if rs.cfg.eval.forgetting:
        measure_forgetting(rs, "final", rs.global_state, say)
    write_metrics(rs)
    if rs.events is not None:
        rs.events.close()
    save_artifacts(rs, say)
    # The wall time the report, metrics.json and the console's "done in" all give from now on; a
    # --resume of a finished run stops before any work (unless it adds rounds), so it stays true.
    rs.history.finished_s = round(time.time() - rs.history.started, 2)
    write_metrics(rs)
    write_report(rs.out, rs.metrics_doc(), plots=rs.cfg.output.plots, sections=report_sections)
    say(f"report: {rs.out / 'report.md'}")


def run_federation(
    grid: Grid,
    cfg: FedTuneConfig,
    out: Path,
    say: Printer = print,
    resume: bool = False,
    site_keys=None,
    report_sections: Sequence[ReportSection] = (),
    explain_site: Callable[[str, str], str | None] | None = None,
    started: float | None = None,
    stop_after: Sequence[StopCondition] = (),
) -> RunState:
    """``site_keys``: the registered sites' identity keys (SEC1 P-384 bytes) that secure
    aggregation publishes to the sites; None: the keys the sites present. ``report_sections``:
    the caller's parts of the end-of-run report (ftsim's sites' data), rendered with it once.
    ``explain_site``: ftsim's (site, status) -> why, read from that site's files (RunState).
    ``started``: when the run's clock starts (ftsim's own start, so that the report's wall time is
    what its console shows); None: now. ``stop_after``: the caller's stop conditions, asked after
    each recorded round as :data:`STOP_AFTER` are (``ftsim tune``'s pruner)."""
    rs = start_run(cfg, out, say, resume, site_keys)
    rs.explain_site = explain_site
    if started is not None:
        rs.started = started
    first = resume_run(rs, say) if resume else begin_run(rs)
    fed = cfg.federation
    minimum = fewest_sites(cfg)
    wanted = max(fed.expected_sites or max(fed.min_sites, len(fed.sites)), minimum)
    nodes = wait_for_sites(grid, wanted, minimum, fed.join_timeout_s, say)
    say(f"{len(nodes)} site(s) connected")
    if cfg.eval.forgetting:
        measure_forgetting(rs, "base", None, say)
    if not resume:
        evaluate_base(grid, nodes, rs, say)
    if rs.accountant is not None:
        q, sigma = dp_round(rs, len(nodes))
        dp = cfg.privacy
        say(
            f"differential privacy: clip {dp.clip:g}, noise multiplier {sigma:.3f}, sampling rate {q:.3g}; "
            f"budget epsilon {dp.epsilon:g} at delta {dp.delta:g}; spent so far {rs.accountant.epsilon():.3f}"
        )
    rs.first_round, rs.first_round_at = first, time.time()
    run_rounds(grid, rs, first, say, stop_after)
    finish_run(rs, say, report_sections)
    return rs


def make_server_app(
    cfg: FedTuneConfig,
    out: Path,
    say: Printer = print,
    result: list | None = None,
    resume: bool = False,
    site_keys=None,
    report_sections: Sequence[ReportSection] = (),
    explain_site: Callable[[str, str], str | None] | None = None,
    started: float | None = None,
    stop_after: Sequence[StopCondition] = (),
) -> ServerApp:
    """The ServerApp that runs :func:`run_federation` (its RunState, or the FederationError that
    ended it, appended to ``result``); ``report_sections`` go into the end-of-run report."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            rs = run_federation(
                grid,
                cfg,
                out,
                say,
                resume,
                site_keys,
                report_sections,
                explain_site=explain_site,
                started=started,
                stop_after=stop_after,
            )
        except FederationError as e:
            say(f"FAILED: {e}")
            if result is not None:
                result.append(e)
            return
        if result is not None:
            result.append(rs)

    return app
