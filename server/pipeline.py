"""What happens to one site's plain update between its decoding and the round's mean, as plain
functions over plain data, each testable alone:

    SiteUpdate (decoded arrays, claimed examples)
      -> pad_rank   a lower-rank LoRA update gets zero rows/columns up to the global rank (HetLoRA)
      -> validate   keys, shapes, finite values, the example count (the round's spec)
      -> clip       to the update-norm bound, when one is set (the sites clip; one that did not is clipped here)
      -> fold       into the round's accumulator: the example-weighted (capped) mean, or kept for a robust aggregator

Padding comes before validation because validation checks the update against the global
adapter's shapes; :func:`fedtune.common.methods.rank_of` checks a lower rank's own shapes first.
A step that finds the update unusable raises :class:`Rejected` with the problems; the caller
records the site as rejected. :func:`prepare` runs the first three in order.

Under secure aggregation none of this sees an update: the sites' vectors stay masked, and
:mod:`fedtune.server.secure` checks and sums them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from fedtune.common import methods, privacy

from .aggregation import CappedMean, RunningMean, robust_aggregate, validate_update


class Rejected(Exception):
    """The update cannot be used; ``problems``: why, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class SiteUpdate:
    site: str
    arrays: dict  # name -> ndarray, as decoded
    examples: object  # the site's claimed example count, as it sent it (validated by validate)
    rank: int | None = None  # a LoRA update's rank (mixed-rank methods), once pad_rank has read it
    clipped_by_coordinator: bool | None = None  # None: no bound, so clip did nothing


def pad_rank(u: SiteUpdate, spec: dict, method: str | None) -> SiteUpdate:
    """``method``: the fine-tuning method when it has mixed ranks (the registry's ``mixed_ranks``),
    else None. Read the update's rank along the method's rank axes and zero-pad a lower one to the
    global rank; an update whose shapes are no rank of the spec, or ``method`` None: unchanged
    (validate then refuses shapes that are not the spec's)."""
    rank = methods.rank_of(u.arrays, spec, method) if method is not None else None
    if rank is None:
        return u
    return replace(u, arrays=methods.pad_rank(u.arrays, spec, method), rank=rank)


def validate(u: SiteUpdate, spec: dict, max_examples: int) -> SiteUpdate:
    """The update matches ``spec`` exactly, is finite, and claims a usable example count; else Rejected."""
    problems = validate_update(u.arrays, spec, u.examples, max_examples)
    if problems:
        raise Rejected(problems)
    return u


def clip(u: SiteUpdate, bound: float | None) -> SiteUpdate:
    """Scaled down to L2 norm ``bound`` when it is above it (None: no bound, unchanged)."""
    if bound is None:
        return u
    c = privacy.clip_update(u.arrays, bound)
    return replace(u, arrays=c.update, clipped_by_coordinator=bool(c.norm > bound * (1 + 1e-4)))


def prepare(u: SiteUpdate, spec: dict, rank_method: str | None, max_examples: int, bound: float | None) -> SiteUpdate:
    """pad_rank -> validate -> clip. Raises Rejected, or ValueError/KeyError/TypeError from a
    malformed update (the caller treats both as a rejection)."""
    return clip(validate(pad_rank(u, spec, rank_method), spec, max_examples), bound)


@dataclass
class Fold:
    """A round's accumulator. ``aggregator`` 'mean': every update is added to the weighted mean as
    it arrives and dropped (each weighs 1 when ``equal``; else its example count, capped at
    ``cap`` x the round's median count once all are in); a robust aggregator keeps them all.
    ``keep_updates``: also keep each (site, update, rank) for the round's per-site measures."""

    aggregator: str = "mean"
    equal: bool = False
    cap: float | None = None
    keep_updates: bool = False
    default_rank: int | None = None  # the rank a measured update of a method without ranks is given
    mean: RunningMean | CappedMean | None = None
    weighed: list = field(default_factory=list)  # the sites in the mean, in the order they were added
    kept: list = field(default_factory=list)  # robust aggregators: every update
    measured: list = field(default_factory=list)  # (site, update, rank), in the order they were added

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = RunningMean() if self.cap is None else CappedMean(self.cap)

    @property
    def count(self) -> int:
        return self.mean.count + len(self.kept)

    def weights(self) -> dict[str, float]:
        """The weight each site in the mean got (after the cap); empty for a robust aggregator."""
        return dict(zip(self.weighed, self.mean.weights())) if self.aggregator == "mean" else {}

    def result(self, trim_fraction: float) -> dict[str, np.ndarray]:
        if self.aggregator == "mean":
            return self.mean.result()
        return robust_aggregate(self.kept, self.aggregator, trim_fraction)


def fold(acc: Fold, u: SiteUpdate) -> Fold:
    """``u`` folded into ``acc`` (which is returned, changed)."""
    if acc.aggregator == "mean":
        acc.mean.add(u.arrays, 1.0 if acc.equal else float(u.examples))
        acc.weighed.append(u.site)
        if acc.keep_updates:
            acc.measured.append((u.site, u.arrays, u.rank or acc.default_rank))
    else:
        acc.kept.append(u.arrays)
    return acc
