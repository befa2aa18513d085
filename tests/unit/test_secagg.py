"""SecAgg+ primitives and an in-memory round (common/secagg.py): exact recovery with dropouts,
abort below the threshold, masked vectors that reveal nothing, refusals."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag

from fedtune.common import secagg as sa

TAG = b"round-0001"


def run_round(updates, weights, threshold, k, q, drop_before_share=(), drop_after_share=(), drop_after_upload=()):
    """One round among len(updates) sites; returns the unmasked code sum and the summed ids."""
    ids = list(range(1, len(updates) + 1))
    sites = {i: sa.Site(i, TAG) for i in ids}
    keys = {i: s.advertise() for i, s in sites.items()}
    nbrs = sa.neighbours(ids, k)
    shared = [i for i in ids if i not in drop_before_share]
    outbox = {i: sites[i].share_keys(keys, nbrs[i], threshold) for i in shared}
    for j in ids:
        sites[j].receive_shares(keys, {i: outbox[i][j] for i in shared if j in outbox[i]})
    uploaders = [i for i in shared if i not in drop_after_share]
    rng = np.random.default_rng(1)
    masked = {
        i: sites[i].masked_input(
            q.encode(updates[i - 1], weights[i - 1], rng), keys, [j for j in nbrs[i] if j in shared]
        )
        for i in uploaders
    }
    # Each site is asked for its own view of the alive set: its share holders in it, and the
    # senders of its shares that are not in it.
    answers = {}
    for i in uploaders:
        if i not in drop_after_upload:
            alive, dropped = sa.unmask_view(masked, [j for j in nbrs[i] if j in shared], i)
            answers[i] = sites[i].unmask(alive, dropped, threshold)
    total = np.zeros(len(updates[0]) + 1, dtype=np.uint32)
    for y in masked.values():
        total += y
    return sa.unmask_sum(total, masked, keys, shared, nbrs, answers, threshold, TAG), sorted(masked)


def weighted_mean(updates, weights, ids):
    w = np.array([weights[i - 1] for i in ids], dtype=np.float64)
    return (np.stack([updates[i - 1] for i in ids]) * w[:, None]).sum(0) / w.sum()


@pytest.fixture
def five_sites():
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 0.01, 1000) for _ in range(5)]
    weights = [120, 80, 200, 45, 160]
    return updates, weights, sa.Quantizer(clip=0.05, max_weight=10_000, n_sites=5)


def test_quantized_weighted_mean_is_within_the_stated_bound(five_sites):
    updates, weights, q = five_sites
    rng = np.random.default_rng(3)
    total = np.zeros(1001, dtype=np.uint32)
    for x, w in zip(updates, weights):
        total = total + q.encode(x, w, rng)
    mean, weight = q.decode(total, 5)
    assert weight == sum(weights)  # the weights travel inside the vector, and sum exactly
    bound = q.mean_error_bound(weight, 5)
    err = np.abs(mean - weighted_mean(updates, weights, range(1, 6))).max()
    assert err <= bound and bound < 1e-6  # small next to LoRA deltas of ~1e-2
    assert err > 0  # it is a quantization, not a copy


def test_a_sum_that_is_not_of_updates_is_refused_not_decoded(five_sites):
    """A wrong share or a tampered vector leaves masks in the sum: it decodes to values far beyond
    the clip range, which the coordinator refuses rather than release."""
    updates, weights, q = five_sites
    total, ids = run_round(updates, weights, threshold=3, k=4, q=q)
    total[7] += np.uint32(123_456_789)
    with pytest.raises(sa.SecAggError, match="not a sum of updates"):
        q.decode(total, len(ids))
    masked_only = np.random.default_rng(5).integers(0, 2**32, 1001, dtype=np.uint64).astype(np.uint32)
    with pytest.raises(sa.SecAggError, match="not a sum of updates|unmasked weights sum to"):
        q.decode(masked_only, 5)
    total[7] -= np.uint32(123_456_789)
    total[-1] = 5 * q.max_weight + 1  # more weight than 5 sites may encode
    with pytest.raises(sa.SecAggError, match="unmasked weights sum to"):
        q.decode(total, 5)


def test_full_round_equals_the_plain_sum_of_codes(five_sites):
    updates, weights, q = five_sites
    total, ids = run_round(updates, weights, threshold=3, k=4, q=q)
    mean, weight = q.decode(total, len(ids))
    assert ids == [1, 2, 3, 4, 5] and weight == sum(weights)
    assert np.abs(mean - weighted_mean(updates, weights, ids)).max() <= q.mean_error_bound(sum(weights), 5)


@pytest.mark.parametrize("stage", ["before_share", "after_share", "after_upload"])
@pytest.mark.parametrize("n_drop", [1, 2])
def test_dropouts_at_each_stage_still_give_the_survivors_exact_mean(five_sites, stage, n_drop):
    updates, weights, q = five_sites
    gone = tuple(range(5, 5 - n_drop, -1)) if n_drop else ()
    total, ids = run_round(updates, weights, threshold=3, k=4, q=q, **{f"drop_{stage}": gone})
    expected_ids = [1, 2, 3, 4, 5] if stage == "after_upload" else [i for i in range(1, 6) if i not in gone]
    assert ids == expected_ids
    weight = sum(weights[i - 1] for i in ids)
    mean, summed = q.decode(total, len(ids))
    assert summed == weight
    assert np.abs(mean - weighted_mean(updates, weights, ids)).max() <= q.mean_error_bound(weight, len(ids))


@pytest.mark.parametrize("stage", ["after_share", "after_upload"])
def test_three_dropouts_abort_and_release_nothing(five_sites, stage):
    updates, weights, q = five_sites
    with pytest.raises(sa.SecAggError, match="nothing released|the secret stays hidden|fewer than the threshold"):
        run_round(updates, weights, threshold=3, k=4, q=q, **{f"drop_{stage}": (3, 4, 5)})


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / a.size
    fb = np.searchsorted(np.sort(b), grid, side="right") / b.size
    return float(np.abs(fa - fb).max())


def test_a_masked_vector_looks_the_same_for_a_zero_and_a_large_update():
    q = sa.Quantizer(clip=0.05, max_weight=1000, n_sites=3)
    n = 20_000
    views = {}
    for name, x in {"zero": np.zeros(n), "large": np.full(n, 0.05)}.items():
        sites = {i: sa.Site(i, TAG) for i in (1, 2, 3)}
        keys = {i: s.advertise() for i, s in sites.items()}
        code = q.encode(x, 1000, np.random.default_rng(0))
        views[name] = (code, sites[1].masked_input(code, keys, [2, 3]))
    crit = 2.63 * np.sqrt(2 / (n + 1))  # two-sample KS at alpha = 1e-6 (random keys each run: no flakes)
    assert _ks_statistic(views["zero"][1].astype(float), views["large"][1].astype(float)) < crit
    # The test can tell distributions apart: the unmasked codes differ plainly.
    assert _ks_statistic(views["zero"][0].astype(float), views["large"][0].astype(float)) > 10 * crit


def test_masks_come_from_full_entropy_seeds_and_never_repeat():
    masks = {sa.prg_mask(os.urandom(32), 8).tobytes() for _ in range(2000)}
    assert len(masks) == 2000
    seed = os.urandom(32)
    assert np.array_equal(sa.prg_mask(seed, 64), sa.prg_mask(seed, 64))
    with pytest.raises(ValueError, match="32 bytes"):
        sa.prg_mask(b"\x00" * 4, 8)  # a 32-bit seed is not accepted


def test_unmask_requests_that_are_not_the_sites_own_view_are_refused():
    """Site 1 received shares from 2, 3, 4 and 5 (threshold 3)."""
    check = lambda alive, dropped: sa.check_unmask_request(alive, dropped, 3, me=1, senders={2, 3, 4, 5})  # noqa: E731
    with pytest.raises(sa.SecAggError, match=r"both alive and dropped: refused"):
        check({1, 2, 3}, {3, 4, 5})
    with pytest.raises(sa.SecAggError, match="fewer than the threshold 3"):
        check({1, 2}, {3, 4, 5})
    # Attack (a): sites that do not exist counted towards the threshold.
    with pytest.raises(sa.SecAggError, match=r"sites \[98, 99\] that sent this site no shares"):
        check({1, 2, 98, 99}, {3, 4, 5})
    with pytest.raises(sa.SecAggError, match=r"leaves out sites \[5\]"):
        check({1, 2, 3}, {4})
    with pytest.raises(sa.SecAggError, match="this site, which uploaded, as not alive"):
        check({2, 3, 4}, {5})
    with pytest.raises(sa.SecAggError, match=r"sites \[6\] that sent this site no shares"):
        check({1, 2, 3}, {4, 5, 6})  # a dropped site must have completed key sharing with this one
    check({1, 2, 3}, {4, 5})
    assert sa.unmask_view([1, 2, 3, 7], senders=[2, 3, 4, 5], me=1) == ([1, 2, 3], [4, 5])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_updates_are_refused_before_masking(bad):
    q = sa.Quantizer(clip=0.05, max_weight=100, n_sites=3)
    x = np.zeros(10)
    x[4] = bad
    with pytest.raises(sa.SecAggError, match="non-finite value.*refused before masking"):
        q.encode(x, 10, np.random.default_rng(0))
    with pytest.raises(sa.SecAggError, match="weight"):
        q.encode(np.zeros(3), 101, np.random.default_rng(0))


def test_shamir_any_threshold_shares_rebuild_and_fewer_do_not():
    secret = os.urandom(32)
    shares = sa.shamir_split(secret, 3, [2, 5, 7, 9])
    for combo in itertools.combinations(shares, 3):
        assert sa.shamir_combine({h: shares[h] for h in combo}, 3) == secret
    with pytest.raises(sa.SecAggError, match="2 share"):
        sa.shamir_combine({h: shares[h] for h in (2, 5)}, 3)


def test_sealed_shares_are_bound_to_sender_and_receiver():
    a, b = sa.Site(1, TAG), sa.Site(2, TAG)
    key = sa.agree(a.c_key, b.advertise()[0], b"x")
    assert key == sa.agree(b.c_key, a.advertise()[0], b"x")
    ct = sa.seal(key, b"share", b"1->2")
    assert sa.unseal(key, ct, b"1->2") == b"share"
    with pytest.raises(InvalidTag):
        sa.unseal(key, ct, b"1->3")  # replayed to another receiver
    with pytest.raises(InvalidTag):
        sa.unseal(key, ct[:-1] + bytes([ct[-1] ^ 1]), b"1->2")


def test_neighbour_graph_is_symmetric_and_k_regular():
    g = sa.neighbours(list(range(1, 11)), 4)
    assert all(len(v) == 4 for v in g.values())
    assert all(i in g[j] for i, v in g.items() for j in v)
