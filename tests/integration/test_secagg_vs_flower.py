"""Cross-check against Flower 1.42's own (legacy) SecAgg+: on the same inputs, our secure round
and Flower's agree within the sum of both quantization bounds. First the harness
(benchmarks/flower_secagg.py) is checked: Flower's SecAgg+ returns the weighted mean its
docstring promises, within the promised bound, and uploads ~8 bytes a parameter."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import flower_secagg as fs  # noqa: E402
import secagg as ours  # noqa: E402

WEIGHTS = [3, 10, 7, 1, 5]


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(1234)
    return [rng.uniform(-0.01, 0.01, 1000) for _ in WEIGHTS]


@pytest.fixture(scope="module", autouse=True)
def _ray_down_afterwards():
    yield
    fs.shutdown()  # the harness keeps Ray up between calls


def _max_err(a, b) -> float:
    return float(np.abs(a - b).max())


def test_flower_defaults_give_the_weighted_mean_within_the_bound(vectors):
    r = fs.flower_secaggplus(vectors, WEIGHTS)  # Flower's defaults: W=1000, c=8, Q=2**22, M=2**32
    weighted = fs.reference_mean(vectors, WEIGHTS)
    unweighted = np.mean(vectors, axis=0)
    bound = fs.aggregate_error_bound(WEIGHTS, max_abs=max(float(np.abs(v).max()) for v in vectors))
    assert r.aggregate.shape == (1000,) and r.aggregate.dtype == np.float64
    assert _max_err(r.aggregate, weighted) < bound
    # The bound is tight enough to tell weighting from none: the unweighted mean is well outside it.
    assert _max_err(unweighted, weighted) > 3 * bound
    assert _max_err(r.aggregate, unweighted) > bound
    # Against the mean over Flower's quantized weights, only the quantization error remains.
    assert _max_err(r.aggregate, fs.reference_mean(vectors, WEIGHTS, quantized=True)) < fs.aggregate_error_bound(
        WEIGHTS
    )
    # Masked int64 vector + 1-element weight array, each with a 128-byte .npy header.
    assert r.upload_bytes == 8 * 1000 + 8 + 2 * 128
    assert 8.0 <= r.upload_bytes_per_param < 8.3
    assert r.setup_upload_bytes > 0
    assert 0 < r.seconds < 30


def test_tight_settings_match_to_1e_8(vectors):
    kw = {"max_weight": 10.0, "clipping_range": 0.01}  # no clipping: |x| * n / W <= 0.01
    r = fs.flower_secaggplus(vectors, WEIGHTS, num_shares=3, reconstruction_threshold=2, **kw)
    bound = fs.aggregate_error_bound(WEIGHTS, max_abs=0.01, **kw)
    assert bound < 2e-8
    assert _max_err(r.aggregate, fs.reference_mean(vectors, WEIGHTS)) < bound
    assert _max_err(r.aggregate, np.mean(vectors, axis=0)) > 1e4 * bound


def test_plain_fedavg_is_the_exact_weighted_mean(vectors):
    r = fs.flower_plain_fedavg(vectors, WEIGHTS)
    np.testing.assert_allclose(r.aggregate, fs.reference_mean(vectors, WEIGHTS), rtol=0, atol=1e-15)
    assert r.upload_bytes == 8 * 1000 + 128
    assert r.setup_upload_bytes == 0


def test_our_secure_round_agrees_with_flowers_secaggplus_on_the_same_inputs(vectors):
    """Both run in Flower's simulation engine on the same vectors and weights: ours through
    fedtune.server.app.run_training_round and the sites' real handlers, Flower's through
    SecAggPlusWorkflow + secaggplus_mod. Tight Flower settings, so the check has teeth."""
    kw = {"max_weight": 10.0, "clipping_range": 0.01}
    theirs = fs.flower_secaggplus(vectors, WEIGHTS, **kw)
    mine = ours.fedtune_round(vectors, WEIGHTS, secure=True, clip=0.01, max_weight=100)
    bound = ours.our_error_bound(WEIGHTS, clip=0.01, max_weight=100) + fs.aggregate_error_bound(
        WEIGHTS, max_abs=0.01, **kw
    )
    assert bound < 2e-7
    assert _max_err(mine["aggregate"], theirs.aggregate) <= bound
    # Both are the weighted mean, not something that merely agrees with the other.
    assert _max_err(mine["aggregate"], fs.reference_mean(vectors, WEIGHTS)) <= ours.our_error_bound(
        WEIGHTS, clip=0.01, max_weight=100
    )
    assert _max_err(mine["aggregate"], np.mean(vectors, axis=0)) > 1e3 * bound
    # Ours uploads 4 bytes a value (and 4 for the weight beside them), Flower's 8; ours never saw a site's update in the clear.
    assert mine["upload"] == pytest.approx(4.0 * 1001 / 1000) and theirs.upload_bytes_per_param > 8.0
    assert mine["secure"]["sites_per_stage"] == [5, 5, 5, 5, 5, 5]
    assert mine["secure"]["summed_weight"] == sum(WEIGHTS)  # the weights summed inside the masked vectors
