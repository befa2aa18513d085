"""A hostile site against the coordinator, through the real round handlers (issue 15).

Every test plays a site that sends what an attacker would: a huge example count, an update of
3e38 or NaN, a name or reason with newlines and markup, metric keys of its own, another site's
name, an oversize update. Each checks what reaches the global adapter, server.log,
metrics.json and report.html."""

from __future__ import annotations

import base64
import json
import math
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedtune.common import adapters, messages
from fedtune.common.messages import EvalMetrics, TrainMetrics
from fedtune.server import app as server
from fedtune.server.deploy import make_logger

from .test_server_rounds import FakeGrid, _task_identity, run_state, trainer  # noqa: F401  (fixture)


def reply(name: str, delta: dict | None, metrics: dict, status: str = "ok", reason: str | None = None) -> RecordDict:
    """A hostile site's reply, built by hand (an attacker does not use fedtune.common.messages, whose
    classes refuse what it sends), in the records the coordinator reads."""
    site = ConfigRecord({"name": name, "status": status, **({"reason": reason} if reason is not None else {})})
    content = RecordDict({messages.METRICS: MetricRecord(metrics), messages.SITE: site})
    if delta is not None:
        for k, v in adapters.adapter_records(adapters.to_tensors(delta)).items():
            content[k] = v
    return content


def constant(value: float, n: int = 10, name: str = "site", **extra):
    """A site whose delta is ``value`` everywhere (shaped like the broadcast adapter), claiming ``n`` examples."""

    def handle(m):
        if m.metadata.message_type == messages.EVALUATE:
            return reply(name, None, EvalMetrics(num_examples=4, eval_loss=1.0).to_dict())
        glob = messages.TrainTask.from_record(m.content).adapter
        return reply(
            name,
            OrderedDict((k, np.full(v.shape, value, np.float32)) for k, v in glob.items()),
            {**TrainMetrics(num_examples=n, train_loss=1.0).to_dict(), **extra},  # extra: maybe a hostile key
        )

    return handle


def tiny_run_config(tiny_config, **federation):
    fed = tiny_config.federation.model_copy(
        update={"rounds": 1, "min_sites": 1, "round_timeout_s": 2, "join_timeout_s": 1, **federation}
    )
    return tiny_config.model_copy(
        update={"federation": fed, "output": tiny_config.output.model_copy(update={"plots": False})}
    )


# ---------------------------------------------------------------------------------------------
# Weight spoofing


def test_a_site_claiming_ten_million_examples_weighs_at_most_the_cap(tiny_config, tmp_path):
    """Two honest sites (100 examples, update 1e-3) and one claiming 10,000,000 with -0.5: the
    median count is 100, so the hostile site weighs at most 3 x 100 = 300 of 500 (weight_cap 3)."""
    rs = run_state(tiny_config, tmp_path, min_sites=1, round_timeout_s=5, update_norm_bound=None)
    grid = FakeGrid(
        {1: trainer("alpha", 1e-3, n=100), 2: trainer("beta", 1e-3, n=100), 3: trainer("mallory", -0.5, n=10_000_000)}
    )
    r = server.run_training_round(grid, [1, 2, 3], rs, 1, lambda s: None)
    cap_share = 300 / 500
    expected = (1 - cap_share) * 1e-3 + cap_share * -0.5
    np.testing.assert_allclose(rs.global_state["a"], expected, rtol=1e-5)
    assert abs(float(rs.global_state["a"][0, 0]) - 1e-3) <= cap_share * abs(-0.5 - 1e-3) * (1 + 1e-5)
    assert r["sites"]["mallory"]["weight"] == 300 and r["sites"]["alpha"]["weight"] == 100
    assert r["sites"]["mallory"]["weight_capped"] is True and "weight_capped" not in r["sites"]["alpha"]


def test_the_cap_holds_with_two_sites_and_equal_weighting_ignores_counts(tiny_config, tmp_path):
    """Of two sites the lower of the two middle counts is the median (else one of two sites would
    set its own cap); with weighting 'equal' every site weighs 1."""
    grid = FakeGrid({1: trainer("alpha", 1e-3, n=100), 2: trainer("mallory", -0.5, n=10_000_000)})
    rs = run_state(tiny_config, tmp_path, update_norm_bound=None)
    server.run_training_round(grid, [1, 2], rs, 1, lambda s: None)
    np.testing.assert_allclose(rs.global_state["a"], (100 * 1e-3 + 300 * -0.5) / 400, rtol=1e-5)
    rs = run_state(tiny_config, tmp_path, update_norm_bound=None, weighting="equal")
    server.run_training_round(grid, [1, 2], rs, 1, lambda s: None)
    np.testing.assert_allclose(rs.global_state["a"], (1e-3 - 0.5) / 2, rtol=1e-5)
    rs = run_state(tiny_config, tmp_path, update_norm_bound=None, weight_cap=None)  # no relative cap: the counts rule
    server.run_training_round(grid, [1, 2], rs, 1, lambda s: None)
    np.testing.assert_allclose(rs.global_state["a"], (100 * 1e-3 + 1e7 * -0.5) / (1e7 + 100), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad updates


def test_an_update_of_3e38_is_clipped_by_the_default_bound_and_the_global_stays_finite(tiny_config, tmp_path):
    """The default update_norm_bound ('auto') clips the hostile update; two rounds of it leave the
    global finite, and an honest update of 1e-3 is not touched."""
    rs = run_state(tiny_config, tmp_path, min_sites=1, round_timeout_s=5, update_norm_bound="auto")
    grid = FakeGrid({1: trainer("alpha", 1e-3, n=10), 2: trainer("mallory", 3e38, n=10)})
    for rnd in (1, 2):
        r = server.run_training_round(grid, [1, 2], rs, rnd, lambda s: None)
        assert all(np.isfinite(v).all() for v in rs.global_state.values())
        assert r["sites"]["mallory"]["clipped_by_coordinator"] and not r["sites"]["alpha"]["clipped_by_coordinator"]
    bound = rs.cfg.norm_bound(10)
    assert 0 < bound < 1 and server.l2_norm(rs.global_state) <= 2 * bound


def test_a_global_that_is_not_finite_is_refused_and_the_round_fails_cleanly(tiny_config, tmp_path):
    """With the bound off, 3e38 twice overflows float32: round 2 fails with a FederationError and
    the global stays at round 1's."""
    rs = run_state(tiny_config, tmp_path, min_sites=1, round_timeout_s=5, update_norm_bound="off")
    grid = FakeGrid({1: trainer("mallory", 3e38, n=10)})
    server.run_training_round(grid, [1], rs, 1, lambda s: None)
    after_1 = {k: v.copy() for k, v in rs.global_state.items()}
    with pytest.raises(
        server.FederationError, match=r"round 2: the new global adapter is not finite.*stays at round 1"
    ):
        server.run_training_round(grid, [1], rs, 2, lambda s: None)
    for k in after_1:
        np.testing.assert_array_equal(rs.global_state[k], after_1[k])


def test_a_site_that_zeroed_a_nan_update_is_rejected_not_averaged(tiny_config, tmp_path):
    """A site whose update went NaN used to send zeros (and say so in update-nonfinite): that
    is rejected with a reason, not averaged in at full weight."""
    rs = run_state(tiny_config, tmp_path, min_sites=1, round_timeout_s=5)

    def zeroed(m):
        out = trainer("diverged", 0.0, n=1000)(m)
        if m.metadata.message_type == messages.TRAIN:
            out[messages.METRICS] = MetricRecord(
                {**dict(out[messages.METRICS].items()), "update-nonfinite": 1, "update-clipped": 1}
            )
        return out

    r = server.run_training_round(FakeGrid({1: trainer("alpha", 1e-3, n=10), 2: zeroed}), [1, 2], rs, 1, lambda s: None)
    assert r["accepted"] == 1 and r["sites"]["diverged"]["status"] == "rejected"
    assert "not finite" in r["sites"]["diverged"]["reason"]
    np.testing.assert_allclose(rs.global_state["a"], 1e-3, rtol=1e-5)


def test_a_site_never_sends_a_nan_update_as_zeros(tiny_config):
    from fedtune.common import privacy

    cfg = tiny_config
    with pytest.raises(privacy.NonFiniteUpdate, match="not finite"):
        privacy.site_release(cfg, OrderedDict(a=torch.tensor([math.nan, 1.0])), secure=False, n_sites=3)


def test_an_oversize_update_is_refused_before_its_vector_is_read(tiny_config, tmp_path, monkeypatch):
    """An update that declares more values than the round's adapter has is refused on its
    declared size: its vector is never decoded."""
    from flwr.app import Array

    rs = run_state(tiny_config, tmp_path, min_sites=1, round_timeout_s=5)
    big = OrderedDict(a=np.zeros((2, 3), np.float32), b=np.zeros((4,), np.float32), c=np.zeros((100_000,), np.float32))

    def oversize(m):
        return (
            reply("bloat", big, TrainMetrics(num_examples=10).to_dict())
            if m.metadata.message_type == messages.TRAIN
            else None
        )

    decoded = []
    real = Array.numpy
    monkeypatch.setattr(Array, "numpy", lambda self: decoded.append(self.shape) or real(self))
    r = server.run_training_round(FakeGrid({1: trainer("alpha", 1e-3), 2: oversize}), [1, 2], rs, 1, lambda s: None)
    assert r["sites"]["bloat"]["status"] == "rejected" and "100,010 values" in r["sites"]["bloat"]["reason"]
    assert (100_010,) not in decoded


# ---------------------------------------------------------------------------------------------
# Site strings in the coordinator's files


FORGED = "[00:00:00] round 1/1 done in 0 s; checkpoint /tmp/x"


def test_a_site_name_or_reason_cannot_forge_a_line_in_server_log(tiny_config, tmp_path):
    cfg = tiny_run_config(tiny_config)
    out = tmp_path / "run"
    out.mkdir()

    def liar(m):
        if m.metadata.message_type == messages.EVALUATE:
            return reply("evil\n" + FORGED + "\n\x1b[2K", None, EvalMetrics(num_examples=4, eval_loss=1.0).to_dict())
        return reply(
            "evil\n" + FORGED,
            None,
            TrainMetrics(num_examples=0).to_dict(),
            status="refused",
            reason="no\r\n" + FORGED + "\u2028" + FORGED + "\x1b[1A",
        )

    server.run_federation(FakeGrid({1: constant(1e-3, name="alpha"), 2: liar}), cfg, out, make_logger(out))
    lines = (out / "server.log").read_text(encoding="utf-8").split("\n")[:-1]
    assert lines and all(re.match(r"^\[\d\d:\d\d:\d\d\] ", line) for line in lines)
    assert not any(line.startswith("[00:00:00]") for line in lines)
    text = (out / "server.log").read_text(encoding="utf-8")
    assert "\x1b" not in text and "\u2028" not in text and "\r" not in text
    doc = json.loads((out / "metrics.json").read_text())
    names = set(doc["rounds"][1]["sites"])
    assert "alpha" in names and all(re.fullmatch(r"[A-Za-z0-9_.@-]{1,80}", n) for n in names), names
    reasons = [s.get("reason", "") for s in doc["rounds"][1]["sites"].values()]
    assert all("\n" not in x and "\u2028" not in x and len(x) <= 300 for x in reasons)


def test_report_html_does_not_embed_a_file_a_site_names(tiny_config, tmp_path):
    """A refusing site's reason holds a markdown image of the coordinator's CA key: report.html
    must not contain the key's bytes, raw or base64."""
    secret = tmp_path / "ca.key"
    secret.write_bytes(b"-----BEGIN FAKE PRIVATE KEY-----\nTOPSECRETKEYMATERIAL\n-----END FAKE PRIVATE KEY-----\n")
    cfg = tiny_run_config(tiny_config)
    out = tmp_path / "run"

    image = f"\n![k]({secret})\n"

    def liar(m):  # its name, its reason and a tensor name each carry the image line
        if m.metadata.message_type == messages.EVALUATE:
            return reply("mallory" + image, None, EvalMetrics(num_examples=4, eval_loss=1.0).to_dict())
        return reply(
            "mallory" + image, None, TrainMetrics(num_examples=0).to_dict(), status="refused", reason="busy" + image
        )

    def smuggler(m):  # an update with a tensor of its own: rejected, and the reason names the tensor
        if m.metadata.message_type == messages.EVALUATE:
            return reply("trudy", None, EvalMetrics(num_examples=4, eval_loss=1.0).to_dict())
        glob = adapters.read_adapter(m.content)
        delta = OrderedDict((k, np.zeros(v.shape, np.float32)) for k, v in glob.items()) | {
            "x" + image: np.zeros(1, np.float32)
        }
        return reply("trudy", delta, TrainMetrics(num_examples=10).to_dict())

    server.run_federation(FakeGrid({1: constant(1e-3, name="alpha"), 2: liar, 3: smuggler}), cfg, out, lambda s: None)
    page = (out / "report.html").read_text()
    assert "TOPSECRETKEYMATERIAL" not in page and base64.b64encode(secret.read_bytes()).decode() not in page
    assert "data:image" not in page  # plots off: nothing may be embedded at all


def test_report_embeds_only_the_plots_it_wrote(tmp_path):
    """Even a markdown image line of its own in the report's text (from data) is not embedded:
    only the files write_plots made, inside the run folder."""
    from fedtune.server.report import render_html

    secret = tmp_path / "ca.key"
    secret.write_bytes(b"TOPSECRETKEYMATERIAL")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "loss.png").write_bytes(b"\x89PNG-plot")
    md = f"# r\n\n![k]({secret})\n\n![k](../ca.key)\n\n![loss.png](loss.png)\n"
    page = render_html(md, tmp_path / "run", images=["loss.png"])
    assert base64.b64encode(b"TOPSECRETKEYMATERIAL").decode() not in page
    assert base64.b64encode(b"\x89PNG-plot").decode() in page
    assert "TOPSECRETKEYMATERIAL" not in render_html(md, tmp_path / "run", images=["../ca.key", str(secret)])


def test_unknown_metric_keys_never_reach_metrics_json(tiny_config, tmp_path):
    cfg = tiny_run_config(tiny_config)
    out = tmp_path / "run"
    extra = {"evil-key": 1.0, "rank": 7, "status": 0, "records": 3.5}

    def liar(m):
        if m.metadata.message_type == messages.EVALUATE:
            return reply("mallory", None, {**EvalMetrics(num_examples=4, eval_loss=1.0).to_dict(), "injected-eval": 2})
        return reply(
            "mallory",
            None,
            {**TrainMetrics(num_examples=0, invalid_records=2).to_dict(), **extra},
            status="refused",
            reason="no",
        )

    server.run_federation(
        FakeGrid({1: constant(1e-3, name="alpha", **{"evil-ok": 5, "lora-rank": [1, 2]}), 2: liar}),
        cfg,
        out,
        lambda s: None,
    )
    text = (out / "metrics.json").read_text()
    for key in ("evil_key", "evil-key", "evil_ok", "evil-ok", "injected", '"rank"'):
        assert key not in text, key
    doc = json.loads(text)
    mallory, alpha = doc["rounds"][1]["sites"]["mallory"], doc["rounds"][1]["sites"]["alpha"]
    assert mallory["invalid_records"] == 2 and "records" not in mallory and mallory["status"] == "refused"
    assert mallory["metrics_dropped"] == 4 and alpha["metrics_dropped"] == 2 and alpha["status"] == "ok"
    assert mallory["eval_metrics_dropped"] == 1


def test_two_sites_sending_one_name_stay_two_sites(tiny_config, tmp_path):
    """The second node to claim 'alpha' (whichever replies later) is recorded under its node id,
    never merged with or passed off as the first; a node claiming another node's fallback name
    ('node-1') is too; and the names hold from round to round."""
    rs = run_state(tiny_config, tmp_path, min_sites=1, round_timeout_s=5)
    grid = FakeGrid(
        {1: trainer("alpha", 1e-3, n=10), 2: trainer("alpha", 2e-3, n=10), 3: trainer("node-1", 3e-3, n=10)}
    )
    r = server.run_training_round(grid, [1, 2, 3], rs, 1, lambda s: None)
    names = set(r["sites"])
    assert (
        names in ({"alpha", "alpha@node-2", "node-1@node-3"}, {"alpha", "alpha@node-1", "node-1@node-3"})
        and r["accepted"] == 3
    )
    r = server.run_training_round(grid, [1, 2, 3], rs, 2, lambda s: None)
    assert set(r["sites"]) == names


def test_the_default_bound_never_clips_an_honest_update(tiny_config, tmp_path, monkeypatch):
    """Real sites train LoRA on the bundled data for two rounds under the default bound ('auto'):
    no update comes near it (the sites report their norms before clipping)."""
    from fedtune.client import app as client_app

    from .test_methods import real_sites

    monkeypatch.setattr(client_app, "_RUNTIME", None)
    monkeypatch.setattr(client_app, "_SITE_CACHE", {})
    data = json.loads(tiny_config.to_json())
    data["train"].update(lr=1e-2, local_steps=8)  # ten times the tiny config's steps and rate: larger honest updates
    cfg = tiny_run_config(type(tiny_config).model_validate(data), rounds=2)
    assert cfg.federation.update_norm_bound == "auto"
    grid, _ = real_sites()
    rs = server.run_federation(grid, cfg, tmp_path / "run", lambda s: None)
    bound = cfg.norm_bound(rs.trainable_params)
    for r in rs.rounds[1:]:
        assert r["accepted"] == 2 and r["clipped_updates"] == 0
        for site in r["sites"].values():
            assert not site["clipped"] and not site["clipped_by_coordinator"]
            assert 0 < site["update_norm_before_clip"] < bound / 10, (site["update_norm_before_clip"], bound)


@pytest.mark.parametrize(
    "raw",
    [
        "a\nb",
        "a\r\nb",
        "a\u2028b",
        "a\u2029b",
        "a\x85b",
        "a\x1b[31mb",
        "a\x1b]0;title\x07b",
        "a\u202eb",
        "a\u2066b",
        "a\u200bb",
        "a\x00b",
        "a\tb",
        "a\ufeffb",
    ],
)
def test_clean_leaves_one_line_of_printable_text(raw):
    from fedtune.server.messaging import clean, clean_name

    text = clean(raw)
    assert text in ("a b", "ab") and text.isprintable()
    assert clean_name(raw) in ("a_b", "ab")
    assert len(clean("x" * 10_000)) == 300 and clean("x" * 10_000).endswith("…") and len(clean_name("y" * 500)) == 64
    assert clean_name("\n\n") == "unnamed" and clean_name("../../etc") == "etc"


def test_a_site_claiming_many_eval_examples_does_not_set_the_federated_score_alone(tiny_config, tmp_path):
    """Eval counts 4, 4 and 10,000,000: the claim weighs 3 x 4 = 12, so the federated loss is
    (4 x 1 + 4 x 1 + 12 x 0) / 20 = 0.4, not ~0 (the best round and early stopping follow it)."""
    rs = run_state(tiny_config, tmp_path)

    def scorer(name, loss, n):
        return lambda m: reply(name, None, EvalMetrics(num_examples=n, eval_loss=loss).to_dict())

    ev = server.run_evaluation(
        FakeGrid({1: scorer("a", 1.0, 4), 2: scorer("b", 1.0, 4), 3: scorer("mallory", 0.0, 10_000_000)}),
        [1, 2, 3],
        rs,
        1,
        lambda s: None,
    )
    assert ev["aggregate"]["eval_loss"] == pytest.approx(0.4)


def test_personalized_scores_out_of_range_are_dropped_not_recorded_or_averaged(tiny_config, tmp_path):
    """A site reports a personalized eval loss below 0 and an exact match above 1 (to look better
    than training alone in the baselines' verdict), and a negative count of private steps: the
    coordinator drops all three, counts them, and none reaches the site's record or the round's mean."""
    cfg = tiny_run_config(tiny_config)
    out = tmp_path / "run"
    honest = constant(1e-3, name="alpha")

    def braggart(m):
        if m.metadata.message_type == messages.EVALUATE:
            ok = EvalMetrics(num_examples=4, eval_loss=1.0).to_dict()
            return reply(
                "bragg", None, {**ok, "personal-eval-loss": -5.0, "personal-exact-match": 7.0, "personal-steps": -3}
            )
        return honest(m)

    server.run_federation(FakeGrid({1: honest, 2: braggart}), cfg, out, lambda s: None)
    doc = json.loads((out / "metrics.json").read_text())
    r = doc["rounds"][1]
    assert r["sites"]["bragg"]["eval_metrics_dropped"] == 3
    for key in ("personal_eval_loss", "personal_exact_match", "personal_steps"):
        assert key not in r["sites"]["bragg"], key
    assert "personal_eval_loss" not in r["aggregate"]
