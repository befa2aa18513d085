"""server/aggregation.py: update validation and FedAvg maths, against hand-computed numbers."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from fedtune.server.aggregation import (
    ServerOptimizer,
    add_update,
    fedavg_step,
    l2_norm,
    robust_aggregate,
    spec_of,
    validate_update,
    weighted_mean,
)

F32 = np.float32


def arr(x) -> np.ndarray:
    return np.asarray(x, dtype=F32)


SPEC = {"a": (2,), "b": (2, 2)}


def good_update() -> OrderedDict:
    return OrderedDict(a=arr([0.5, -0.5]), b=arr([[1, 2], [3, 4]]))


# ------------------------------------------------------------------ maths


def test_weighted_mean_hand_computed():
    u1 = {"a": arr([1.0, 2.0]), "b": arr([[0.0, 0.0], [0.0, 4.0]])}
    u2 = {"a": arr([4.0, -1.0]), "b": arr([[3.0, 3.0], [3.0, 0.0]])}
    out = weighted_mean([u1, u2], [1, 2])
    # a: (1*1 + 2*4)/3 = 3, (1*2 + 2*-1)/3 = 0; b: (0+6)/3 = 2, ..., (4+0)/3
    np.testing.assert_allclose(out["a"], [3.0, 0.0], rtol=0, atol=1e-7)
    np.testing.assert_allclose(out["b"], [[2.0, 2.0], [2.0, 4.0 / 3.0]], rtol=1e-7)
    assert all(v.dtype == F32 for v in out.values())
    assert list(out) == ["a", "b"]


def test_weighted_mean_equal_weights_is_plain_mean():
    us = [{"w": arr([1.0, 10.0])}, {"w": arr([2.0, 20.0])}, {"w": arr([6.0, 0.0])}]
    np.testing.assert_allclose(weighted_mean(us, [5, 5, 5])["w"], [3.0, 10.0])


def test_weighted_mean_single_update_is_itself():
    u = {"w": arr([0.1, 0.2, 0.3])}
    np.testing.assert_array_equal(weighted_mean([u], [7])["w"], u["w"])


def test_weighted_mean_accumulates_in_float64():
    # 1e8 + 1 is not representable in float32 (it rounds to 1e8): a float32 accumulator would
    # give (1e8 + 1 - 1e8) / 3 = 0; float64 keeps the 1 and gives 1/3.
    us = [{"w": arr([1e8])}, {"w": arr([1.0])}, {"w": arr([-1e8])}]
    assert weighted_mean(us, [1, 1, 1])["w"][0] == pytest.approx(1 / 3)


@pytest.mark.parametrize("weights", [[1, 0], [1, -1], [1, float("nan")], [1, float("inf")]])
def test_weighted_mean_rejects_bad_weights(weights):
    with pytest.raises(ValueError, match="finite and positive"):
        weighted_mean([{"w": arr([1.0])}, {"w": arr([2.0])}], weights)


def test_weighted_mean_rejects_empty_and_mismatch():
    with pytest.raises(ValueError, match="no updates"):
        weighted_mean([], [])
    with pytest.raises(ValueError, match="2 updates, 1 weights"):
        weighted_mean([{"w": arr([1.0])}, {"w": arr([2.0])}], [1])


def test_fedavg_step_hand_computed():
    g = OrderedDict(w=arr([1.0, 1.0]), v=arr([[0.0]]))
    d1 = {"w": arr([0.3, -0.6]), "v": arr([[1.0]])}
    d2 = {"w": arr([-0.1, 0.0]), "v": arr([[-1.0]])}
    new = fedavg_step(g, [d1, d2], [30, 10])
    # mean delta w = (30*0.3 + 10*-0.1)/40 = 0.2, (30*-0.6)/40 = -0.45; v = (30 - 10)/40 = 0.5
    np.testing.assert_allclose(new["w"], [1.2, 0.55], rtol=1e-6)
    np.testing.assert_allclose(new["v"], [[0.5]], rtol=1e-6)
    assert new["w"].dtype == F32
    np.testing.assert_array_equal(g["w"], [1.0, 1.0])  # input untouched


def test_fedavg_of_deltas_equals_weighted_mean_of_local_models():
    rng = np.random.default_rng(0)
    g = {"w": rng.standard_normal(5).astype(F32)}
    locals_ = [{"w": g["w"] + rng.standard_normal(5).astype(F32)} for _ in range(3)]
    n = [3, 1, 6]
    via_deltas = fedavg_step(g, [{"w": l["w"] - g["w"]} for l in locals_], n)
    direct = sum(ni * l["w"].astype(np.float64) for ni, l in zip(n, locals_)) / sum(n)
    np.testing.assert_allclose(via_deltas["w"], direct, rtol=1e-5, atol=1e-6)


def test_add_update_and_l2_norm():
    out = add_update({"a": arr([1.0, 2.0])}, {"a": arr([0.5, -2.0])})
    np.testing.assert_array_equal(out["a"], [1.5, 0.0])
    assert l2_norm({"a": arr([3.0]), "b": arr([[4.0, 0.0]])}) == pytest.approx(5.0)
    assert l2_norm({}) == 0.0


def test_spec_of():
    import torch

    assert spec_of({"a": np.zeros((2, 3)), "b": torch.zeros(4)}) == {"a": (2, 3), "b": (4,)}


# ------------------------------------------------------------------ validation


def test_accepts_good_update():
    assert validate_update(good_update(), SPEC, 12, 1000) == []
    assert validate_update(good_update(), SPEC, 1, 1) == []  # both ends of the range
    assert validate_update(good_update(), SPEC, 5.0, 1000) == []  # a whole float is a count


def test_rejects_missing_key():
    u = good_update()
    del u["b"]
    assert validate_update(u, SPEC, 3, 100) == ["1 missing tensor(s), e.g. b"]


def test_rejects_extra_key():
    u = good_update()
    u["zzz"] = arr([1.0])
    assert validate_update(u, SPEC, 3, 100) == ["1 unexpected tensor(s), e.g. zzz"]


def test_rejects_wrong_shape():
    u = good_update()
    u["b"] = arr([[1, 2, 3, 4]])  # same size, other shape: must not be reshaped or broadcast
    assert validate_update(u, SPEC, 3, 100) == ["b: shape (1, 4), expected (2, 2)"]
    u["b"] = arr([1.0])  # would broadcast
    assert validate_update(u, SPEC, 3, 100) == ["b: shape (1,), expected (2, 2)"]


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.uint16])
def test_rejects_wrong_dtype(dtype):
    # float16 is what a bfloat16 model's tensors become when cast for ArrayRecord.
    u = good_update()
    u["a"] = u["a"].astype(dtype)
    problems = validate_update(u, SPEC, 3, 100)
    assert problems == [f"a: dtype {np.dtype(dtype)}, expected float32"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rejects_non_finite(bad):
    u = good_update()
    u["b"][1, 0] = bad
    u["b"][0, 1] = bad
    assert validate_update(u, SPEC, 3, 100) == ["b: 2 non-finite value(s)"]


@pytest.mark.parametrize(
    "n, fragment",
    [
        (0, "num-examples 0 outside 1..100"),
        (-5, "num-examples -5 outside 1..100"),
        (101, "num-examples 101 outside 1..100"),
        (10**18, "outside 1..100"),
        (2.5, "not a whole number (2.5)"),
        (float("nan"), "not a whole number"),
        (float("inf"), "not a whole number"),
        (True, "not a number (bool)"),
        (False, "not a number (bool)"),
        ("12", "not a number (str)"),
        (None, "not a number (NoneType)"),
    ],
)
def test_rejects_bad_num_examples(n, fragment):
    problems = validate_update(good_update(), SPEC, n, 100)
    assert len(problems) == 1 and fragment in problems[0]


def test_reports_every_problem():
    u = good_update()
    u["a"] = u["a"].astype(np.float64)
    u["b"][0, 0] = np.nan
    u["extra"] = arr([0.0])
    problems = validate_update(u, SPEC, 0, 100)
    assert len(problems) == 4


def test_running_mean_folds_updates_one_at_a_time():
    from fedtune.server.aggregation import RunningMean

    m = RunningMean()
    m.add({"a": np.array([1.0, 2.0], dtype=np.float32)}, 1.0)
    m.add({"a": np.array([4.0, 8.0], dtype=np.float32)}, 2.0)
    assert m.count == 2 and m.total_weight == 3.0
    np.testing.assert_allclose(m.result()["a"], [3.0, 6.0])  # (1*[1,2] + 2*[4,8]) / 3
    assert m.result()["a"].dtype == np.float32
    with pytest.raises(KeyError):
        m.add({"b": np.zeros(2, dtype=np.float32)}, 1.0)
    with pytest.raises(ValueError):
        m.add({"a": np.zeros(2, dtype=np.float32)}, 0.0)
    with pytest.raises(ValueError):
        RunningMean().result()


# ---------------------------------------------------------------- robust aggregators and server optimizers


def test_coordinate_median_and_trimmed_mean_hand_computed():
    ups = [OrderedDict(a=arr([v, -v])) for v in (1.0, 2.0, 3.0, 100.0, 4.0)]
    np.testing.assert_allclose(robust_aggregate(ups, "median")["a"], [3.0, -3.0])
    # 5 sites, trim 0.2: one value cut at each end per coordinate -> mean of 2, 3, 4.
    np.testing.assert_allclose(robust_aggregate(ups, "trimmed-mean", 0.2)["a"], [3.0, -3.0])
    # trim 0.1 of 5 cuts nothing: the plain (unweighted) mean, outlier included.
    np.testing.assert_allclose(robust_aggregate(ups, "trimmed-mean", 0.1)["a"], [22.0, -22.0])
    with pytest.raises(ValueError, match="unknown method"):
        robust_aggregate(ups, "krum")


def test_server_optimizers_hand_computed_two_steps():
    g = OrderedDict(a=arr([0.0, 0.0]))
    d1, d2 = OrderedDict(a=arr([0.1, -0.2])), OrderedDict(a=arr([0.3, 0.0]))

    avg = ServerOptimizer("fedavg", lr=0.5)
    np.testing.assert_allclose(avg.step(avg.step(g, d1), d2)["a"], [0.2, -0.1], atol=1e-7)

    m = ServerOptimizer("fedavgm", lr=1.0, momentum=0.5)
    x1 = m.step(g, d1)  # v = d1
    x2 = m.step(x1, d2)  # v = 0.5 d1 + d2 = [0.35, -0.1]
    np.testing.assert_allclose(x2["a"], [0.1 + 0.35, -0.2 - 0.1], atol=1e-7)

    lr, b1, b2, tau = 0.01, 0.9, 0.99, 1e-6
    adam = ServerOptimizer("fedadam", lr=lr, beta1=b1, beta2=b2, tau=tau)
    x1 = adam.step(g, d1)
    m1 = (1 - b1) * np.array([0.1, -0.2])
    v1 = (1 - b2) * np.array([0.1, -0.2]) ** 2
    step1 = lr * np.sqrt(1 - b2) / (1 - b1) * m1 / (np.sqrt(v1) + tau)
    np.testing.assert_allclose(x1["a"], step1, rtol=1e-5)
    assert np.allclose(np.abs(x1["a"]), lr, rtol=1e-3)  # the first Adam step is ~lr per value

    yogi = ServerOptimizer("fedyogi", lr=lr, beta1=b1, beta2=b2, tau=tau)
    yogi.step(g, d1)
    yogi.step(g, d2)
    v_yogi1 = (1 - b2) * np.array([0.01, 0.04])  # from v = 0: v - (1-b2) d^2 sign(0 - d^2)
    d2sq = np.array([0.09, 0.0])
    np.testing.assert_allclose(yogi.v["a"], v_yogi1 - (1 - b2) * d2sq * np.sign(v_yogi1 - d2sq), rtol=1e-6)

    ada = ServerOptimizer("fedadagrad", lr=lr, beta1=b1, tau=tau)
    ada.step(g, d1)
    ada.step(g, d2)
    np.testing.assert_allclose(ada.v["a"], [0.01 + 0.09, 0.04], rtol=1e-6)


def test_server_optimizer_state_round_trips_and_refuses_another_strategy():
    g = OrderedDict(a=arr([0.0, 1.0]))
    d = OrderedDict(a=arr([0.1, -0.2]))
    straight = ServerOptimizer("fedadam")
    for _ in range(3):
        g_straight = straight.step(g, d)
    first = ServerOptimizer("fedadam")
    first.step(g, d)
    first.step(g, d)
    doc, arrays = first.state()
    resumed = ServerOptimizer("fedadam")
    resumed.restore(doc, {k: v.copy() for k, v in arrays.items()})
    np.testing.assert_array_equal(resumed.step(g, d)["a"], g_straight["a"])
    with pytest.raises(ValueError, match="'fedadam', this run's is 'fedyogi'"):
        ServerOptimizer("fedyogi").restore(doc, arrays)
    assert ServerOptimizer("fedavg").state() == ({"strategy": "fedavg", "t": 0}, {})


def test_fedprox_server_step_is_fedavgs():
    """FedProx changes the sites' loss, not the server: x += lr * mean delta, with lr 1 by default."""
    from collections import OrderedDict

    import numpy as np

    from fedtune.server.aggregation import ServerOptimizer

    x = OrderedDict(a=np.array([1.0, -2.0], np.float32))
    d = OrderedDict(a=np.array([0.25, 0.5], np.float32))
    assert np.array_equal(ServerOptimizer("fedprox").step(x, d)["a"], np.array([1.25, -1.5], np.float32))
    assert np.array_equal(
        ServerOptimizer("fedprox", lr=2.0).step(x, d)["a"], ServerOptimizer("fedavg", lr=2.0).step(x, d)["a"]
    )


def test_server_lr_sites_adds_the_sum_of_the_sites_updates():
    """server_lr 'sites': x += K * mean delta, K the round's combined updates (fedavg, fedprox, and
    fedavgm's velocity); a number stays a number whatever K; the adaptive strategies refuse it,
    in the optimizer and in the config (naming the key and the strategy)."""
    from fedtune.common.config import ConfigError, load_config
    from fedtune.server.aggregation import ServerOptimizer

    x = OrderedDict(a=np.array([1.0, -2.0], np.float32))
    d = OrderedDict(a=np.array([0.25, 0.5], np.float32))
    for strategy in ("fedavg", "fedprox", "fedavgm"):
        opt = ServerOptimizer(strategy, lr="sites")
        assert opt.round_lr(3) == 3.0 and opt.round_lr(0) == 1.0
        assert np.array_equal(opt.step(x, d, n_sites=3)["a"], np.array([1.75, -0.5], np.float32))
    assert np.array_equal(
        ServerOptimizer("fedavg", lr=2.0).step(x, d, n_sites=3)["a"], np.array([1.5, -1.0], np.float32)
    )
    with pytest.raises(ValueError, match="fedadam"):
        ServerOptimizer("fedadam", lr="sites")
    with pytest.raises(ConfigError, match=r"federation.*server_lr 'sites'.*fedyogi"):
        load_config(None, overrides={"federation.strategy": "fedyogi", "federation.server_lr": "sites"})
    assert load_config(None, overrides={"federation.server_lr": "sites"}).federation.server_lr == "sites"


def test_capped_mean_equals_the_weighted_mean_with_capped_weights():
    """Counts 10, 10, 30, 40, 1e7 (lower median 30, cap 3 -> limit 90): weights 10, 10, 30, 40, 90,
    whatever order the updates arrive in; equal counts share one sum (bucket)."""
    from fedtune.server.aggregation import CappedMean, capped_weights, lower_median, weighted_mean

    rng = np.random.default_rng(0)
    counts = [10, 30, 1e7, 10, 40]
    updates = [
        OrderedDict(a=rng.normal(size=(3, 2)).astype(np.float32), b=rng.normal(size=(4,)).astype(np.float32))
        for _ in counts
    ]
    assert lower_median(counts) == 30 and lower_median([100, 1e7]) == 100
    assert capped_weights(counts, 3.0) == [10, 30, 90, 10, 40] and capped_weights(counts, None) == [
        float(c) for c in counts
    ]
    m = CappedMean(3.0)
    for u, n in zip(updates, counts):
        m.add(u, n)
    expected = weighted_mean(updates, [10, 30, 90, 10, 40])
    got = m.result()
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6)
    assert m.weights() == [10, 30, 90, 10, 40] and m.limit() == 90 and len(m._buckets) == 4  # the two 10s share one
    assert np.shares_memory(m._buckets[30][1]["a"], updates[1]["a"])  # a count seen once: held as sent, not copied
    with pytest.raises(ValueError):
        m.add(updates[0], float("inf"))
    with pytest.raises(KeyError):
        m.add(OrderedDict(a=updates[0]["a"]), 5)
