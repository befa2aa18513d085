"""common/messages.py: every coordinator-site message round-trips through to_record/from_record,
and a reader refuses what a hostile peer sends (unknown keys, wrong types, oversized values,
missing keys) with an error that names the key; the config a site gets holds no site's paths."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict

from fedtune.client import app as client_app
from fedtune.client import secure
from fedtune.common import messages
from fedtune.common.config import FedTuneConfig, load_config
from fedtune.common.messages import (
    AdvertiseReply,
    AdvertiseRequest,
    ConsistencyReply,
    ConsistencyRequest,
    EvalMetrics,
    EvalReply,
    EvalTask,
    MessageError,
    NodeConfig,
    RoundConfig,
    SecureTrainRequest,
    ShareKeysReply,
    ShareKeysRequest,
    SiteStatus,
    StageReply,
    StageTask,
    TrainMetrics,
    TrainReply,
    TrainTask,
    UnmaskReply,
    UnmaskRequest,
)
from fedtune.common.secagg import SecAggError

TAG = b"r" * 16
ADAPTER = OrderedDict(a=torch.arange(6, dtype=torch.float32).reshape(2, 3), b=torch.ones(4))


def config_with_sites() -> FedTuneConfig:
    return load_config(
        None,
        {
            "federation.sites": [
                {"name": "hospital", "train": "/secret/hospital/train.jsonl", "eval": "/secret/hospital/eval.jsonl"},
                {"name": "bank", "train": "/secret/bank/train.jsonl", "rank": 2},
            ],
            "output.dir": "/coordinator/runs/private-run",
        },
    )


def same_arrays(a, b) -> None:
    assert list(a) == list(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


# ---------------------------------------------------------------------------------------------
# Round trips


def test_every_coordinator_message_round_trips():
    cfg = FedTuneConfig()
    rc = RoundConfig(cfg, 3, ["a", "b"], 7)
    back = RoundConfig.from_record(rc.to_record())
    assert (back.server_round, back.trainable, back.dp_population) == (3, ["a", "b"], 7)
    assert back.config.to_json() == cfg.to_json()

    sec = SecureTrainRequest(TAG, [2, 3], [b"s2", b"s3"])
    for request in (None, sec):
        task = TrainTask.from_record(TrainTask(rc, ADAPTER, request).to_record())
        assert task.server_round == 3 and task.trainable == ["a", "b"] and task.round.dp_population == 7
        assert task.secure == request
        same_arrays(task.adapter, ADAPTER)

    ev = EvalTask.from_record(EvalTask(RoundConfig(cfg, 0), ADAPTER).to_record())
    assert ev.server_round == 0 and ev.round.trainable is None
    same_arrays(ev.adapter, ADAPTER)


def test_every_site_reply_round_trips():
    metrics = TrainMetrics(num_examples=6, train_loss=1.25, train_steps=2, lora_rank=2, update_clipped=0)
    plain = TrainReply.from_record(
        TrainReply(SiteStatus("bank", "ok"), metrics, update=ADAPTER).to_record(), max_values=10, max_tensors=2
    )
    assert plain.site == SiteStatus("bank", "ok") and plain.masked is None
    assert plain.metrics.num_examples == 6 and plain.metrics.train_loss == 1.25 and plain.metrics.lora_rank == 2
    assert plain.metrics.upload_bytes == plain.update_bytes > 40  # filled in: the arrays' bytes
    same_arrays(plain.update, ADAPTER)

    y = np.arange(11, dtype=np.uint32)
    masked = TrainReply.from_record(
        TrainReply(SiteStatus("bank", "ok"), TrainMetrics(num_examples=6, clipped_values=1), masked=y).to_record(),
        masked_length=11,
    )
    np.testing.assert_array_equal(masked.masked, y)
    assert masked.update is None and masked.metrics.upload_bytes == 44 and masked.metrics.clipped_values == 1

    refused = TrainReply(SiteStatus("bank", "refused", "busy"), TrainMetrics(num_examples=0, records=3))
    back = TrainReply.from_record(refused.to_record())
    assert back.site.reason == "busy" and back.update is None and back.metrics.records == 3

    ev = EvalReply(SiteStatus("bank", "ok"), EvalMetrics(num_examples=3, eval_loss=0.5, exact_match=1.0))
    assert EvalReply.from_record(ev.to_record()) == ev


def test_every_secure_stage_message_round_trips():
    requests = [
        AdvertiseRequest(TAG, 1, 3, 0.25, 1000),
        ShareKeysRequest(
            TAG, 2, 10, [2, 3], [b"c2", b"c3"], [b"s2", b"s3"], [b"g2", b"g3"], [b"k2", b"k3"], ["8", "9"]
        ),
        SecureTrainRequest(TAG, [2], [b"sealed"]),
        ConsistencyRequest(TAG, [1, 2, 3]),
        UnmaskRequest(TAG, [1, 2, 3], [1, 2], [3], [1, 2], [b"x", b"y"]),
    ]
    replies = [
        AdvertiseReply(b"c" * 32, b"s" * 32, b"identity", b"sig", 12),
        AdvertiseReply(b"c" * 32, b"s" * 32, b"identity", b"sig"),  # no example count (DP or equal weights)
        ShareKeysReply([2, 3], [b"to2", b"to3"]),
        ConsistencyReply(b"sig"),
        UnmaskReply([1, 2], [b"\x00\x01", b"\x00\x02"], [3], [b"\x00\x03"]),
    ]
    for msg in requests + replies:
        assert type(msg).from_record(msg.to_record()) == msg
    assert UnmaskReply([1], [b"\x00\x05"], [2], [b"\x01\x00"]).shares() == {"self_seed": {1: 5}, "pair_key": {2: 256}}

    cfg = FedTuneConfig()
    task = StageTask.from_record(StageTask(requests[0], RoundConfig(cfg, 1, ["a"])).to_record(), messages.ADVERTISE)
    assert task.request == requests[0] and task.round.trainable == ["a"]
    for stage, request, reply in [
        (messages.SHARE_KEYS, requests[1], replies[2]),
        (messages.CONSISTENCY, requests[3], replies[3]),
        (messages.UNMASK, requests[4], replies[4]),
    ]:
        assert StageTask.from_record(StageTask(request).to_record(), stage).request == request
        answer = StageReply(SiteStatus("s1", "ok"), reply)
        assert StageReply.from_record(answer.to_record(), stage) == answer
    no = StageReply(SiteStatus("s1", "refused", "out of order"))
    assert StageReply.from_record(no.to_record(), messages.UNMASK) == no


def test_the_share_keys_record_the_coordinator_sends_is_the_typed_request():
    keys, signed, node_of = {2: (b"c2", b"s2")}, {2: (b"k2", b"g2")}, {2: 42}
    rec = ShareKeysRequest.build(TAG, 2, 5, [2], keys, signed, node_of).to_record()
    assert ShareKeysRequest.from_record(rec) == ShareKeysRequest(
        TAG, 2, 5, [2], [b"c2"], [b"s2"], [b"g2"], [b"k2"], ["42"]
    )


def test_node_config_round_trips_and_verbosity_is_explicit():
    nc = NodeConfig(site_name="bank", data_path="/d/t.jsonl", eval_data_path="/d/e.jsonl", lora_rank=4, verbose=True)
    assert NodeConfig.from_record(nc.to_record()) == nc
    assert "verbose" not in NodeConfig(data_path="/d/t.jsonl").to_record()
    # ftsim's nodes: Flower's partition keys only, not verbose; a data path alone is not verbosity either.
    assert not NodeConfig.from_record({"partition-id": 0, "num-partitions": 3}).verbose
    assert not NodeConfig.from_record({"data-path": "/d/t.jsonl"}).verbose
    assert NodeConfig.from_record({"data-path": "x", "eval-data-path": "", "lora-rank": 0}) == NodeConfig(data_path="x")
    with pytest.raises(MessageError, match="node config: unknown key 'data_path'"):
        NodeConfig.from_record({"data_path": "x"})
    with pytest.raises(MessageError, match="'lora-rank': expected a whole number"):
        NodeConfig.from_record({"data-path": "x", "lora-rank": "4"})
    with pytest.raises(MessageError, match="'lora-rank': expected a positive LoRA rank"):
        NodeConfig.from_record({"data-path": "x", "lora-rank": -1})
    # state-dir (a personalized site's private folder) is a path: bounded as the data paths are
    assert NodeConfig.from_record({"data-path": "x", "state-dir": "/w/site-state"}).state_dir == "/w/site-state"
    with pytest.raises(MessageError, match="'state-dir'"):
        NodeConfig.from_record({"data-path": "x", "state-dir": "/" + "a" * messages.MAX_PATH_CHARS})


def test_ftclient_sets_verbose_in_the_node_config_it_passes(tmp_path):
    from flwr.common.config import parse_config_args

    from fedtune.client.join import node_config

    args = argparse.Namespace(data=str(tmp_path / "t.jsonl"), eval_data=None, rank=None)
    parsed = parse_config_args([node_config("bank", args, verbose=True)])
    assert parsed == {"site-name": "bank", "data-path": str((tmp_path / "t.jsonl").resolve()), "verbose": True}
    assert NodeConfig.from_record(parsed).verbose


def test_the_site_prints_its_progress_only_when_its_node_config_says_verbose(monkeypatch):
    said = []
    monkeypatch.setattr(client_app, "_say", lambda site, text: said.append(text))
    ctx = lambda nc: Context(run_id=1, node_id=5, node_config=nc, state=RecordDict(), run_config={})  # noqa: E731
    bad = RecordDict({messages.SECAGG: ConfigRecord({"round-tag": b"short"})})
    from .test_client_app import envelope

    msg = envelope(bad, messages.CONSISTENCY)
    client_app.handle_secure_stage(msg, ctx({"data-path": "unused.jsonl"}), None)
    assert said == []  # a data path is no longer a verbosity switch
    client_app.handle_secure_stage(msg, ctx({"data-path": "unused.jsonl", "verbose": True}), None)
    assert len(said) == 1 and "secure aggregation" in said[0]


# ---------------------------------------------------------------------------------------------
# A hostile peer: refused, and the error names the key


def honest_reply(**metrics) -> RecordDict:
    return TrainReply(SiteStatus("mallory", "ok"), TrainMetrics(num_examples=4, **metrics), update=ADAPTER).to_record()


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c: c[messages.METRICS].__setitem__("injected", 1.0), r"train metrics: unknown key 'injected'"),
        (
            lambda c: c[messages.METRICS].__setitem__("num-examples", 2.5),
            r"key 'num-examples': expected a whole number",
        ),
        (lambda c: c[messages.METRICS].__setitem__("update-clipped", 7), r"key 'update-clipped': .*\[0, 1\]"),
        (lambda c: c[messages.SITE].__setitem__("name", 12), r"site record: key 'name': expected text"),
        (lambda c: c[messages.SITE].__setitem__("name", "x" * 5000), r"key 'name': expected text of at most 256"),
        (lambda c: c[messages.SITE].__setitem__("reason", "r" * 100_000), r"key 'reason': expected text of at most"),
        (lambda c: c[messages.SITE].__setitem__("status", "root"), r"key 'status': expected one of"),
        (lambda c: c[messages.SITE].__setitem__("admin", True), r"site record: unknown key 'admin'"),
        (lambda c: c[messages.SITE].__delitem__("status"), r"site record: missing key 'status'"),
        (lambda c: c.__delitem__(messages.SITE), r"train reply: missing record 'site'"),
        (lambda c: c.__setitem__("extra", ConfigRecord({"a": 1})), r"train reply: unknown record 'extra'"),
        (lambda c: c[messages.SITE].__setitem__("status", "refused"), r"status 'refused' with an update"),
        (lambda c: c.__delitem__(messages.LAYOUT), r"no adapter in the message"),
    ],
)
def test_a_hostile_train_reply_is_refused_with_the_key_named(change, match):
    content = honest_reply()
    change(content)
    with pytest.raises(MessageError, match=match):
        TrainReply.from_record(content, max_values=10, max_tensors=2)


def test_an_oversized_update_is_refused_unread():
    big = TrainReply(SiteStatus("bloat", "ok"), TrainMetrics(num_examples=4), update={"a": np.zeros(1000)}).to_record()
    with pytest.raises(MessageError, match="declares 1,000 values .* more than the 10"):
        TrainReply.from_record(big, max_values=10)
    y = TrainReply(SiteStatus("bloat", "ok"), TrainMetrics(num_examples=4), masked=np.zeros(99, np.uint32)).to_record()
    with pytest.raises(MessageError, match=r"record 'masked': masked vector: .*\(99,\), expected .*\(11,\)"):
        TrainReply.from_record(y, masked_length=11)
    with pytest.raises(MessageError, match="record 'masked': not a secure round"):
        TrainReply.from_record(y)


def test_a_lenient_read_drops_and_counts_what_the_strict_read_refuses():
    content = honest_reply()
    content[messages.METRICS]["injected"] = 1.0
    content[messages.METRICS]["train-loss"] = [0.1, 0.2]  # a list where a number belongs
    r = TrainReply.from_record(content, strict=False)
    assert r.metrics_dropped == 2 and r.metrics.num_examples == 4 and r.metrics.train_loss is None
    ev = RecordDict(
        {
            messages.METRICS: MetricRecord({"num-examples": 3, "eval-loss": -1.0, "x": 1}),
            messages.SITE: SiteStatus("s", "ok").to_record(),
        }
    )
    assert EvalReply.from_record(ev, strict=False).metrics_dropped == 2
    with pytest.raises(MessageError, match=r"eval metrics: key 'eval-loss': expected a number in \[0, inf\]"):
        EvalReply.from_record(ev)


def test_the_coordinators_tolerant_reader_uses_the_one_declaration():
    from fedtune.server import messaging

    assert messaging.TRAIN_METRICS is messages.TRAIN_METRICS and messaging.EVAL_METRICS is messages.EVAL_METRICS
    assert messaging.SITE_STATUSES is messages.SITE_STATUSES
    assert set(messages.TRAIN_METRICS) == {f.name.replace("_", "-") for f in dataclasses.fields(TrainMetrics)}
    with pytest.raises(TypeError):
        TrainMetrics(loss=1.0)  # a site cannot write a metric outside the set


@pytest.mark.parametrize(
    "cls, record, match",
    [
        (ConsistencyRequest, {"round-tag": TAG, "alive": [b"1"]}, r"key 'alive': expected a list of whole numbers"),
        (ConsistencyRequest, {"round-tag": TAG, "alive": [1], "extra": 1}, r"unknown key 'extra'"),
        (ConsistencyRequest, {"round-tag": TAG * 2, "alive": [1]}, r"key 'round-tag': expected bytes of at most 16"),
        (ConsistencyRequest, {"round-tag": TAG, "alive": list(range(70_000))}, r"key 'alive'.*at most 65,536 entries"),
        (SecureTrainRequest, {"round-tag": TAG, "from": [1]}, r"missing key 'sealed'"),
        (
            SecureTrainRequest,
            {"round-tag": TAG, "from": [1], "sealed": [b"x" * 5000]},
            r"'sealed'.*at most 4,096 bytes",
        ),
        (AdvertiseRequest, {"round-tag": TAG, "sid": True, "n-sites": 3, "clip": 1.0, "max-weight": 9}, r"key 'sid'"),
        (UnmaskReply, {"self-ids": [1], "self-shares": ["1"], "pair-ids": [], "pair-shares": []}, r"'self-shares'"),
        (AdvertiseReply, {"c-pub": b"c", "s-pub": b"s", "signer": b"k"}, r"missing key 'sig'"),
    ],
)
def test_a_hostile_secure_stage_record_is_refused_with_the_key_named(cls, record, match):
    with pytest.raises(MessageError, match=match):
        cls.from_record(ConfigRecord(record))


def test_the_site_refuses_a_malformed_stage_request_as_an_unsafe_one():
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(SecAggError, match=r"train.advertise request: key 'clip': expected a number.*: refused"):
        secure.advertise(ctx, ConfigRecord({"round-tag": TAG, "sid": 1, "n-sites": 3, "clip": "big", "max-weight": 9}))


def test_a_hostile_coordinator_task_is_refused_with_the_key_named(tmp_path):
    cfg = FedTuneConfig()
    good = TrainTask(RoundConfig(cfg, 1, ["a", "b"]), ADAPTER).to_record()
    cases = [
        (lambda c: c[messages.CONFIG].__delitem__(messages.TRAINABLE_KEY), "missing key 'trainable'"),
        (lambda c: c[messages.CONFIG].__setitem__(messages.ROUND_KEY, "1"), "key 'server-round': expected a whole"),
        (lambda c: c[messages.CONFIG].__setitem__("run-this", "rm -rf"), "round config: unknown key 'run-this'"),
        (lambda c: c[messages.CONFIG].__setitem__(messages.CONFIG_KEY, "{}x"), "key 'fedtune-config': not a valid"),
        (
            lambda c: c[messages.CONFIG].__setitem__(messages.CONFIG_KEY, json.dumps({"model": {"nme": "x"}})),
            "key 'fedtune-config': not a valid fedtune config",
        ),
        (
            lambda c: c[messages.CONFIG].__setitem__(messages.CONFIG_KEY, " " * (messages.MAX_CONFIG_CHARS + 1)),
            "at most",
        ),
        (lambda c: c.__setitem__("payload", ArrayRecord({"x": Array(np.zeros(1))})), "unknown record 'payload'"),
        (lambda c: c.__setitem__(messages.SECAGG, ConfigRecord({"round-tag": TAG})), "missing key 'from'"),
    ]
    for change, match in cases:
        content = RecordDict(dict(good.items()))
        content[messages.CONFIG] = ConfigRecord(dict(good[messages.CONFIG].items()))
        change(content)
        with pytest.raises(MessageError, match=match):
            TrainTask.from_record(content)
    # ... and the site answers such a task 'refused' with that reason, before anything loads.
    from .test_client_app import envelope

    content = RecordDict(dict(good.items()))
    content[messages.CONFIG] = ConfigRecord({**dict(good[messages.CONFIG].items()), "run-this": "x"})
    ctx = Context(run_id=1, node_id=5, node_config={"data-path": "unused.jsonl"}, state=RecordDict(), run_config={})
    reply = TrainReply.from_record(client_app.handle_train(envelope(content, messages.TRAIN), ctx, None).content)
    assert reply.site.status == "refused" and "unknown key 'run-this'" in reply.site.reason
    assert reply.update is None and reply.metrics.num_examples == 0


# ---------------------------------------------------------------------------------------------
# The config a site gets


def test_the_config_a_site_gets_holds_no_sites_paths():
    cfg = config_with_sites()
    sent = TrainTask(RoundConfig(cfg, 1, ["a", "b"]), ADAPTER).to_record()
    text = sent[messages.CONFIG][messages.CONFIG_KEY]
    for secret in ("/secret/", "hospital", "bank", "/coordinator/runs", "private-run"):
        assert secret not in text
    got = TrainTask.from_record(sent).config
    assert got.federation.sites == [] and got.output.dir is None
    # Everything every site must agree on still travels.
    for section in ("model", "peft", "layers", "data", "train", "eval", "secure_aggregation", "privacy"):
        assert getattr(got, section) == getattr(cfg, section)
    assert got.federation.model_dump(exclude={"sites"}) == cfg.federation.model_dump(exclude={"sites"})
    # The strip does not change the coordinator's own config.
    assert [s.name for s in cfg.federation.sites] == ["hospital", "bank"]
    assert messages.site_config(cfg).federation.sites == []
    # A secure round's key advertisement carries the same stripped config.
    adv = StageTask(AdvertiseRequest(TAG, 1, 2, 0.1, 100), RoundConfig(cfg, 1, ["a"])).to_record()
    assert "/secret/" not in adv[messages.CONFIG][messages.CONFIG_KEY]


def test_the_site_validates_each_distinct_config_once(monkeypatch):
    calls = []
    real = FedTuneConfig.model_validate.__func__

    def counting(cls, *a, **kw):
        calls.append(1)
        return real(cls, *a, **kw)

    monkeypatch.setattr(FedTuneConfig, "model_validate", classmethod(counting))
    monkeypatch.setattr(messages, "_CONFIG_CACHE", OrderedDict())
    cfg = FedTuneConfig()
    text = messages.site_config(cfg).to_json()
    first = messages.config_from_json(text)
    assert messages.config_from_json(text) is first and len(calls) == 1  # the same config: validated once
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": 99})})
    assert messages.config_from_json(other.to_json()).train.seed == 99 and len(calls) == 2  # a new one: in full
    bad = json.loads(text)
    bad["train"]["lr"] = -1.0
    with pytest.raises(MessageError, match="fedtune-config"):
        messages.config_from_json(json.dumps(bad))  # a new (invalid) one is never served from the cache
