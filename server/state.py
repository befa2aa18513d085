"""The coordinator's run state, in three parts a round touches separately.

- :class:`GlobalModel`: the global adapter (or full weights), the method's facts about it (which
  tensors train, the layer count) and the server optimizer with its moments. A round's aggregate
  step reads and replaces it; its checkpoint saves it.
- :class:`History`: what has happened: the round records (metrics.json's ``rounds``), when the run
  started, why it stopped, the general-knowledge scores. The best round and the progress bar are
  read from it.
- :class:`RunState`: the run: its config and output folder, the two parts above, and what the
  coordinator keeps between rounds (its RNG, the DP accountant, the sites' names and keys, the
  TensorBoard writer). Its old flat attributes (``rs.global_state``, ``rs.rounds``, ``rs.stopped``
  ...) still read and write through to the parts, so callers that predate the split keep working.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedtune.common import methods, privacy, progress
from fedtune.common.config import FedTuneConfig

from .aggregation import ServerOptimizer
from .messaging import FederationError, SiteNames


def num(x) -> float | None:
    """A finite number as float, else None (what a site's metric or a record's value may be)."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(float(x)) else None


def best_round(rounds: list[dict], metric: str, min_delta: float = 0.0) -> tuple[int | None, float | None, int]:
    """The round whose federated validation ``metric`` (its ``aggregate``: the sites'
    example-weighted mean) is best: lowest ``eval_loss``, highest ``exact_match``; round 0, the
    base model, included. A round beats the best so far only by more than ``min_delta``.
    -> (best round, its value, rounds since it); (None, None, 0) before any round has the metric.
    A round without the metric (skipped, or no site evaluated) counts as not improving."""
    sign = -1.0 if metric == "exact_match" else 1.0
    best, value, since = None, None, 0
    for r in rounds:
        v = num((r.get("aggregate") or {}).get(metric))
        if v is not None and (value is None or sign * v < sign * value - min_delta):
            best, value, since = int(r["round"]), v, 0
        elif best is not None:
            since += 1
    return best, value, since


@dataclass
class GlobalModel:
    state: OrderedDict  # name -> float32 ndarray
    peft_config: object  # the peft config of the adapter; None for full fine-tuning
    trainable_params: int  # parameters the method can train (the most a round's update carries)
    # State keys the method trains (e.g. VeRA's shared projections are in the state but never train),
    # and the model's layer count: together with cfg.layers they give each round's trainable set.
    trainable_keys: list = field(default_factory=list)
    n_layers: int = 0
    # The server optimizer (federation.strategy) and its moments, checkpointed every round.
    optimizer: ServerOptimizer = field(default_factory=lambda: ServerOptimizer("fedavg"))

    def round_keys(self, cfg: FedTuneConfig, rnd: int) -> list[str]:
        """The tensors that train in round ``rnd`` (layer-wise control), in state order."""
        keys = self.trainable_keys or list(self.state)
        chosen = methods.round_keys(keys, self.n_layers, cfg.layers, rnd) if cfg.layers.active else keys
        if not chosen:
            raise FederationError(
                f"round {rnd}: the layers section leaves nothing to train: {cfg.peft.method} has tensors in layers "
                f"{sorted({methods.position(k, self.n_layers) for k in keys})} (-1: embeddings, {self.n_layers}: above the top layer)"
            )
        return chosen

    def layer_of(self, key: str) -> int:
        """The layer a state tensor belongs to (-1: embeddings, n_layers: above the top layer)."""
        return methods.position(key, self.n_layers)

    def step(self, rnd: int, update: dict, n_sites: int = 1) -> OrderedDict:
        """The server optimizer's step with the round's mean update (of ``n_sites`` sites) -> the new global state, refused
        (FederationError; the global and the optimizer's moments stay at round ``rnd - 1``) when any
        value of it is not finite: clipped, finite updates can still overflow float32 over rounds.
        Does not replace :attr:`state`: the caller does, once the round's record is built."""
        opt = self.optimizer
        saved = (opt.t, OrderedDict(opt.m), OrderedDict(opt.v))
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught just below
            new = opt.step(self.state, update, n_sites)
        bad = [k for k, v in new.items() if not np.isfinite(v).all()]
        if bad:
            opt.t, opt.m, opt.v = saved
            raise FederationError(
                f"round {rnd}: the new global adapter is not finite ({len(bad)} tensor(s), e.g. {bad[0]}); refused. "
                f"The global adapter stays at round {rnd - 1}; check the sites' updates (federation.update_norm_bound) and resume."
            )
        return new


@dataclass
class History:
    rounds: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    stopped: str | None = None  # why the run stopped before its last round
    finished_s: float | None = None  # the run's wall time when it finished (metrics.json's elapsed_s from then on)
    forgetting: dict = field(default_factory=dict)  # general knowledge: {"base": ..., "final": ...}
    first_round: int = 1  # where this process started training (after a resume, later)
    first_round_at: float | None = None

    def best(self, ev) -> dict | None:
        """The best round by ``ev`` (the eval section: select_metric, min_delta), or None."""
        rnd, value, since = best_round(self.rounds, ev.select_metric, ev.min_delta)
        return (
            None if rnd is None else {"round": rnd, "metric": ev.select_metric, "value": value, "rounds_since": since}
        )

    def progress(self, last_round: int, rnd: int, done: int, of: int) -> str:
        """A bar over the run's training rounds (up to ``last_round``) with an ETA, ``done`` of ``of``
        sites into round ``rnd``: the time per round so far (training and evaluation) times what is left."""
        if self.first_round_at is None:
            return ""
        total = last_round - self.first_round + 1
        return progress.bar((rnd - self.first_round + done / max(of, 1)) / total, time.time() - self.first_round_at)


def _through(part: str, name: str) -> property:
    """A RunState attribute that reads and writes ``self.<part>.<name>``."""
    return property(
        lambda self: getattr(getattr(self, part), name),
        lambda self, value: setattr(getattr(self, part), name, value),
        doc=f"{part}.{name}",
    )


class RunState:
    """One run of the coordinator (see the module docstring for its parts)."""

    def __init__(
        self,
        cfg: FedTuneConfig,
        out: Path,
        global_state: OrderedDict,
        peft_config: object,
        trainable_params: int,
        trainable_keys: list | None = None,
        n_layers: int = 0,
        rng: np.random.Generator | None = None,
        optimizer: ServerOptimizer | None = None,
        accountant: privacy.Accountant | None = None,
        site_keys: object = None,
    ) -> None:
        self.cfg, self.out = cfg, out
        self.model = GlobalModel(
            global_state, peft_config, trainable_params, list(trainable_keys or []), n_layers,
            optimizer or ServerOptimizer.from_config(cfg.federation),
        )  # fmt: skip
        self.history = History()
        # The coordinator's own randomness (which sites train when sites_per_round is set); its
        # state is checkpointed with every round so a resumed run draws what the original would have.
        self.rng = rng if rng is not None else np.random.default_rng(0)
        # Differential privacy: the rounds composed so far (checkpointed).
        self.accountant = accountant
        # Flower node id -> the site name it reported, so a site that later fails is still named.
        self.node_names: dict = SiteNames()
        # ftsim plays every site, so it can say why one sent nothing from that site's own files
        # ((name, status) -> the reason, or None); a deployment's coordinator has only the status.
        self.explain_site: Callable[[str, str], str | None] | None = None
        self.events = None  # output.tensorboard: an events.EventWriter
        # Secure aggregation: the registered sites' identity keys (SEC1 P-384; a KeyFolder), if known.
        self.site_keys = site_keys

    global_state = _through("model", "state")
    peft_config = _through("model", "peft_config")
    trainable_params = _through("model", "trainable_params")
    trainable_keys = _through("model", "trainable_keys")
    n_layers = _through("model", "n_layers")
    optimizer = _through("model", "optimizer")
    rounds = _through("history", "rounds")
    started = _through("history", "started")
    stopped = _through("history", "stopped")
    forgetting = _through("history", "forgetting")
    first_round = _through("history", "first_round")
    first_round_at = _through("history", "first_round_at")

    def round_keys(self, rnd: int) -> list[str]:
        return self.model.round_keys(self.cfg, rnd)

    def layer_of(self, key: str) -> int:
        return self.model.layer_of(key)

    def progress(self, rnd: int, done: int, of: int) -> str:
        return self.history.progress(self.cfg.federation.rounds, rnd, done, of)

    def best(self) -> dict | None:
        return self.history.best(self.cfg.eval)

    def server_state(self, rnd: int) -> dict:
        """What a round's checkpoint keeps of the coordinator beside the global state."""
        return {
            "round": rnd,
            "strategy": self.cfg.federation.strategy,
            "rng": self.rng.bit_generator.state,
            "optimizer": self.optimizer.state()[0],
            **({"privacy": self.accountant.state()} if self.accountant is not None else {}),
        }

    def restore_server_state(self, doc: dict, optimizer_arrays: dict | None = None) -> None:
        self.rng.bit_generator.state = doc["rng"]
        self.optimizer.restore(doc.get("optimizer") or {}, optimizer_arrays or {})
        if self.accountant is not None:
            if "privacy" not in doc:
                raise ValueError(
                    "the run had no privacy accountant; differential privacy cannot be turned on in the middle of a run"
                )
            self.accountant = privacy.Accountant.restore(doc["privacy"])

    def metrics_doc(self) -> dict:
        """metrics.json's content."""
        cfg, h = self.cfg, self.history
        return {
            "fedtune": {
                "peft": cfg.peft.method,
                "artifact": methods.get(cfg.peft.method).artifact,
                "strategy": cfg.federation.strategy,
                "aggregator": cfg.federation.aggregator,
                "secure_aggregation": bool(cfg.secure_aggregation.enabled),
                "differential_privacy": cfg.privacy.enabled,
                "update": "delta",
            },
            **({"stopped": h.stopped} if h.stopped else {}),
            **({"best": best} if (best := self.best()) else {}),
            **({"forgetting": h.forgetting} if h.forgetting else {}),
            "model": cfg.model.name,
            "trainable_params": self.trainable_params,
            "n_layers": self.n_layers,
            "config": cfg.model_dump(mode="json"),
            "rounds": h.rounds,
            "elapsed_s": h.finished_s if h.finished_s is not None else round(time.time() - h.started, 2),
            **({"finished": True} if h.finished_s is not None else {}),
        }


@dataclass
class InitialAdapter:
    state: OrderedDict  # name -> float32 ndarray: fresh adapter weights (seeded), or the base's for full
    peft_config: object  # None for full fine-tuning
    trainable_keys: list
    n_layers: int


def initial_adapter(cfg: FedTuneConfig) -> InitialAdapter:
    """The method's starting state and config, from one load of the base model (never quantized
    here: the coordinator needs the adapter's shapes, not a 4-bit base)."""
    model, _, _ = methods.load_model(cfg, device="cpu", quantized=False)
    state = methods.get_state(model)
    out = InitialAdapter(
        OrderedDict((k, v.numpy()) for k, v in state.items()),
        methods.saved_peft_config(model, methods.base_reference(cfg.model)) if methods.is_peft(model) else None,
        methods.trainable_capable(model),
        methods.n_layers_of(model),
    )
    del model
    return out
