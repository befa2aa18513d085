"""Secure aggregation over Flower messages: the coordinator's round (server/secure.py) against
real site-side handlers (client/secure.py, client/app.py) through a fake Grid, with dropouts at
every stage, aborts, refusals, server optimizers on the unmasked mean; and a malicious
coordinator (forged unmask views, substituted keys) and hostile sites (inflated weights)."""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtune.client import app as client_app
from fedtune.client import secure
from fedtune.common import messages
from fedtune.common.config import ConfigError, FedTuneConfig, SecureAggregationConfig, load_config
from fedtune.common.messages import (
    AdvertiseReply,
    AdvertiseRequest,
    ConsistencyReply,
    ConsistencyRequest,
    EvalMetrics,
    EvalReply,
    NodeConfig,
    RoundConfig,
    SecureTrainRequest,
    ShareKeysReply,
    ShareKeysRequest,
    SiteStatus,
    StageReply,
    TrainMetrics,
    TrainReply,
    TrainTask,
    UnmaskReply,
    UnmaskRequest,
)
from fedtune.common.secagg import Quantizer, SecAggError, identity_public, new_identity, round_weight_cap, sign
from fedtune.common.secagg import primitives as prim
from fedtune.common.secagg import protocol as p
from fedtune.server import app as server
from fedtune.server import secure as coordinator
from fedtune.server.aggregation import ServerOptimizer, weighted_mean

from .test_server_rounds import FakeGrid, _task_identity  # noqa: F401  (fixture)

SHAPES = {"a": (6, 5), "b": (7,)}
IDENTITIES = {i: new_identity() for i in range(1, 10)}  # each site's registered signing key
REGISTERED = frozenset(identity_public(k) for k in IDENTITIES.values())


def _global() -> OrderedDict:
    return OrderedDict((k, np.zeros(s, np.float32)) for k, s in SHAPES.items())


class SecureSite:
    """A site as the coordinator meets it: trains (a fixed update), then runs the real secure
    handlers on its own Flower context with its registered signing key. ``silent_at``: the
    message type it never answers. ``reported``: the example count it reports at key
    advertisement (default: ``examples``, what it trains on and encodes)."""

    def __init__(
        self,
        idx: int,
        update: OrderedDict,
        examples: int,
        silent_at: str | None = None,
        reported: int | None = None,
        pinned=None,
    ):
        self.name = f"site{idx}"
        self.update, self.examples, self.silent_at = update, examples, silent_at
        self.reported = examples if reported is None else reported
        self.identity = secure.Identity(IDENTITIES[idx], pinned)
        self.ctx = Context(
            run_id=1,
            node_id=idx,
            node_config=NodeConfig(partition_id=idx - 1).to_record(),
            state=RecordDict(),
            run_config={},
        )
        self.sites = [client_app.SiteFiles(f"site{i}", "unused") for i in range(1, 10)]
        self.replies: list[RecordDict] = []
        self.adverts: list[AdvertiseReply] = []  # its key advertisements, as sent
        self.snapshots: list[dict] = []  # the round's secrets (keys, seed, shares held) as they stood after masking

    def __call__(self, m: Message):
        kind = m.metadata.message_type
        if kind == self.silent_at:
            return None
        if kind == messages.EVALUATE:
            out = EvalReply(self._site("ok"), EvalMetrics(num_examples=4, eval_loss=1.0)).to_record()
        elif kind == messages.TRAIN:
            task = TrainTask.from_record(m.content)
            cfg = task.config
            try:
                flat = secure.flatten_update(self.update, task.adapter)
                weight = 1 if cfg.privacy.enabled or cfg.federation.weighting == "equal" else self.examples
                y, extra = secure.masked_input(self.ctx, task.secure, flat, weight, seed=7)
                self.snapshots.append(dict(self.ctx.state[p.STATE]))
                metrics = TrainMetrics.from_record(MetricRecord(extra))  # what masked_input reports, by wire key
                metrics = dataclasses.replace(metrics, num_examples=self.examples, train_loss=1.0)
                out = TrainReply(self._site("ok"), metrics, masked=y).to_record()
            except SecAggError as e:
                secure.forget(self.ctx)
                out = TrainReply(self._site("refused", str(e))).to_record()
        elif kind == p.ADVERTISE:  # as client_app.handle_secure_stage, with the count this site claims
            cfg = RoundConfig.from_record(m.content[messages.CONFIG]).config
            n = None if cfg.privacy.enabled or cfg.federation.weighting == "equal" else self.reported
            try:
                advert = AdvertiseReply.from_record(
                    secure.advertise(self.ctx, m.content[messages.SECAGG], self.identity, n)
                )
                self.adverts.append(advert)
                out = StageReply(self._site("ok"), advert).to_record()
            except SecAggError as e:
                out = StageReply(self._site("refused", str(e))).to_record()
        else:
            out = client_app.handle_secure_stage(m, self.ctx, self.sites, identity=self.identity).content
        self.replies.append(out)
        return out

    def _site(self, status: str, reason: str | None = None) -> SiteStatus:
        return SiteStatus(self.name, status, reason or None)

    def refusals(self) -> list[str]:
        sites = [SiteStatus.from_record(r[messages.SITE]) for r in self.replies if messages.SITE in r]
        return [str(s.reason) for s in sites if s.status == "refused"]


def secure_state(tiny_config, tmp_path, sa: dict | None = None, site_keys=REGISTERED, **federation) -> server.RunState:
    fed = tiny_config.federation.model_copy(update={"round_timeout_s": 0.5, **federation})
    cfg = tiny_config.model_copy(
        update={
            "federation": fed,
            "secure_aggregation": SecureAggregationConfig(enabled=True, stage_timeout_s=0.5, **(sa or {})),
        }
    )
    return server.RunState(
        cfg=cfg,
        out=tmp_path,
        global_state=_global(),
        peft_config=None,
        trainable_params=37,
        optimizer=ServerOptimizer.from_config(cfg.federation),
        site_keys=site_keys,
    )


def updates_for(n: int, seed: int = 0, scale: float = 0.01) -> list[OrderedDict]:
    rng = np.random.default_rng(seed)
    return [OrderedDict((k, rng.normal(0, scale, s).astype(np.float32)) for k, s in SHAPES.items()) for _ in range(n)]


EXAMPLES = [120, 80, 200, 45, 160]


def five(silent: dict[int, str] | None = None, updates=None, **kw) -> dict[int, SecureSite]:
    ups = updates or updates_for(5)
    return {i: SecureSite(i, ups[i - 1], EXAMPLES[i - 1], (silent or {}).get(i), **kw) for i in range(1, 6)}


def expected_mean(sites: dict[int, SecureSite], ids, cap: int | None = None) -> OrderedDict:
    return weighted_mean(
        [sites[i].update for i in ids], [min(sites[i].examples, cap or sites[i].examples) for i in ids]
    )


def round_cap(rs, sites) -> int:
    return round_weight_cap(
        [s.reported for s in sites.values()], rs.cfg.federation.weight_cap, rs.cfg.secure_aggregation.max_weight
    )


def bound_for(rs, sites, ids) -> float:
    cap = round_cap(rs, sites)
    q = Quantizer(rs.cfg.secure_clip, cap, len(sites))
    return q.mean_error_bound(sum(min(sites[i].examples, cap) for i in ids), len(ids))


def test_secure_round_gives_the_weighted_mean_within_the_stated_bound_and_never_an_update(tiny_config, tmp_path):
    rs = secure_state(tiny_config, tmp_path)
    sites = five()
    said: list[str] = []
    r = server.run_training_round(FakeGrid(sites), list(sites), rs, 1, said.append)
    want = expected_mean(sites, range(1, 6))
    stats = r["secure_aggregation"]
    bound = stats["quantization_error_bound"]
    assert bound == pytest.approx(bound_for(rs, sites, range(1, 6))) and 0 < bound < 1e-6
    for k in SHAPES:
        err = np.abs(rs.global_state[k].astype(np.float64) - want[k]).max()
        assert err <= bound + 1e-7  # + float32 storage of the result
    # The weighting matters: the unweighted mean is far off.
    plain = np.mean([s.update["a"] for s in sites.values()], axis=0)
    assert np.abs(plain - want["a"]).max() > 100 * bound
    assert r["accepted"] == 5 and stats["sites_per_stage"] == [5, 5, 5, 5, 5, 5] and stats["threshold"] == 3
    assert stats["upload_bytes_per_param"] == pytest.approx(
        4.0 * (37 + 1) / 37, abs=1e-4
    )  # 4 bytes a value, and 4 for the weight
    # The mean divides by the weights the sites encoded, which are their counts (none capped here).
    assert stats["summed_weight"] == stats["reported_weight"] == sum(EXAMPLES) and stats["weight_cap"] == 360
    assert stats["identity_keys"] == "registered"
    # Nothing a site sent is its update: no float adapter record in any reply, and nothing of
    # the update is parked in the site's Flower context either (only keys and shares are).
    assert all(messages.ARRAYS not in reply for s in sites.values() for reply in s.replies)
    # The round is over: its secrets are wiped; what stays for the run is the peers' public identity keys.
    assert all(list(s.ctx.state.keys()) == [p.PEERS] for s in sites.values())
    assert set(sites[1].ctx.state[p.PEERS]["keys"]) == {identity_public(IDENTITIES[j]) for j in (2, 3, 4, 5)}
    assert any("weighted mean of 5 site(s) unmasked" in line for line in said)


@pytest.mark.parametrize("n_drop", [1, 2])
@pytest.mark.parametrize("stage", [p.ADVERTISE, p.SHARE_KEYS, messages.TRAIN, p.CONSISTENCY, p.UNMASK])
def test_dropouts_at_each_stage_still_give_the_survivors_exact_mean(tiny_config, tmp_path, stage, n_drop):
    rs = secure_state(tiny_config, tmp_path)
    dropped = [2, 4][:n_drop]
    sites = five({i: stage for i in dropped})
    said: list[str] = []
    r = server.run_training_round(FakeGrid(sites), list(sites), rs, 1, said.append)
    # A site silent at the consistency check or at unmasking had uploaded: its update is in the
    # sum (others rebuild its self-mask).
    summed = list(range(1, 6)) if stage in (p.CONSISTENCY, p.UNMASK) else [i for i in range(1, 6) if i not in dropped]
    want = expected_mean(sites, summed)
    bound = bound_for(rs, sites, summed)
    for k in SHAPES:
        assert np.abs(rs.global_state[k].astype(np.float64) - want[k]).max() <= bound + 1e-7
    assert r["accepted"] == len(summed)
    assert sorted(n for n, v in r["sites"].items() if v.get("summed")) == [f"site{i}" for i in summed]
    label = {
        p.ADVERTISE: "advertise",
        p.SHARE_KEYS: "share_keys",
        messages.TRAIN: "train",
        p.CONSISTENCY: "consistency",
        p.UNMASK: "unmask",
    }[stage]
    # A site silent from the first message of its first round was never named: its node id stands in.
    named = [f"node-{i}" if stage == p.ADVERTISE else f"site{i}" for i in dropped]
    assert r["secure_aggregation"]["dropped"] == {label: named}
    assert any(f"{label}: {5 - n_drop} of 5 site(s) went on; dropped: {', '.join(named)}" in line for line in said)


@pytest.mark.parametrize("stage", [p.ADVERTISE, p.SHARE_KEYS, messages.TRAIN, p.CONSISTENCY, p.UNMASK])
def test_three_dropouts_abort_the_round_and_release_nothing(tiny_config, tmp_path, stage):
    rs = secure_state(tiny_config, tmp_path)
    sites = five({1: stage, 3: stage, 5: stage})
    with pytest.raises(
        server.FederationError, match=r"secure aggregation aborted .*2 site\(s\) left, 3 needed.*nothing was"
    ):
        server.run_training_round(FakeGrid(sites), list(sites), rs, 1, lambda s: None)
    for k in SHAPES:
        np.testing.assert_array_equal(rs.global_state[k], 0.0)


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedavgm"])
def test_server_optimizers_act_on_the_unmasked_mean(tiny_config, tmp_path, strategy):
    rs = secure_state(tiny_config, tmp_path, strategy=strategy, server_lr=None)  # each strategy's default
    sites = five()
    server.run_training_round(FakeGrid(sites), list(sites), rs, 1, lambda s: None)
    reference = ServerOptimizer(strategy).step(_global(), expected_mean(sites, range(1, 6)), n_sites=5)
    for k in SHAPES:
        # Adaptive steps are ~server_lr per value whatever the mean's scale: compare at that scale.
        np.testing.assert_allclose(rs.global_state[k], reference[k], atol=1e-3 * 1e-2)
    assert np.abs(rs.global_state["a"]).max() > 0


def test_a_non_finite_update_is_refused_at_the_site_before_masking(tiny_config, tmp_path):
    rs = secure_state(tiny_config, tmp_path)
    ups = updates_for(5)
    ups[2]["a"][0, 0] = math.nan
    sites = five(updates=ups)
    r = server.run_training_round(FakeGrid(sites), list(sites), rs, 1, lambda s: None)
    assert r["sites"]["site3"]["status"] == "refused" and "non-finite" in r["sites"]["site3"]["reason"]
    assert r["accepted"] == 4 and p.STATE not in sites[3].ctx.state
    want = expected_mean(sites, [1, 2, 4, 5])
    assert (
        np.abs(rs.global_state["b"].astype(np.float64) - want["b"]).max() <= bound_for(rs, sites, [1, 2, 4, 5]) + 1e-7
    )


TAG = b"t" * p.TAG_BYTES


def share_record(tag, i, ids, keys, signed, cap=360, threshold=3, **changes) -> ConfigRecord:
    """What an honest coordinator sends site ``i`` at key sharing (node ids are the site numbers
    here); ``changes``: ShareKeysRequest fields a dishonest one changes."""
    req = ShareKeysRequest.build(tag, threshold, cap, ids, keys, signed, {j: j for j in ids})
    return dataclasses.replace(req, **changes).to_record()


def advertise_all(sites, tag=TAG) -> tuple[dict, dict]:
    keys, signed = {}, {}
    for i, s in sites.items():
        rec = AdvertiseRequest(tag, i, 5, 0.1, 10_000).to_record()
        pub = AdvertiseReply.from_record(secure.advertise(s.ctx, rec, s.identity, s.examples))
        keys[i], signed[i] = (pub.c_pub, pub.s_pub), (pub.signer, pub.sig)
    return keys, signed


def consistency(s: SecureSite, alive, tag=TAG) -> bytes:
    """Site ``s``'s signature on the alive set ``alive`` (stage 4), asked as the coordinator asks."""
    return ConsistencyReply.from_record(
        secure.consistency(s.ctx, ConsistencyRequest(tag, list(alive)).to_record(), s.identity)
    ).sig


def _site_after_consistency(u3=(1, 2, 3, 4, 5)):
    """Five sites through stage 4 of one round (every site every other's neighbour), driven by
    hand; ``u3``: the alive set the coordinator has them sign (None: stop after the upload).
    -> (sites, each site's signature)."""
    sites = five()
    keys, signed = advertise_all(sites)
    out = {}
    for i, s in sites.items():
        sealed = secure.share_keys(
            s.ctx, share_record(TAG, i, [j for j in range(1, 6) if j != i], keys, signed), s.identity
        )
        reply = ShareKeysReply.from_record(sealed)
        out[i] = dict(zip(reply.to, reply.sealed))
    for i, s in sites.items():
        senders = [j for j in range(1, 6) if j != i]
        rec = SecureTrainRequest(TAG, senders, [out[j][i] for j in senders]).to_record()
        secure.masked_input(s.ctx, rec, secure.flatten_update(s.update, _global()), s.examples, seed=i)
    if u3 is None:
        return sites, {}
    sigs = {i: consistency(s, u3) for i, s in sites.items() if i in u3}
    return sites, sigs


def unmask_request(i, u3, sigs, alive=None, dropped=None, signers=None, tag=TAG) -> ConfigRecord:
    """Site i's unmask request: its own view of u3 unless ``alive``/``dropped`` say otherwise."""
    view = prim.unmask_view(u3, [j for j in range(1, 6) if j != i], i)
    signers = sorted(sigs) if signers is None else signers
    return UnmaskRequest(
        tag,
        list(u3),
        view[0] if alive is None else alive,
        view[1] if dropped is None else dropped,
        signers,
        [sigs[j] for j in signers],
    ).to_record()


def test_a_site_answers_one_unmask_request_per_round_and_refuses_unsafe_ones():
    u3 = [1, 2, 3, 4]  # site 5's upload came too late: its shares' senders are dropped at the others
    sites, sigs = _site_after_consistency(u3)
    ctx = sites[1].ctx
    # Overlapping alive/dropped: the coordinator would get both a self-mask and a mask key.
    with pytest.raises(SecAggError, match="both alive and dropped"):
        secure.unmask(ctx, unmask_request(1, u3, sigs, alive=[1, 2, 3, 4], dropped=[4, 5]))
    # Refused requests end the round at that site: no second try with other sets.
    with pytest.raises(SecAggError, match="no secure round in progress"):
        secure.unmask(ctx, unmask_request(1, u3, sigs))
    # Too few alive.
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        secure.unmask(sites[2].ctx, unmask_request(2, u3, sigs, alive=[1, 2], dropped=[3, 4, 5]))
    # A valid request is answered once; a second, different one finds nothing.
    ans = UnmaskReply.from_record(secure.unmask(sites[3].ctx, unmask_request(3, u3, sigs)))
    assert list(ans.self_ids) == [1, 2, 3, 4] and list(ans.pair_ids) == [5]
    with pytest.raises(SecAggError, match="no secure round in progress"):
        secure.unmask(sites[3].ctx, unmask_request(3, u3, sigs, alive=[1, 2, 3], dropped=[4, 5]))
    # A request for another round is refused.
    with pytest.raises(SecAggError, match="another round"):
        secure.unmask(sites[4].ctx, unmask_request(4, u3, sigs, tag=b"x" * p.TAG_BYTES))


@pytest.mark.parametrize(
    "forge, match",
    [
        (lambda u3, sigs: unmask_request(1, [1, 2, 3, 4, 5], sigs), "another alive set than the one this site signed"),
        (
            lambda u3, sigs: unmask_request(1, u3, sigs, signers=[1, 2]),
            "only 2 of this site's share holders signed the alive set, 3 needed",
        ),
        (
            lambda u3, sigs: unmask_request(1, u3, {**sigs, 3: sigs[2]}),
            r"signatures of site\(s\) \[3\] on the alive set do not verify",
        ),
        (
            lambda u3, sigs: unmask_request(1, u3, {**sigs, 98: sigs[2]}, signers=[1, 2, 98]),
            "at most one from each of this site's share holders",
        ),
        (
            lambda u3, sigs: unmask_request(1, u3, sigs, alive=[1, 2, 3], dropped=[4, 5]),
            "not this site's view of the alive set it signed",
        ),
    ],
)
def test_an_unmask_request_without_the_survivors_signatures_on_the_same_alive_set_is_refused(forge, match):
    u3 = [1, 2, 3, 4]
    sites, sigs = _site_after_consistency(u3)
    with pytest.raises(SecAggError, match=match):
        secure.unmask(sites[1].ctx, forge(u3, sigs))
    assert p.STATE not in sites[1].ctx.state  # and the round is over at that site: nothing revealed, ever


def test_a_site_signs_one_alive_set_only_if_it_is_in_it_with_enough_share_holders():
    sites, _ = _site_after_consistency(None)
    with pytest.raises(SecAggError, match="leaves out this site"):
        consistency(sites[1], [2, 3, 4])
    with pytest.raises(SecAggError, match=r"distinct site numbers in 1..5"):
        consistency(sites[2], [2, 3, 98, 99])
    with pytest.raises(SecAggError, match="fewer than the threshold 3"):
        consistency(sites[4], [3, 4])
    sig = consistency(sites[3], [1, 2, 3])
    assert prim.verify(identity_public(IDENTITIES[3]), sig, p.alive_payload(1, TAG, [1, 2, 3]))
    with pytest.raises(SecAggError, match="out of order"):  # once per round
        consistency(sites[3], [1, 2, 3, 4])


def test_a_site_refuses_out_of_order_or_unsafe_key_sharing():
    s = five()[1]
    with pytest.raises(SecAggError, match="no secure round in progress"):  # a well-formed request, but no round
        secure.share_keys(
            s.ctx, ShareKeysRequest(TAG, 3, 360, [2], [b"x"], [b"y"], [b"g"], [b"k"], ["2"]).to_record(), s.identity
        )
    sites = {1: s, **{j: o for j, o in five().items() if j in (2, 3)}}
    keys, signed = advertise_all(sites)
    # A threshold of half the holders or less lets two disjoint groups rebuild both secrets.
    with pytest.raises(SecAggError, match=r"threshold 1 with 3 share holders"):
        secure.share_keys(s.ctx, share_record(TAG, 1, [2, 3], keys, signed, threshold=1), s.identity)
    with pytest.raises(SecAggError, match="no secure round in progress"):  # a refusal ends the round here
        secure.ready_to_train(s.ctx, SecureTrainRequest(TAG, [], []).to_record())
    unsafe = [  # ShareKeysRequest fields a dishonest coordinator changes
        (lambda sg: {"nbr_pk": [sg[2][0], sg[2][0]]}, "identity keys repeat"),  # one identity for two sites
        (
            lambda sg: {"nbr_pk": [sg[2][0], identity_public(IDENTITIES[1])]},
            "identity keys repeat, or repeat this site's own",
        ),
        (lambda sg: {"nbr_node": ["2", "2"]}, "Flower nodes repeat"),
        (lambda sg: {"nbr_node": ["2", "1"]}, "name this site's own"),
        (
            lambda sg: {"nbr_sig": [sg[3][1], sg[3][1]]},
            r"keys of site\(s\) \[2\] are not signed by their published identity keys",
        ),
        (lambda sg: {"weight_cap": 0}, "weight cap 0"),
        (lambda sg: {"weight_cap": 20_000}, "weight cap 20000"),
    ]
    for change, match in unsafe:
        keys, signed = advertise_all(sites)
        rec = share_record(TAG, 1, [2, 3], keys, signed, **change(signed))
        with pytest.raises(SecAggError, match=match):
            secure.share_keys(s.ctx, rec, s.identity)
    # Signatures bind the round: keys advertised for another round (replayed) do not verify here.
    old_keys, old_signed = advertise_all(sites, tag=b"o" * p.TAG_BYTES)
    advertise_all(sites)
    rec = share_record(TAG, 1, [2, 3], old_keys, old_signed)
    with pytest.raises(SecAggError, match="not signed by their published identity keys"):
        secure.share_keys(s.ctx, rec, s.identity)


def test_a_site_that_lost_its_keys_refuses_before_training(tiny_config, tmp_path):
    """A site restarted between key sharing and training: it says so at once instead of
    training a round whose update it could not mask."""
    rs = secure_state(tiny_config, tmp_path)
    sites = five()

    class Amnesiac(SecureSite):
        def __call__(self, m):
            if m.metadata.message_type == messages.TRAIN:
                secure.forget(self.ctx)
            return super().__call__(m)

    sites[4] = Amnesiac(4, sites[4].update, sites[4].examples)
    r = server.run_training_round(FakeGrid(sites), list(sites), rs, 1, lambda s: None)
    assert r["sites"]["site4"]["status"] == "refused" and "no secure round in progress" in r["sites"]["site4"]["reason"]
    assert r["accepted"] == 4 and r["secure_aggregation"]["dropped"] == {"train": ["site4"]}


def test_update_shapes_are_checked_before_masking():
    glob = _global()
    bad = OrderedDict(a=np.zeros((5, 6), np.float32), b=np.zeros(7, np.float32))
    with pytest.raises(SecAggError, match=r"shape \(5, 6\), expected \(6, 5\)"):
        secure.flatten_update(bad, glob)
    with pytest.raises(SecAggError, match="missing"):
        secure.flatten_update(OrderedDict(a=glob["a"]), glob)


def test_configs_that_secure_aggregation_cannot_serve_fail_at_start(tmp_path):
    with pytest.raises(ConfigError, match=r"aggregator 'median' inspects each site's update"):
        load_config(overrides={"secure_aggregation.enabled": True, "federation.aggregator": "median"})
    # ftserver turns it on by default, so the same config fails there unless it turns it off.
    cfg = load_config(overrides={"federation.aggregator": "trimmed-mean"})
    with pytest.raises(ConfigError, match="on by default here"):
        cfg.with_secure_default(True)
    assert (
        load_config(overrides={"federation.aggregator": "median", "secure_aggregation.enabled": False})
        .with_secure_default(True)
        .secure_aggregation.enabled
        is False
    )
    one_site = {"federation.sites": [{"name": "a", "train": "x.jsonl"}], "secure_aggregation.enabled": True}
    with pytest.raises(ConfigError, match="needs at least 2 sites"):
        load_config(overrides=one_site)
    with pytest.raises(ConfigError, match=r"threshold 4: at most 3 share holders"):
        load_config(
            overrides={
                "federation.sites": [{"name": n, "train": "x.jsonl"} for n in "abc"],
                "secure_aggregation.enabled": True,
                "secure_aggregation.threshold": 4,
            }
        )
    with pytest.raises(ConfigError, match=r"threshold 2 with 3 neighbours: expected more than half"):
        load_config(overrides={"secure_aggregation.neighbours": 3, "secure_aggregation.threshold": 2})
    assert FedTuneConfig().with_secure_default(False).secure_aggregation.enabled is False


def test_an_unusable_threshold_aborts_clearly_before_anything_is_sent(tiny_config, tmp_path):
    rs = secure_state(tiny_config, tmp_path, sa={"threshold": 5})
    sites = {i: s for i, s in five().items() if i != 2}
    grid = FakeGrid(sites)
    with pytest.raises(
        server.FederationError,
        match=r"secure aggregation cannot start: secure_aggregation.threshold 5 with 4 share holders",
    ):
        server.run_training_round(grid, list(sites), rs, 1, lambda s: None)
    assert grid.sent == []


def test_the_threshold_is_fixed_by_the_sites_invited_not_those_that_turn_up(tiny_config, tmp_path):
    """Five invited (threshold 3): two sites that finish training cannot be unmasked on their own."""
    rs = secure_state(tiny_config, tmp_path)
    sites = five({1: messages.TRAIN, 2: messages.TRAIN, 3: messages.TRAIN})
    with pytest.raises(server.FederationError, match=r"2 site\(s\) left, 3 needed"):
        server.run_training_round(FakeGrid(sites), list(sites), rs, 1, lambda s: None)
    assert all(s.replies == [] or p.RECORD in s.replies[0] for s in sites.values())
    assert not any(m.metadata.message_type == p.SHARE_KEYS for m in FakeGrid(sites).sent)


# ---------------------------------------------------------------- a malicious coordinator


class MaliciousCoordinator(FakeGrid):
    """The coordinator's own round (server/secure.py), with the request it sends rewritten by
    ``tamper(kind, sid, request)`` (which returns the request to send instead, or None) on the way
    out; it keeps every reply it sees (keys, masked vectors, unmask shares) and tries to open site
    1's masked vector with them."""

    def __init__(self, sites, tamper=None):
        super().__init__(sites)
        self.tamper = tamper or (lambda kind, sid, req: None)
        self.sid: dict[int, int] = {}
        self.pubs, self.masked, self.answers, self.tag = {}, {}, {}, None

    def push_messages(self, sent):
        sent = list(sent)
        for m in sent:
            kind, node = m.metadata.message_type, m.metadata.dst_node_id
            if messages.SECAGG in m.content:
                cls = messages.STAGE_MESSAGES[kind][0] if kind in messages.STAGE_MESSAGES else SecureTrainRequest
                req = cls.from_record(m.content[messages.SECAGG])
                if kind == p.ADVERTISE:
                    self.sid[node], self.tag = req.sid, req.round_tag
                forged = self.tamper(kind, self.sid[node], req)
                if forged is not None:
                    m.content[messages.SECAGG] = forged.to_record()
        ids = super().push_messages(sent)
        for m, mid in zip(sent, ids):
            if mid not in self._ready:
                continue
            out, sid, kind = self._ready[mid].content, self.sid.get(m.metadata.dst_node_id), m.metadata.message_type
            if kind == p.ADVERTISE and messages.SECAGG in out:
                advert = AdvertiseReply.from_record(out[messages.SECAGG])
                self.pubs[sid] = (advert.c_pub, advert.s_pub)
            if kind == messages.TRAIN and messages.MASKED in out:
                task = TrainTask.from_record(m.content)
                length = sum(task.adapter[k].size for k in task.trainable) + 1  # the values and the weight
                self.masked[sid] = TrainReply.from_record(out, masked_length=length).masked.copy()
            if kind == p.UNMASK and messages.SECAGG in out:
                shares = UnmaskReply.from_record(out[messages.SECAGG]).shares()
                self.answers[sid] = (shares["self_seed"], shares["pair_key"])
        return ids

    def open_site_1(self, t: int = 3) -> np.ndarray | None:
        """Site 1's quantized update, if the shares given away rebuild its self-mask seed and
        every neighbour's mask key (which with site 1's public key gives each pairwise mask)."""
        b = {h: a[0][1] for h, a in self.answers.items() if 1 in a[0]}
        if len(b) < t or 1 not in self.masked:
            return None
        seeds = [(prim.shamir_combine(b, t), -1)]
        for k in range(2, 6):
            s = {h: a[1][k] for h, a in self.answers.items() if k in a[1]}
            if len(s) < t:
                return None
            s_k = X25519PrivateKey.from_private_bytes(prim.shamir_combine(s, t))
            seeds.append((prim.mask_key(s_k, self.pubs[1][1], self.tag), -1))  # site 1 added +m_1k (1 < k)
        return prim.apply_masks(self.masked[1].copy(), seeds)


def attack_a(kind, sid, req):
    """Attack (a): ask each site j to unmask with alive = {1, j, 98, 99} (98 and 99 are no
    sites) and dropped = the rest: site 1's self-mask seed from the others, every other site's
    mask key from site 1 and the rest. (Against the code before the signed consistency check and
    the share-holder checks, this opened site 1's update to one quantization step: 1.7e-8.)"""
    if kind == p.UNMASK:
        return dataclasses.replace(req, alive=sorted({1, sid, 98, 99}), dropped=sorted(set(range(1, 6)) - {1, sid}))
    return None


def attack_a_signed(kind, sid, req):
    """Attack (a) with the alive set split instead: the sites sign the true alive set, then
    each site j is asked as if the alive set were {1, j, j'} (three real sites), with its own
    view of that set and the signatures the coordinator holds (on the true set)."""
    if kind == p.UNMASK:
        mine = sorted({1, sid, sid % 4 + 2})  # 1 -> {1, 3}... made three: {1, 2, 3} for site 1
        mine = mine if len(mine) == 3 else sorted({1, 2, 3})
        alive, dropped = prim.unmask_view(mine, [j for j in range(1, 6) if j != sid], sid)
        return dataclasses.replace(req, u3=mine, alive=alive, dropped=dropped)
    return None


@pytest.mark.parametrize("tamper", [attack_a, attack_a_signed], ids=["forged-views", "split-alive-set"])
def test_attack_a_a_coordinator_cannot_count_strangers_or_split_views_to_open_a_site(tiny_config, tmp_path, tamper):
    rs = secure_state(tiny_config, tmp_path)
    sites = five()
    grid = MaliciousCoordinator(sites, tamper)
    with pytest.raises(server.FederationError, match=r"aborted at (unmasking|the consistency check)"):
        server.run_training_round(grid, list(sites), rs, 1, lambda s: None)
    assert grid.answers == {} and grid.open_site_1() is None  # not one share given away
    why = [r for s in sites.values() for r in s.refusals()]
    expected = "sent this site no shares" if tamper is attack_a else "another alive set than the one this site signed"
    assert len(why) == 5 and all(expected in r for r in why), why
    for k in SHAPES:
        np.testing.assert_array_equal(rs.global_state[k], 0.0)


def test_the_attack_harness_opens_a_site_when_the_sites_give_their_shares_away(tiny_config, tmp_path):
    """The harness has teeth: with the shares an honest round hands over plus, say, every
    mask key (what attack (a) used to get), site 1's update comes back; so the refusals above
    are what stops the attack, not a broken harness."""
    rs = secure_state(tiny_config, tmp_path)
    sites = five()
    grid = MaliciousCoordinator(sites)
    server.run_training_round(grid, list(sites), rs, 1, lambda s: None)
    assert grid.open_site_1() is None  # an honest round reveals self-mask seeds only
    # Give the harness site 1's neighbours' mask keys as if the sites had revealed them.
    snapshots = {i: s.snapshots[-1] for i, s in sites.items()}
    for h, (b, _) in list(grid.answers.items()):
        shares = {
            k: p.bytes_to_ints(list(snapshots[h]["held-s"]))[list(snapshots[h]["held-ids"]).index(k)]
            for k in range(2, 6)
            if k != h
        }
        grid.answers[h] = (b, shares)
    code = grid.open_site_1()
    cap = round_cap(rs, sites)
    q = Quantizer(rs.cfg.secure_clip, cap, 5)
    x = (code[:-1].astype(np.float64) * q.step - q.max_weight * q.clip) / sites[1].examples
    assert code[-1] == sites[1].examples
    assert np.abs(x - secure.flatten_update(sites[1].update, _global())).max() <= q.step / sites[1].examples


def substitute_keys(target: int, identity=None, only_round=None, state=None):
    """A coordinator that hands every neighbour of site ``target`` its own X25519 keys in place
    of the target's (so it could open the target's shares); with ``identity``, it also signs
    them with that key and publishes it as the target's identity key."""
    mine = (X25519PrivateKey.generate(), X25519PrivateKey.generate())
    raw = [k.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) for k in mine]
    state = state if state is not None else {"round": 0}

    def tamper(kind, sid, req):
        if kind == p.ADVERTISE and sid == 1:
            state["round"] += 1
            state["tag"] = req.round_tag
        if kind != p.SHARE_KEYS or (only_round and state["round"] != only_round) or target not in req.nbr_ids:
            return None
        at = list(req.nbr_ids).index(target)

        def put(values, value):
            return [value if i == at else v for i, v in enumerate(values)]

        changes = dict(nbr_c=put(req.nbr_c, raw[0]), nbr_s=put(req.nbr_s, raw[1]))
        if identity is not None:
            sig = sign(identity, p.advert_payload(1, state["tag"], target, raw[0], raw[1]))
            changes.update(nbr_sig=put(req.nbr_sig, sig), nbr_pk=put(req.nbr_pk, identity_public(identity)))
        return dataclasses.replace(req, **changes)

    return tamper


def test_a_substituted_key_is_refused_and_nothing_is_unmasked(tiny_config, tmp_path):
    rs = secure_state(tiny_config, tmp_path)
    sites = five()
    grid = MaliciousCoordinator(sites, substitute_keys(3))
    with pytest.raises(server.FederationError, match="aborted at key sharing"):
        server.run_training_round(grid, list(sites), rs, 1, lambda s: None)
    for i in (1, 2, 4, 5):
        assert any(
            "advertised keys of site(s) [3] are not signed by their published identity keys" in r
            for r in sites[i].refusals()
        )
    assert grid.masked == {} and grid.answers == {}  # no site trained or masked: nothing to open
    assert all(p.STATE not in sites[i].ctx.state for i in (1, 2, 4, 5))  # the refusing sites forgot the round


def test_a_substituted_identity_is_refused_by_pinned_sites_and_when_it_changes_during_the_run(tiny_config, tmp_path):
    """A coordinator that also signs the substituted keys with a key of its own, published as
    site 3's identity: sites that pin the registered keys refuse at once; sites that do not pin
    refuse it once they have seen site 3's real key (trust on first use)."""
    rogue = new_identity()
    rs = secure_state(tiny_config, tmp_path)
    pinned = five(pinned=REGISTERED)
    with pytest.raises(server.FederationError, match="aborted at key sharing"):
        server.run_training_round(
            MaliciousCoordinator(pinned, substitute_keys(3, rogue)), list(pinned), rs, 1, lambda s: None
        )
    assert any("published for node(s) 3 are not among this site's pinned peer keys" in r for r in pinned[1].refusals())

    rs = secure_state(tiny_config, tmp_path)
    sites = five()
    grid = MaliciousCoordinator(sites, substitute_keys(3, rogue, only_round=2))
    server.run_training_round(grid, list(sites), rs, 1, lambda s: None)  # round 1 is honest
    with pytest.raises(server.FederationError, match="aborted at key sharing"):
        server.run_training_round(grid, list(sites), rs, 2, lambda s: None)
    assert any("identity key published for node 3 changed during the run" in r for r in sites[1].refusals())


def test_without_pinning_the_coordinator_controls_the_published_keys_in_the_first_round(tiny_config, tmp_path):
    """What the threat model says: a site that pins nothing trusts the coordinator's published
    keys on first use, so a coordinator can enrol keys of its own (Sybil sites, colluding with
    it) from the start. Privacy then holds only while it controls fewer than threshold of a
    site's share holders: here it would hold one share of each secret, threshold 3."""
    rs = secure_state(tiny_config, tmp_path)
    sites = five()
    grid = MaliciousCoordinator(sites, substitute_keys(3, new_identity()))
    with pytest.raises(server.FederationError):  # site 3 cannot open shares sealed to the rogue keys
        server.run_training_round(grid, list(sites), rs, 1, lambda s: None)
    assert not any("identity" in r or "signed" in r for i in (1, 2, 4, 5) for r in sites[i].refusals())


# ---------------------------------------------------------------- fresh seeds


def check_fresh_secrets(sites: dict[int, SecureSite]) -> tuple[int, int]:
    """The detector: from every site's secrets as they stood after masking, in every
    round seen, each self-mask seed is new, and each pairwise mask key is new and the same at
    both ends of its pair. AssertionError names what repeats. -> (seeds, pair keys) checked."""
    seeds: list[bytes] = []
    pairs: dict[tuple, set] = {}
    for s in sites.values():
        for snap in s.snapshots:
            tag, me = snap["round-tag"], int(snap["sid"])
            seeds.append(snap["self-seed"])
            s_key = X25519PrivateKey.from_private_bytes(snap["s-key"])
            for j, s_pub in zip(snap["nbr-ids"], snap["nbr-s"]):
                pairs.setdefault((tag, frozenset({me, int(j)})), set()).add(prim.mask_key(s_key, s_pub, tag))
    assert len(set(seeds)) == len(seeds), f"self-mask seeds repeat: {len(seeds) - len(set(seeds))} of {len(seeds)}"
    assert all(len(v) == 1 for v in pairs.values()), "the two ends of a pair derive different mask keys"
    keys = [next(iter(v)) for v in pairs.values()]
    assert len(set(keys)) == len(keys), (
        f"pairwise mask keys repeat across pairs or rounds: {len(set(keys))} distinct of {len(keys)}"
    )
    assert not set(keys) & set(seeds), "a pairwise mask key equals a self-mask seed"
    return len(seeds), len(keys)


def two_rounds(tiny_config, tmp_path, n_values: int = 37, same_update: bool = False):
    """Two secure rounds of five sites; -> (sites, the coordinator's view of every masked vector per round)."""
    rs = secure_state(tiny_config, tmp_path)
    if n_values != 37:
        rs.global_state, rs.trainable_params = OrderedDict(w=np.zeros(n_values, np.float32)), n_values
    x = OrderedDict(w=np.random.default_rng(1).normal(0, 0.01, n_values).astype(np.float32)) if n_values != 37 else None
    ups = (
        [x] * 5
        if same_update
        else (
            [OrderedDict(w=np.random.default_rng(i).normal(0, 0.01, n_values).astype(np.float32)) for i in range(5)]
            if x
            else None
        )
    )
    sites = five(updates=ups)
    seen = []
    for rnd in (1, 2):
        grid = MaliciousCoordinator(sites)
        rs.global_state = OrderedDict(
            (k, np.zeros_like(v)) for k, v in rs.global_state.items()
        )  # the same update twice
        server.run_training_round(grid, list(sites), rs, rnd, lambda s: None)
        seen.append(grid.masked)
    return sites, seen


def test_self_mask_seeds_and_pairwise_mask_keys_are_fresh_across_sites_and_rounds(tiny_config, tmp_path):
    sites, _ = two_rounds(tiny_config, tmp_path)
    assert check_fresh_secrets(sites) == (10, 20)  # 5 sites x 2 rounds; 10 pairs x 2 rounds


@pytest.mark.parametrize("constant", ["self-mask seed", "pairwise mask key"])
def test_the_freshness_detector_fires_when_a_seed_source_is_constant(tiny_config, tmp_path, monkeypatch, constant):
    """Both seeds made constant leave every round's sum exact (the masks still cancel or are
    removed), which is why only a test that looks at the seeds themselves can catch it."""
    if constant == "self-mask seed":
        monkeypatch.setattr(prim, "fresh_secret", lambda: b"\x01" * 32)
    else:
        monkeypatch.setattr(prim, "mask_key", lambda private, peer_public, round_tag: b"\x02" * 32)
    sites, _ = two_rounds(tiny_config, tmp_path)
    with pytest.raises(AssertionError, match="repeat"):
        check_fresh_secrets(sites)


def _ks_uniform32(v: np.ndarray) -> float:
    """One-sample Kolmogorov-Smirnov statistic of uint32 values against the uniform distribution."""
    u = np.sort(v.astype(np.float64) / 2.0**32)
    n = u.size
    return float(max((np.arange(1, n + 1) / n - u).max(), (u - np.arange(n) / n).max()))


def test_masked_vectors_are_uniform_and_independent_of_the_update_across_sites_and_rounds(tiny_config, tmp_path):
    """Every site holds the same update and sends it in two rounds: what the coordinator sees is
    uniform on Z_(2^32), and neither two sites' vectors nor one site's two rounds differ by
    anything but uniform noise (a constant or repeated seed would leave the quantized update's
    differences, a few steps wide, or zero)."""
    n = 20_000
    sites, seen = two_rounds(tiny_config, tmp_path, n_values=n, same_update=True)
    crit = 2.69 / np.sqrt(n)  # one-sample KS at alpha = 1e-6: fresh keys every run, no flakes
    y1, y2 = seen[0], seen[1]
    assert _ks_uniform32(y1[1]) < crit
    for a, b in [(y1[1], y2[1]), (y1[3], y2[3]), (y1[1], y1[2]), (y1[2], y1[5]), (y1[4], y2[5])]:
        assert _ks_uniform32((a - b).astype(np.uint32)) < crit
    # The test can tell: the quantized codes of one update in two rounds differ by a step or so.
    q = Quantizer(0.1, 360, 5)
    x = secure.flatten_update(sites[1].update, OrderedDict(w=np.zeros(n, np.float32)))
    codes = [q.encode(x, sites[1].examples, np.random.default_rng(s)) for s in (1, 2)]
    assert _ks_uniform32((codes[0] - codes[1]).astype(np.uint32)) > 0.4


# ---------------------------------------------------------------- weights bound to what is summed


def hostile_update(value: float = 0.09) -> OrderedDict:
    return OrderedDict((k, np.full(s, value, np.float32)) for k, s in SHAPES.items())


def test_a_site_claiming_ten_million_examples_weighs_no_more_than_the_cap(tiny_config, tmp_path):
    rs = secure_state(tiny_config, tmp_path)
    sites = five()
    sites[5] = SecureSite(5, hostile_update(), 10_000_000)  # reports and encodes 10M
    r = server.run_training_round(FakeGrid(sites), list(sites), rs, 1, lambda s: None)
    stats = r["secure_aggregation"]
    # weight_cap 3 x the median reported count (120): the 10M claim cannot move the median.
    assert stats["weight_cap"] == 360 and stats["summed_weight"] == 120 + 80 + 200 + 45 + 360
    want = expected_mean(sites, range(1, 6), cap=360)
    for k in SHAPES:
        assert np.abs(rs.global_state[k].astype(np.float64) - want[k]).max() <= stats["quantization_error_bound"] + 1e-7
    # Uncapped, the hostile site would have set the mean to its own update (~0.09 everywhere).
    assert float(np.abs(rs.global_state["b"]).max()) < 0.09 * 360 / 805 + 0.02


def test_a_site_that_encodes_more_weight_than_it_reports_is_held_to_the_cap(tiny_config, tmp_path):
    """Attack (d): a site reports a small weight (1 example at advertisement, and 'secagg-weight'
    1 in its metrics) and encodes a huge one. The coordinator divides by the unmasked weights,
    so the site weighs what it encoded, and that is at most the round's cap."""
    rs = secure_state(tiny_config, tmp_path)
    sites = five()

    class Liar(SecureSite):
        def __call__(self, m):
            out = super().__call__(m)
            if out is not None and m.metadata.message_type == messages.TRAIN:
                metrics = TrainMetrics.from_record(out[messages.METRICS])
                out[messages.METRICS] = dataclasses.replace(metrics, secagg_weight=1).to_record()
            return out

    sites[5] = Liar(5, hostile_update(), 10_000_000, reported=1)
    said: list[str] = []
    r = server.run_training_round(FakeGrid(sites), list(sites), rs, 1, said.append)
    stats = r["secure_aggregation"]
    cap = 3 * 80  # the median of 120, 80, 200, 45 and the liar's 1
    assert stats["weight_cap"] == cap and stats["summed_weight"] == 445 + cap and stats["reported_weight"] == 445 + 1
    want = expected_mean(sites, range(1, 6), cap=cap)
    for k in SHAPES:
        assert np.abs(rs.global_state[k].astype(np.float64) - want[k]).max() <= stats["quantization_error_bound"] + 1e-7
    assert float(np.abs(rs.global_state["b"]).max()) < 0.09 * cap / (445 + cap) + 0.02  # not ~0.0999, as before
    assert any("encoded a total weight of 685, but reported 446" in line for line in said)


def test_a_vector_that_claims_more_weight_than_the_sites_may_encode_is_refused(tiny_config, tmp_path, monkeypatch):
    """A site that skips the encoder and writes a weight beyond the cap into the last
    coordinate: the unmasked weights exceed what the summed sites may encode, and the round
    aborts with nothing released (a site can always abort a round; it cannot weigh more)."""
    rs = secure_state(tiny_config, tmp_path)
    sites = five()
    real = secure.masked_input

    def crafted(context, sa, flat, weight, seed):
        st = context.state[p.STATE]
        y, extra = real(context, sa, flat, weight, seed)
        if int(st["sid"]) == 5:
            y[-1] += np.uint32(5 * 360)  # masked, but the mask comes off in the sum
        return y, extra

    monkeypatch.setattr(secure, "masked_input", crafted)
    with pytest.raises(server.FederationError, match="unmasked weights sum to"):
        server.run_training_round(FakeGrid(sites), list(sites), rs, 1, lambda s: None)
    for k in SHAPES:
        np.testing.assert_array_equal(rs.global_state[k], 0.0)


def test_equal_weighting_sends_no_counts_and_every_site_weighs_one(tiny_config, tmp_path):
    rs = secure_state(tiny_config, tmp_path, weighting="equal")
    sites = five()
    r = server.run_training_round(FakeGrid(sites), list(sites), rs, 1, lambda s: None)
    stats = r["secure_aggregation"]
    assert stats["weight_cap"] == 1 and stats["summed_weight"] == 5
    assert all(s.adverts for s in sites.values())
    assert all(advert.examples is None for s in sites.values() for advert in s.adverts)
    want = weighted_mean([s.update for s in sites.values()], [1] * 5)
    for k in SHAPES:
        assert np.abs(rs.global_state[k].astype(np.float64) - want[k]).max() <= stats["quantization_error_bound"] + 1e-7


# ---------------------------------------------------------------- deployment: site keys, pins, the registry


def test_a_site_signs_with_its_ftclient_key_which_the_coordinator_publishes_from_authorized_keys(tmp_path):
    """ftclient's site key (OpenSSH P-384, from ftclient keygen) signs; the coordinator's
    registry is the *.pub files of ftserver's --authorized-keys (named in the run's server.json);
    a site's --peer-keys folder pins the same files."""
    import json

    from fedtune.client.join import JoinError, check_inputs, join_parser
    from fedtune.client.keys import create_site_keys
    from fedtune.server.secure import KeyFolder

    registry = tmp_path / "authorized-keys"
    registry.mkdir()
    for n in ("a", "b"):
        create_site_keys(tmp_path / n)
        (registry / f"{n}.pub").write_bytes((tmp_path / n / "site_key.pub").read_bytes())
    me = secure.Identity.from_files(tmp_path / "a" / "site_key", registry)
    assert me.pinned == frozenset(KeyFolder(registry)) and me.public in me.pinned and len(me.pinned) == 2
    assert prim.verify(me.public, sign(me.key, b"round"), b"round")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "server.json").write_text(json.dumps({"authorized_keys": str(registry)}))
    assert set(KeyFolder.of_run(tmp_path / "run")) == me.pinned and KeyFolder.of_run(tmp_path / "none") is None
    (registry / "notes.pub").write_text("not a key")  # left out, as ftserver leaves it unregistered
    assert set(KeyFolder(registry)) == me.pinned
    with pytest.raises(ValueError, match=r"notes.pub: not a readable public key"):
        secure.load_pins(registry)
    with pytest.raises(ValueError, match="no \\*.pub file"):
        secure.load_pins(tmp_path / "run")
    data = Path(__file__).resolve().parents[2] / "simulations" / "data" / "medical" / "train.jsonl"
    args = join_parser().parse_args(
        ["--server", "h:1", "--data", str(data), "--insecure", "--peer-keys", str(tmp_path / "run")]
    )
    with pytest.raises(JoinError, match="--peer-keys: .*no \\*.pub file"):
        check_inputs(args)


class RefusesWithAForgedLine(SecureSite):
    """A site that refuses key advertisement with a reason built to forge a line in server.log."""

    def __call__(self, m: Message):
        if m.metadata.message_type == p.ADVERTISE:
            reason = "no\n[12:00:00] round 1 FORGED | \x1b[2Jall sites agreed"
            out = StageReply(self._site("refused", reason)).to_record()
            self.replies.append(out)
            return out
        return super().__call__(m)


def test_a_refusal_reason_in_a_secure_stage_cannot_forge_a_log_line_or_a_record(tiny_config, tmp_path):
    rs = secure_state(tiny_config, tmp_path)
    sites = five()
    sites[2] = RefusesWithAForgedLine(2, sites[2].update, sites[2].examples)
    said: list[str] = []
    r = server.run_training_round(FakeGrid(sites), list(sites), rs, 1, said.append)
    assert r["accepted"] == 4
    why = r["secure_aggregation"]["refused_by_coordinator"]["site2"]
    assert "FORGED" in why and not any(c in why for c in "\n\r\x1b")
    assert all("\n" not in line and "\x1b" not in line for line in said)
    assert not any(line.startswith("[12:00:00]") for line in "\n".join(said).splitlines())


class AdvertisesAForgedSignature(SecureSite):
    """A site whose key advertisement carries a signature that does not verify."""

    def __call__(self, m: Message):
        out = super().__call__(m)
        if m.metadata.message_type == p.ADVERTISE and messages.SECAGG in out:
            advert = AdvertiseReply.from_record(out[messages.SECAGG])
            sig = bytearray(advert.sig)
            sig[-1] ^= 1
            out[messages.SECAGG] = dataclasses.replace(advert, sig=bytes(sig)).to_record()
        return out


def test_the_coordinator_drops_a_site_whose_advertisement_is_not_signed_so_the_others_still_sum(tiny_config, tmp_path):
    """Honest sites refuse to share keys with a forged advertisement, so a coordinator that
    passed it on would see the whole round abort; it drops that one site at advertisement."""
    rs = secure_state(tiny_config, tmp_path)
    sites = five()
    sites[4] = AdvertisesAForgedSignature(4, sites[4].update, sites[4].examples)
    r = server.run_training_round(FakeGrid(sites), list(sites), rs, 1, lambda s: None)
    st = r["secure_aggregation"]
    assert r["accepted"] == 4 and st["sites_per_stage"][:2] == [5, 4]
    assert "no valid signature" in st["refused_by_coordinator"]["site4"]
    want = expected_mean(sites, [1, 2, 3, 5], round_cap(rs, sites))
    for k in SHAPES:
        np.testing.assert_allclose(rs.global_state[k], want[k], atol=bound_for(rs, sites, [1, 2, 3, 5]) + 1e-7)


class SendsTextWhereIdsBelong(SecureSite):
    """A site whose reply at ``stage`` names sites by text where whole numbers belong (``key``)."""

    def __init__(self, *args, stage: str, key: str, **kw):
        super().__init__(*args, **kw)
        self.stage, self.key = stage, key

    def __call__(self, m: Message):
        out = super().__call__(m)
        if m.metadata.message_type == self.stage and p.RECORD in out:
            # Crafted by hand: the stage's reply class would refuse to build text where ids belong.
            rec = out[p.RECORD]
            out[p.RECORD] = ConfigRecord({**dict(rec.items()), self.key: [f"x{v}" for v in rec[self.key]]})
        return out


@pytest.mark.parametrize("stage,key", [(p.SHARE_KEYS, "to"), (p.UNMASK, "self-ids"), (p.UNMASK, "pair-ids")])
def test_a_reply_that_names_sites_by_text_drops_that_site_and_does_not_crash_the_round(
    tiny_config, tmp_path, stage, key
):
    """A malformed stage reply is one site's dropout, never an exception out of the coordinator's
    round (which would end the round for everyone, and in ftserver the run)."""
    rs = secure_state(tiny_config, tmp_path)
    sites = five(
        {5: messages.TRAIN} if key == "pair-ids" else None
    )  # a dropout after sharing: its pair keys are asked for
    sites[2] = SendsTextWhereIdsBelong(2, sites[2].update, sites[2].examples, stage=stage, key=key)
    r = server.run_training_round(FakeGrid(sites), list(sites), rs, 1, lambda s: None)
    st = r["secure_aggregation"]
    label = "share_keys" if stage == p.SHARE_KEYS else "unmask"
    assert "site2" in st["dropped"][label]
    assert "malformed" in st["refused_by_coordinator"]["site2"] and key in st["refused_by_coordinator"]["site2"]
    summed = {"to": [1, 3, 4, 5], "self-ids": [1, 2, 3, 4, 5], "pair-ids": [1, 2, 3, 4]}[key]
    assert r["accepted"] == len(summed)
    want = expected_mean(sites, summed, round_cap(rs, sites))
    for k in SHAPES:
        np.testing.assert_allclose(rs.global_state[k], want[k], atol=bound_for(rs, sites, summed) + 1e-7)


class SignsTheAliveSetBadly(SecureSite):
    """A site whose signature on the alive set does not verify."""

    def __call__(self, m: Message):
        out = super().__call__(m)
        if m.metadata.message_type == p.CONSISTENCY and messages.SECAGG in out:
            sig = bytearray(ConsistencyReply.from_record(out[messages.SECAGG]).sig)
            sig[-1] ^= 1
            out[messages.SECAGG] = ConsistencyReply(bytes(sig)).to_record()
        return out


def test_the_coordinator_drops_a_site_whose_alive_set_signature_does_not_verify_so_the_round_still_unmasks(
    tiny_config, tmp_path
):
    """Honest sites refuse an unmask request that carries a signature that does not verify, so a
    coordinator that passed it on would see the round abort; it leaves that site out of U4 (its
    vector is summed already: its share holders remove its mask)."""
    rs = secure_state(tiny_config, tmp_path)
    sites = five()
    sites[3] = SignsTheAliveSetBadly(3, sites[3].update, sites[3].examples)
    r = server.run_training_round(FakeGrid(sites), list(sites), rs, 1, lambda s: None)
    st = r["secure_aggregation"]
    assert r["accepted"] == 5 and st["sites_per_stage"] == [5, 5, 5, 5, 4, 4]
    assert "does not verify" in st["refused_by_coordinator"]["site3"]
    want = expected_mean(sites, [1, 2, 3, 4, 5], round_cap(rs, sites))
    for k in SHAPES:
        np.testing.assert_allclose(rs.global_state[k], want[k], atol=bound_for(rs, sites, [1, 2, 3, 4, 5]) + 1e-7)


@pytest.mark.parametrize("key,why", [("site1's", "another site's key"), ("unregistered", "not signed by a registered")])
def test_the_coordinator_drops_a_site_that_signs_with_another_sites_or_an_unregistered_key(
    tiny_config, tmp_path, key, why
):
    """A second site with site 1's key (honest sites refuse repeated keys, which would abort the
    round) or with a key nobody registered is dropped at advertisement; the others still sum.
    (Of two sites with one key, the one whose advertisement arrives second is dropped.)"""
    rs = secure_state(tiny_config, tmp_path)
    sites = five()
    sites[5].identity = secure.Identity(IDENTITIES[1] if key == "site1's" else new_identity())
    r = server.run_training_round(FakeGrid(sites), list(sites), rs, 1, lambda s: None)
    st = r["secure_aggregation"]
    assert r["accepted"] == 4 and st["sites_per_stage"][:2] == [5, 4]
    (refused,) = st["refused_by_coordinator"]
    assert refused in (["site1", "site5"] if key == "site1's" else ["site5"])
    assert why in st["refused_by_coordinator"][refused]
    summed = [i for i in range(1, 6) if f"site{i}" != refused]
    want = expected_mean(sites, summed, round_cap(rs, sites))
    for k in SHAPES:
        np.testing.assert_allclose(rs.global_state[k], want[k], atol=bound_for(rs, sites, summed) + 1e-7)


# ---------------------------------------------------------------- the coordinator's checks, one by one


def _advert(sid: int = 2, key=None, tag: bytes = TAG, run_id: int = 1, examples=50) -> coordinator.Advert:
    """Site ``sid``'s advertisement, signed by ``key`` (default: site ``sid``'s registered identity)
    for run 1, arriving in run ``run_id``."""
    key = IDENTITIES[sid] if key is None else key
    c, s_ = bytes([sid]) * 32, bytes([sid + 100]) * 32
    sig = sign(key, p.advert_payload(1, tag, sid, c, s_))
    return coordinator.Advert(c, s_, identity_public(key), sig, examples, run_id)


def test_an_advertisement_is_checked_for_a_registered_unique_key_a_valid_signature_and_a_sane_count():
    ok = dict(tag=TAG, sid=2, registered=REGISTERED, taken=[], by_examples=True, max_examples=100)
    assert coordinator.advert_problem(_advert(), **ok) is None
    assert coordinator.advert_problem(_advert(), **{**ok, "registered": None}) is None  # no registry: as presented
    assert "not signed by a registered" in coordinator.advert_problem(_advert(key=new_identity()), **ok)
    assert "another site's key" in coordinator.advert_problem(
        _advert(), **{**ok, "taken": [identity_public(IDENTITIES[2])]}
    )
    assert "no valid signature" in coordinator.advert_problem(_advert(), **{**ok, "sid": 3})  # signed as site 2
    assert "no valid signature" in coordinator.advert_problem(_advert(tag=b"y" * p.TAG_BYTES), **ok)  # another round
    assert "no valid signature" in coordinator.advert_problem(_advert(run_id=2), **ok)  # replayed into another run
    for bad in (0, 101, 2.5, "50", None):
        assert "example count" in coordinator.advert_problem(_advert(examples=bad), **ok)
    assert coordinator.advert_problem(_advert(examples=None), **{**ok, "by_examples": False}) is None


def test_an_advertisement_whose_keys_are_not_two_32_byte_values_is_not_read():
    good = messages.AdvertiseReply(b"c" * 32, b"s" * 32, b"k", b"g", 3)
    assert coordinator.parse_advert(good, 7) == coordinator.Advert(b"c" * 32, b"s" * 32, b"k", b"g", 3, 7)
    for bad in (dict(c_pub=b"c" * 31), dict(s_pub=b"s" * 33), dict(c_pub=b"")):
        assert coordinator.parse_advert(dataclasses.replace(good, **bad), 7) is None


def test_shares_are_kept_only_when_there_is_one_for_each_neighbour_and_no_other():
    def shares(to, sealed):
        return coordinator.parse_shares(messages.ShareKeysReply(to, sealed), [2, 3])

    assert shares([3, 2], [b"3", b"2"]) == {3: b"3", 2: b"2"}
    assert shares([2], [b"2"]) is None  # one missing
    assert shares([2, 3, 4], [b"2", b"3", b"4"]) is None
    assert shares([2, 3], [b"2"]) is None  # a share short
    assert shares([2, 2], [b"2", b"2"]) is None
    assert shares([], []) is None


def test_a_signature_on_the_alive_set_counts_only_for_that_set_run_round_and_signer():
    key = IDENTITIES[1]
    sig = sign(key, p.alive_payload(1, TAG, [1, 2, 3]))
    assert coordinator.alive_signature_ok(identity_public(key), sig, 1, TAG, [1, 2, 3])
    assert not coordinator.alive_signature_ok(identity_public(key), sig, 1, TAG, [1, 2])
    assert not coordinator.alive_signature_ok(identity_public(key), sig, 2, TAG, [1, 2, 3])
    assert not coordinator.alive_signature_ok(identity_public(key), sig, 1, b"y" * p.TAG_BYTES, [1, 2, 3])
    assert not coordinator.alive_signature_ok(identity_public(IDENTITIES[2]), sig, 1, TAG, [1, 2, 3])
    assert not coordinator.alive_signature_ok(identity_public(key), None, 1, TAG, [1, 2, 3])


def test_each_site_is_asked_to_unmask_its_own_view_with_its_share_holders_signatures_only():
    sigs = {1: b"s1", 2: b"s2", 4: b"s4", 5: b"s5"}  # site 3 did not sign
    req = coordinator.unmask_request(TAG, {1, 2, 3, 4}, [2, 3, 5], 1, sigs)  # 5 shared keys, then dropped
    assert req == messages.UnmaskRequest(TAG, [1, 2, 3, 4], [1, 2, 3], [5], [1, 2, 5], [b"s1", b"s2", b"s5"])
    rec = req.to_record()
    # The wire's keys and their order, pinned here on purpose (as the sites were sent).
    assert list(rec.keys()) == ["round-tag", "u3", "alive", "dropped", "sig-ids", "sigs"]
    read = messages.UnmaskRequest.from_record(rec)  # as a site reads it
    assert read.alive == [1, 2, 3] and read.dropped == [5] and read.sig_ids == [1, 2, 5]


def test_an_unmask_answer_is_read_or_refused_whole():
    reply = messages.UnmaskReply([1, 2], p.ints_to_bytes([11, 12]), [5], p.ints_to_bytes([13]))
    assert coordinator.parse_unmask_answer(reply) == {"self_seed": {1: 11, 2: 12}, "pair_key": {5: 13}}
    for short in (dict(self_ids=[1]), dict(pair_shares=[])):  # ids and shares that do not pair up
        with pytest.raises(messages.MessageError, match="differ in length"):
            coordinator.parse_unmask_answer(dataclasses.replace(reply, **short))


def test_a_round_aborts_below_the_threshold_min_sites_or_two_and_never_starts_with_an_unsafe_threshold():
    coordinator.require_survivors({1, 2, 3}, "x", 3, 1, 4)
    for alive, t, min_sites in (({1, 2}, 3, 1), ({1, 2, 3}, 2, 4), ({1}, 1, 1)):
        with pytest.raises(server.FederationError, match="aborted at x.*nothing was unmasked or released"):
            coordinator.require_survivors(alive, "x", t, min_sites, 4)
    assert coordinator.round_threshold_or_abort(None, None, 5, 1) == (4, 3)
    for threshold in (2, 6):  # not above half of the 5 share holders; more than there are
        with pytest.raises(server.FederationError, match="cannot start.*nothing was sent"):
            coordinator.round_threshold_or_abort(threshold, None, 5, 1)


def test_the_reported_weight_caps_each_site_at_the_rounds_cap():
    assert coordinator.reported_weight({1: 10, 2: 500, 3: 40}, [1, 2], 100) == 110
