"""Update-norm bounding and client-level differential privacy (DP-FedAvg, McMahan et al. 2018).

Each site clips its whole update (every tensor that trained, as one vector) to L2 norm ``C``
before it leaves. With differential privacy on (``privacy.epsilon``), Gaussian noise of standard
deviation ``sigma * C`` is added to the *sum* of the clipped updates, so that adding or removing
any one site moves the released sum by at most ``C`` and is hidden by the noise:

- without secure aggregation the coordinator adds it (it sees the clipped updates: it is trusted);
- with secure aggregation every site adds ``N(0, (sigma C)^2 / m)`` to its own update before
  masking, where ``m`` is the fewest sites a round can sum (:func:`min_summed`); the coordinator
  only ever sees a sum that carries at least ``(sigma C)^2`` of noise, never an unnoised one.

Under DP every site weighs the same (1): with example-count weights one site's influence would
depend on the count it claims. The mean is the noised sum divided by the sites summed (as
Flower's DifferentialPrivacy*FixedClipping wrappers do); the number of sites taking part is
treated as public.

The accountant is the Renyi-DP accountant of Google's ``dp-accounting`` library: each round is
a Gaussian mechanism with noise multiplier ``sigma``, Poisson-subsampled with rate ``q`` when
only some sites train (``federation.sites_per_round``: each site then takes part with
probability ``q`` independently). It reports the cumulative (epsilon, delta) after every round;
its state is the list of rounds it composed, saved in every checkpoint.

A checkpoint is written after the round's adapter exists, so a crash between the two would
lose the round's charge while its noised adapter was already out. The coordinator therefore
also appends every charge to ``privacy-ledger.jsonl`` (one fsynced line) before the adapter is
written or sent, and a resumed run continues from whichever of the ledger and the checkpoint
has spent more (:func:`ledger_accountant`).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Integer Renyi orders: for these the RDP of the subsampled Gaussian has a closed form (a
# binomial sum, Mironov et al. 2019), so a test can check the library's figure independently.
ORDERS = tuple(range(2, 257))


def l2(state: Mapping[str, object]) -> float:
    """The L2 norm of all tensors together, in float64 (numpy arrays or torch tensors); NaN when
    any value is not finite."""
    total = 0.0
    for v in state.values():
        a = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, dtype=np.float64)
        total += float(np.sum(a * a))
    return math.sqrt(total) if math.isfinite(total) else float("nan")


class NonFiniteUpdate(ValueError):
    """An update with NaN or Inf: never clipped, zeroed or sent; the round goes on without it."""


@dataclass
class Clipped:
    update: OrderedDict  # same keys and types as the input
    norm: float  # the norm before clipping
    clipped: bool  # scaled down to the bound
    nonfinite: bool = False  # kept for readers of old metrics: a non-finite update now raises NonFiniteUpdate


def clip_update(update: Mapping[str, object], bound: float) -> Clipped:
    """``update`` scaled to L2 norm at most ``bound``. A zero update stays zero (no division).
    An update with NaN or Inf raises :class:`NonFiniteUpdate`: zeroing it (as this once did)
    sent a diverged site's zeros into the mean at full weight, pulling the global toward no change."""
    if not (bound > 0 and math.isfinite(bound)):
        raise ValueError(f"clip bound {bound}: expected a positive finite number")
    norm = l2(update)
    if not math.isfinite(norm):
        raise nonfinite(update)
    if norm <= bound:
        return Clipped(OrderedDict(update), norm, False, False)
    scale = bound / norm * (1 - 1e-6)  # a hair inside, so float32 rounding never lands above the bound
    return Clipped(OrderedDict((k, v * scale) for k, v in update.items()), norm, True, False)


def nonfinite(update: Mapping[str, object]) -> NonFiniteUpdate:
    """The error for an update with NaN/Inf, counting them."""
    bad = sum(
        int(np.sum(~np.isfinite(np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v))))
        for v in update.values()
    )
    return NonFiniteUpdate(f"the update is not finite ({bad} NaN/Inf value(s)): the local training diverged; not sent")


def gaussian_noise_like(update: Mapping[str, object], std: float) -> OrderedDict:
    """Fresh N(0, std^2) per value, from the operating system's randomness (unpredictable to
    anyone else, never seeded from the run's seed), shaped and typed like ``update``."""
    rng = np.random.default_rng(secrets.randbits(128))
    out = OrderedDict()
    for k, v in update.items():
        z = rng.normal(0.0, std, size=tuple(v.shape))
        if hasattr(v, "detach"):
            import torch

            out[k] = torch.from_numpy(z).to(v.dtype)
        else:
            out[k] = z.astype(v.dtype)
    return out


def add(a: Mapping[str, object], b: Mapping[str, object]) -> OrderedDict:
    return OrderedDict((k, a[k] + b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# The accountant


def _dpa():
    try:
        import dp_accounting
        from dp_accounting import rdp
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise RuntimeError("differential privacy needs the dp-accounting package (pip install dp-accounting)") from e
    return dp_accounting, rdp


def _event(q: float, sigma: float, rounds: int):
    dpa, _ = _dpa()
    ev = dpa.GaussianDpEvent(sigma) if q >= 1.0 else dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))
    return dpa.SelfComposedDpEvent(ev, rounds)


def epsilon_of(history: list[tuple[float, float, int]], delta: float) -> float:
    """Cumulative epsilon at ``delta`` after the rounds in ``history`` ([(q, sigma, rounds)])."""
    if not history:
        return 0.0
    _, rdp = _dpa()
    acc = rdp.RdpAccountant(orders=list(ORDERS))
    for q, sigma, n in history:
        acc.compose(_event(q, sigma, n))
    return float(acc.get_epsilon(delta))


def calibrate_noise(epsilon: float, delta: float, rounds: int, q: float = 1.0) -> float:
    """The smallest noise multiplier (to 0.1%) whose ``rounds`` rounds spend at most ``epsilon``."""
    if epsilon <= 0 or not 0 < delta < 1 or rounds < 1 or not 0 < q <= 1:
        raise ValueError(f"calibrate_noise: epsilon {epsilon}, delta {delta}, rounds {rounds}, q {q}")
    lo, hi = 1e-2, 1.0
    while epsilon_of([(q, hi, rounds)], delta) > epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {epsilon} in {rounds} rounds")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if epsilon_of([(q, mid, rounds)], delta) > epsilon:
            lo = mid
        else:
            hi = mid
    return hi


@dataclass
class Accountant:
    """The rounds composed so far; ``epsilon`` is recomputed from them (exact, and cheap)."""

    delta: float
    history: list = field(default_factory=list)  # [[q, sigma, rounds], ...], consecutive equal rounds merged

    def epsilon(self, then: tuple[float, float] | None = None) -> float:
        """Spent so far; with ``then=(q, sigma)``: what it would be after one more such round."""
        hist = [tuple(h) for h in self.history] + ([(then[0], then[1], 1)] if then else [])
        return epsilon_of(hist, self.delta)

    def spend(self, q: float, sigma: float) -> None:
        if self.history and self.history[-1][0] == q and self.history[-1][1] == sigma:
            self.history[-1][2] += 1
        else:
            self.history.append([q, sigma, 1])

    @property
    def rounds(self) -> int:
        return sum(int(h[2]) for h in self.history)

    def state(self) -> dict:
        return {"delta": self.delta, "history": [list(h) for h in self.history]}

    @classmethod
    def restore(cls, doc: dict) -> "Accountant":
        return cls(float(doc["delta"]), [[float(q), float(s), int(n)] for q, s, n in doc["history"]])


# ---------------------------------------------------------------------------------------------
# The ledger: every charge on disk before the adapter it pays for leaves the coordinator

LEDGER = "privacy-ledger.jsonl"


def ledger_append(path: str | Path, entry: dict) -> None:
    """Append one JSON line to the ledger and fsync it (and, when the file is new, its folder)
    before returning: the coordinator calls this before it writes or sends the adapter that the
    entry's round released, so a crash at any later point leaves the charge on disk."""
    path = Path(path)
    new = not path.exists()
    line = (json.dumps(entry, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        if os.fstat(fd).st_size and not _ends_with_newline(fd):
            line = b"\n" + line  # a torn line (a crash mid-write) stays apart from this one
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _ends_with_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return os.pread(fd, 1, size - 1) == b"\n"


def ledger_start(path: str | Path, delta: float) -> None:
    """A fresh run's first line: the charges that follow are this run's (earlier runs' lines stay, for the record)."""
    ledger_append(path, {"event": "start", "delta": delta, "time": round(time.time(), 3)})


def ledger_charge(path: str | Path, rnd: int, q: float, sigma: float, epsilon: float, released: bool) -> None:
    """Round ``rnd`` composed into the accountant (a Gaussian release with sampling rate ``q`` and
    noise multiplier ``sigma``; ``released`` False: a skipped round, charged all the same)."""
    ledger_append(
        path,
        {
            "event": "charge",
            "round": rnd,
            "q": q,
            "sigma": sigma,
            "epsilon": epsilon,
            "released": released,
            "time": round(time.time(), 3),
        },
    )


def ledger_accountant(path: str | Path, delta: float) -> Accountant | None:
    """The accountant the ledger's charges since the run's last start add up to; None without a
    ledger. A line that does not parse (torn by a crash while it was written, before the release
    it would have paid for) is skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    acc = Accountant(delta)
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            if entry.get("event") == "start":
                acc = Accountant(delta)
            elif entry.get("event") == "charge":
                q, sigma = float(entry["q"]), float(entry["sigma"])
                if 0 < q <= 1 and sigma > 0:
                    acc.spend(q, sigma)
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return acc


# ---------------------------------------------------------------------------------------------
# What a run's config implies (the coordinator and every site compute the same from it)


def sampling_rate(cfg, n_sites: int) -> float:
    k = cfg.federation.sites_per_round
    return 1.0 if k is None or k >= n_sites else k / n_sites


def min_summed(cfg, n_sites: int) -> int:
    """The fewest sites whose updates a secure round can sum, drawn from ``n_sites``: what each
    site's share of the noise is sized for (more sites summed only add noise). A secure round
    aborts with fewer than max(threshold, min_sites, 2) left (fedtune.server.secure); the default
    threshold is a majority of the sites invited, known here only when every site is invited."""
    from fedtune.common.secagg import round_threshold

    sa = cfg.secure_aggregation
    m = max(cfg.federation.min_sites, 2)
    if sa.threshold is None and sampling_rate(cfg, n_sites) < 1.0:
        return m
    return max(m, round_threshold(sa.threshold, sa.neighbours, n_sites)[1])


_CALIBRATED: dict = {}


def noise_multiplier(cfg, n_sites: int) -> float:
    """privacy.noise_multiplier, or the one that spends privacy.epsilon in federation.rounds rounds."""
    p = cfg.privacy
    if p.noise_multiplier is not None:
        return p.noise_multiplier
    key = (p.epsilon, p.delta, cfg.federation.rounds, sampling_rate(cfg, n_sites))
    if key not in _CALIBRATED:
        _CALIBRATED[key] = calibrate_noise(p.epsilon, p.delta, cfg.federation.rounds, key[3])
    return _CALIBRATED[key]


def site_noise_std(cfg, n_sites: int) -> float:
    """Under secure aggregation: the noise each site adds to its clipped update, so that any
    ``min_summed`` of them carry at least (sigma C)^2 together."""
    return noise_multiplier(cfg, n_sites) * cfg.privacy.clip / math.sqrt(min_summed(cfg, n_sites))


def quantizer_clip(cfg, n_sites: int) -> float:
    """Under DP with secure aggregation: the per-value range the quantizer must cover, the
    clipped update (each value at most C) plus 7 standard deviations of the site's noise, so
    that the noise is practically never clipped (which would change its distribution)."""
    return cfg.privacy.clip + 7.0 * site_noise_std(cfg, n_sites)


def bound_of(cfg, n_values: int) -> float | None:
    """The L2 bound on an update of ``n_values`` values: privacy.clip under DP, else
    federation.update_norm_bound as resolved by ``cfg.norm_bound`` ('auto' depends on the size)."""
    return cfg.privacy.clip if cfg.privacy.enabled else cfg.norm_bound(n_values)


def site_release(cfg, update: Mapping[str, object], secure: bool, n_sites: int) -> tuple[OrderedDict, dict]:
    """What a site does to its update before it leaves: clip it to the bound, and under DP with
    secure aggregation add its share of the noise. -> (update, metrics). Under DP no metric
    depends on the update (its norm, or whether it was clipped, would reveal something of the
    data that the noise does not cover)."""
    bound = bound_of(cfg, sum(int(np.prod(tuple(v.shape))) for v in update.values()))
    if bound is None:
        if not math.isfinite(l2(update)):  # a NaN update never leaves, bound or not
            raise nonfinite(update)
        return OrderedDict(update), {}
    c = clip_update(update, bound)
    out = c.update
    if cfg.privacy.enabled:
        if secure:
            out = add(out, gaussian_noise_like(out, site_noise_std(cfg, n_sites)))
        return out, {}
    return out, {"update-clipped": int(c.clipped), "update-norm": c.norm}
