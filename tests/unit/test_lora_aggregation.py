"""LoRA-correct aggregation: the aggregation error against the mean of the sites' B·A products
(hand-computed), and mixed ranks across sites (HetLoRA zero-padding): shapes, the padded mean,
the error, and the same result under secure aggregation."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest

from fedtune.client import app as client_app
from fedtune.common import messages, methods
from fedtune.common.config import ConfigError, load_config
from fedtune.common.messages import TrainReply
from fedtune.server import app as server
from fedtune.server.aggregation import lora_product_error, weighted_mean

from .test_client_app import fresh_caches  # noqa: F401  (autouse fixture)
from .test_methods import method_config, real_sites, tiny_config  # noqa: F401  (fixture: the 64-wide tiny model)
from .test_server_rounds import _task_identity  # noqa: F401  (fixture)

A, B = "m.lora_A.weight", "m.lora_B.weight"


def _frobenius_by_hand(global_state, site_states, ranks, weights, new_global) -> tuple[float, float]:
    """|| B'A' - sum p_i B_i A_i || and || sum p_i B_i A_i - BA ||, element by element."""
    out_dim, in_dim = global_state[B].shape[0], global_state[A].shape[1]
    mean = np.zeros((out_dim, in_dim))
    for s, r, w in zip(site_states, ranks, weights):
        for i in range(out_dim):
            for j in range(in_dim):
                mean[i, j] += w / sum(weights) * sum(float(s[B][i, k]) * float(s[A][k, j]) for k in range(r))
    new = new_global[B].astype(np.float64) @ new_global[A].astype(np.float64)
    old = global_state[B].astype(np.float64) @ global_state[A].astype(np.float64)
    return float(np.linalg.norm(new - mean)), float(np.linalg.norm(mean - old))


@pytest.mark.parametrize("ranks", [(4, 4), (4, 2)])
def test_aggregation_error_against_the_mean_of_products_by_hand(ranks):
    rng = np.random.default_rng(1)
    g = OrderedDict({A: rng.normal(size=(4, 5)).astype(np.float32), B: rng.normal(size=(3, 4)).astype(np.float32)})
    deltas, sites = [], []
    for r in ranks:
        d = OrderedDict({A: np.zeros((4, 5), np.float32), B: np.zeros((3, 4), np.float32)})
        d[A][:r] = rng.normal(size=(r, 5)) * 0.3
        d[B][:, :r] = rng.normal(size=(3, r)) * 0.3
        deltas.append(d)
        sites.append({A: (g[A] + d[A])[:r], B: (g[B] + d[B])[:, :r]})
    weights = [1.0, 3.0]
    mean = weighted_mean(deltas, weights)
    got = lora_product_error(g, deltas, list(ranks), weights, mean, [(A, B)])
    err, ref = _frobenius_by_hand(g, sites, ranks, weights, {A: g[A] + mean[A], B: g[B] + mean[B]})
    assert got["aggregation_error"] == pytest.approx(err, rel=1e-5) and err > 0.01
    assert got["aggregation_error_rel"] == pytest.approx(err / ref, rel=1e-5)


def test_updates_of_b_alone_on_a_shared_a_aggregate_exactly():
    """FFA-LoRA's case: A is the same everywhere and does not move, so mean(B_i) A = mean(B_i A)."""
    rng = np.random.default_rng(2)
    g = OrderedDict({A: rng.normal(size=(4, 6)).astype(np.float32), B: np.zeros((5, 4), np.float32)})
    deltas = [OrderedDict({B: rng.normal(size=(5, 4)).astype(np.float32)}) for _ in range(3)]
    weights = [2.0, 1.0, 5.0]
    got = lora_product_error(g, deltas, [4, 4, 4], weights, weighted_mean(deltas, weights), [(A, B)])
    assert got["aggregation_error_rel"] < 1e-6 and got["aggregation_error"] < 1e-5


def test_rank_truncation_padding_and_detection():
    g = OrderedDict(
        {
            A: np.arange(40, dtype=np.float32).reshape(8, 5),
            B: np.arange(24, dtype=np.float32).reshape(3, 8),
            "m.bias": np.zeros(3, np.float32),
        }
    )
    spec = {k: v.shape for k, v in g.items()}
    cut = methods.truncate_rank(g, 2)
    assert cut[A].shape == (2, 5) and cut[B].shape == (3, 2) and cut["m.bias"].shape == (3,)
    assert methods.rank_of(cut, spec) == 2 and methods.rank_of(g, spec) == 8
    padded = methods.pad_rank(cut, spec)
    assert np.array_equal(padded[A][:2], g[A][:2]) and not padded[A][2:].any() and not padded[B][:, 2:].any()
    assert methods.rank_of({A: cut[A], B: g[B], "m.bias": g["m.bias"]}, spec) is None  # ranks disagree
    assert (
        methods.rank_of({A: np.zeros((9, 5), np.float32), B: np.zeros((3, 9), np.float32)}, spec) is None
    )  # above the global rank
    assert methods.rank_of({A: np.zeros((2, 6), np.float32)}, spec) is None  # another dimension is off
    assert methods.lora_pairs(g) == [(A, B)]


def test_mixed_rank_config_errors_name_the_site(tiny_config):
    base = json.loads(tiny_config.to_json())
    site = {"name": "small", "train": "x.jsonl", "rank": 32}
    with pytest.raises(ConfigError, match=r"federation.sites\[small\].rank 32: at most peft.r"):
        load_config(None, base=base | {"federation": {"sites": [site]}})
    with pytest.raises(ConfigError, match="mixed ranks need a LoRA-family method"):
        load_config(None, base=base | {"peft": {"method": "ia3"}, "federation": {"sites": [site | {"rank": 2}]}})


def mixed_rank_run(tiny_config, tmp_path, names, small: str, secure: bool = False):
    data = json.loads(method_config(tiny_config, "lora").to_json())
    data["peft"].update(r=8, alpha=16.0)
    data["secure_aggregation"]["enabled"] = secure
    cfg = load_config(None, base=data)
    grid, files = real_sites(names)
    i = list(names).index(small)
    files[i] = client_app.SiteFiles(files[i].name, files[i].train, files[i].eval, rank=4)  # the handlers read this list
    client_app._RUNTIME, client_app._SITE_CACHE = None, {}
    init = server.initial_adapter(cfg)
    rs = server.run_federation(grid, cfg, tmp_path, lambda s: None)
    return cfg, grid, init, rs


def test_mixed_ranks_pad_with_zeros_and_report_the_error(tiny_config, tmp_path):
    """medical trains rank 4, financial rank 8 (the global rank). medical's update has rank-4
    shapes (fewer bytes); the coordinator zero-pads it, so the global A's rows 4..7 move by
    financial's change times its weight alone, rows 0..3 by the weighted mean of both; the
    global adapter keeps rank 8; the aggregation error is the hand-computed one."""
    cfg, grid, init, rs = mixed_rank_run(tiny_config, tmp_path, ("medical", "financial"), "medical")
    r1 = rs.rounds[1]
    assert r1["accepted"] == 2 and r1["sites"]["medical"]["rank"] == 4 and "rank" not in r1["sites"]["financial"]
    assert r1["sites"]["medical"]["bytes_sent"] < 0.75 * r1["sites"]["financial"]["bytes_sent"]
    replies = {}
    for m in (m for m in grid.sent if m.metadata.message_type == messages.TRAIN):
        out = TrainReply.from_record(grid.sites[m.metadata.dst_node_id](m))
        replies[out.site.name] = (out.update, out.metrics.num_examples)
    (d_med, w_med), (d_fin, w_fin) = replies["medical"], replies["financial"]
    a_key = next(k for k in init.state if ".lora_A." in k)
    assert d_med[a_key].shape[0] == 4 and d_fin[a_key].shape[0] == 8 and rs.global_state[a_key].shape[0] == 8
    total = w_med + w_fin
    np.testing.assert_allclose(
        rs.global_state[a_key][4:] - init.state[a_key][4:], d_fin[a_key][4:] * w_fin / total, atol=1e-6
    )
    np.testing.assert_allclose(
        rs.global_state[a_key][:4] - init.state[a_key][:4],
        (d_med[a_key] * w_med + d_fin[a_key][:4] * w_fin) / total,
        atol=1e-6,
    )
    # The error, computed here from the sites' own adapters at their own ranks.
    err2 = ref2 = 0.0
    for a, b in methods.lora_pairs(init.state):
        mean = np.zeros((init.state[b].shape[0], init.state[a].shape[1]))
        for d, w, r in ((d_med, w_med, 4), (d_fin, w_fin, 8)):
            mean += (
                w
                / total
                * (init.state[b][:, :r] + d[b]).astype(np.float64)
                @ (init.state[a][:r] + d[a]).astype(np.float64)
            )
        new = rs.global_state[b].astype(np.float64) @ rs.global_state[a].astype(np.float64)
        err2 += float(np.sum((new - mean) ** 2))
        ref2 += float(np.sum((mean - init.state[b].astype(np.float64) @ init.state[a].astype(np.float64)) ** 2))
    assert r1["aggregation_error"] == pytest.approx(np.sqrt(err2), rel=1e-4)
    assert (
        r1["aggregation_error_rel"] == pytest.approx(np.sqrt(err2 / ref2), rel=1e-4)
        and r1["aggregation_error_rel"] > 0.01
    )
    assert "medical r=4" in (tmp_path / "report.md").read_text()


def test_mixed_ranks_under_secure_aggregation_give_the_plain_result(tiny_config, tmp_path):
    """The rank-4 site zero-pads before masking, so the masked sum is the padded sum."""
    names = ("medical", "legal", "financial")
    _, _, init, plain = mixed_rank_run(tiny_config, tmp_path / "plain", names, "legal")
    _, _, _, masked = mixed_rank_run(tiny_config, tmp_path / "secure", names, "legal", secure=True)
    r1 = masked.rounds[1]
    assert r1["accepted"] == 3 and "aggregation_error" not in r1  # the coordinator cannot see single updates
    bound = r1["secure_aggregation"]["quantization_error_bound"]
    for k in init.state:
        assert float(np.abs(masked.global_state[k] - plain.global_state[k]).max()) <= bound + 3e-7, k


def test_a_site_with_a_rank_refuses_a_run_whose_method_has_none(tiny_config, tmp_path):
    """ftclient join --rank 4 against an IA3 run: the site says why it sits the round out; the
    other site's update is applied."""
    cfg = method_config(tiny_config, "ia3")
    grid, files = real_sites(("medical", "financial"))
    files[0] = client_app.SiteFiles(files[0].name, files[0].train, files[0].eval, rank=4)
    rs = server.run_federation(grid, cfg, tmp_path, lambda s: None)
    r1 = rs.rounds[1]
    assert r1["accepted"] == 1 and r1["sites"]["medical"]["status"] == "refused"
    assert "LoRA rank 4, and the run's method ia3 has no LoRA rank" in r1["sites"]["medical"]["reason"]
    assert r1["sites"]["medical"]["eval_status"] == "refused"
