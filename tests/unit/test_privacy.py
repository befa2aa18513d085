"""Update-norm bounding and client-level differential privacy: clipping (zero and NaN updates
included), the accountant against an independent computation, the noise the coordinator and the
sites add, the run that stops at its budget, and the accountant across a resume."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedtune.client import app as client_app
from fedtune.common import adapters, privacy
from fedtune.common.config import ConfigError, load_config
from fedtune.server import app as server

from .test_client_app import fresh_caches  # noqa: F401  (autouse fixture)
from .test_methods import method_config, real_sites
from .test_server_rounds import FakeGrid, _task_identity, trainer  # noqa: F401  (fixture)

# ---------------------------------------------------------------------------------------------
# Clipping


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_clipping_bounds_the_norm_and_keeps_the_direction(kind):
    rng = np.random.default_rng(0)
    raw = OrderedDict(a=rng.normal(size=(5, 7)).astype(np.float32), b=rng.normal(size=(3,)).astype(np.float32))
    u = raw if kind == "numpy" else adapters.to_tensors(raw)
    norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in raw.values()))
    c = privacy.clip_update(u, 0.5)
    assert c.clipped and not c.nonfinite and c.norm == pytest.approx(norm)
    assert 0.5 * (1 - 2e-6) <= privacy.l2(c.update) <= 0.5  # at the bound, never above it
    for k in raw:
        np.testing.assert_allclose(np.asarray(c.update[k]), raw[k] * (0.5 / norm), rtol=1e-5)
    loose = privacy.clip_update(u, 10 * norm)  # within the bound: untouched
    assert not loose.clipped and all(np.array_equal(np.asarray(loose.update[k]), raw[k]) for k in raw)


def test_zero_updates_pass_and_nonfinite_ones_are_refused_not_zeroed():
    """A NaN/Inf update raises NonFiniteUpdate: zeroed (as it once was) it went into the mean at
    full weight; and an update of 3e38 (finite, norm beyond float32) is clipped, not overflowed."""
    zero = OrderedDict(a=np.zeros((2, 2), np.float32))
    c = privacy.clip_update(zero, 1.0)
    assert c.norm == 0.0 and not c.clipped and not c.nonfinite and np.array_equal(c.update["a"], zero["a"])
    for bad in (math.nan, math.inf, -math.inf):
        u = OrderedDict(a=np.ones((2, 2), np.float32), b=torch.tensor([1.0, bad]))
        with pytest.raises(privacy.NonFiniteUpdate, match=r"not finite \(1 NaN/Inf"):
            privacy.clip_update(u, 1.0)
    huge = privacy.clip_update(OrderedDict(a=np.full((4,), 3e38, np.float32)), 1.0)
    assert huge.clipped and privacy.l2(huge.update) <= 1.0 and np.isfinite(huge.update["a"]).all()
    with pytest.raises(ValueError, match="clip bound"):
        privacy.clip_update(zero, 0.0)


def test_a_site_clips_before_sending_and_reports_counts_but_under_dp_nothing_norm_dependent(tiny_config):
    cfg = load_config(None, base=json.loads(tiny_config.to_json()) | {"federation": {"update_norm_bound": 0.1}})
    big = OrderedDict(a=torch.full((10,), 1.0))
    out, metrics = privacy.site_release(cfg, big, secure=False, n_sites=3)
    assert 0.1 * (1 - 2e-6) <= privacy.l2(out) <= 0.1
    assert metrics["update-clipped"] == 1 and metrics["update-norm"] == pytest.approx(math.sqrt(10))
    nan = OrderedDict(a=torch.tensor([math.nan, 1.0]))
    for bound in (0.1, "off"):  # a NaN update never leaves a site, bound or not
        with pytest.raises(privacy.NonFiniteUpdate):
            privacy.site_release(
                load_config(
                    None, base=json.loads(tiny_config.to_json()) | {"federation": {"update_norm_bound": bound}}
                ),
                nan,
                secure=False,
                n_sites=3,
            )
    dp = load_config(
        None,
        base=json.loads(tiny_config.to_json()) | {"privacy": {"epsilon": 8.0, "clip": 0.1, "noise_multiplier": 1.0}},
    )
    out, metrics = privacy.site_release(dp, big, secure=False, n_sites=3)
    assert metrics == {} and 0.1 * (1 - 2e-6) <= privacy.l2(out) <= 0.1  # central DP: the coordinator adds the noise


def test_under_secure_aggregation_each_site_adds_its_share_of_the_noise(tiny_config):
    """Each of 4 sites adds N(0, (sigma C)^2 / m), m = the fewest a round can sum (3 of 4: the
    default threshold), so any m of them carry at least (sigma C)^2 together."""
    data = json.loads(tiny_config.to_json())
    data["privacy"] = {"epsilon": 8.0, "clip": 0.5, "noise_multiplier": 2.0}
    data["secure_aggregation"]["enabled"] = True
    cfg = load_config(None, base=data)
    assert privacy.min_summed(cfg, 4) == 3
    zero = OrderedDict(a=torch.zeros(200_000))
    out, metrics = privacy.site_release(cfg, zero, secure=True, n_sites=4)
    assert metrics == {}
    assert float(out["a"].std()) == pytest.approx(2.0 * 0.5 / math.sqrt(3), rel=0.01)
    again, _ = privacy.site_release(cfg, zero, secure=True, n_sites=4)
    assert not torch.equal(out["a"], again["a"])  # fresh randomness every time, not the run's seed
    assert privacy.quantizer_clip(cfg, 4) == pytest.approx(0.5 + 7 * 2.0 * 0.5 / math.sqrt(3))


# ---------------------------------------------------------------------------------------------
# The accountant


def independent_epsilon(q: float, sigma: float, rounds: int, delta: float, orders=range(2, 257)) -> float:
    """RDP of the Poisson-subsampled Gaussian at integer orders (Mironov, Talwar & Zhang 2019,
    Sec. 3.3: A_a = sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k) / (2 sigma^2))), composed over the
    rounds, then converted with Canonne, Kamath & Steinke 2020 Prop. 12 / Balle et al. 2020:
    eps = rdp + log(1 - 1/a) - log(delta * a) / (a - 1). Written from the papers, in log space."""
    best = math.inf
    for a in orders:
        if q >= 1.0:
            rdp = a / (2 * sigma**2)
        else:
            terms = [
                math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1)
                + (a - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
                for k in range(a + 1)
            ]  # fmt: skip
            top = max(terms)
            rdp = (top + math.log(sum(math.exp(t - top) for t in terms))) / (a - 1)
        eps = rounds * rdp + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
        best = min(best, eps)
    return max(0.0, best)


@pytest.mark.parametrize("q, sigma, rounds", [(1.0, 1.0, 3), (1.0, 0.8, 10), (0.5, 1.2, 20), (0.1, 0.9, 100)])
def test_epsilon_matches_an_independent_computation(q, sigma, rounds):
    ours = privacy.epsilon_of([(q, sigma, rounds)], 1e-5)
    assert ours == pytest.approx(independent_epsilon(q, sigma, rounds, 1e-5), rel=1e-6)
    acc = privacy.Accountant(1e-5)
    for _ in range(rounds):
        acc.spend(q, sigma)
    assert acc.history == [[q, sigma, rounds]] and acc.epsilon() == pytest.approx(ours, rel=1e-9)
    assert privacy.Accountant.restore(json.loads(json.dumps(acc.state()))).epsilon() == acc.epsilon()


def test_calibrated_noise_spends_the_budget_in_the_rounds_and_no_less_noise_would():
    sigma = privacy.calibrate_noise(8.0, 1e-5, 5)
    assert privacy.epsilon_of([(1.0, sigma, 5)], 1e-5) <= 8.0
    assert privacy.epsilon_of([(1.0, sigma * 0.995, 5)], 1e-5) > 8.0
    assert privacy.calibrate_noise(8.0, 1e-5, 20) > sigma  # more rounds, more noise per round
    assert privacy.calibrate_noise(8.0, 1e-5, 5, q=0.25) < sigma  # sampling amplifies privacy


def test_privacy_config_errors_name_the_key(tiny_config):
    base = json.loads(tiny_config.to_json())
    with pytest.raises(ConfigError, match="privacy.epsilon"):
        load_config(None, base=base | {"privacy": {"epsilon": -1}})
    with pytest.raises(ConfigError, match="aggregator 'mean'"):
        load_config(None, base=base | {"privacy": {"epsilon": 8}, "federation": {"aggregator": "median"}})


# ---------------------------------------------------------------------------------------------
# The coordinator


def dp_state(tiny_config, tmp_path, shape=(200, 300), **privacy_settings):
    data = json.loads(tiny_config.to_json())
    data["privacy"] = privacy_settings
    cfg = load_config(None, base=data)
    state = OrderedDict(a=np.zeros(shape, np.float32), b=np.zeros((4,), np.float32))
    return server.RunState(cfg=cfg, out=tmp_path, global_state=state, peft_config=None, trainable_params=state["a"].size + 4,
                           accountant=privacy.Accountant(cfg.privacy.delta))  # fmt: skip


def test_central_dp_clips_each_update_weighs_sites_equally_and_adds_calibrated_noise(tiny_config, tmp_path):
    """Two sites send constant updates of very different sizes and example counts: each is clipped
    to C, both weigh 1, and the mean carries N(0, (sigma C)^2) / 2 per value."""
    rs = dp_state(tiny_config, tmp_path, epsilon=50.0, clip=0.2, noise_multiplier=0.5)

    def site(name, value, n):
        def handle(m):
            out = trainer(name, value, n)(m)
            if m.metadata.message_type == "train":  # replace the test trainer's tiny state with ours
                d = OrderedDict(a=torch.full((200, 300), value), b=torch.full((4,), value))
                for k, v in adapters.adapter_records(d).items():
                    out[k] = v
            return out

        return handle

    grid = FakeGrid({1: site("alpha", 1.0, 10), 2: site("beta", -0.001, 1000)})
    r = server.run_training_round(grid, [1, 2], rs, 1, lambda s: None)
    n_values = 200 * 300 + 4
    alpha = 0.2 / math.sqrt(n_values * 1.0)  # alpha's value after clipping to norm 0.2
    beta = -0.001 if 0.001 * math.sqrt(n_values) <= 0.2 else -0.2 / math.sqrt(n_values)
    expected = (alpha + beta) / 2  # equal weights, not 10 : 1000
    noise = rs.global_state["a"].astype(np.float64) - expected
    assert abs(noise.mean()) < 5 * 0.5 * 0.2 / 2 / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(0.5 * 0.2 / 2, rel=0.02)
    assert r["privacy"]["epsilon"] == pytest.approx(privacy.epsilon_of([(1.0, 0.5, 1)], 1e-5))
    assert r["privacy"]["noise"].startswith("central")
    assert rs.accountant.rounds == 1
    assert "cosine_to_aggregate" not in r["sites"]["alpha"]  # no per-site statistic outside the noise's protection


def test_update_norm_bound_without_dp_is_enforced_by_the_coordinator_too(tiny_config, tmp_path):
    data = json.loads(tiny_config.to_json())
    data["federation"]["update_norm_bound"] = 0.5
    cfg = load_config(None, base=data)
    state = OrderedDict(a=np.zeros((2, 3), np.float32), b=np.zeros((4,), np.float32))
    rs = server.RunState(cfg=cfg, out=tmp_path, global_state=state, peft_config=None, trainable_params=10)
    grid = FakeGrid({1: trainer("alpha", 1.0, n=10), 2: trainer("beta", 0.01, n=10)})  # the test sites do not clip
    r = server.run_training_round(grid, [1, 2], rs, 1, lambda s: None)
    assert (
        r["clipped_updates"] == 1
        and r["sites"]["alpha"]["clipped_by_coordinator"]
        and not r["sites"]["beta"]["clipped_by_coordinator"]
    )
    np.testing.assert_allclose(rs.global_state["a"], (0.5 / math.sqrt(10) + 0.01) / 2, rtol=1e-5)


def dp_run_config(tiny_config, rounds: int, **settings):
    data = json.loads(method_config(tiny_config, "lora").to_json())
    data["federation"]["rounds"] = rounds
    data["eval"]["max_examples"] = 2
    data["privacy"] = settings
    return load_config(None, base=data)


def test_the_run_stops_before_the_budget_and_the_accountant_survives_resume(tiny_config, tmp_path):
    """sigma 2 spends about 2.5, 3.3, 4.0 ... in rounds 1, 2, 3: a budget of 3.5 allows 2 of the 5
    rounds asked; the run stops cleanly (adapter, report) before round 3. Resumed with a larger
    budget, it continues the accountant from round 2's checkpoint, not from zero."""
    eps = [privacy.epsilon_of([(1.0, 2.0, t)], 1e-5) for t in (1, 2, 3)]
    assert eps[1] < 3.5 < eps[2]
    cfg = dp_run_config(tiny_config, 5, epsilon=3.5, clip=0.05, noise_multiplier=2.0)
    grid, _ = real_sites()
    said: list[str] = []
    rs = server.run_federation(grid, cfg, tmp_path, said.append)
    assert [r["round"] for r in rs.rounds] == [0, 1, 2]
    assert rs.rounds[2]["privacy"]["epsilon"] == pytest.approx(eps[1]) and rs.accountant.epsilon() <= 3.5
    assert "round 3 would bring epsilon to" in rs.stopped and any("stopping: privacy budget" in s for s in said)
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["stopped"] == rs.stopped and doc["fedtune"]["differential_privacy"] is True
    report = (tmp_path / "report.md").read_text()
    assert "epsilon" in report and "privacy budget" in report
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()

    bigger = dp_run_config(tiny_config, 5, epsilon=100.0, clip=0.05, noise_multiplier=2.0)
    client_app._RUNTIME, client_app._SITE_CACHE = None, {}
    grid, _ = real_sites()
    rs2 = server.run_federation(grid, bigger, tmp_path, lambda s: None, resume=True)
    assert [r["round"] for r in rs2.rounds] == [0, 1, 2, 3, 4, 5]
    assert rs2.rounds[3]["privacy"]["epsilon"] == pytest.approx(eps[2])
    assert rs2.accountant.history == [[1.0, 2.0, 5]]


def test_dp_cannot_be_turned_on_in_the_middle_of_a_run(tiny_config, tmp_path):
    cfg = dp_run_config(tiny_config, 1)
    grid, _ = real_sites()
    server.run_federation(grid, cfg, tmp_path, lambda s: None)
    client_app._RUNTIME, client_app._SITE_CACHE = None, {}
    grid, _ = real_sites()
    with pytest.raises(server.FederationError, match="cannot be turned on in the middle"):
        server.run_federation(grid, dp_run_config(tiny_config, 2, epsilon=8.0), tmp_path, lambda s: None, resume=True)


def test_distributed_noise_under_secure_aggregation_completes_a_round(tiny_config, tmp_path):
    """Three real sites, secure aggregation and DP: the sites clip and noise, the coordinator
    only unmasks the sum, the quantizer covers the noise, and the round is accounted."""
    data = json.loads(dp_run_config(tiny_config, 1, epsilon=20.0, clip=0.05).to_json())
    data["secure_aggregation"]["enabled"] = True
    cfg = load_config(None, base=data)
    grid, _ = real_sites(("medical", "legal", "financial"))
    rs = server.run_federation(grid, cfg, tmp_path, lambda s: None)
    r = rs.rounds[1]
    sigma = privacy.calibrate_noise(20.0, 1e-5, 1)
    assert r["accepted"] == 3 and r["privacy"]["noise"].startswith("distributed")
    assert r["privacy"]["noise_multiplier"] == pytest.approx(sigma)
    assert r["secure_aggregation"]["clip"] == pytest.approx(0.05 + 7 * sigma * 0.05 / math.sqrt(2))
    assert r["secure_aggregation"]["summed_weight"] == 3  # every site weighs 1 under DP
    assert (
        r["privacy"]["epsilon"] == pytest.approx(privacy.epsilon_of([(1.0, sigma, 1)], 1e-5))
        and r["privacy"]["epsilon"] <= 20.0
    )
    for site in r["sites"].values():
        assert not {"update_norm", "update_norm_before_clip", "clipped", "cosine_to_aggregate"} & set(site)


def test_under_dp_sites_are_drawn_by_poisson_sampling_and_an_empty_draw_is_charged(tiny_config, tmp_path):
    """sites_per_round 1 of 2 under DP: each site takes part with probability 1/2 on its own (so
    a round may have 0, 1 or 2), as the accountant's amplification assumes; a round that draws
    no site is skipped but charged. Which rounds those are follows from the coordinator's seeded
    generator, so it is predicted here and checked."""
    data = json.loads(dp_run_config(tiny_config, 4, epsilon=100.0, clip=0.05, noise_multiplier=1.0).to_json())
    data["federation"]["sites_per_round"] = 1
    cfg = load_config(None, base=data)
    rng = np.random.default_rng(cfg.train.seed)
    drawn = [int(np.sum(rng.random(2) < 0.5)) for _ in range(4)]
    assert 0 in drawn and max(drawn) == 2, drawn  # this seed shows both an empty and a full draw
    grid, _ = real_sites()
    rs = server.run_federation(grid, cfg, tmp_path, lambda s: None)
    for r, n in zip(rs.rounds[1:], drawn):
        assert ("skipped" in r) == (n == 0) and (n == 0 or r["accepted"] == n), (r, n)
        assert r["privacy"]["epsilon"] == pytest.approx(privacy.epsilon_of([(0.5, 1.0, r["round"])], 1e-5))
    assert rs.accountant.history == [[0.5, 1.0, 4]]
    assert privacy.epsilon_of([(0.5, 1.0, 4)], 1e-5) < privacy.epsilon_of([(1.0, 1.0, 4)], 1e-5)  # amplified


def test_update_norm_bound_holds_under_secure_aggregation(tiny_config, tmp_path):
    """The clipping is at the sites, so it needs no look at single updates: under secure
    aggregation the unmasked mean of 3 bounded updates stays within the bound (a mean of
    vectors of norm <= C has norm <= C), where the same run without the bound moves further."""
    moved = {}
    for bound in (None, 0.02):
        data = json.loads(dp_run_config(tiny_config, 1).to_json())
        data["secure_aggregation"]["enabled"] = True
        data["federation"]["update_norm_bound"] = bound
        cfg = load_config(None, base=data)
        client_app._RUNTIME, client_app._SITE_CACHE = None, {}
        grid, _ = real_sites(("medical", "legal", "financial"))
        init = server.initial_adapter(cfg).state
        rs = server.run_federation(grid, cfg, tmp_path / str(bound), lambda s: None)
        r = rs.rounds[1]
        assert r["accepted"] == 3
        moved[bound] = privacy.l2({k: rs.global_state[k].astype(np.float64) - init[k] for k in init})
        if bound is not None:
            assert all(
                s["clipped"] and s["update_norm_before_clip"] > bound for s in r["sites"].values()
            )  # the sites say so
            assert r["clipped_updates"] == 3
    assert moved[0.02] <= 0.02 * (1 + 1e-3) and moved[None] > 3 * 0.02, moved
