"""ftsim --baselines: does federation help? The table that tells a site whether joining is worth it.

After the federation, with its compute and its seed, ftsim scores every site under four trainings:

- **base**: no training. The federation's round 0: the base model with the method's initial
  adapter, which is exactly the base model for every method but prompt and prefix tuning
  (their initial virtual tokens already change the output).
- **alone**: each site trains by itself on its own data. It runs the optimizer steps it ran in
  the federation (in a personalized run, its private steps too), round by round, with the same
  batches, learning-rate schedule and seeds: :func:`fedtune.client.app.train_local`, the
  function a site trains with in the federation. Only the averaging is missing: a site's round
  starts from its own previous round.
- **pooled** (centralized): one trainer on all the sites' training data pooled, running in each
  round the sum of the steps the sites ran in that round, so its compute equals the
  federation's.
- **federation**: the run itself, scored by its last round's evaluation.

Equal compute is counted in optimizer steps of the same batch size, taken from what the
federation actually ran (metrics.json's rounds: a run that stopped early, sampled sites, or lost
a site's update counts only the steps that reached the global model). Every site's score is its
validation split, scored as the sites score the global adapter each round
(:func:`fedtune.common.evaluation.evaluate_examples` on the same split), in this process, on
data ftsim already holds: nothing here leaves a site that would not in a deployment.

The baselines train without the federation's update clipping, privacy noise or secure
aggregation: those protect sites from each other, and a site alone or the pooled data (the
thing federation exists to avoid) have nobody to be protected from.

Each finished training is saved at once in ``baselines/results.json`` (with its adapter in
``baselines/alone/<site>/`` or ``baselines/pooled/``), so a rerun of ``ftsim --resume DIR
--baselines`` continues where it stopped.

The results go into the run's record (metrics.json) as its ``baselines`` section, whose schema is
:class:`BaselinesRecord` (the coordinator's :class:`~fedtune.server.record.RunRecord` only carries
it), and into the report as ftsim's sections (:mod:`fedtune.simulations.report_sections`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from fedtune.client import app as client_app
from fedtune.common import methods, progress
from fedtune.common.checkpoint import atomic_write_json, load_adapter_state, save_adapter, verify_checkpoint
from fedtune.common.config import FedTuneConfig
from fedtune.common.evaluation import evaluate_examples
from fedtune.common.metrics import weighted_mean, weighted_scores
from fedtune.server.record import (
    FILE,
    RecordError,
    RoundRecord,
    RunRecord,
    Scores,
    SiteRound,
    read_document,
    write_record,
)

FOLDER = "baselines"
RESULTS = "results.json"
TRAININGS = ("base", "alone", "pooled", "federation")
# federation.personalization: each site's own model after the last round (scored by the site, beside the global).
PERSONALIZED = "personalized"
POOLED = "pooled"
# The pooled trainer's data-order seed: not a possible site name (those have no spaces), so it
# never repeats a site's.
POOLED_SEED_NAME = "all sites pooled"
# Up to this many sites, each alone model is also scored on every other site's split: is the
# federation's model better for everyone than the best one site could train for itself?
ON_ALL_MAX_SITES = 5


class BaselineError(RuntimeError):
    pass


class _Record(BaseModel):
    # ftsim writes it: every key declared, no coercion (as fedtune.server.record's models).
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=True)


class Score(_Record):
    """One site's validation score under one training (as a site scores the global adapter)."""

    eval_loss: float | None = None
    exact_match: float | None = None
    eval_examples: int


class TrainingScores(_Record):
    """One site's score under each training; None where it has none (e.g. its data was unusable)."""

    base: Score | None = None
    alone: Score | None = None
    pooled: Score | None = None
    federation: Score | None = None
    personalized: Score | None = None  # a personalized run's site model


class MeanScores(_Record):
    """The example-weighted mean over the sites, per training."""

    base: Scores = Scores()
    alone: Scores = Scores()
    pooled: Scores = Scores()
    federation: Scores = Scores()
    personalized: Scores = Scores()


class Steps(_Record):
    """The optimizer steps each training ran (``budget``: the steps the federation planned)."""

    budget: int | None = None
    federation: dict[str, int]  # site -> steps, and "total"
    alone: dict[str, int]
    pooled: int


class BaselinesRecord(_Record):
    """metrics.json's ``baselines`` (:func:`baselines_doc`)."""

    compute: str
    examples_per_step: int
    steps: Steps
    sites: dict[str, TrainingScores]
    mean: MeanScores
    adapters: dict[str, str] = {}
    seconds: dict[str, float | None] = {}
    # site -> its alone model's score on every site's split (at most ON_ALL_MAX_SITES sites)
    alone_on_all: dict[str, dict[str, Score | None]] = {}

    @classmethod
    def of(cls, record: RunRecord) -> BaselinesRecord | None:
        """The run record's baselines section, typed; None when it has none. Raises
        :class:`~fedtune.server.record.RecordError` naming the key that does not fit."""
        if not record.baselines:
            return None
        try:
            return cls.model_validate(record.baselines)
        except ValidationError as e:
            where = "; ".join(
                "baselines." + ".".join(str(p) for p in err["loc"]) + f": {err['msg']}" for err in e.errors()[:5]
            )
            raise RecordError(f"{FILE}: not a valid baselines section: {where}") from None


def _rounds(rounds: Sequence[RoundRecord | Mapping]) -> list[RoundRecord]:
    return [r if isinstance(r, RoundRecord) else RoundRecord.model_validate(r) for r in rounds]


@dataclass
class Plan:
    """The federation's compute: site -> round -> the optimizer steps of each update that reached
    the global model; ``ran``: site -> the steps it actually ran in all. With local early stopping
    (train.local_patience) a round's budget is its planned steps, of which a site may run fewer:
    the baselines get the same budget, and stop by the same rule."""

    steps: dict[str, dict[int, int]]
    ran: dict[str, int] = field(default_factory=dict)

    @property
    def rounds(self) -> list[int]:
        return sorted({r for by_round in self.steps.values() for r in by_round})

    def alone(self, site: str) -> list[tuple[int, int]]:
        return sorted(self.steps.get(site, {}).items())

    def pooled(self) -> list[tuple[int, int]]:
        return [(r, sum(by_round.get(r, 0) for by_round in self.steps.values())) for r in self.rounds]

    def total(self) -> int:
        return sum(sum(by_round.values()) for by_round in self.steps.values())

    def as_json(self) -> dict:
        return {site: {str(r): n for r, n in sorted(by_round.items())} for site, by_round in sorted(self.steps.items())}


def plan_of(rounds: Sequence[RoundRecord | Mapping]) -> Plan:
    """The steps each site ran per round, from metrics.json's round records: updates that were
    accepted (and, under secure aggregation, summed), plus, in a personalized run, the private
    steps the site ran on its own part that round (federation.personal_steps): a site's compute
    is every optimizer step it ran, so alone and pooled get those steps as well."""
    steps: dict[str, dict[int, int]] = {}
    ran: dict[str, int] = {}
    for r in _rounds(rounds):
        if r.round < 1 or r.skipped:
            continue
        for name, s in r.sites.items():
            n = 0
            if s.status == "ok" and s.summed is not False and (s.steps or 0) > 0:
                n, ran[name] = s.planned_steps or s.steps, ran.get(name, 0) + s.steps
            if s.personal_steps:  # a personalized run's private steps are the site's compute too
                n, ran[name] = n + s.personal_steps, ran.get(name, 0) + s.personal_steps
            if n:
                steps.setdefault(name, {})[r.round] = n
    return Plan(steps, ran)


def _score(cfg: FedTuneConfig, rt, examples: list) -> dict | None:
    """``examples`` scored as a site scores the global adapter each round (client.app.handle_evaluate)."""
    if not examples:
        return None
    res = evaluate_examples(rt.model, rt.tokenizer, examples, cfg.data, cfg.eval, rt.device)
    return {
        "eval_loss": res.loss,
        **({"exact_match": res.exact_match} if res.exact_match is not None else {}),
        "eval_examples": res.examples,
    }


def _personal_score(site: SiteRound | None) -> dict | None:
    """A site's personalized model in a round (federation.personalization), as a baseline score."""
    if site is None or site.personal_eval_loss is None or not site.eval_examples:
        return None
    out = {"eval_loss": site.personal_eval_loss, "eval_examples": site.eval_examples}
    return out | ({"exact_match": site.personal_exact_match} if site.personal_exact_match is not None else {})


def _round_score(site: SiteRound | None) -> dict | None:
    """A site's evaluation in a round of the federation, as a baseline score."""
    if site is None or site.eval_loss is None or not site.eval_examples:
        return None
    return {k: getattr(site, k) for k in ("eval_loss", "exact_match", "eval_examples") if getattr(site, k) is not None}


class _Progress:
    """One line per trained round: a bar over all the baselines' steps, with an ETA."""

    def __init__(self, total_steps: int, say: Callable[[str], None]):
        self.total, self.done, self.say, self.t0 = total_steps, 0, say, time.time()

    def round(self, what: str, i: int, n_rounds: int, stats) -> None:
        self.done += stats.planned_steps  # the budget: a round that stopped early is done all the same
        ran = (
            f"{stats.steps} steps"
            if stats.steps == stats.planned_steps
            else f"{stats.steps} of {stats.planned_steps} steps (stopped early)"
        )
        self.say(
            f"baselines | {what}: round {i}/{n_rounds}, {ran}, loss {stats.loss_first:.3f} -> {stats.loss_last:.3f} "
            f"{progress.bar(self.done / max(self.total, 1), time.time() - self.t0)}"
        )


def _train(
    cfg, rt, items, seed_name, plan: list[tuple[int, int]], start: dict, what: str, bar: _Progress, validation=None
) -> int:
    """Train from ``start`` through the planned (round, steps); -> optimizer steps run."""
    methods.set_state(rt.model, start)
    keys, n_layers = methods.trainable_capable(rt.model), methods.n_layers_of(rt.model)
    ran = 0
    for i, (rnd, steps) in enumerate(plan, 1):
        methods.set_trainable(rt.model, methods.round_keys(keys, n_layers, cfg.layers, rnd))
        stats = client_app.train_local(
            cfg, rt, items, client_app.site_seed(cfg, seed_name), rnd, steps=steps, validation=validation
        )
        ran += stats.steps
        bar.round(what, i, len(plan), stats)
    return ran


def _save(
    rt, cfg: FedTuneConfig, folder: Path, site: str | None = None, steps: int | None = None, examples: int | None = None
) -> str | None:
    """The training's adapter as a PEFT folder, with its model card (adapter methods; full
    fine-tuning's whole model is not kept). ``site``: the site that trained alone (None: all data
    pooled); ``steps``, ``examples``: the optimizer steps it ran and the training examples it drew on."""
    from fedtune.common import card

    if not methods.is_peft(rt.model):
        return None
    info = methods.method_info(cfg)
    save_adapter(
        folder,
        methods.get_state(rt.model),
        methods.saved_peft_config(rt.model, methods.base_reference(cfg.model)),
        {methods.METHOD_FILE: info},
    )
    card.write_card(folder, _card_facts(cfg, folder, info, site, steps, examples))
    return str(folder)


def _card_facts(cfg: FedTuneConfig, folder: Path, info: dict, site, steps, examples, sites=()):
    """A baseline adapter's model card: which training it is, and (once every baseline is scored,
    :func:`_scored_cards`) the sites' scores under the base model and under it."""
    from fedtune.common import card

    return card.CardFacts(
        kind="pooled" if site is None else "alone",
        folder=str(folder),
        **card.method_facts(cfg, info),
        baseline=card.Baseline(site, steps, examples, cfg.train.batch_size * cfg.train.grad_accum),
        sites=sites,
        evaluated=bool(sites),
    )


def _scored_cards(cfg: FedTuneConfig, doc: dict, done: dict) -> None:
    """Every baseline adapter's card again, now with its scores: a site alone on its own split,
    pooled on every site's, each beside the base model's (the federation's round 0)."""
    from fedtune.common import card

    record = BaselinesRecord.model_validate(doc)

    def as_card(score: Score | None):
        return card.Score(score.eval_loss, score.exact_match) if score else None

    def facts(name: str, training: str):
        row = record.sites.get(name)
        base, score = (row.base, getattr(row, training)) if row else (None, None)
        return card.SiteFacts(name, None, score.eval_examples if score else None, as_card(base), as_card(score))

    trainings = [(name, res, "alone", name) for name, res in done.get("alone", {}).items()]
    trainings += [(None, done[POOLED], "pooled", None)] if POOLED in done else []
    for site, res, training, only in trainings:
        if not res.get("adapter") or not Path(res["adapter"]).is_dir():
            continue
        folder = Path(res["adapter"])
        names = [only] if only else list(record.sites)
        examples = res.get("examples")
        sites = [facts(n, training) for n in names]
        card.write_card(
            folder, _card_facts(cfg, folder, methods.read_method_info(folder), site, res.get("steps"), examples, sites)
        )


def run_baselines(
    cfg: FedTuneConfig,
    out: Path,
    rounds: Sequence[RoundRecord | Mapping],
    say: Callable[[str], None] = print,
    device: str | None = None,
) -> dict:
    """Train and score the baselines for the finished run in ``out`` (its ``rounds`` records).
    -> the ``baselines`` document that metrics.json keeps."""
    plan = plan_of(rounds)
    start = _starting_adapter(out, plan)
    folder = out / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    done = _finished(folder / RESULTS, plan)
    sites = client_app.sites_from_config(cfg)
    bar = _Progress(_announce(cfg, plan, sites, done, say), say)
    # Each site alone, at its own LoRA rank when it has one (as it trains in the federation).
    for site in sites:
        if site.name in done.setdefault("alone", {}):
            continue
        done["alone"][site.name] = _alone(cfg, site, plan, start, folder, bar, device, sites)
        _keep(folder / RESULTS, plan, done)
    if POOLED not in done:
        done[POOLED] = _pooled(cfg, sites, plan, start, folder, bar, device)
        _keep(folder / RESULTS, plan, done)
    # A training a previous version finished without scoring it on every split: score its saved adapter.
    for site in sites if len(sites) <= ON_ALL_MAX_SITES else []:
        res = done["alone"].get(site.name) or {}
        if "on_all" not in res and res.get("adapter") and Path(res["adapter"]).is_dir():
            res["on_all"] = _on_all_saved(cfg, site, res, start, sites, device)
            _keep(folder / RESULTS, plan, done)
    doc = baselines_doc(cfg, plan, rounds, done, [s.name for s in sites])
    _scored_cards(cfg, doc, done)
    return doc


def _starting_adapter(out: Path, plan: Plan) -> dict:
    """The federation's round-0 adapter, where every baseline starts; BaselineError when the
    federation trained nothing to compare with or the checkpoint does not verify."""
    if plan.total() == 0:
        raise BaselineError(
            "the federation ran no training steps that reached the global adapter: there is nothing to compare with"
        )
    start_dir = out / "checkpoints" / "round-0000"
    why = verify_checkpoint(start_dir)
    if why is not None:
        raise BaselineError(
            f"{start_dir}: the run's starting adapter is needed for the baselines and does not verify: {why}"
        )
    return load_adapter_state(start_dir)


def _announce(cfg: FedTuneConfig, plan: Plan, sites: list, done: dict, say: Callable[[str], None]) -> int:
    """Say what the baselines will train (and what a previous run already did). -> the steps to go."""
    alone_todo = [s.name for s in sites if s.name not in done.get("alone", {})]
    n_todo = len(alone_todo) + (POOLED not in done)
    remaining = sum(n for name in alone_todo for _, n in plan.alone(name)) + (plan.total() if POOLED not in done else 0)
    say(
        f"baselines: each site alone and all data pooled, at the federation's compute ({plan.total()} optimizer steps of "
        f"{cfg.train.batch_size * cfg.train.grad_accum} examples over {len(plan.rounds)} round(s)); "
        + (f"{len(sites) + 1 - n_todo} of {len(sites) + 1} trainings already done, " if n_todo < len(sites) + 1 else "")
        + f"{remaining} steps to go"
    )
    return remaining


def _keep(path: Path, plan: Plan, done: dict) -> None:
    """results.json as it stands: each finished training kept at once, for a rerun to continue."""
    atomic_write_json(path, {"plan": plan.as_json(), **done})


def _alone(cfg: FedTuneConfig, site, plan: Plan, start: dict, folder: Path, bar: _Progress, device, sites) -> dict:
    """One site training by itself on its own data, at the steps it ran in the federation -> its results
    (with ``on_all``, its score on every site's split, when there are at most ON_ALL_MAX_SITES)."""
    rt, st, site_start = client_app.site_model(cfg, site, start, device)
    if st.problem:
        return {"steps": 0, "problem": st.problem}
    t = time.time()
    ran = _train(
        cfg,
        rt,
        st.train_items,
        site.name,
        plan.alone(site.name),
        site_start,
        f"{site.name} alone",
        bar,
        st.eval_examples,
    )
    own = _score(cfg, rt, st.eval_examples)
    return {
        "steps": ran,
        "score": own,
        **({"on_all": _on_all(cfg, rt, sites, site.name, own)} if len(sites) <= ON_ALL_MAX_SITES else {}),
        "examples": len(st.train_items),
        "adapter": _save(rt, cfg, folder / "alone" / site.name, site.name, ran, len(st.train_items)),
        "seconds": round(time.time() - t, 1),
    }


def _on_all(cfg: FedTuneConfig, rt, sites: list, own_name: str, own: dict | None) -> dict:
    """A site's alone model scored on every site's validation split (its own: ``own``). The
    splits are the ones the sites score the global adapter on: the same files, or the same
    seeded share of train."""
    scores = {}
    for s in sites:
        if s.name == own_name:
            scores[s.name] = own
            continue
        st = client_app.site_state(client_app.SiteFiles(s.name, s.train, s.eval), cfg, rt)
        scores[s.name] = None if st.problem else _score(cfg, rt, st.eval_examples)
    return scores


def _on_all_saved(cfg: FedTuneConfig, site, res: dict, start: dict, sites: list, device) -> dict:
    """:func:`_on_all` for a site's alone model that is on disk (``res["adapter"]``)."""
    rt, _, _ = client_app.site_model(cfg, site, start, device)
    methods.set_state(rt.model, load_adapter_state(Path(res["adapter"])))
    return _on_all(cfg, rt, sites, site.name, res.get("score"))


def _pooled(cfg: FedTuneConfig, sites: list, plan: Plan, start: dict, folder: Path, bar: _Progress, device) -> dict:
    """All data pooled: the run's rank, every site's training examples, the federation's total
    steps -> its results (every site's score)."""
    t = time.time()
    rt = client_app.runtime(cfg, device)
    states = {s.name: client_app.site_state(client_app.SiteFiles(s.name, s.train, s.eval), cfg, rt) for s in sites}
    items = [it for st in states.values() if not st.problem for it in st.train_items]
    # Round-robin over the sites, so the first eval.max_examples a check uses cover every site.
    splits = [st.eval_examples for st in states.values() if not st.problem]
    validation = [split[i] for i in range(max(map(len, splits), default=0)) for split in splits if i < len(split)]
    ran = _train(cfg, rt, items, POOLED_SEED_NAME, plan.pooled(), start, "all data pooled", bar, validation)
    scores = {name: None if st.problem else _score(cfg, rt, st.eval_examples) for name, st in states.items()}
    return {
        "steps": ran,
        "examples": len(items),
        "scores": scores,
        "adapter": _save(rt, cfg, folder / POOLED, None, ran, len(items)),
        "seconds": round(time.time() - t, 1),
    }


def _finished(path: Path, plan: Plan) -> dict:
    """Trainings a previous ``--baselines`` finished for this same federation (else none)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if doc.get("plan") != plan.as_json():  # the federation has changed since (e.g. resumed for more rounds)
        return {}
    return {k: v for k, v in doc.items() if k in ("alone", POOLED)}


def baselines_doc(
    cfg: FedTuneConfig, plan: Plan, rounds: Sequence[RoundRecord | Mapping], done: dict, names: list[str]
) -> dict:
    """metrics.json's ``baselines`` (:class:`BaselinesRecord`): each site's score under each
    training, their example-weighted means, and the optimizer steps each training ran."""
    rounds = _rounds(rounds)
    first = rounds[0].sites if rounds and rounds[0].round == 0 else {}
    last = next((r.sites for r in reversed(rounds) if r.round > 0 and not r.skipped), {})
    alone, pooled = done.get("alone", {}), done.get(POOLED, {})
    sites = {
        name: {
            "base": _round_score(first.get(name)),
            "alone": (alone.get(name) or {}).get("score"),
            "pooled": (pooled.get("scores") or {}).get(name),
            "federation": _round_score(last.get(name)),
            **({PERSONALIZED: p} if (p := _personal_score(last.get(name))) else {}),  # a personalized run's
        }
        for name in names
    }
    shown = _trainings(any(PERSONALIZED in row for row in sites.values()))
    fed_steps = {name: plan.ran.get(name, 0) for name in names}
    return {
        "compute": (
            "optimizer steps of train.batch_size x train.grad_accum examples: each site alone has the steps it had in the "
            "federation, round by round (a personalized run's private steps included); the pooled run, the sum of all sites' "
            "steps each round (budget: the steps planned; "
            "federation, alone, pooled: the steps run, fewer than planned only where local early stopping ended a round)"
        ),
        "examples_per_step": cfg.train.batch_size * cfg.train.grad_accum,
        "steps": {
            "budget": plan.total(),
            "federation": {**fed_steps, "total": sum(fed_steps.values())},
            "alone": {name: (alone.get(name) or {}).get("steps", 0) for name in names},
            "pooled": pooled.get("steps", 0),
        },
        "sites": sites,
        "mean": {t: weighted_scores(sites[n].get(t) for n in names) for t in shown},
        "adapters": {
            **{n: a["adapter"] for n, a in alone.items() if a.get("adapter")},
            **({POOLED: pooled["adapter"]} if pooled.get("adapter") else {}),
        },
        "seconds": {**{n: a.get("seconds") for n, a in alone.items()}, POOLED: pooled.get("seconds")},
        "alone_on_all": {n: a["on_all"] for n in names if (a := alone.get(n) or {}).get("on_all")},
    }


def _score_of(row: TrainingScores | MeanScores, training: str) -> Score | Scores | None:
    return getattr(row, training)


def _trainings(personalized: bool) -> tuple[str, ...]:
    """The trainings a record scores: TRAININGS, and PERSONALIZED for a personalized run."""
    return TRAININGS + ((PERSONALIZED,) if personalized else ())


def is_personalized(b: BaselinesRecord) -> bool:
    """Whether the record scores each site's personalized model (a personalized federation's)."""
    return any(row.personalized for row in b.sites.values())


def trainings_of(b: BaselinesRecord) -> tuple[str, ...]:
    """The trainings the record scores (:func:`_trainings`)."""
    return _trainings(is_personalized(b))


def personal_verdict(b: BaselinesRecord) -> str | None:
    """One line: at how many sites the personalized model beat the site alone, and by how much (eval loss)."""
    d = {
        n: row.personalized.eval_loss - row.alone.eval_loss
        for n, row in b.sites.items()
        if row.personalized and row.alone and None not in (row.personalized.eval_loss, row.alone.eval_loss)
    }
    if not d:
        return None
    return (
        f"each site's personalized model against the site alone, eval loss: {', '.join(f'{n} {x:+.3f}' for n, x in d.items())} "
        f"(negative: better); better at {sum(x < 0 for x in d.values())} of {len(d)} site(s)"
    )


def on_all_mean(by_site: Mapping[str, Score | None]) -> float | None:
    """Example-weighted mean eval loss over the sites' splits (None unless every split is scored)."""
    rows = list(by_site.values())
    if not rows or any(s is None or s.eval_loss is None for s in rows):
        return None
    return weighted_mean([s.eval_loss for s in rows], [s.eval_examples for s in rows])


def on_all_verdict(b: BaselinesRecord, name: Callable[[str], str] = str) -> str | None:
    """One line: the federation's mean eval loss over all sites' splits against the best alone
    model's (``name``: how a site's name is written, e.g. escaped for markdown)."""
    means = {t: on_all_mean(by_site) for t, by_site in b.alone_on_all.items()}
    means = {t: m for t, m in means.items() if m is not None}
    fed = on_all_mean({n: row.federation for n, row in b.sites.items()})
    if not means or fed is None:
        return None
    best = min(means, key=means.get)
    verdict = "better than" if fed < means[best] else "not better than"
    return (
        f"on every site's split (mean eval loss), the federation's model {fed:.3f} is {verdict} the best site "
        f"alone's ({name(best)}, {means[best]:.3f})"
    )


def summary_lines(doc: BaselinesRecord | Mapping) -> list[str]:
    """The table for the console: each site's eval loss (and exact match) under each training."""
    b = doc if isinstance(doc, BaselinesRecord) else BaselinesRecord.model_validate(doc)
    shown = trainings_of(b)
    em = any((s := _score_of(row, t)) and s.exact_match is not None for row in b.sites.values() for t in shown)
    w = max(6, *(len(n) + 2 for n in b.sites))
    head = f"{'site':<{w}}" + "".join(f"{t:>16}" for t in shown)

    def cell(s: Score | Scores | None) -> str:
        if s is None or s.eval_loss is None:
            return f"{'–':>16}"
        text = f"{s.eval_loss:.3f}" + (f" / {s.exact_match:.2f}" if em and s.exact_match is not None else "")
        return f"{text:>16}"

    rows = [f"{name:<{w}}" + "".join(cell(_score_of(row, t)) for t in shown) for name, row in b.sites.items()]
    rows.append(f"{'mean':<{w}}" + "".join(cell(_score_of(b.mean, t)) for t in shown))
    gains = [
        (name, row.federation.eval_loss - row.alone.eval_loss)
        for name, row in b.sites.items()
        if row.alone and row.federation and row.alone.eval_loss is not None and row.federation.eval_loss is not None
    ]
    verdict = (
        [
            f"the federation against each site alone, eval loss: {', '.join(f'{n} {d:+.3f}' for n, d in gains)} "
            f"(negative: joining helped); better at {sum(d < 0 for _, d in gains)} of {len(gains)} site(s)"
        ]
        if gains
        else []
    )
    verdict += [line for line in (personal_verdict(b), on_all_verdict(b)) if line]
    return [f"eval loss{' / exact match' if em else ''} per site (lower / higher is better):", head, *rows, *verdict]


def add_baselines(cfg: FedTuneConfig, out: Path, say: Callable[[str], None] = print) -> dict:
    """Run the baselines for the finished run in ``out``, put them in its metrics.json under
    ``baselines`` and rewrite its report (the table and baselines.png). -> the metrics document."""
    from .report_sections import write_ftsim_report

    try:
        doc = read_document(out / FILE)
    except RecordError as e:
        raise BaselineError(str(e)) from None
    t = time.time()
    doc["baselines"] = run_baselines(
        cfg, out, doc["rounds"], say, None if cfg.model.device == "auto" else cfg.model.device
    )
    typed = BaselinesRecord.model_validate(doc["baselines"])  # ours: a key the schema lacks is a bug, found here
    write_record(out / FILE, doc)
    write_ftsim_report(out, plots=cfg.output.plots)
    say(f"baselines done in {progress.duration(time.time() - t)}")
    for line in summary_lines(typed):
        say(line)
    return doc
