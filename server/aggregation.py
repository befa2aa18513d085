"""Update validation and aggregation maths: plain functions over numpy arrays.

Flower's own FedAvg accepts NaN/Inf, negative or huge example counts and mismatched
shapes (it broadcasts), so every update is checked here before it is averaged.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

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


def weighted_mean(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> OrderedDict[str, np.ndarray]:
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
        self.count += 1

    def result(self) -> OrderedDict[str, np.ndarray]:
        if self._acc is None:
            raise ValueError("RunningMean.result: no updates")
        return OrderedDict((k, (v / self.total_weight).astype(WIRE_DTYPE)) for k, v in self._acc.items())


def add_update(global_state: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, (global_state[k].astype(np.float64) + update[k]).astype(WIRE_DTYPE)) for k in global_state)


def l2_norm(state: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in state.values())))


def fedavg_step(
    global_state: Mapping[str, np.ndarray],
    deltas: Sequence[Mapping[str, np.ndarray]],
    num_examples: Sequence[float],
) -> OrderedDict[str, np.ndarray]:
    """FedAvg on deltas: global + example-weighted mean delta (= weighted mean of local models)."""
    return add_update(global_state, weighted_mean(deltas, num_examples))
