"""Secure aggregation over Flower messages: the coordinator's round (server/secure.py) against
real site-side handlers (client/secure.py, client/app.py) through a fake Grid, with dropouts at
every stage, aborts, refusals, server optimizers on the unmasked mean; and a malicious
coordinator (forged unmask views, substituted keys) and hostile sites (inflated weights)."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtune.client import app as client_app
from fedtune.client import secure
from fedtune.common import adapters
from fedtune.common.config import ConfigError, FedTuneConfig, SecureAggregationConfig, load_config
from fedtune.common.protocol import CONFIG_KEY
from fedtune.common.secagg import Quantizer, SecAggError, identity_public, new_identity, round_weight_cap, sign
from fedtune.common.secagg import primitives as prim
from fedtune.common.secagg import protocol as p
from fedtune.server import app as server
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

    def __init__(self, idx: int, update: OrderedDict, examples: int, silent_at: str | None = None, reported: int | None = None, pinned=None):
        self.name = f"site{idx}"
        self.update, self.examples, self.silent_at = update, examples, silent_at
        self.reported = examples if reported is None else reported
        self.identity = secure.Identity(IDENTITIES[idx], pinned)
        self.ctx = Context(run_id=1, node_id=idx, node_config={"partition-id": idx - 1}, state=RecordDict(), run_config={})
        self.sites = [client_app.SiteFiles(f"site{i}", "unused") for i in range(1, 10)]
        self.replies: list[RecordDict] = []
        self.snapshots: list[dict] = []  # the round's secrets as they stood when training began

    def __call__(self, m: Message):
        kind = m.metadata.message_type
        if kind == self.silent_at:
            return None
        if kind == "evaluate":
            out = RecordDict({"metrics": MetricRecord({"num-examples": 4, "eval-loss": 1.0}), "site": self._site("ok")})
        elif kind == "train":
            cfg = FedTuneConfig.from_json(str(m.content["config"][CONFIG_KEY]))
            if p.STATE in self.ctx.state:
                self.snapshots.append(dict(self.ctx.state[p.STATE]))
            glob = adapters.read_adapter(m.content)
            try:
                flat = secure.flatten_update(self.update, glob)
                weight = 1 if cfg.privacy.enabled or cfg.federation.weighting == "equal" else self.examples
                y, extra = secure.masked_input(self.ctx, m.content[p.RECORD], flat, weight, seed=7)
                metrics = MetricRecord({"num-examples": self.examples, "train-loss": 1.0, **extra})
                out = RecordDict({"metrics": metrics, "site": self._site("ok"), p.MASKED: p.masked_record(y)})
            except SecAggError as e:
                secure.forget(self.ctx)
                out = RecordDict({"metrics": MetricRecord({}), "site": self._site("refused", str(e))})
        elif kind == p.ADVERTISE:  # as client_app.handle_secure_stage, with the count this site claims
            cfg = FedTuneConfig.from_json(str(m.content["config"][CONFIG_KEY]))
            n = None if cfg.privacy.enabled or cfg.federation.weighting == "equal" else self.reported
            try:
                out = RecordDict({"site": self._site("ok"), p.RECORD: secure.advertise(self.ctx, m.content[p.RECORD], self.identity, n)})
            except SecAggError as e:
                out = RecordDict({"site": self._site("refused", str(e))})
        else:
            out = client_app.handle_secure_stage(m, self.ctx, self.sites, identity=self.identity).content
        self.replies.append(out)
        return out

    def _site(self, status: str, reason: str | None = None) -> ConfigRecord:
        return ConfigRecord({"name": self.name, "status": status, **({"reason": reason} if reason else {})})

    def refusals(self) -> list[str]:
        return [str(r["site"]["reason"]) for r in self.replies if "site" in r and r["site"]["status"] == "refused"]


def secure_state(tiny_config, tmp_path, sa: dict | None = None, site_keys=REGISTERED, **federation) -> server.RunState:
    fed = tiny_config.federation.model_copy(update={"round_timeout_s": 2.0, **federation})
    cfg = tiny_config.model_copy(
        update={"federation": fed, "secure_aggregation": SecureAggregationConfig(enabled=True, stage_timeout_s=2.0, **(sa or {}))}
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
    return weighted_mean([sites[i].update for i in ids], [min(sites[i].examples, cap or sites[i].examples) for i in ids])


def round_cap(rs, sites) -> int:
    return round_weight_cap([s.reported for s in sites.values()], rs.cfg.federation.weight_cap, rs.cfg.secure_aggregation.max_weight)


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
    assert stats["upload_bytes_per_param"] == pytest.approx(4.0 * (37 + 1) / 37, abs=1e-4)  # 4 bytes a value, and 4 for the weight
    # The mean divides by the weights the sites encoded, which are their counts (none capped here).
    assert stats["summed_weight"] == stats["reported_weight"] == sum(EXAMPLES) and stats["weight_cap"] == 360
    assert stats["identity_keys"] == "registered"
    # Nothing a site sent is its update: no float adapter record in any reply, and nothing of
    # the update is parked in the site's Flower context either (only keys and shares are).
    assert all("arrays" not in reply for s in sites.values() for reply in s.replies)
    # The round is over: its secrets are wiped; what stays for the run is the peers' public identity keys.
    assert all(list(s.ctx.state.keys()) == [p.PEERS] for s in sites.values())
    assert set(sites[1].ctx.state[p.PEERS]["keys"]) == {identity_public(IDENTITIES[j]) for j in (2, 3, 4, 5)}
    assert any("weighted mean of 5 site(s) unmasked" in line for line in said)


@pytest.mark.parametrize("n_drop", [1, 2])
@pytest.mark.parametrize("stage", [p.ADVERTISE, p.SHARE_KEYS, "train", p.CONSISTENCY, p.UNMASK])
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
    label = {p.ADVERTISE: "advertise", p.SHARE_KEYS: "share_keys", "train": "train", p.CONSISTENCY: "consistency", p.UNMASK: "unmask"}[stage]
    # A site silent from the first message of its first round was never named: its node id stands in.
    named = [f"node-{i}" if stage == p.ADVERTISE else f"site{i}" for i in dropped]
    assert r["secure_aggregation"]["dropped"] == {label: named}
    assert any(f"{label}: {5 - n_drop} of 5 site(s) went on; dropped: {', '.join(named)}" in line for line in said)


@pytest.mark.parametrize("stage", [p.ADVERTISE, p.SHARE_KEYS, "train", p.CONSISTENCY, p.UNMASK])
def test_three_dropouts_abort_the_round_and_release_nothing(tiny_config, tmp_path, stage):
    rs = secure_state(tiny_config, tmp_path)
    sites = five({1: stage, 3: stage, 5: stage})
    with pytest.raises(server.FederationError, match=r"secure aggregation aborted .*2 site\(s\) left, 3 needed.*nothing was"):
        server.run_training_round(FakeGrid(sites), list(sites), rs, 1, lambda s: None)
    for k in SHAPES:
        np.testing.assert_array_equal(rs.global_state[k], 0.0)


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedavgm"])
def test_server_optimizers_act_on_the_unmasked_mean(tiny_config, tmp_path, strategy):
    rs = secure_state(tiny_config, tmp_path, strategy=strategy)
    sites = five()
    server.run_training_round(FakeGrid(sites), list(sites), rs, 1, lambda s: None)
    reference = ServerOptimizer(strategy).step(_global(), expected_mean(sites, range(1, 6)))
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
    assert np.abs(rs.global_state["b"].astype(np.float64) - want["b"]).max() <= bound_for(rs, sites, [1, 2, 4, 5]) + 1e-7


TAG = b"t" * p.TAG_BYTES


def share_record(tag, i, ids, keys, signed, cap=360, threshold=3, **changes) -> ConfigRecord:
    """What an honest coordinator sends site ``i`` at key sharing (node ids are the site numbers here)."""
    rec = {
        "round-tag": tag,
        "threshold": threshold,
        "weight-cap": cap,
        "nbr-ids": ids,
        "nbr-c": [keys[j][0] for j in ids],
        "nbr-s": [keys[j][1] for j in ids],
        "nbr-sig": [signed[j][1] for j in ids],
        "nbr-pk": [signed[j][0] for j in ids],
        "nbr-node": [str(j) for j in ids],
    }
    return ConfigRecord({**rec, **changes})


def advertise_all(sites, tag=TAG) -> tuple[dict, dict]:
    keys, signed = {}, {}
    for i, s in sites.items():
        rec = ConfigRecord({"round-tag": tag, "sid": i, "n-sites": 5, "clip": 0.1, "max-weight": 10_000})
        pub = secure.advertise(s.ctx, rec, s.identity, s.examples)
        keys[i], signed[i] = (pub["c-pub"], pub["s-pub"]), (pub["signer"], pub["sig"])
    return keys, signed


def _site_after_consistency(u3=(1, 2, 3, 4, 5)):
    """Five sites through stage 4 of one round (every site every other's neighbour), driven by
    hand; ``u3``: the alive set the coordinator has them sign (None: stop after the upload).
    -> (sites, each site's signature)."""
    sites = five()
    keys, signed = advertise_all(sites)
    out = {}
    for i, s in sites.items():
        sealed = secure.share_keys(s.ctx, share_record(TAG, i, [j for j in range(1, 6) if j != i], keys, signed), s.identity)
        out[i] = dict(zip(sealed["to"], sealed["sealed"]))
    for i, s in sites.items():
        senders = [j for j in range(1, 6) if j != i]
        rec = ConfigRecord({"round-tag": TAG, "from": senders, "sealed": [out[j][i] for j in senders]})
        secure.masked_input(s.ctx, rec, secure.flatten_update(s.update, _global()), s.examples, seed=i)
    if u3 is None:
        return sites, {}
    sigs = {i: secure.consistency(s.ctx, ConfigRecord({"round-tag": TAG, "alive": list(u3)}), s.identity)["sig"] for i, s in sites.items() if i in u3}
    return sites, sigs


def unmask_request(i, u3, sigs, alive=None, dropped=None, signers=None, tag=TAG) -> ConfigRecord:
    """Site i's unmask request: its own view of u3 unless ``alive``/``dropped`` say otherwise."""
    view = prim.unmask_view(u3, [j for j in range(1, 6) if j != i], i)
    signers = sorted(sigs) if signers is None else signers
    return ConfigRecord(
        {
            "round-tag": tag,
            "u3": list(u3),
            "alive": view[0] if alive is None else alive,
            "dropped": view[1] if dropped is None else dropped,
            "sig-ids": signers,
            "sigs": [sigs[j] for j in signers],
        }
    )


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
    ans = secure.unmask(sites[3].ctx, unmask_request(3, u3, sigs))
    assert list(ans["self-ids"]) == [1, 2, 3, 4] and list(ans["pair-ids"]) == [5]
    with pytest.raises(SecAggError, match="no secure round in progress"):
        secure.unmask(sites[3].ctx, unmask_request(3, u3, sigs, alive=[1, 2, 3], dropped=[4, 5]))
    # A request for another round is refused.
    with pytest.raises(SecAggError, match="another round"):
        secure.unmask(sites[4].ctx, unmask_request(4, u3, sigs, tag=b"x" * p.TAG_BYTES))


@pytest.mark.parametrize(
    "forge, match",
    [
        (lambda u3, sigs: unmask_request(1, [1, 2, 3, 4, 5], sigs), "another alive set than the one this site signed"),
        (lambda u3, sigs: unmask_request(1, u3, sigs, signers=[1, 2]), "only 2 of this site's share holders signed the alive set, 3 needed"),
        (lambda u3, sigs: unmask_request(1, u3, {**sigs, 3: sigs[2]}), r"signatures of site\(s\) \[3\] on the alive set do not verify"),
        (lambda u3, sigs: unmask_request(1, u3, {**sigs, 98: sigs[2]}, signers=[1, 2, 98]), "at most one from each of this site's share holders"),
        (lambda u3, sigs: unmask_request(1, u3, sigs, alive=[1, 2, 3], dropped=[4, 5]), "not this site's view of the alive set it signed"),
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
        secure.consistency(sites[1].ctx, ConfigRecord({"round-tag": TAG, "alive": [2, 3, 4]}), sites[1].identity)
    with pytest.raises(SecAggError, match=r"distinct site numbers in 1..5"):
        secure.consistency(sites[2].ctx, ConfigRecord({"round-tag": TAG, "alive": [2, 3, 98, 99]}), sites[2].identity)
    with pytest.raises(SecAggError, match="fewer than the threshold 3"):
        secure.consistency(sites[4].ctx, ConfigRecord({"round-tag": TAG, "alive": [3, 4]}), sites[4].identity)
    sig = secure.consistency(sites[3].ctx, ConfigRecord({"round-tag": TAG, "alive": [1, 2, 3]}), sites[3].identity)["sig"]
    assert prim.verify(identity_public(IDENTITIES[3]), sig, p.alive_payload(1, TAG, [1, 2, 3]))
    with pytest.raises(SecAggError, match="out of order"):  # once per round
        secure.consistency(sites[3].ctx, ConfigRecord({"round-tag": TAG, "alive": [1, 2, 3, 4]}), sites[3].identity)


def test_a_site_refuses_out_of_order_or_unsafe_key_sharing():
    s = five()[1]
    with pytest.raises(SecAggError, match="no secure round in progress"):
        secure.share_keys(s.ctx, ConfigRecord({"round-tag": TAG, "threshold": 3, "nbr-ids": [2], "nbr-c": [b"x"], "nbr-s": [b"y"]}), s.identity)
    sites = {1: s, **{j: o for j, o in five().items() if j in (2, 3)}}
    keys, signed = advertise_all(sites)
    # A threshold of half the holders or less lets two disjoint groups rebuild both secrets.
    with pytest.raises(SecAggError, match=r"threshold 1 with 3 share holders"):
        secure.share_keys(s.ctx, share_record(TAG, 1, [2, 3], keys, signed, threshold=1), s.identity)
    with pytest.raises(SecAggError, match="no secure round in progress"):  # a refusal ends the round here
        secure.ready_to_train(s.ctx, ConfigRecord({"round-tag": TAG, "from": [], "sealed": []}))
    unsafe = [
        (lambda sg: {"nbr-pk": [sg[2][0], sg[2][0]]}, "identity keys repeat"),  # one identity for two sites
        (lambda sg: {"nbr-pk": [sg[2][0], identity_public(IDENTITIES[1])]}, "identity keys repeat, or repeat this site's own"),
        (lambda sg: {"nbr-node": ["2", "2"]}, "Flower nodes repeat"),
        (lambda sg: {"nbr-node": ["2", "1"]}, "name this site's own"),
        (lambda sg: {"nbr-sig": [sg[3][1], sg[3][1]]}, r"keys of site\(s\) \[2\] are not signed by their published identity keys"),
        (lambda sg: {"weight-cap": 0}, "weight cap 0"),
        (lambda sg: {"weight-cap": 20_000}, "weight cap 20000"),
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
            if m.metadata.message_type == "train":
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
    assert load_config(overrides={"federation.aggregator": "median", "secure_aggregation.enabled": False}).with_secure_default(True).secure_aggregation.enabled is False
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
    with pytest.raises(server.FederationError, match=r"secure aggregation cannot start: secure_aggregation.threshold 5 with 4 share holders"):
        server.run_training_round(grid, list(sites), rs, 1, lambda s: None)
    assert grid.sent == []


def test_the_threshold_is_fixed_by_the_sites_invited_not_those_that_turn_up(tiny_config, tmp_path):
    """Five invited (threshold 3): two sites that finish training cannot be unmasked on their own."""
    rs = secure_state(tiny_config, tmp_path)
    sites = five({1: "train", 2: "train", 3: "train"})
    with pytest.raises(server.FederationError, match=r"2 site\(s\) left, 3 needed"):
        server.run_training_round(FakeGrid(sites), list(sites), rs, 1, lambda s: None)
    assert all(s.replies == [] or p.RECORD in s.replies[0] for s in sites.values())
    assert not any(m.metadata.message_type == p.SHARE_KEYS for m in FakeGrid(sites).sent)
