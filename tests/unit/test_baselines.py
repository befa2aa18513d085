"""ftsim --baselines: each site alone and all data pooled, at the federation's compute and seed.

The key property is equal compute: the steps every baseline actually ran (counted at the trainer,
not taken from the plan) equal the steps the federation's sites ran.
"""

from __future__ import annotations

import json

import pytest

from fedtune.client import app as client_app
from fedtune.client import trainer
from fedtune.common import methods
from fedtune.common.checkpoint import load_adapter_state
from fedtune.common.config import load_config
from fedtune.common.evaluation import evaluate_examples
from fedtune.common.metrics import weighted_scores
from fedtune.server import app as server
from fedtune.server.record import write_record
from fedtune.simulations import baselines
from fedtune.simulations.report_sections import write_ftsim_report

from .test_client_app import fresh_caches  # noqa: F401  (autouse fixture)
from .test_methods import DATA_DIR, real_sites
from .test_server_rounds import _task_identity  # noqa: F401  (fixture)

NAMES = ("medical", "financial")


def test_the_plan_counts_only_the_steps_that_reached_the_global_adapter():
    rounds = [
        {"round": 0, "sites": {"a": {"eval_loss": 1.0}}},
        {
            "round": 1,
            "sites": {
                "a": {"status": "ok", "steps": 3},
                "b": {"status": "ok", "steps": 2},
                "c": {"status": "rejected", "steps": 3},
            },
        },
        {"round": 2, "skipped": "too few sites drawn", "sites": {}},
        {
            "round": 3,
            "sites": {
                "a": {"status": "ok", "steps": 3, "summed": False},
                "b": {"status": "ok", "steps": 4, "summed": True},
            },
        },
    ]
    plan = baselines.plan_of(rounds)
    assert plan.alone("a") == [(1, 3)]
    assert plan.alone("b") == [(1, 2), (3, 4)]
    assert plan.alone("c") == []
    assert plan.pooled() == [(1, 5), (3, 4)]
    assert plan.total() == 9 and plan.ran == {"a": 3, "b": 6}
    # With local early stopping the budget is the planned steps; what ran is counted apart.
    plan = baselines.plan_of([{"round": 1, "sites": {"a": {"status": "ok", "steps": 4, "planned_steps": 10}}}])
    assert plan.alone("a") == [(1, 10)] and plan.ran == {"a": 4}
    # A personalized run: the private steps a site ran on its own part count as its compute, even in a
    # round whose shared update did not reach the global model.
    plan = baselines.plan_of(
        [
            {
                "round": 1,
                "sites": {"a": {"status": "ok", "steps": 5, "personal_steps": 5}, "b": {"status": "ok", "steps": 5}},
            },
            {"round": 2, "sites": {"a": {"status": "rejected", "steps": 5, "personal_steps": 5}}},
        ]
    )
    assert plan.alone("a") == [(1, 10), (2, 5)] and plan.alone("b") == [(1, 5)]
    assert plan.pooled() == [(1, 15), (2, 5)] and plan.ran == {"a": 15, "b": 5}


def test_scores_are_weighted_by_examples():
    mean = weighted_scores(
        [{"eval_loss": 1.0, "exact_match": 0.5, "eval_examples": 3}, {"eval_loss": 3.0, "eval_examples": 1}, None]
    )
    assert mean == {"eval_loss": 1.5, "exact_match": 0.5}


@pytest.fixture
def federated_run(tiny_config, tmp_path):
    """A finished 2-round federation of two real sites (financial at LoRA rank 2 of the run's 4)."""
    return federate(tiny_config, tmp_path)


def federate(tiny_config, tmp_path, **train):
    data = json.loads(tiny_config.to_json())
    data["train"].update({"local_steps": 3, "lr": 1e-2, **train})
    data["eval"]["forgetting"] = False
    data["federation"]["sites"] = [
        {
            "name": "medical",
            "train": str(DATA_DIR / "medical" / "train.jsonl"),
            "eval": str(DATA_DIR / "medical" / "eval.jsonl"),
        },
        {
            "name": "financial",
            "train": str(DATA_DIR / "financial" / "train.jsonl"),
            "eval": str(DATA_DIR / "financial" / "eval.jsonl"),
            "rank": 2,
        },
    ]
    cfg = load_config(None, base=data)
    grid, files = real_sites(NAMES, {"financial": 2})
    assert files == client_app.sites_from_config(cfg)
    rs = server.run_federation(grid, cfg, tmp_path, lambda s: None)
    return cfg, tmp_path, rs


def test_baselines_run_at_the_federations_compute_and_seed(federated_run, monkeypatch):
    cfg, out, rs = federated_run
    calls: list[dict] = []
    real = trainer.train_round

    def counting(model, items, *a, **kw):
        stats = real(model, items, *a, **kw)
        calls.append({"round": kw["server_round"], "items": len(items), "steps": stats.steps, "seed": kw["seed"]})
        return stats

    monkeypatch.setattr(client_app, "train_round", counting)
    said: list[str] = []
    doc = baselines.run_baselines(cfg, out, rs.rounds, said.append, "cpu")

    # The federation: 2 rounds x 3 steps at each of 2 sites.
    fed = {name: sum(r["sites"][name]["steps"] for r in rs.rounds[1:]) for name in NAMES}
    assert fed == {"medical": 6, "financial": 6}
    assert doc["steps"]["federation"] == {**fed, "total": 12} and doc["steps"]["budget"] == 12
    # Alone: each site its own steps; pooled: the total. Counted at the trainer, round by round.
    assert doc["steps"]["alone"] == fed and doc["steps"]["pooled"] == 12
    per_training = [c["steps"] for c in calls]
    assert per_training == [3, 3, 3, 3, 6, 6]  # medical r1, r2; financial r1, r2; pooled r1, r2
    assert [c["round"] for c in calls] == [1, 2, 1, 2, 1, 2]
    assert sum(per_training) == 2 * 12  # alone and pooled each spend the federation's compute
    # The same seed a site trains with in the federation; the pooled run has its own, and all the data.
    sizes = {
        name: len(client_app.site_state(f, cfg, client_app.runtime(cfg, "cpu")).train_items)
        for name, f in zip(NAMES, client_app.sites_from_config(cfg))
    }
    assert calls[0]["seed"] == client_app.site_seed(cfg, "medical") and calls[2]["seed"] == client_app.site_seed(
        cfg, "financial"
    )
    assert calls[4]["items"] == sum(sizes.values()) and calls[4]["seed"] not in (calls[0]["seed"], calls[2]["seed"])

    # Every site has a score under every training; base and federation are the run's own rounds.
    for name in NAMES:
        s = doc["sites"][name]
        assert set(s) == {"base", "alone", "pooled", "federation"} and all(s[t]["eval_loss"] > 0 for t in s)
        assert s["base"]["eval_loss"] == rs.rounds[0]["sites"][name]["eval_loss"]
        assert s["federation"]["eval_loss"] == rs.rounds[-1]["sites"][name]["eval_loss"]
        assert s["alone"]["eval_loss"] < s["base"]["eval_loss"]  # training alone helps its own data at lr 1e-2
    assert set(doc["mean"]) == {"base", "alone", "pooled", "federation"}
    # Adapters are kept; financial alone trained at its own rank 2.
    assert (
        load_adapter_state(out / "baselines" / "alone" / "financial")[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        ].shape[0]
        == 2
    )
    assert (
        load_adapter_state(out / "baselines" / "pooled")[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        ].shape[0]
        == 4
    )
    assert any("ETA" in line for line in said) and any("financial alone: round 2/2" in line for line in said)

    # Two sites (at most 5): each alone model is also scored on the other's split, as that site
    # scores a model: medical's alone adapter on financial's eval file equals fteval's way of it.
    on_all = doc["alone_on_all"]
    assert set(on_all) == set(NAMES) and all(set(by_site) == set(NAMES) for by_site in on_all.values())
    assert all(on_all[n][n] == doc["sites"][n]["alone"] for n in NAMES)
    medical, financial = client_app.sites_from_config(cfg)
    rt, _, state = client_app.site_model(
        cfg, medical, load_adapter_state(out / "baselines" / "alone" / "medical"), "cpu"
    )
    methods.set_state(rt.model, state)
    fin_split = client_app.site_state(financial, cfg, rt).eval_examples
    res = evaluate_examples(rt.model, rt.tokenizer, fin_split, cfg.data, cfg.eval, rt.device)
    assert on_all["medical"]["financial"]["eval_loss"] == pytest.approx(res.loss, rel=1e-5)
    assert on_all["medical"]["financial"]["eval_examples"] == min(len(fin_split), cfg.eval.max_examples)
    assert on_all["medical"]["financial"]["eval_loss"] != doc["sites"]["financial"]["alone"]["eval_loss"]
    assert any(
        "on every site's split (mean eval loss), the federation's model" in line
        for line in baselines.summary_lines(doc)
    )

    # A second call (ftsim --resume DIR --baselines) reuses what is done: no training.
    calls.clear()
    again = baselines.run_baselines(cfg, out, rs.rounds, said.append, "cpu")
    assert calls == [] and again["sites"] == doc["sites"]
    # Results from before the scores on every split: the saved alone adapters are scored, the same figures.
    results = json.loads((out / "baselines" / "results.json").read_text())
    for res in results["alone"].values():
        del res["on_all"]
    (out / "baselines" / "results.json").write_text(json.dumps(results))
    again = baselines.run_baselines(cfg, out, rs.rounds, said.append, "cpu")
    assert calls == [] and again["alone_on_all"]["medical"]["financial"]["eval_loss"] == pytest.approx(
        on_all["medical"]["financial"]["eval_loss"], rel=1e-5
    )
    assert again["alone_on_all"]["financial"]["medical"]["eval_loss"] == pytest.approx(
        on_all["financial"]["medical"]["eval_loss"], rel=1e-5
    )
    # A federation with more rounds since is a different plan: everything trains again.
    more = [*rs.rounds, {"round": 3, "sites": {n: {"status": "ok", "steps": 3} for n in NAMES}}]
    baselines.run_baselines(cfg, out, more, said.append, "cpu")
    assert [c["steps"] for c in calls] == [3, 3, 3] * 2 + [6, 6, 6]


def test_a_site_alone_is_scored_exactly_as_the_federation_scores_it(federated_run):
    """The in-process score of round 0's adapter equals the score the sites reported for round 0,
    so the alone and pooled columns are comparable with the federation's."""
    cfg, out, rs = federated_run
    start = load_adapter_state(out / "checkpoints" / "round-0000")
    for site in client_app.sites_from_config(cfg):
        rt, st, state = client_app.site_model(cfg, site, start, "cpu")
        methods.set_state(rt.model, state)
        res = evaluate_examples(rt.model, rt.tokenizer, st.eval_examples, cfg.data, cfg.eval, rt.device)
        assert res.loss == pytest.approx(rs.rounds[0]["sites"][site.name]["eval_loss"], rel=1e-5)


def test_the_report_shows_the_baselines_table_and_plot(federated_run):
    cfg, out, rs = federated_run
    doc = json.loads((out / "metrics.json").read_text())
    doc["baselines"] = baselines.baselines_doc(
        cfg,
        baselines.plan_of(rs.rounds),
        rs.rounds,
        {
            "alone": {
                "medical": {
                    "steps": 6,
                    "score": {"eval_loss": 2.0, "exact_match": 0.5, "eval_examples": 4},
                    "on_all": {
                        "medical": {"eval_loss": 2.0, "exact_match": 0.5, "eval_examples": 4},
                        "financial": {"eval_loss": 4.0, "eval_examples": 12},
                    },
                },
                "financial": {"steps": 6, "score": None},
            },
            "pooled": {
                "steps": 12,
                "scores": {
                    "medical": {"eval_loss": 1.5, "eval_examples": 4},
                    "financial": {"eval_loss": 1.0, "eval_examples": 4},
                },
            },
        },
        list(NAMES),
    )
    write_record(out / "metrics.json", doc)  # as ftsim --baselines does: the record, then ftsim's report
    write_ftsim_report(out)
    md = (out / "report.md").read_text()
    assert "## Does federation help? Baselines at equal compute" in md
    assert "federation 12 (medical 6, financial 6); alone medical 6, financial 6; pooled 12" in md
    fed = rs.rounds[-1]["sites"]["medical"]["eval_loss"]
    better = "better" if fed < 2.0 else "worse"
    assert (
        f"| medical | {rs.rounds[0]['sites']['medical']['eval_loss']:.3f} | 2.000 | 1.500 | {fed:.3f} | {fed - 2.0:+.3f} ({better}) |"
        in md
    )
    assert "| financial |" in md and "| – | 1.000 |" in md  # financial alone has no score
    # The verdict counts only sites scored under both (financial alone has no score).
    assert (
        f"- eval loss: the federation did better than the site alone at {int(fed < 2.0)} of 1 site(s); all data pooled did best of the four at 1 of 1"
        in md
    )
    # Medical's alone model on every split: (2.0 x 4 + 4.0 x 12) / 16 = 3.5, against the federation's mean.
    assert "| medical alone | 2.000 | 4.000 | 3.500 |" in md
    fed_sites = rs.rounds[-1]["sites"]
    fed_mean = sum(fed_sites[n]["eval_loss"] * fed_sites[n]["eval_examples"] for n in NAMES) / sum(
        fed_sites[n]["eval_examples"] for n in NAMES
    )
    verdict = "better than" if fed_mean < 3.5 else "not better than"
    assert (
        f"- on every site's split (mean eval loss), the federation's model {fed_mean:.3f} is {verdict} the best site alone's (medical, 3.500)"
        in md
    )
    html = (out / "report.html").read_text()
    assert (out / "baselines.png").stat().st_size > 1000
    assert html.count("data:image/png;base64,") == md.count("](") and 'alt="baselines.png"' in html


def test_with_local_early_stopping_the_baselines_get_the_planned_budget_and_stop_by_the_same_rule(
    tiny_config, tmp_path, monkeypatch
):
    # lr 0.5 overshoots at once: every site's validation loss stops improving and rounds end early.
    cfg, out, rs = federate(tiny_config, tmp_path, local_steps=6, lr=0.5, local_patience=1, local_eval_every=1)
    ran = {n: sum(r["sites"][n]["steps"] for r in rs.rounds[1:]) for n in NAMES}
    assert all(r["sites"][n]["planned_steps"] == 6 for r in rs.rounds[1:] for n in NAMES)
    assert sum(ran.values()) < 24  # some round stopped early
    calls: list[int] = []
    real = trainer.train_round

    def counting(model, items, pad_id, train_cfg, *a, **kw):
        calls.append(train_cfg.local_steps)
        return real(model, items, pad_id, train_cfg, *a, **kw)

    monkeypatch.setattr(client_app, "train_round", counting)
    doc = baselines.run_baselines(cfg, out, rs.rounds, lambda s: None, "cpu")
    assert calls == [6, 6, 6, 6, 12, 12]  # each training is offered the federation's planned budget
    assert doc["steps"]["budget"] == 24 and doc["steps"]["federation"] == {**ran, "total": sum(ran.values())}
    assert all(1 <= doc["steps"]["alone"][n] <= 12 for n in NAMES) and 1 <= doc["steps"]["pooled"] <= 24


def test_the_baselines_section_of_the_record_is_typed(tiny_config):
    """metrics.json's baselines (ftsim's section) read through BaselinesRecord; a wrong type is
    refused naming the key."""
    from fedtune.server.record import RecordError, validate_record

    from .test_report import make_doc

    rounds = [
        {"round": 0, "sites": {"a": {"eval_loss": 2.0, "eval_examples": 4}}},
        {"round": 1, "sites": {"a": {"status": "ok", "steps": 3, "eval_loss": 1.5, "eval_examples": 4}}},
    ]
    done = {
        "alone": {"a": {"steps": 3, "score": {"eval_loss": 1.7, "eval_examples": 4}}},
        "pooled": {"steps": 3, "scores": {"a": None}},
    }
    doc = baselines.baselines_doc(tiny_config, baselines.plan_of(rounds), rounds, done, ["a"])
    b = baselines.BaselinesRecord.model_validate(doc)
    assert b.sites["a"].base.eval_loss == 2.0 and b.sites["a"].federation.eval_loss == 1.5
    assert b.sites["a"].alone.eval_loss == 1.7 and b.sites["a"].pooled is None
    assert b.steps.federation == {"a": 3, "total": 3} and b.steps.pooled == 3 and b.mean.alone.eval_loss == 1.7
    record = validate_record({**make_doc(), "baselines": doc})
    assert baselines.BaselinesRecord.of(record) == b
    assert baselines.BaselinesRecord.of(validate_record(make_doc())) is None
    # The console's table reads the same record.
    lines = baselines.summary_lines(b)
    assert lines[0] == "eval loss per site (lower / higher is better):" and lines[1].split() == [
        "site",
        *baselines.TRAININGS,
    ]
    assert lines[2].split() == ["a", "2.000", "1.700", "–", "1.500"] and lines[3].split() == [
        "mean",
        "2.000",
        "1.700",
        "–",
        "1.500",
    ]
    assert (
        lines[4].startswith("the federation against each site alone, eval loss: a -0.200")
        and "better at 1 of 1" in lines[4]
    )
    assert baselines.summary_lines(doc) == lines
    doc["steps"]["pooled"] = "3"
    with pytest.raises(RecordError, match=r"baselines\.steps\.pooled"):
        baselines.BaselinesRecord.of(validate_record({**make_doc(), "baselines": doc}))


def test_a_personalized_run_gets_its_column_and_verdict(tiny_config, tmp_path):
    """The last round's personalized scores (each site's own model) sit beside the four trainings,
    in the console, metrics.json and the report, with how many sites beat training alone."""
    from fedtune.server.record import validate_record

    from .test_report import make_doc

    last = {"status": "ok", "steps": 3, "eval_loss": 1.5, "eval_examples": 4}
    rounds = [
        {
            "round": 0,
            "sites": {"a": {"eval_loss": 2.0, "eval_examples": 4}, "b": {"eval_loss": 2.2, "eval_examples": 4}},
        },
        {
            "round": 1,
            "sites": {
                "a": {**last, "personal_eval_loss": 1.2, "personal_exact_match": 0.75},
                "b": {**last, "personal_eval_loss": 1.9},
            },
        },
    ]
    done = {
        "alone": {n: {"steps": 3, "score": {"eval_loss": 1.7, "eval_examples": 4}} for n in "ab"},
        "pooled": {"steps": 6, "scores": {"a": None, "b": None}},
    }
    doc = baselines.baselines_doc(tiny_config, baselines.plan_of(rounds), rounds, done, ["a", "b"])
    b = baselines.BaselinesRecord.model_validate(doc)
    assert b.sites["a"].personalized.eval_loss == 1.2 and b.sites["a"].personalized.exact_match == 0.75
    assert b.mean.personalized.eval_loss == pytest.approx(1.55)
    lines = baselines.summary_lines(b)
    assert lines[1].split() == ["site", *baselines.TRAININGS, "personalized"]
    assert any(
        line.startswith("each site's personalized model against the site alone, eval loss: a -0.500, b +0.200")
        and line.endswith("better at 1 of 2 site(s)")
        for line in lines
    )
    plain = baselines.baselines_doc(
        tiny_config, baselines.plan_of(rounds[:1] + [{"round": 1, "sites": {"a": last, "b": last}}]),
        [rounds[0], {"round": 1, "sites": {"a": last, "b": last}}], done, ["a", "b"],
    )  # fmt: skip
    assert "personalized" not in baselines.summary_lines(plain)[1]
    out = tmp_path / "run"
    out.mkdir()
    record = {**make_doc(), "baselines": doc}
    validate_record(record)
    write_record(out / "metrics.json", record)
    write_ftsim_report(out, plots=False)
    md = (out / "report.md").read_text()
    assert "| personalized | federation against alone | personalized against alone |" in md
    assert "- each site's personalized model against the site alone" in md
    assert "private steps (personalization) are counted in its compute" in md
