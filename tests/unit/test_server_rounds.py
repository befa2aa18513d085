"""The coordinator's round logic against a fake Grid: deadlines, dropped and failing sites,
min_sites, site sampling with a checkpointed RNG, and resume with the server state."""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.error import Error
from flwr.supercore.task_identity import TaskIdentity

from fedtune.common import adapters, messages
from fedtune.common.messages import EvalMetrics, EvalReply, RoundConfig, SiteStatus, TrainMetrics, TrainReply, TrainTask
from fedtune.server import app as server

Handler = Callable[[Message], "RecordDict | Error | None"]


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower's Message needs the process's task identity (set by Flower in a real ServerApp)."""
    old = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = old


class FakeGrid:
    """Sites are node ids with a handler: content of their reply, an Error, or None (silent)."""

    def __init__(self, sites: dict[int, Handler]):
        self.sites = dict(sites)
        self.sent: list[Message] = []
        self._ready: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.sites)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{len(self.sent)}"
            m.metadata.__dict__["_message_id"] = mid
            self.sent.append(m)
            ids.append(mid)
            out = self.sites[m.metadata.dst_node_id](m)
            if out is not None:
                self._ready[mid] = Message(out, reply_to=m)
        return ids

    def pull_messages(self, ids):
        return [self._ready.pop(i) for i in list(ids) if i in self._ready]


def _state(shape=(2, 3), value=0.0) -> OrderedDict:
    return OrderedDict(a=np.full(shape, value, np.float32), b=np.full((4,), value, np.float32))


def server_round(m: Message) -> int:
    """The round a coordinator's TRAIN or EVALUATE message is for."""
    return RoundConfig.from_record(m.content[messages.CONFIG]).server_round


def global_adapter(m: Message) -> OrderedDict:
    """The global adapter a coordinator's TRAIN message carries."""
    return TrainTask.from_record(m.content).adapter


def trainer(
    name: str,
    value: float = 1.0,
    n: int = 10,
    bad: str | None = None,
    delta: Callable[[Message], dict] | None = None,
    **metrics,
) -> Handler:
    """A site that answers TRAIN with a constant delta (or ``delta(message)``; ``metrics``: more
    it reports) and EVALUATE with a loss."""

    def handle(m: Message):
        site = SiteStatus(name, "ok")
        if m.metadata.message_type == messages.EVALUATE:
            return EvalReply(site, EvalMetrics(num_examples=4, eval_loss=1.0 + value)).to_record()
        update = delta(m) if delta is not None else adapters.to_tensors(_state(value=value))
        if bad == "nan":
            update["a"][0, 0] = math.nan
        reply = TrainMetrics(num_examples=n, train_loss=1.0, startup_seconds=0.01, **metrics)
        content = TrainReply(site, reply, update).to_record()
        if bad == "layout":  # a torn update: its layout is not its arrays' (no honest site sends it, so by hand)
            content[adapters.LAYOUT_KEY] = ConfigRecord({"names": ["a"], "ndims": [1], "dims": [1]})
        return content

    return handle


def run_state(tiny_config, tmp_path, **federation) -> server.RunState:
    """A coordinator's state over the 10-value test adapter. The update-norm bound is off unless
    asked for: these rounds use unit-size updates to keep the arithmetic legible, which the default
    bound ('auto': 10 x lr x steps x sqrt(10) = 0.06 here) would clip (test_hostile_sites uses it)."""
    federation = {"update_norm_bound": None, **federation}
    cfg = tiny_config.model_copy(update={"federation": tiny_config.federation.model_copy(update=federation)})
    return server.RunState(
        cfg=cfg,
        out=tmp_path,
        global_state=_state(),
        peft_config=None,
        trainable_params=10,
        rng=np.random.default_rng(0),
    )


def test_round_completes_without_a_silent_site_when_enough_remain(tiny_config, tmp_path):
    rs = run_state(tiny_config, tmp_path, min_sites=2, round_timeout_s=0.5)
    grid = FakeGrid({1: trainer("alpha", 1.0, n=10), 2: trainer("beta", 3.0, n=30), 3: lambda m: None})
    said: list[str] = []
    t = time.time()
    r = server.run_training_round(grid, [1, 2, 3], rs, 1, said.append)
    assert time.time() - t < 5  # the round ends at the deadline, not when the silent site wakes up
    assert r["accepted"] == 2 and r["applied"]
    np.testing.assert_allclose(rs.global_state["a"], (1.0 * 10 + 3.0 * 30) / 40)  # examples-weighted mean
    assert any("1 site(s) did not answer" in s and "dropped" in s for s in said)
    assert set(r["sites"]) == {"alpha", "beta"}


def test_round_fails_clearly_below_min_sites_and_keeps_the_adapter(tiny_config, tmp_path):
    rs = run_state(tiny_config, tmp_path, min_sites=3, round_timeout_s=0.5)
    grid = FakeGrid({1: trainer("alpha"), 2: trainer("beta"), 3: lambda m: None})
    with pytest.raises(
        server.FederationError, match=r"round 4: only 2 valid update\(s\) of 3 site\(s\) asked \(1 did not answer"
    ) as e:
        server.run_training_round(grid, [1, 2, 3], rs, 4, lambda s: None)
    assert "min_sites is 3" in str(e.value) and "stays at round 3" in str(e.value)
    np.testing.assert_array_equal(rs.global_state["a"], 0.0)


def test_bad_updates_are_rejected_with_reasons_not_averaged(tiny_config, tmp_path):
    rs = run_state(tiny_config, tmp_path, min_sites=1, round_timeout_s=5)
    grid = FakeGrid(
        {1: trainer("alpha", 2.0), 2: trainer("nan", 9.0, bad="nan"), 3: trainer("torn", 9.0, bad="layout")}
    )
    r = server.run_training_round(grid, [1, 2, 3], rs, 1, lambda s: None)
    assert r["accepted"] == 1
    reasons = {x["site"]: x["reason"] for x in r["rejected"]}
    assert "finite" in reasons["nan"]
    assert "layout" in reasons["torn"]
    np.testing.assert_allclose(rs.global_state["b"], 2.0)


def test_a_site_that_vanishes_is_still_named_in_the_round_record(tiny_config, tmp_path):
    rs = run_state(tiny_config, tmp_path, min_sites=1, round_timeout_s=5)
    alive = {"gamma": True}

    def gamma(m: Message):
        if alive["gamma"]:
            return trainer("gamma")(m)
        return Error(code=0, reason="Node Unavailable: no heartbeat")

    grid = FakeGrid({1: trainer("alpha"), 3: gamma})
    server.run_evaluation(grid, [1, 3], rs, 0, lambda s: None)  # both answer: names learnt
    alive["gamma"] = False
    r = server.run_training_round(grid, [1, 3], rs, 1, lambda s: None)
    assert r["sites"]["gamma"]["status"] == "error" and "Node Unavailable" in r["sites"]["gamma"]["reason"]


def test_wait_for_sites_deadline(monkeypatch):
    said: list[str] = []
    grid = FakeGrid({1: trainer("a"), 2: trainer("b")})
    assert server.wait_for_sites(grid, 2, 2, 5, said.append) == [1, 2]
    # Fewer than wanted but enough at the deadline: go with those.
    assert server.wait_for_sites(grid, 3, 2, 0.3, said.append) == [1, 2]
    assert any("join deadline passed: starting with the 2 site(s)" in s for s in said)
    with pytest.raises(
        server.FederationError,
        match=r"only 2 site\(s\) joined within 0 s \(federation.join_timeout_s\); 3 needed \(federation.min_sites",
    ):
        server.wait_for_sites(grid, 3, 3, 0.3, said.append)


def test_site_sampling_continues_identically_after_restoring_the_server_state(tiny_config, tmp_path):
    grid = FakeGrid({n: trainer(f"s{n}") for n in range(1, 7)})
    straight = run_state(tiny_config, tmp_path, sites_per_round=2)
    draws = [server.sites_for_round(grid, straight, print)[0] for _ in range(6)]
    assert all(len(d) == 2 for d in draws) and len({tuple(d) for d in draws}) > 1  # a sample, and it varies
    assert all(e == list(range(1, 7)) for e in [server.sites_for_round(grid, straight, print)[1]])  # all evaluate

    first = run_state(tiny_config, tmp_path, sites_per_round=2)
    head = [server.sites_for_round(grid, first, print)[0] for _ in range(3)]
    saved = json.loads(json.dumps(first.server_state(3)))  # as checkpointed: through JSON
    resumed = run_state(tiny_config, tmp_path, sites_per_round=2)
    resumed.restore_server_state(saved)
    tail = [server.sites_for_round(grid, resumed, print)[0] for _ in range(3)]
    assert head + tail == draws


def test_run_federation_resumes_with_round_numbering_and_server_state(tiny_config, tmp_path):
    """A run that fails in round 2 (too few sites), resumed: rounds 2..3 run, history and RNG continue."""
    cfg_kw = {"rounds": 3, "min_sites": 2, "round_timeout_s": 0.5, "join_timeout_s": 0.5, "sites_per_round": 2}
    cfg = tiny_config.model_copy(update={"federation": tiny_config.federation.model_copy(update=cfg_kw)})
    cfg = cfg.model_copy(update={"output": cfg.output.model_copy(update={"plots": False})})
    import torch

    def site(name, dies_in_round=None):
        def delta(m: Message):  # a delta shaped like the real adapter
            return OrderedDict((k, torch.full(v.shape, 0.01)) for k, v in global_adapter(m).items())

        def handle(m: Message):
            rnd = server_round(m)
            if dies_in_round is not None and rnd >= dies_in_round and m.metadata.message_type == messages.TRAIN:
                return None
            return trainer(name, 0.0, delta=delta)(m)

        return handle

    out = tmp_path / "run"
    grid = FakeGrid({1: site("a", dies_in_round=2), 2: site("b", dies_in_round=2), 3: site("c")})
    with pytest.raises(server.FederationError, match="round 2"):
        server.run_federation(grid, cfg, out, lambda s: None)
    doc = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1]
    state_after_1 = json.loads((out / "checkpoints" / "round-0001" / "server_state.json").read_text())

    grid2 = FakeGrid({1: site("a"), 2: site("b"), 3: site("c")})
    said: list[str] = []
    rs = server.run_federation(grid2, cfg, out, said.append, resume=True)
    assert any("resuming after round 1" in s for s in said)
    assert [r["round"] for r in rs.rounds] == [0, 1, 2, 3]
    assert rs.rounds[1] == doc["rounds"][1]
    # The RNG picked up where round 1 left it: round 2's sample is what a fresh generator in that state draws.
    probe = np.random.default_rng(0)
    probe.bit_generator.state = state_after_1["rng"]
    expected = sorted(np.array([1, 2, 3])[probe.choice(3, size=2, replace=False)].tolist())
    names = {1: "a", 2: "b", 3: "c"}
    trained = sorted(n for n, s in rs.rounds[2]["sites"].items() if "train_loss" in s)
    assert trained == [names[i] for i in expected]
    # Three rounds of +0.01 from two sites each: the global adapter moved by 0.03 from its init.
    init = server.initial_adapter(cfg).state
    for k in init:
        np.testing.assert_allclose(rs.global_state[k] - init[k], 0.03, atol=1e-6)


def test_a_resumed_fedadam_run_ends_exactly_where_an_uninterrupted_one_does(tiny_config, tmp_path):
    """The server optimizer's moments are checkpointed with every round and restored on resume."""
    import torch

    fed = tiny_config.federation.model_copy(
        update={"rounds": 3, "min_sites": 2, "round_timeout_s": 0.5, "join_timeout_s": 0.5, "strategy": "fedadam"}
    )
    cfg = tiny_config.model_copy(
        update={"federation": fed, "output": tiny_config.output.model_copy(update={"plots": False})}
    )

    def site(name, scale, dies_in_round=None):
        def delta(m: Message):
            return OrderedDict((k, torch.full(v.shape, scale * server_round(m))) for k, v in global_adapter(m).items())

        def handle(m: Message):
            rnd = server_round(m)
            if dies_in_round is not None and rnd >= dies_in_round and m.metadata.message_type == messages.TRAIN:
                return None
            return trainer(name, 0.0, delta=delta)(m)

        return handle

    straight = server.run_federation(
        FakeGrid({1: site("a", 0.01), 2: site("b", -0.03)}), cfg, tmp_path / "straight", lambda s: None
    )

    out = tmp_path / "resumed"
    with pytest.raises(server.FederationError, match="round 2"):
        server.run_federation(
            FakeGrid({1: site("a", 0.01), 2: site("b", -0.03, dies_in_round=2)}), cfg, out, lambda s: None
        )
    assert (out / "checkpoints" / "round-0001" / server.OPTIMIZER_ARRAYS).is_file()
    assert json.loads((out / "checkpoints" / "round-0001" / "server_state.json").read_text())["optimizer"] == {
        "strategy": "fedadam",
        "t": 1,
    }
    resumed = server.run_federation(
        FakeGrid({1: site("a", 0.01), 2: site("b", -0.03)}), cfg, out, lambda s: None, resume=True
    )
    for k in straight.global_state:
        np.testing.assert_array_equal(resumed.global_state[k], straight.global_state[k])
    assert resumed.optimizer.t == 3
    # The check has teeth: without the moments (a fresh optimizer from round 1's adapter) rounds 2-3 end elsewhere.
    fresh = server.ServerOptimizer("fedadam")
    state = OrderedDict(
        (k, v.numpy()) for k, v in server.load_adapter_state(out / "checkpoints" / "round-0001").items()
    )
    for rnd in (2, 3):
        state = fresh.step(state, OrderedDict((k, np.full(v.shape, -0.01 * rnd, np.float32)) for k, v in state.items()))
    assert any(not np.allclose(state[k], straight.global_state[k], atol=1e-6) for k in state)


def test_a_site_that_fails_evaluation_is_recorded_as_such(tiny_config, tmp_path):
    fed = tiny_config.federation.model_copy(
        update={"rounds": 1, "min_sites": 1, "round_timeout_s": 2, "join_timeout_s": 1}
    )
    cfg = tiny_config.model_copy(
        update={"federation": fed, "output": tiny_config.output.model_copy(update={"plots": False})}
    )
    import torch

    def zeros(m: Message):
        return OrderedDict((k, torch.zeros(v.shape)) for k, v in global_adapter(m).items())

    def flaky(m: Message):
        if m.metadata.message_type == messages.EVALUATE and server_round(m) == 1:
            return Error(code=0, reason="Node Unavailable")
        return trainer("flaky", 0.0, delta=zeros)(m)

    rs = server.run_federation(FakeGrid({1: flaky}), cfg, tmp_path / "run", lambda s: None)
    entry = rs.rounds[1]["sites"]["flaky"]
    assert entry["status"] == "ok" and entry["eval_status"] == "error" and "eval_loss" not in entry
    assert "| 1 | flaky | ok |" in (tmp_path / "run" / "report.md").read_text()


def test_each_sites_pull_and_the_change_per_layer_are_recorded(tiny_config, tmp_path):
    """alpha sends +1 everywhere (10 examples), beta -1 (30): the mean is -0.5, so beta pulls
    along it (cosine 1) and alpha against it (-1); each norm is sqrt(10); the global change's
    norm is 0.5 sqrt(10), all of it outside the layers (the test state has no layer index)."""
    rs = run_state(tiny_config, tmp_path, min_sites=1, round_timeout_s=5)
    grid = FakeGrid({1: trainer("alpha", 1.0, n=10), 2: trainer("beta", -1.0, n=30)})
    r = server.run_training_round(grid, [1, 2], rs, 1, lambda s: None)
    a, b = r["sites"]["alpha"], r["sites"]["beta"]
    assert a["cosine_to_aggregate"] == pytest.approx(-1.0) and b["cosine_to_aggregate"] == pytest.approx(1.0)
    assert a["update_norm"] == pytest.approx(math.sqrt(10)) and b["update_norm"] == pytest.approx(math.sqrt(10))
    assert r["layer_change"] == {"0": pytest.approx(0.5 * math.sqrt(10))}
    assert r["update_norm"] == pytest.approx(0.5 * math.sqrt(10))


def test_by_default_fedavg_adds_the_sum_of_the_round_s_updates(tiny_config, tmp_path):
    """server_lr unset (the default, 'sites'): the same round moves the global by 2 x the mean, the
    number of updates combined, and the record says so; a site that does not answer is not counted."""
    rs = run_state(tiny_config, tmp_path, min_sites=1, round_timeout_s=5, server_lr=None)
    before = {k: v.copy() for k, v in rs.global_state.items()}
    grid = FakeGrid({1: trainer("alpha", 1.0, n=10), 2: trainer("beta", -1.0, n=30)})
    r = server.run_training_round(grid, [1, 2], rs, 1, lambda s: None)
    assert r["accepted"] == 2 and r["server_lr"] == 2.0
    for k, v in rs.global_state.items():
        assert np.allclose(v - before[k], -1.0)  # 2 x (10 x 1 - 30 x 1) / 40
    assert r["layer_change"] == {"0": pytest.approx(math.sqrt(10))}

    rs = run_state(tiny_config, tmp_path / "one", min_sites=1, round_timeout_s=1, server_lr=None)
    grid = FakeGrid({1: trainer("alpha", 1.0, n=10), 2: lambda m: None})
    r = server.run_training_round(grid, [1, 2], rs, 1, lambda s: None)
    assert r["accepted"] == 1 and r["server_lr"] == 1.0


def test_each_sites_pull_per_layer():
    """Site a pulls along the aggregate in layer 0 and against it in layer 1; b has no layer-1
    update (cosine unknown there); the per-layer norms make up the whole."""
    from fedtune.server.aggregation import site_alignment

    agg = {"model.layers.0.w": np.array([1.0, 0.0]), "model.layers.1.w": np.array([0.0, 2.0])}
    a = {"model.layers.0.w": np.array([3.0, 0.0]), "model.layers.1.w": np.array([0.0, -4.0])}
    b = {"model.layers.0.w": np.array([0.0, 1.0]), "model.layers.1.w": np.array([0.0, 0.0])}
    sa, sb = site_alignment([a, b], agg, lambda k: int(k.split(".")[2]))
    assert sa["by_layer"] == {
        "0": {"update_norm": 3.0, "cosine_to_aggregate": 1.0},
        "1": {"update_norm": 4.0, "cosine_to_aggregate": -1.0},
    }
    assert sa["update_norm"] == 5.0 and sa["cosine_to_aggregate"] == pytest.approx((3 - 8) / (5 * math.sqrt(5)))
    assert (
        sb["by_layer"]["0"] == {"update_norm": 1.0, "cosine_to_aggregate": 0.0}
        and sb["by_layer"]["1"]["cosine_to_aggregate"] is None
    )
    assert "by_layer" not in site_alignment([a], agg)[0]


def test_progress_bar_shows_the_share_of_the_run_done_and_an_eta(tiny_config, tmp_path):
    """4 rounds, 100 s spent, 2 of 4 sites into round 2: 37.5% done, so about 167 s to go."""
    rs = run_state(tiny_config, tmp_path, rounds=4)
    assert rs.progress(1, 1, 4) == ""  # before the first round starts
    rs.first_round, rs.first_round_at = 1, time.time() - 100
    bar = rs.progress(2, 2, 4)
    assert bar.startswith("▕" + "█" * 8 + "░" * 12 + "▏ 38%, ETA 2 min 4")  # 166.7 s, give or take the test's own time
    rs.first_round = 3  # resumed after round 2: the bar covers rounds 3..4 only
    assert " 75%" in rs.progress(4, 1, 2)


def test_a_sites_local_early_stop_is_recorded_and_shown(tiny_config, tmp_path):
    stopping = trainer(
        "alpha",
        train_steps=6,
        planned_steps=10,
        local_stopped_at=6,
        local_best_step=4,
        local_val_start=2.5,
        local_val_best=1.25,
    )
    rs = run_state(tiny_config, tmp_path, min_sites=1, round_timeout_s=5)
    said: list[str] = []
    r = server.run_training_round(FakeGrid({1: stopping, 2: trainer("beta")}), [1, 2], rs, 1, said.append)
    alpha, beta = r["sites"]["alpha"], r["sites"]["beta"]
    assert alpha["planned_steps"] == 10 and alpha["steps"] == 6
    assert alpha["local_stop"] == {"stopped_at": 6, "best_step": 4, "val_start": 2.5, "val_best": 1.25}
    assert "local_stop" not in beta and "planned_steps" not in beta
    assert any("alpha" in s and "in 6 of 10 steps (stopped early; kept step 4)" in s for s in said)


def test_a_site_reporting_a_nan_eval_loss_does_not_stop_the_round(tiny_config, tmp_path):
    """A site whose model diverged reports eval loss NaN: it is shown as '?' and left out of the
    federated mean, which the other site's loss makes."""
    rs = run_state(tiny_config, tmp_path, min_sites=1, round_timeout_s=5)
    said: list[str] = []
    ev = server.run_evaluation(
        FakeGrid({1: trainer("alpha", math.nan), 2: trainer("beta", 1.0)}), [1, 2], rs, 1, said.append
    )
    assert ev["sites"]["alpha"]["eval_loss"] is None and ev["aggregate"] == {"eval_loss": 2.0}
    assert any("alpha: loss ?" in s and "beta: loss 2.000" in s for s in said)


# ---- the update pipeline (server/pipeline.py), one step at a time ---------------------------------


def _lora_spec(r: int = 4) -> dict:
    return {"m.lora_A.weight": (r, 3), "m.lora_B.weight": (5, r)}


def _lora_update(r: int, value: float = 1.0) -> dict:
    return {k: np.full(s, value, np.float32) for k, s in _lora_spec(r).items()}


def test_pad_rank_zero_pads_a_lower_rank_and_records_it():
    from fedtune.server import pipeline

    u = pipeline.pad_rank(pipeline.SiteUpdate("a", _lora_update(2), 10), _lora_spec(4), "lora")
    assert u.rank == 2 and {k: v.shape for k, v in u.arrays.items()} == _lora_spec(4)
    a, b = u.arrays["m.lora_A.weight"], u.arrays["m.lora_B.weight"]
    assert (a[:2] == 1).all() and (a[2:] == 0).all() and (b[:, :2] == 1).all() and (b[:, 2:] == 0).all()
    full = pipeline.SiteUpdate("b", _lora_update(4), 10)
    assert pipeline.pad_rank(full, _lora_spec(4), None) is full  # a method without ranks: as it came


def test_validate_passes_a_matching_update_and_rejects_with_the_problems():
    from fedtune.server import pipeline

    spec = {"a": (2, 3), "b": (4,)}
    good = pipeline.SiteUpdate("a", dict(_state(value=0.5)), 10)
    assert pipeline.validate(good, spec, 1000) is good
    bad = dict(_state(value=0.5))
    bad["a"] = np.full((3, 2), np.nan, np.float32)
    with pytest.raises(pipeline.Rejected) as e:
        pipeline.validate(pipeline.SiteUpdate("m", bad, -5), spec, 1000)
    assert e.value.problems and all(isinstance(p, str) for p in e.value.problems)


def test_clip_scales_to_the_bound_and_says_whether_it_did():
    from fedtune.server import pipeline

    u = pipeline.SiteUpdate("a", dict(_state(value=1.0)), 10)  # norm sqrt(10)
    assert pipeline.clip(u, None) is u and u.clipped_by_coordinator is None
    c = pipeline.clip(u, 1.0)
    assert c.clipped_by_coordinator is True and server.l2_norm(c.arrays) == pytest.approx(1.0, rel=1e-5)
    assert pipeline.clip(u, 10.0).clipped_by_coordinator is False


def test_fold_weighs_by_examples_capped_equal_or_keeps_for_a_robust_aggregator():
    from fedtune.server import pipeline

    def ups():
        return [pipeline.SiteUpdate(n, dict(_state(value=v)), k) for n, v, k in [("a", 1.0, 10), ("b", 3.0, 30)]]

    by_examples = pipeline.Fold(keep_updates=True, default_rank=8)
    for u in ups():
        pipeline.fold(by_examples, u)
    assert by_examples.weights() == {"a": 10.0, "b": 30.0} and by_examples.count == 2
    np.testing.assert_allclose(by_examples.result(0.0)["a"], 2.5)
    assert [(s, r) for s, _, r in by_examples.measured] == [("a", 8), ("b", 8)]
    equal = pipeline.Fold(equal=True)
    for u in ups():
        pipeline.fold(equal, u)
    np.testing.assert_allclose(equal.result(0.0)["a"], 2.0)
    assert equal.measured == []
    capped = pipeline.Fold(cap=1.0)  # at most 1 x the (lower) median count, 10
    for u in ups():
        pipeline.fold(capped, u)
    assert capped.weights() == {"a": 10.0, "b": 10.0}
    robust = pipeline.Fold(aggregator="median")
    for u in [*ups(), pipeline.SiteUpdate("c", dict(_state(value=100.0)), 1)]:
        pipeline.fold(robust, u)
    assert robust.weights() == {} and len(robust.kept) == 3
    np.testing.assert_allclose(robust.result(0.0)["a"], 3.0)


def test_prepare_pads_before_it_validates_so_a_lower_rank_passes():
    from fedtune.server import pipeline

    u = pipeline.prepare(pipeline.SiteUpdate("a", _lora_update(2), 10), _lora_spec(4), "lora", 1000, None)
    assert u.rank == 2 and u.clipped_by_coordinator is None
    with pytest.raises(pipeline.Rejected):  # without padding, the shapes are not the global adapter's
        pipeline.prepare(pipeline.SiteUpdate("a", _lora_update(2), 10), _lora_spec(4), None, 1000, None)


# ---- the run loop's stop conditions (server/app.py) ------------------------------------------------


def test_patience_stops_only_without_improvement_and_with_rounds_left(tiny_config, tmp_path):
    rs = run_state(tiny_config, tmp_path, rounds=5)
    rs.cfg = rs.cfg.model_copy(update={"eval": rs.cfg.eval.model_copy(update={"patience": 2})})
    for rnd, loss in enumerate([2.0, 1.0, 1.5, 1.2]):
        rs.rounds.append({"round": rnd, "aggregate": {"eval_loss": loss}})
    assert "has not improved for 2 round(s) since round 1" in server.patience(rs, 3, 2)
    assert server.patience(rs, 5, 2) is None  # the last round: nothing left to save
    rs.rounds[-1]["aggregate"]["eval_loss"] = 0.5
    assert server.patience(rs, 3, 2) is None


def test_a_new_stop_condition_is_one_function_in_the_list(tiny_config, tmp_path, monkeypatch):
    """What 'stages' will need: a condition added to STOP_AFTER ends the run after the round it names,
    recorded in metrics.json's 'stopped' like the built-in ones."""
    from .test_hostile_sites import constant, tiny_run_config

    cfg = tiny_run_config(tiny_config)
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 3})})

    def stage_done(rs, rnd, population):
        return "stage 1 done" if rnd == 1 else None

    monkeypatch.setattr(server, "STOP_AFTER", (*server.STOP_AFTER, stage_done))
    rs = server.run_federation(FakeGrid({1: constant(1e-3, name="a")}), cfg, tmp_path / "run", lambda s: None)
    assert rs.stopped == "stage 1 done" and [r["round"] for r in rs.rounds] == [0, 1]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["stopped"] == "stage 1 done"


def test_the_config_a_site_gets_names_no_sites_paths_nor_the_output_folder(tiny_config, tmp_path):
    """Nor the study's settings (ftsim tune): its storage URL may carry a database password."""
    rs = run_state(tiny_config, tmp_path)
    sites = [{"name": "alpha", "train": "/secret/alpha/train.jsonl"}, {"name": "beta", "train": "/secret/beta.jsonl"}]
    data = json.loads(rs.cfg.to_json())
    data["federation"]["sites"], data["output"]["dir"] = sites, str(tmp_path / "out")
    data["tune"].update(storage="postgresql://tuner:hunter2@db/secret", study="secret-study")
    rs.cfg = type(rs.cfg).model_validate(data)
    grid = FakeGrid({1: trainer("alpha"), 2: trainer("beta")})
    server.run_training_round(grid, [1, 2], rs, 1, lambda s: None)
    server.run_evaluation(grid, [1, 2], rs, 1, lambda s: None)
    assert len(grid.sent) == 4
    for m in grid.sent:
        text = m.content[messages.CONFIG][messages.CONFIG_KEY]  # as sent (RoundConfig would parse it)
        sent = json.loads(text)
        assert sent["federation"]["sites"] == [] and sent["output"]["dir"] is None and "/secret/" not in text
        assert "hunter2" not in text and "secret" not in text
        assert sent["model"] == data["model"] and sent["train"] == data["train"]  # the rest as it is
