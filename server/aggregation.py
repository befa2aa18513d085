"""Update validation and aggregation maths: plain functions over numpy arrays.

Flower's own FedAvg accepts NaN/Inf, negative or huge example counts and mismatched
shapes (it broadcasts), so every update is checked here before it is averaged.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from fedtune.common.config import SUMMING_STRATEGIES
from fedtune.common.metrics import lower_median

WIRE_DTYPE = np.dtype(np.float32)


def spec_of(state: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
    """name -> shape, from a state of tensors or arrays."""
    return {k: tuple(int(s) for s in v.shape) for k, v in state.items()}


def validate_update(
    arrays: Mapping[str, np.ndarray],
    spec: Mapping[str, tuple[int, ...]],
    num_examples: object,
    max_examples: int,
) -> list[str]:
    """Every reason to reject this update; empty when it is sound."""
    problems: list[str] = []
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float)):
        problems.append(f"num-examples is not a number ({type(num_examples).__name__})")
    elif not math.isfinite(num_examples) or num_examples != int(num_examples):
        problems.append(f"num-examples is not a whole number ({num_examples})")
    elif not 1 <= num_examples <= max_examples:
        problems.append(f"num-examples {int(num_examples)} outside 1..{max_examples}")
    missing = sorted(set(spec) - set(arrays))
    extra = sorted(set(arrays) - set(spec))
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), e.g. {missing[0]}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[0]}")
    for name, shape in spec.items():
        a = arrays.get(name)
        if a is None:
            continue
        if a.dtype != WIRE_DTYPE:
            problems.append(f"{name}: dtype {a.dtype}, expected {WIRE_DTYPE}")
            continue
        if tuple(a.shape) != tuple(shape):
            problems.append(f"{name}: shape {tuple(a.shape)}, expected {tuple(shape)}")
            continue
        if not np.isfinite(a).all():
            bad = int(a.size - np.isfinite(a).sum())
            problems.append(f"{name}: {bad} non-finite value(s)")
    return problems


def weighted_mean(
    updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> OrderedDict[str, np.ndarray]:
    """sum_i w_i * u_i / sum_i w_i, key by key, accumulated in float64, returned as float32."""
    if not updates:
        raise ValueError("weighted_mean: no updates")
    if len(updates) != len(weights):
        raise ValueError(f"weighted_mean: {len(updates)} updates, {len(weights)} weights")
    mean = RunningMean()
    for u, w in zip(updates, weights):
        mean.add(u, float(w))
    return mean.result()


class RunningMean:
    """Example-weighted mean of updates, folded in one at a time (float64 accumulator).

    The server adds each update as it arrives and drops it, so its memory holds one
    accumulator, not every site's update. Equal to :func:`weighted_mean` of the same inputs.
    """

    def __init__(self) -> None:
        self._acc: OrderedDict[str, np.ndarray] | None = None
        self._weights: list[float] = []  # in arrival order
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: Mapping[str, np.ndarray], weight: float) -> None:
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError("RunningMean.add: weight must be finite and positive")
        if self._acc is None:
            self._acc = OrderedDict((k, np.zeros(v.shape, dtype=np.float64)) for k, v in update.items())
        elif set(update) != set(self._acc):
            raise KeyError("RunningMean.add: update keys differ from earlier updates")
        for k, acc in self._acc.items():
            acc += weight * update[k].astype(np.float64)
        self.total_weight += weight
        self._weights.append(float(weight))
        self.count += 1

    def weights(self) -> list[float]:
        """Each update's weight, in the order they were added (as :meth:`CappedMean.weights`)."""
        return list(self._weights)

    def result(self) -> OrderedDict[str, np.ndarray]:
        if self._acc is None:
            raise ValueError("RunningMean.result: no updates")
        return OrderedDict((k, (v / self.total_weight).astype(WIRE_DTYPE)) for k, v in self._acc.items())


def capped_weights(counts: Sequence[float], cap: float | None) -> list[float]:
    """Each site's weight: its example count, at most ``cap`` x the round's (lower) median count
    (federation.weight_cap; None: the counts as they are). A site that claims 10,000,000
    examples among sites of 100 weighs 300 at cap 3, whatever it claims."""
    if cap is None or not counts:
        return [float(c) for c in counts]
    limit = cap * lower_median(counts)
    return [min(float(c), limit) for c in counts]


class CappedMean:
    """The weighted mean of updates whose weights are capped at ``cap`` x the median count, which
    is known only once the round's replies are all in (:func:`capped_weights`).

    Updates are summed per distinct claimed count (float64): at the end every count's weight is
    min(count, cap x median), and the mean is sum_n w_n S_n / sum_n k_n w_n, exact. The first
    update of a count is held as it arrived (float32, no copy) until a second one shares it.
    Memory: one update per distinct count. That is one per site when every site claims another
    count (as buffering the updates until the round ends would be), and much less when counts
    repeat (ftsim's equal partitions); weighting 'equal', DP and no cap need none of this
    (:class:`RunningMean`: one accumulator). Geometric buckets would bound the memory but let a
    site exceed the cap by the bucket's ratio; a second pass over the replies would need them
    kept all the same. So the cost is the distinct counts, and it is exact.
    """

    def __init__(self, cap: float) -> None:
        self.cap = cap
        self._buckets: dict[float, list] = {}  # count -> [sites, sum of their updates]
        self.counts: list[float] = []  # in arrival order
        self.count = 0

    def add(self, update: Mapping[str, np.ndarray], count: float) -> None:
        if not (math.isfinite(count) and count > 0):
            raise ValueError("CappedMean.add: the count must be finite and positive")
        if self._buckets and set(update) != set(next(iter(self._buckets.values()))[1]):
            raise KeyError("CappedMean.add: update keys differ from earlier updates")
        bucket = self._buckets.get(count)
        if bucket is None:
            self._buckets[count] = [1, OrderedDict(update)]
        else:
            if bucket[0] == 1:  # a second update of this count: start summing (a float64 copy of the first)
                bucket[1] = OrderedDict((k, v.astype(np.float64)) for k, v in bucket[1].items())
            for k, acc in bucket[1].items():
                acc += update[k]
            bucket[0] += 1
        self.counts.append(float(count))
        self.count += 1

    def limit(self) -> float:
        return self.cap * lower_median(self.counts)

    def weights(self) -> list[float]:
        """Each update's weight, in the order they were added."""
        return capped_weights(self.counts, self.cap)

    def result(self) -> OrderedDict[str, np.ndarray]:
        if not self._buckets:
            raise ValueError("CappedMean.result: no updates")
        limit = self.limit()
        acc: OrderedDict[str, np.ndarray] | None = None
        total = 0.0
        for n, (sites, summed) in self._buckets.items():
            w = min(n, limit)
            total += w * sites
            if acc is None:
                acc = OrderedDict((k, w * v.astype(np.float64)) for k, v in summed.items())
            else:
                for k, a in acc.items():
                    a += w * summed[k]
        return OrderedDict((k, (v / total).astype(WIRE_DTYPE)) for k, v in acc.items())


def add_update(
    global_state: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]
) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, (global_state[k].astype(np.float64) + update[k]).astype(WIRE_DTYPE)) for k in global_state)


def unflatten(flat: np.ndarray, spec: Mapping[str, tuple[int, ...]]) -> OrderedDict[str, np.ndarray]:
    """One vector (in ``spec``'s order) -> name -> float32 array of the spec's shape."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    pos = 0
    for name, shape in spec.items():
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = np.asarray(flat[pos : pos + size], dtype=WIRE_DTYPE).reshape(shape)
        pos += size
    if pos != len(flat):
        raise ValueError(f"unflatten: {len(flat)} values, the spec describes {pos}")
    return out


def l2_norm(state: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in state.values())))


def fedavg_step(
    global_state: Mapping[str, np.ndarray],
    deltas: Sequence[Mapping[str, np.ndarray]],
    num_examples: Sequence[float],
) -> OrderedDict[str, np.ndarray]:
    """FedAvg on deltas: global + example-weighted mean delta (= weighted mean of local models)."""
    return add_update(global_state, weighted_mean(deltas, num_examples))


def robust_aggregate(
    updates: Sequence[Mapping[str, np.ndarray]], method: str, trim_fraction: float = 0.1
) -> OrderedDict[str, np.ndarray]:
    """Coordinate-wise ``median`` or ``trimmed-mean`` of the sites' updates (unweighted, as in
    Yin et al. 2018: a site cannot buy influence by claiming many examples). The trimmed mean
    drops ``floor(trim_fraction * n)`` values at each end of every coordinate."""
    if not updates:
        raise ValueError("robust_aggregate: no updates")
    n = len(updates)
    cut = int(math.floor(trim_fraction * n))
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for k in updates[0]:
        stack = np.stack([u[k].astype(np.float64) for u in updates])
        if method == "median":
            agg = np.median(stack, axis=0)
        elif method == "trimmed-mean":
            agg = np.sort(stack, axis=0)[cut : n - cut].mean(axis=0)
        else:
            raise ValueError(f"robust_aggregate: unknown method {method!r}")
        out[k] = agg.astype(WIRE_DTYPE)
    return out


# fedavg and fedprox add the sum of the round's updates ('sites': the mean times the number of
# sites combined): measured against pooled training at equal compute in benchmarks/README.md
# ("Learning speed"), the plain mean (1.0) reached a third to a half of pooling's gain on distinct
# domains. fedavgm keeps 1.0: its momentum already lengthens the step.
DEFAULT_SERVER_LR = {
    "fedavg": "sites",
    "fedprox": "sites",
    "fedavgm": 1.0,
    "fedadam": 1e-3,
    "fedyogi": 1e-3,
    "fedadagrad": 1e-3,
}


class ServerOptimizer:
    """What the server does with the round's mean update Δ (Reddi et al. 2021, "Adaptive
    Federated Optimization"), per coordinate, with server learning rate η:

    - fedavg:     x += η Δ
    - fedavgm:    v = μ v + Δ;  x += η v
    - fedadam:    m = β1 m + (1-β1) Δ;  v = β2 v + (1-β2) Δ²;  x += η_t m / (√v + τ)
    - fedyogi:    as fedadam, but v -= (1-β2) Δ² sign(v - Δ²)
    - fedadagrad: as fedadam, but v += Δ²

    η_t = η √(1-β2^t) / (1-β1^t) for fedadam and fedyogi (bias correction, as Flower's). The
    state (m, v, t) goes into every checkpoint, so a resumed run continues it exactly.
    """

    def __init__(
        self,
        strategy: str,
        lr: float | Literal["sites"] | None = None,
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-6,
    ):
        if strategy not in DEFAULT_SERVER_LR:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(DEFAULT_SERVER_LR)}")
        self.strategy = strategy
        if lr == "sites" and strategy not in SUMMING_STRATEGIES:
            raise ValueError(f"server lr 'sites' is for {', '.join(SUMMING_STRATEGIES)}, not {strategy}")
        self.lr = DEFAULT_SERVER_LR[strategy] if lr is None else lr
        self.momentum, self.beta1, self.beta2, self.tau = momentum, beta1, beta2, tau
        self.t = 0
        self.m: OrderedDict[str, np.ndarray] = OrderedDict()
        self.v: OrderedDict[str, np.ndarray] = OrderedDict()

    @classmethod
    def from_config(cls, fed) -> "ServerOptimizer":
        return cls(fed.strategy, fed.server_lr, fed.server_momentum, fed.server_beta1, fed.server_beta2, fed.server_tau)

    def round_lr(self, n_sites: int = 1) -> float:
        """η for a round that combined ``n_sites`` updates (server lr 'sites': that number)."""
        return float(max(n_sites, 1)) if self.lr == "sites" else float(self.lr)

    def step(
        self, global_state: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], n_sites: int = 1
    ) -> OrderedDict[str, np.ndarray]:
        """The new global state; ``delta`` may cover only the tensors that trained this round, the
        mean of ``n_sites`` sites' updates."""
        self.t += 1
        s = self.strategy
        eta = self.round_lr(n_sites)
        out: OrderedDict[str, np.ndarray] = OrderedDict()
        for k, x in global_state.items():
            if k not in delta:  # frozen this round (layer-wise control): untouched, moments kept
                out[k] = x
                continue
            d = delta[k].astype(np.float64)
            if s in ("fedavg", "fedprox"):  # FedProx differs at the sites (the proximal term), not here
                step = eta * d
            elif s == "fedavgm":
                v = self.v[k] = self.momentum * self.v.get(k, 0.0) + d
                step = eta * v
            else:
                m = self.m[k] = self.beta1 * self.m.get(k, 0.0) + (1 - self.beta1) * d
                v_old = self.v.get(k, np.zeros_like(d))
                d2 = d * d
                if s == "fedadam":
                    v = self.beta2 * v_old + (1 - self.beta2) * d2
                elif s == "fedyogi":
                    v = v_old - (1 - self.beta2) * d2 * np.sign(v_old - d2)
                else:  # fedadagrad
                    v = v_old + d2
                self.v[k] = v
                lr = eta
                if s in ("fedadam", "fedyogi"):
                    lr *= math.sqrt(1 - self.beta2**self.t) / (1 - self.beta1**self.t)
                step = lr * m / (np.sqrt(v) + self.tau)
            out[k] = (x.astype(np.float64) + step).astype(WIRE_DTYPE)
        return out

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """-> (JSON-able scalars, arrays by name) for a checkpoint; empty arrays for fedavg."""
        arrays = {f"m/{k}": v for k, v in self.m.items()} | {f"v/{k}": v for k, v in self.v.items()}
        return {"strategy": self.strategy, "t": self.t}, arrays

    def restore(self, doc: dict, arrays: Mapping[str, np.ndarray]) -> None:
        if doc.get("strategy", self.strategy) != self.strategy:
            raise ValueError(
                f"the checkpoint's server optimizer is {doc.get('strategy')!r}, this run's is {self.strategy!r}"
            )
        self.t = int(doc.get("t", 0))
        self.m = OrderedDict((k[2:], np.asarray(v, dtype=np.float64)) for k, v in arrays.items() if k.startswith("m/"))
        self.v = OrderedDict((k[2:], np.asarray(v, dtype=np.float64)) for k, v in arrays.items() if k.startswith("v/"))


def lora_product_error(
    global_state: Mapping[str, np.ndarray],
    deltas: Sequence[Mapping[str, np.ndarray]],
    ranks: Sequence[int],
    weights: Sequence[float],
    mean_delta: Mapping[str, np.ndarray],
    pairs: Sequence[tuple[str, str]],
) -> dict[str, float]:
    """How far the aggregated adapter's product B·A is from the weighted mean of the sites' own
    products B_i·A_i (each at its own rank r_i), summed over every LoRA layer (Frobenius):

    - ``aggregation_error``: || B̄·Ā − Σ p_i B_i·A_i ||, with B̄ = B + mean ΔB and Ā = A + mean ΔA
      (what averaging A and B separately, zero-padded for mixed ranks, yields);
    - ``aggregation_error_rel``: that over || Σ p_i B_i·A_i − B·A ||, the size of the change the
      sites made together (0 for FFA-LoRA, where A is shared and frozen).

    ``deltas`` are the sites' updates padded to the global shapes; a tensor an update lacks did
    not train (e.g. A under FFA-LoRA)."""
    total = float(sum(weights))
    err2 = ref2 = 0.0
    for a_key, b_key in pairs:
        a0 = global_state[a_key].astype(np.float64)
        b0 = global_state[b_key].astype(np.float64)
        mean_prod = np.zeros((b0.shape[0], a0.shape[1]))
        for d, r, w in zip(deltas, ranks, weights):
            a = a0[:r] + d[a_key][:r] if a_key in d else a0[:r]
            b = b0[:, :r] + d[b_key][:, :r] if b_key in d else b0[:, :r]
            mean_prod += (w / total) * (b @ a)
        a_bar = a0 + mean_delta[a_key] if a_key in mean_delta else a0
        b_bar = b0 + mean_delta[b_key] if b_key in mean_delta else b0
        err2 += float(np.sum(np.square(b_bar @ a_bar - mean_prod)))
        ref2 += float(np.sum(np.square(mean_prod - b0 @ a0)))
    err = math.sqrt(err2)
    return {"aggregation_error": err, "aggregation_error_rel": err / math.sqrt(ref2) if ref2 > 0 else 0.0}


def noised_mean(
    mean: Mapping[str, np.ndarray], n: int, std: float, rng: np.random.Generator
) -> OrderedDict[str, np.ndarray]:
    """The mean of ``n`` clipped updates as if N(0, std^2) had been added to their sum:
    mean + N(0, std^2) / n per value (the coordinator's Gaussian mechanism, central DP)."""
    return OrderedDict(
        (k, (v.astype(np.float64) + rng.normal(0.0, std, size=v.shape) / n).astype(WIRE_DTYPE)) for k, v in mean.items()
    )


def site_alignment(
    updates: Sequence[Mapping[str, np.ndarray]], aggregate: Mapping[str, np.ndarray], layer_of=None
) -> list[dict]:
    """Each site's update norm and its cosine similarity to the aggregate (which way it pulled:
    1 along the mean, 0 across it, below 0 against it); cosine None when either norm is 0.
    With ``layer_of`` (key -> layer label) also ``by_layer``: the same two per layer."""

    def cosine(dot: float, uu: float, aa: float) -> float | None:
        return dot / math.sqrt(uu * aa) if uu > 0 and aa > 0 else None

    label = {k: str(layer_of(k)) if layer_of else "" for k in aggregate}
    agg = {k: aggregate[k].astype(np.float64).ravel() for k in aggregate}
    aa: dict[str, float] = {}
    for k, a in agg.items():
        aa[label[k]] = aa.get(label[k], 0.0) + float(np.dot(a, a))
    out = []
    for u in updates:
        dot: dict[str, float] = {}
        uu: dict[str, float] = {}
        for k, a in agg.items():
            v = u[k].astype(np.float64).ravel()
            dot[label[k]] = dot.get(label[k], 0.0) + float(np.dot(v, a))
            uu[label[k]] = uu.get(label[k], 0.0) + float(np.dot(v, v))
        site = {
            "update_norm": math.sqrt(sum(uu.values())),
            "cosine_to_aggregate": cosine(sum(dot.values()), sum(uu.values()), sum(aa.values())),
        }
        if layer_of is not None:
            site["by_layer"] = {
                g: {"update_norm": math.sqrt(uu[g]), "cosine_to_aggregate": cosine(dot[g], uu[g], aa[g])}
                for g in sorted(uu, key=int)
            }
        out.append(site)
    return out


def change_by_layer(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray], layer_of) -> dict[str, float]:
    """L2 norm of the global adapter's change, per layer (``layer_of(key)`` -> a layer label)."""
    sq: dict[str, float] = {}
    for k, a in after.items():
        d = a.astype(np.float64) - before[k].astype(np.float64)
        label = str(layer_of(k))
        sq[label] = sq.get(label, 0.0) + float(np.sum(d * d))
    return {k: math.sqrt(v) for k, v in sorted(sq.items(), key=lambda kv: int(kv[0]))}
