"""client/app.py: handle_train / handle_evaluate called directly with Flower messages built, and
replies read, through fedtune.common.messages (a reply that is not the message it should be fails
the read)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict

from fedtune.client import app as client_app
from fedtune.client.app import SiteFiles, handle_evaluate, handle_train, resolve_site, sites_from_config
from fedtune.common import adapters, messages, methods
from fedtune.common.messages import EvalReply, EvalTask, NodeConfig, RoundConfig, TrainReply, TrainTask
from fedtune.common.methods import wrap
from fedtune.common.modeling import load_base_model
from fedtune.server.aggregation import spec_of, validate_update

SECRET = "SECRET-ACCOUNT-4242-7777"
NODE = 7


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch):
    """The app caches the model and site data per process; every test starts clean."""
    monkeypatch.setattr(client_app, "_RUNTIME", None)
    monkeypatch.setattr(client_app, "_SITE_CACHE", {})


@pytest.fixture
def global_state(tiny_config):
    model, _, _ = load_base_model(tiny_config.model, "cpu")
    state = methods.get_state(wrap(model, tiny_config.peft, seed=tiny_config.train.seed))
    # Move B away from zero so the global adapter is not the fresh init the site would build anyway.
    g = torch.Generator().manual_seed(3)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()}


def message(
    cfg,
    state,
    server_round: int,
    kind: str,
    trainable: list[str] | None = None,
    population: int | None = None,
    secure: messages.SecureTrainRequest | None = None,
) -> Message:
    """A coordinator's message; TRAIN carries the trainable set (default: every tensor of
    ``state``), under DP the round's ``population``, in a secure round the ``secure`` request."""
    if kind == MessageType.TRAIN:
        rc = RoundConfig(cfg, server_round, list(state) if trainable is None else trainable, population)
        content = TrainTask(rc, state, secure).to_record()
    else:
        content = EvalTask(RoundConfig(cfg, server_round, dp_population=population), state).to_record()
    return envelope(content, kind, server_round)


def envelope(content: RecordDict, kind: str, server_round: int = 1) -> Message:
    """``content`` as the coordinator's Flower message of type ``kind``."""
    md = Metadata(
        run_id=1,
        message_id=f"msg-{kind}-{server_round}",
        src_node_id=0,
        dst_node_id=NODE,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(content=content, metadata=md)


def context(node_config: dict | NodeConfig) -> Context:
    """A node's context; ``node_config`` as a NodeConfig (a site's own settings) or as Flower passes it."""
    if isinstance(node_config, NodeConfig):
        node_config = node_config.to_record()
    return Context(run_id=1, node_id=NODE, node_config=node_config, state=RecordDict(), run_config={})


def site(data: Path, name: str | None = None, **kw) -> Context:
    """The context of an ftclient site with ``data`` (``verbose``: it prints its progress, as ftclient's do)."""
    return context(NodeConfig(site_name=name, data_path=str(data), **kw))


def train_reply(reply: Message) -> TrainReply:
    """A site's TRAIN reply as the coordinator reads it: strictly (an unknown or mistyped key fails)."""
    return TrainReply.from_record(reply.content)


def eval_reply(reply: Message) -> EvalReply:
    return EvalReply.from_record(reply.content)


def write_site(path: Path, n: int = 8) -> Path:
    recs = [
        {"instruction": f"Classify the payment for {SECRET} number {i}.", "output": ["groceries", "travel"][i % 2]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def all_strings(content: RecordDict) -> list[str]:
    """Every record name, key and (non-tensor) value in a reply, as text."""
    out = []
    for name in content.keys():
        rec = content[name]
        out.append(name)
        if isinstance(rec, (ConfigRecord, MetricRecord)):
            out += [f"{k}={v}" for k, v in rec.items()]
        else:
            assert isinstance(rec, ArrayRecord)
            out += list(rec.keys())
    return out


def test_good_site_replies_with_a_matching_delta(tmp_path, tiny_config, global_state):
    cfg = tiny_config.model_copy(deep=True)
    cfg.data.eval_fraction = 0.25
    data = write_site(tmp_path / "bank.jsonl", 8)
    msg = message(cfg, global_state, 1, MessageType.TRAIN)
    reply = handle_train(msg, site(data, "bank"), None, "cpu")

    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert reply.metadata.dst_node_id == 0 and reply.metadata.src_node_id == NODE
    r = train_reply(reply)
    assert r.site.name == "bank" and r.site.status == "ok"
    m = r.metrics
    assert m.num_examples == 6  # 8 records, round(8 * 0.25) = 2 held out
    assert m.records == 8 and m.invalid_records == 0 and m.dropped_too_long == 0
    assert m.train_steps == cfg.train.local_steps == 2
    assert math.isfinite(m.train_loss) and m.train_loss_first > 0

    arrays = r.update
    assert list(arrays) == list(global_state)
    assert {k: a.shape for k, a in arrays.items()} == {k: tuple(v.shape) for k, v in global_state.items()}
    assert all(a.dtype == np.float32 for a in arrays.values())
    assert validate_update(arrays, spec_of(global_state), m.num_examples, cfg.federation.max_examples_per_update) == []
    assert m.upload_bytes == r.update_bytes == adapters.record_nbytes(reply.content[messages.ARRAYS])
    assert any(np.abs(a).max() > 0 for a in arrays.values())

    # The reply is local - global: global + delta is the site's trained adapter.
    local = methods.get_state(client_app._RUNTIME.model)
    rebuilt = adapters.apply_delta(global_state, adapters.to_tensors(arrays))
    for k in local:
        torch.testing.assert_close(rebuilt[k], local[k], rtol=0, atol=1e-6)

    # Nothing from the records leaves the site.
    assert all(isinstance(v, (int, float)) for v in reply.content[messages.METRICS].values())
    assert not any(SECRET in s or "groceries" in s for s in all_strings(reply.content))


def test_site_with_no_usable_records_sends_no_update(tmp_path, tiny_config, global_state, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"instruction": f"{SECRET} {i}"}) + "\n" for i in range(4)), encoding="utf-8")
    reply = handle_train(
        message(tiny_config, global_state, 1, MessageType.TRAIN),
        site(bad, "broken"),
        None,
        "cpu",
    )
    r = train_reply(reply)
    assert r.update is None and r.masked is None
    assert r.metrics.num_examples == 0
    assert r.site.status == "data-error"
    assert not any(SECRET in s for s in all_strings(reply.content))
    # Detail (file and line) stays in the site's own log.
    err = capsys.readouterr().err
    assert str(bad) in err and "line 1" in err


def test_site_whose_examples_are_all_too_long(tmp_path, tiny_config, global_state):
    cfg = tiny_config.model_copy(deep=True)
    cfg.data.max_length = 8  # every prompt is longer: no answer token survives
    cfg.data.eval_fraction = 0.0
    data = write_site(tmp_path / "long.jsonl", 4)
    reply = handle_train(message(cfg, global_state, 1, MessageType.TRAIN), site(data), None, "cpu")
    r = train_reply(reply)
    assert r.update is None
    m = r.metrics
    assert m.num_examples == 0 and m.dropped_too_long == 4 and m.records == 4
    assert r.site.status == "no-usable-examples"
    assert r.site.name == f"site-{NODE}"  # no site-name given


def test_evaluate_on_held_out_split(tmp_path, tiny_config, global_state):
    cfg = tiny_config.model_copy(deep=True)
    cfg.data.eval_fraction = 0.5
    data = write_site(tmp_path / "bank.jsonl", 6)
    msg = message(cfg, global_state, 0, MessageType.EVALUATE)
    reply = handle_evaluate(msg, site(data, "bank"), None, "cpu")
    r = eval_reply(reply)  # an eval reply has no update records: the read refuses any
    assert r.site.status == "ok"
    m = r.metrics
    assert m.num_examples == 3
    assert math.isfinite(m.eval_loss) and m.eval_loss > 0
    assert m.answer_tokens > 0
    assert 0.0 <= m.exact_match <= 1.0
    assert not any(SECRET in s for s in all_strings(reply.content))


def test_evaluate_uses_the_eval_file_and_the_global_adapter(tmp_path, tiny_config, global_state):
    cfg = tiny_config.model_copy(deep=True)
    cfg.eval.exact_match = False
    train = write_site(tmp_path / "t.jsonl", 4)
    ev = write_site(tmp_path / "e.jsonl", 3)
    ctx = site(train, eval_data_path=str(ev))
    r1 = handle_evaluate(message(cfg, global_state, 1, MessageType.EVALUATE), ctx, None, "cpu")
    m1 = eval_reply(r1).metrics
    assert m1.num_examples == 3 and m1.exact_match is None and "exact-match" not in m1.to_dict()
    other = {k: v * 3.0 for k, v in global_state.items()}
    r2 = handle_evaluate(message(cfg, other, 1, MessageType.EVALUATE), ctx, None, "cpu")
    assert eval_reply(r2).metrics.eval_loss != pytest.approx(m1.eval_loss)


def test_evaluate_on_a_broken_site(tmp_path, tiny_config, global_state):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"")
    reply = handle_evaluate(message(tiny_config, global_state, 1, MessageType.EVALUATE), site(bad), None, "cpu")
    r = eval_reply(reply)
    assert r.metrics.num_examples == 0 and r.site.status == "data-error"


def test_resolve_site():
    sites = [SiteFiles("a", "a.jsonl"), SiteFiles("b", "b.jsonl", "b-eval.jsonl")]
    assert resolve_site(context({"partition-id": 1, "num-partitions": 2}), sites) == sites[1]
    assert resolve_site(site(Path("/d/x.csv"), "x"), sites) == SiteFiles("x", "/d/x.csv", None)
    assert resolve_site(site(Path("x.csv"), eval_data_path="y.csv"), None) == SiteFiles(
        f"site-{NODE}", "x.csv", "y.csv"
    )
    assert resolve_site(site(Path("x.csv"), "x", lora_rank=4), None) == SiteFiles("x", "x.csv", None, 4)
    with pytest.raises(ValueError, match="partition-id 2 has no site"):
        resolve_site(context({"partition-id": 2}), sites)
    with pytest.raises(ValueError, match="data-path"):
        resolve_site(context({}), None)
    # A node config key this site does not know (a typo) is an error that names it, not a silent default.
    with pytest.raises(ValueError, match="unknown key 'data_path'"):
        resolve_site(context({"data_path": "x.csv"}), None)


def test_sites_from_config(tmp_path):
    from fedtune.common.config import load_config

    cfg = load_config(None, {"federation.sites": [{"name": "a", "train": "d/a.jsonl", "eval": "/abs/e.jsonl"}]})
    assert sites_from_config(cfg, tmp_path) == [SiteFiles("a", str(tmp_path / "d/a.jsonl"), "/abs/e.jsonl")]
    assert sites_from_config(cfg) == [SiteFiles("a", "d/a.jsonl", "/abs/e.jsonl")]


def test_site_seed_differs_by_site_and_is_stable(tiny_config):
    a = client_app.site_seed(tiny_config, "a")
    assert a == client_app.site_seed(tiny_config, "a") != client_app.site_seed(tiny_config, "b")
    assert 0 <= a < 2**32


def spy_on_training(monkeypatch) -> dict:
    """The keyword arguments the site's next train_round call gets (the call still runs)."""
    seen: dict = {}
    real = client_app.train_round

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(client_app, "train_round", spy)
    return seen


@pytest.mark.parametrize("strategy, mu, expected", [("fedprox", 0.5, 0.5), ("fedavg", 0.5, 0.0), ("fedadam", 0.5, 0.0)])
def test_the_proximal_term_is_on_for_fedprox_only(
    tmp_path, tiny_config, global_state, monkeypatch, strategy, mu, expected
):
    seen = spy_on_training(monkeypatch)
    cfg = tiny_config.model_copy(deep=True)
    cfg.federation.strategy, cfg.federation.proximal_mu = strategy, mu
    reply = handle_train(
        message(cfg, global_state, 1, MessageType.TRAIN),
        site(write_site(tmp_path / "s.jsonl")),
        None,
        "cpu",
    )
    assert train_reply(reply).site.ok and seen["proximal_mu"] == expected


@pytest.mark.parametrize("anchor_mu", [0.0, 0.3])
def test_the_base_anchor_reaches_training_with_the_base_weights(
    tmp_path, tiny_config, global_state, monkeypatch, anchor_mu
):
    """train.anchor_mu > 0: the site anchors to the weights its freshly built model had (the base
    model: every lora_B zero), not to the global adapter it was sent."""
    seen = spy_on_training(monkeypatch)
    cfg = tiny_config.model_copy(deep=True)
    cfg.train.anchor_mu = anchor_mu
    moved = {k: v + 0.1 for k, v in global_state.items()}
    reply = handle_train(
        message(cfg, moved, 1, MessageType.TRAIN),
        site(write_site(tmp_path / "s.jsonl")),
        None,
        "cpu",
    )
    assert train_reply(reply).site.ok
    if anchor_mu == 0:
        assert seen["base_anchor"] is None
        return
    mu, weights = seen["base_anchor"]
    names = [n for n, p in client_app._RUNTIME.model.named_parameters() if p.requires_grad]
    assert mu == 0.3 and len(weights) == len(names) > 0
    assert all(float(w.abs().max()) == 0.0 for n, w in zip(names, weights) if "lora_B" in n)


def test_local_early_stopping_reports_steps_and_losses_only(tmp_path, tiny_config, global_state, monkeypatch, capsys):
    """train.local_patience: the site checks its validation split (tokenized once, the first
    eval.max_examples), stops, sends the best checked weights' update and reports numbers only."""
    script = iter([3.0, 2.0, 2.5, 2.6, 1.0, 1.0, 1.0])
    checked = []
    real_nll = client_app.answer_nll

    def nll(model, items, *args):
        checked.append(items)
        return real_nll(model, items, *args)

    monkeypatch.setattr(client_app, "answer_nll", nll)
    monkeypatch.setattr(client_app, "mean_loss", lambda total, count: next(script) if count > 0 else math.nan)
    cfg = tiny_config.model_copy(deep=True)
    cfg.data.eval_fraction = 0.5
    cfg.eval.max_examples = 3
    cfg.train.local_steps, cfg.train.local_patience, cfg.train.local_eval_every = 6, 2, 1
    reply = handle_train(
        message(cfg, global_state, 2, MessageType.TRAIN),
        site(write_site(tmp_path / "s.jsonl", 8), "bank", verbose=True),
        None,
        "cpu",
    )

    r = train_reply(reply)
    assert r.site.ok
    m = r.metrics
    assert m.train_steps == 3 and m.planned_steps == 6 and m.local_stopped_at == 3 and m.local_best_step == 1
    assert m.local_val_start == 3.0 and m.local_val_best == 2.0
    assert len(checked) == 4 and all(c is checked[0] for c in checked) and len(checked[0]) == 3
    assert all(isinstance(v, (int, float)) for v in reply.content[messages.METRICS].values())
    assert not any(SECRET in s or "groceries" in s for s in all_strings(reply.content))
    assert "round 2: stopped early at step 3 of 6 (validation loss 2.000 at step 1 kept)" in capsys.readouterr().err
    # The update is the restored best weights' delta: global + delta is what the site's model holds.
    local = methods.get_state(client_app._RUNTIME.model)
    rebuilt = adapters.apply_delta(global_state, adapters.to_tensors(r.update))
    for k in local:
        torch.testing.assert_close(rebuilt[k], local[k], rtol=0, atol=1e-6)


def test_local_early_stopping_without_validation_examples_trains_every_step(
    tmp_path, tiny_config, global_state, capsys
):
    cfg = tiny_config.model_copy(deep=True)
    cfg.data.eval_fraction = 0.0  # and no eval file: nothing to check on
    cfg.train.local_steps, cfg.train.local_patience = 3, 1
    reply = handle_train(
        message(cfg, global_state, 1, MessageType.TRAIN),
        site(write_site(tmp_path / "s.jsonl"), verbose=True),
        None,
        "cpu",
    )
    r = train_reply(reply)
    assert r.site.ok
    m = r.metrics
    assert m.train_steps == m.planned_steps == 3
    assert not any(k.startswith("local-") for k in m.to_dict())
    assert "no usable validation examples: trained all 3 steps" in capsys.readouterr().err


def test_a_site_without_local_early_stopping_reports_no_planned_steps(tmp_path, tiny_config, global_state):
    reply = handle_train(
        message(tiny_config, global_state, 1, MessageType.TRAIN),
        site(write_site(tmp_path / "s.jsonl")),
        None,
        "cpu",
    )
    m = train_reply(reply).metrics
    assert (
        m.train_steps == tiny_config.train.local_steps
        and m.planned_steps is None
        and not any(k.startswith("local-") for k in m.to_dict())
    )


def test_a_site_whose_training_diverged_refuses_the_round_instead_of_sending_nan(
    tmp_path, tiny_config, global_state, monkeypatch
):
    """A NaN in the trained adapter: the site answers 'refused' with the reason and sends no
    update (neither the NaN nor zeros in its place)."""
    real = client_app.train_round

    def diverge(model, *args, **kwargs):
        stats = real(model, *args, **kwargs)
        with torch.no_grad():
            next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = math.nan
        return stats

    monkeypatch.setattr(client_app, "train_round", diverge)
    reply = handle_train(
        message(tiny_config, global_state, 1, MessageType.TRAIN),
        site(write_site(tmp_path / "s.jsonl")),
        None,
        "cpu",
    )
    r = train_reply(reply)
    assert r.site.status == "refused"
    assert "not finite" in r.site.reason
    assert r.update is None and r.metrics.num_examples == 0


def test_train_metrics_report_counts_losses_times_rank_and_the_released_norm():
    st = client_app.SiteState(n_records=10, n_invalid=2, train_items=[1, 2, 3], dropped_too_long=1, eval_examples=[])
    stats = client_app.TrainStats(
        steps=4,
        examples_seen=8,
        loss_first=2.0,
        loss_last=1.0,
        loss_mean=1.5,
        seconds=3.5,
        tokens=99,
        first_step_at=105.0,
        planned_steps=6,
        stopped_at=4,
        best_step=3,
        val_losses=[(0, 2.25), (3, 1.125)],
    )
    released = {"update-norm": 0.5, "update-clipped": 1}  # privacy.site_release's, under their wire keys
    m = client_app.train_metrics(
        SiteFiles("bank", "x", rank=2), st, stats, released, received=100.0, arrived=97.5, local_stopping=True
    )
    assert m == messages.TrainMetrics(
        num_examples=3,
        records=10,
        invalid_records=2,
        dropped_too_long=1,
        train_loss=1.5,
        train_loss_first=2.0,
        train_loss_last=1.0,
        train_steps=4,
        train_seconds=3.5,
        train_tokens=99,
        receive_seconds=2.5,  # arrived -> received: the download
        startup_seconds=5.0,  # received -> the first step
        lora_rank=2,
        update_norm=0.5,
        update_clipped=1,
        planned_steps=6,
        local_stopped_at=4,
        local_best_step=3,
        local_val_start=2.25,
        local_val_best=1.125,
    )
    assert messages.TrainMetrics.from_record(m.to_record()) == m  # all of it a site may send
    plain = client_app.train_metrics(
        SiteFiles("bank", "x"), st, stats, {}, received=100.0, arrived=100.0, local_stopping=False
    )
    assert plain.receive_seconds == 0.0 and plain.lora_rank is None and plain.update_norm is None
    assert plain.planned_steps is None and plain.local_best_step is None and plain.local_val_best is None


@pytest.fixture
def secure_site(tmp_path, monkeypatch):
    """An ftclient site in a secure round past key sharing (a stand-in for its round state)."""
    from fedtune.common.secagg import protocol as p

    monkeypatch.setattr(client_app.secure, "ready_to_train", lambda context, sa: None)
    ctx = site(write_site(tmp_path / "bank.jsonl"), "bank", verbose=True)
    ctx.state[p.STATE] = ConfigRecord({"stage": p.DONE_SHARE})
    return ctx


def secure_task(cfg, state, population=None, trainable=None) -> Message:
    return message(
        cfg, state, 1, MessageType.TRAIN, trainable, population, messages.SecureTrainRequest(b"t" * 16, [], [])
    )


def dp_secure(tiny_config):
    doc = json.loads(tiny_config.to_json())
    doc["secure_aggregation"]["enabled"] = True
    doc["privacy"].update({"epsilon": 8.0, "noise_multiplier": 5.0})
    return type(tiny_config).model_validate(doc)


@pytest.mark.parametrize("case", ["malformed", "trainable", "no-population", "masking"])
def test_a_secure_round_the_site_refuses_drops_its_secrets(case, secure_site, tiny_config, global_state, monkeypatch):
    """Each refusal of a secure TRAIN task once the site holds the round's keys: the reason goes
    back, nothing (masked or not) leaves, and the site forgets the round (its keys cannot be
    used again); refused at masking, it still reports what it trained."""
    from fedtune.common.secagg import SecAggError
    from fedtune.common.secagg import protocol as p

    if case == "malformed":
        msg = envelope(
            RecordDict({messages.SECAGG: messages.SecureTrainRequest(b"t" * 16, [], []).to_record()}), "train"
        )
        needle = "train task: missing record"
    elif case == "trainable":
        msg, needle = (
            secure_task(tiny_config, global_state, trainable=["model.layers.0.mlp.up_proj.weight"]),
            "trainable set",
        )
    elif case == "no-population":
        msg, needle = secure_task(dp_secure(tiny_config), global_state), "names no site population"
    else:

        def refuse(*args, **kwargs):
            raise SecAggError("only 0 neighbour(s) shared keys: refused")

        monkeypatch.setattr(client_app.secure, "masked_input", refuse)
        msg, needle = secure_task(tiny_config, global_state), "only 0 neighbour(s)"
    r = train_reply(handle_train(msg, secure_site, None, "cpu"))
    assert r.site.status == "refused" and needle in r.site.reason, r.site
    assert r.update is None and r.masked is None
    assert p.STATE not in secure_site.state  # the round is forgotten
    if case == "masking":  # trained: the counts and the training's metrics, no update
        assert r.metrics.num_examples > 0 and r.metrics.train_steps == tiny_config.train.local_steps
    else:
        assert r.metrics.num_examples == 0 and r.metrics.train_steps is None
        assert (r.metrics.records == 8) == (case != "malformed")  # counts once the data is loaded


@pytest.mark.parametrize(
    "stage, done, content, needle",
    [
        # A task for another stage is refused as that, though it is malformed too (a hostile
        # coordinator's records: hand-built).
        (messages.UNMASK, "advertise", {"round-tag": b"t" * 16, "bogus": 1}, "out of order"),
        (messages.CONSISTENCY, "upload", {"round-tag": b"u" * 16, "bogus": 1}, "another round"),
        (messages.SHARE_KEYS, None, {"round-tag": b"t" * 16}, "no secure round in progress"),
        (messages.CONSISTENCY, "upload", {"alive": [1]}, "round tag (key 'round-tag')"),
        # The right round and stage: the task is read by its class, and the reason names the key.
        (messages.CONSISTENCY, "upload", {"round-tag": b"t" * 16}, "missing key 'alive'"),
        (messages.UNMASK, "consistency", {"round-tag": b"t" * 16, "u3": "1,2"}, "key 'u3': expected a list"),
    ],
)
def test_a_secure_stage_task_is_checked_for_its_round_and_stage_before_it_is_read(
    tmp_path, stage, done, content, needle
):
    from fedtune.common.secagg import protocol as p

    ctx = site(write_site(tmp_path / "bank.jsonl"), "bank")
    if done is not None:
        at = {"advertise": p.DONE_ADVERTISE, "upload": p.DONE_UPLOAD, "consistency": p.DONE_CONSISTENCY}[done]
        ctx.state[p.STATE] = ConfigRecord({"round-tag": b"t" * 16, "stage": at})
    msg = envelope(RecordDict({messages.SECAGG: ConfigRecord(content)}), stage)
    reply = messages.StageReply.from_record(client_app.handle_secure_stage(msg, ctx, None).content, stage)
    assert reply.site.status == "refused" and needle in reply.site.reason, reply.site
    assert reply.reply is None and p.STATE not in ctx.state  # nothing given away; the round is forgotten


def test_a_key_advertisement_with_a_malformed_config_is_refused_naming_the_key(tmp_path):
    from fedtune.common.secagg import protocol as p

    ctx = site(write_site(tmp_path / "bank.jsonl"), "bank")
    request = messages.AdvertiseRequest(b"t" * 16, 1, 2, 0.1, 1000).to_record()
    config = ConfigRecord({messages.CONFIG_KEY: "{}"})  # a hostile coordinator's: no round number
    msg = envelope(RecordDict({messages.SECAGG: request, messages.CONFIG: config}), messages.ADVERTISE)
    reply = messages.StageReply.from_record(client_app.handle_secure_stage(msg, ctx, None).content, messages.ADVERTISE)
    assert reply.site.status == "refused" and f"missing key {messages.ROUND_KEY!r}" in reply.site.reason, reply.site
    assert reply.reply is None and p.STATE not in ctx.state
