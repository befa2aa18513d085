"""What a run leaves for people: the best round by the sites' weighted validation metric, kept
as best/, and early stopping after eval.patience rounds without improvement; where adaptation
happens (per layer, per site); report.html with its plots embedded; TensorBoard event files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedtune.common import messages
from fedtune.common.checkpoint import load_adapter_state
from fedtune.common.config import ConfigError, load_config
from fedtune.common.messages import EvalMetrics, EvalReply
from fedtune.server import app as server

from .test_client_app import fresh_caches  # noqa: F401  (autouse fixture)
from .test_methods import method_config, real_sites, tiny_config  # noqa: F401  (fixture: the 64-wide tiny model)
from .test_server_rounds import _task_identity, server_round  # noqa: F401  (_task_identity: fixture)


def rounds_of(values, metric="eval_loss"):
    return [{"round": i, "aggregate": {} if v is None else {metric: v}} for i, v in enumerate(values)]


@pytest.mark.parametrize(
    "values, metric, min_delta, expected",
    [
        ([3.0, 2.0, 2.5, 1.9, 1.95], "eval_loss", 0.0, (3, 1.9, 1)),
        ([3.0, 2.0, 2.5, 1.9, 1.95], "eval_loss", 0.2, (1, 2.0, 3)),  # 2.0 -> 1.9 is not enough
        ([3.0, 3.0, 3.0], "eval_loss", 0.0, (0, 3.0, 2)),  # a tie does not improve: the base stays best
        (
            [0.2, 0.5, 0.4, None],
            "exact_match",
            0.0,
            (1, 0.5, 2),
        ),  # higher is better; a round without it does not improve
        ([None, None], "eval_loss", 0.0, (None, None, 0)),
    ],
)
def test_best_round_on_scripted_sequences(values, metric, min_delta, expected):
    assert server.best_round(rounds_of(values, metric), metric, min_delta) == expected


def test_validation_settings_are_checked(tiny_config):
    base = json.loads(tiny_config.to_json())
    with pytest.raises(ConfigError, match="eval.select_metric"):
        load_config(None, base=base | {"eval": {"select_metric": "accuracy"}})
    with pytest.raises(ConfigError, match="eval.patience"):
        load_config(None, base=base | {"eval": {"patience": 0}})


def test_the_best_round_is_kept_and_the_run_stops_after_patience_rounds_without_improvement(tiny_config, tmp_path):
    """Real sites train; their validation loss is scripted per round: 3.0 (base), 2.0, 2.5, 2.6,
    then 1.0 that the run never reaches. With patience 2 the 6-round run stops after round 3,
    best/ holds round 1's adapter, and metrics.json and the report say so."""
    script = {0: 3.0, 1: 2.0, 2: 2.5, 3: 2.6, 4: 1.0, 5: 1.0, 6: 1.0}
    data = json.loads(method_config(tiny_config, "lora").to_json())
    data["federation"]["rounds"] = 6
    data["train"]["local_steps"] = 2
    data["eval"]["patience"] = 2
    data["output"]["tensorboard"] = True
    cfg = load_config(None, base=data)
    grid, _ = real_sites()
    for node, handle in list(grid.sites.items()):

        def scripted(m, handle=handle):
            if m.metadata.message_type != messages.EVALUATE:
                return handle(m)
            site = EvalReply.from_record(handle(m)).site
            return EvalReply(site, EvalMetrics(num_examples=4, eval_loss=script[server_round(m)])).to_record()

        grid.sites[node] = scripted
    said: list[str] = []
    rs = server.run_federation(grid, cfg, tmp_path, said.append)
    assert [r["round"] for r in rs.rounds] == [0, 1, 2, 3]
    assert (
        "early stopping" in rs.stopped
        and "since round 1" in rs.stopped
        and any("stopping: early stopping" in s for s in said)
    )
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["best"] == {"round": 1, "metric": "eval_loss", "value": 2.0, "rounds_since": 2}
    best = load_adapter_state(tmp_path / "best")
    round1 = load_adapter_state(tmp_path / "checkpoints" / "round-0001")
    last = load_adapter_state(tmp_path / "adapter")
    assert all(np.array_equal(best[k].numpy(), round1[k].numpy()) for k in best)
    assert any(not np.array_equal(best[k].numpy(), last[k].numpy()) for k in best)  # adapter/ is the last round's
    report = (tmp_path / "report.md").read_text()
    assert "- best round: 1, federated eval_loss 2.0000; its adapter: `best/`" in report
    assert "**stopped early**: early stopping" in report
    # Where adaptation happens: the per-layer change (plot) and each site's pull (table).
    assert set(doc["rounds"][1]["layer_change"]) == {"0", "1"} and (tmp_path / "layers.png").stat().st_size > 1000
    assert "![layers.png](layers.png)" in report and "| 1 | medical |" in report
    for site in doc["rounds"][1]["sites"].values():
        assert 0 < site["cosine_to_aggregate"] <= 1 and site["update_norm"] > 0
        # ... and per layer: the layers' norms make up the whole.
        assert set(site["by_layer"]) == {"0", "1"}
        assert sum(v["update_norm"] ** 2 for v in site["by_layer"].values()) == pytest.approx(site["update_norm"] ** 2)
    assert "![sites.png](sites.png)" in report
    # Forgetting: the general-knowledge set, base model against the final adapter, beside the domains.
    f = doc["forgetting"]
    assert set(f) == {"base", "final", "change"}
    assert set(f["base"]) == {"text_loss", "qa_loss", "qa_accuracy", "qa_wrong_loss", "qa_reply_words"}
    assert f["change"]["qa_loss"] == pytest.approx(f["final"]["qa_loss"] - f["base"]["qa_loss"])
    assert f["base"]["qa_loss"] != f["final"]["qa_loss"]  # the final adapter (round 3) is not the base model
    assert "## What the model forgot" in report and "| domain eval loss | 3.000 | 2.600 | -0.400 |" in report
    # report.html: the same report on one page, every plot embedded (no file beside it needed).
    page = (tmp_path / "report.html").read_text()
    plots = ["loss.png", "layers.png", "sites.png", "rounds.png", "forgetting.png"]
    assert all((tmp_path / p).stat().st_size > 1000 for p in plots)
    assert page.count('src="data:image/png;base64,') == len(plots) and 'src="loss.png"' not in page
    assert "<table><tr><th>site</th><th>eval loss, base</th>" in page and "<strong>stopped early</strong>" in page
    # TensorBoard: the same figures as metrics.json, one step per round.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    losses = [(e.step, e.value) for e in acc.Scalars("federation/eval_loss")]
    assert losses == [(r["round"], pytest.approx(r["aggregate"]["eval_loss"])) for r in doc["rounds"]]
    cos = acc.Scalars("site/medical/cosine_to_aggregate")
    assert [e.step for e in cos] == [1, 2, 3] and cos[0].value == pytest.approx(
        doc["rounds"][1]["sites"]["medical"]["cosine_to_aggregate"]
    )
    assert {"round/update_bytes", "round/seconds", "layer_change/0", "layer_change/1"} <= set(acc.Tags()["scalars"])


def test_the_general_knowledge_set_loads_and_scores(tiny_config):
    from fedtune.common import forgetting, methods
    from fedtune.common.config import DataConfig
    from fedtune.common.data import load_site_data

    qa = load_site_data(forgetting.GENERAL_DIR / "qa.jsonl", DataConfig()).examples
    text = load_site_data(forgetting.GENERAL_DIR / "text.jsonl", DataConfig()).examples
    assert len(qa) == 32 and len(text) == 16 and all(ex.is_chat for ex in qa) and not any(ex.is_chat for ex in text)
    assert forgetting.contains_answer("The capital of France is Paris.", "Paris")
    assert not forgetting.contains_answer("Parisian cafés", "Paris") and not forgetting.contains_answer("", "Paris")
    assert forgetting.contains_answer("It is 56", "56") and not forgetting.contains_answer("156", "56")
    model, tok, dev = methods.load_model(tiny_config, "cpu")
    scores = forgetting.general_knowledge(model, tok, dev)
    assert set(scores) == {"text_loss", "qa_loss", "qa_accuracy", "qa_wrong_loss", "qa_reply_words"}
    assert scores["text_loss"] > 0 and scores["qa_loss"] > 0 and 0 <= scores["qa_accuracy"] <= 1
    assert (
        scores["qa_wrong_loss"] > 0 and scores["qa_wrong_loss"] != scores["qa_loss"] and scores["qa_reply_words"] >= 0
    )
    # The wrong answers: each question with the next one's answer, the form kept.
    wrong = forgetting.wrong_answers(qa)
    answers = [ex.messages[-1]["content"] for ex in qa]
    assert [ex.messages[-1]["content"] for ex in wrong] == answers[1:] + answers[:1]
    assert all(w.messages[:-1] == q.messages[:-1] for w, q in zip(wrong, qa))
    assert all(a != b for a, b in zip(answers, answers[1:] + answers[:1]))  # every one is wrong


@pytest.mark.parametrize(
    "final, said",
    [
        # The demo's own figures (2026-12-07): the lead grew, the replies shrank to one word.
        ({"qa_loss": 1.685, "qa_wrong_loss": 4.145, "qa_accuracy": 0.03, "qa_reply_words": 1.0},
         "so the model kept the facts. Questions answered went from 0.62 to 0.03, with greedy replies of 7.5 words on "
         "average before and 1.0 after: what fell is how it answers"),
        ({"qa_loss": 3.0, "qa_wrong_loss": 3.2, "qa_accuracy": 0.2, "qa_reply_words": 7.0}, "so the model lost most of the facts."),
        ({"qa_loss": 3.0, "qa_wrong_loss": 4.4, "qa_accuracy": 0.5, "qa_reply_words": 7.0}, "so the model kept part of the facts."),
    ],
)  # fmt: skip
def test_the_report_says_whether_the_model_lost_facts_or_changed_its_form(final, said):
    from fedtune.server.record import RunRecord
    from fedtune.server.report import render_markdown

    from .test_report import make_doc

    doc = make_doc()
    base = {"text_loss": 2.606, "qa_loss": 3.628, "qa_wrong_loss": 5.569, "qa_accuracy": 0.62, "qa_reply_words": 7.5}
    doc["forgetting"] = {"base": base, "final": {"text_loss": 2.606, **final}}
    md = render_markdown(RunRecord.model_validate(doc), [])
    assert "the right answer's lead over a wrong one went from 1.941 to" in md and said in md
    assert "| general question loss, a wrong answer | 5.569 |" in md
