"""ftsim tune: a hyperparameter study over federations, on Optuna.

    ftsim tune --config study.yaml                   # the config's tune section: space, trials, ...
    ftsim tune --config study.yaml --trials 20 --out studies/lr
    ftsim tune --resume studies/lr                   # a killed or finished study goes on
    ftsim tune --config study.yaml --storage postgresql://host/db --study lr   # several processes, one study

Every trial is a real federation (the same code path as ftsim: Ray's virtual sites, secure
aggregation and DP when configured) in its own folder, ``OUT/trials/trial-NNNN``. After each of
its rounds the trial's federated validation metric (``tune.metric``, the sites' example-weighted
mean) is reported to Optuna's pruner, and a trial the pruner stops ends after that round, through
the coordinator's stop conditions (:func:`fedtune.server.app.run_federation`'s ``stop_after``).
The objective is the metric after the trial's last round: the model its folder's ``adapter/``
holds.

The study lives in Optuna's RDB storage, by default ``OUT/study.db`` (SQLite). ``--resume OUT``
reads ``OUT/study.json`` (the study's config, storage and name) and goes on until ``tune.trials``
trials have finished (completed or pruned) over every process sharing the study; a trial that
was interrupted (the process killed, or stopped by Ctrl-C) is run again from its folder's last
checkpoint (``ftsim --resume`` of the trial), so no round already trained is trained twice.

Outputs in OUT: ``best.yaml`` (the best trial's config, which ``ftsim --config`` and ``ftserver
--config`` run as it is), ``trials.csv``, ``report.md`` and ``report.html`` with Optuna's plots
(optimisation history, parameter importances, slices, the trials' rounds) as PNGs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import yaml

from fedtune.common import exits
from fedtune.common.checkpoint import atomic_write_bytes, atomic_write_json
from fedtune.common.config import (
    ConfigError,
    FedTuneConfig,
    TuneParam,
    add_config_flags,
    config_keys,
    config_overrides,
    load_config,
    set_dotted,
)
from fedtune.common.procs import sigterm_as_interrupt

from . import cli

STUDY_FILE = "study.json"  # the study's config, storage and name: what --resume reads
DB_FILE = "study.db"
TRIALS_DIR = "trials"
BEST_FILE = "best.yaml"
TABLE_FILE = "trials.csv"
PLOTS = ("history.png", "importances.png", "slice.png", "rounds.png")

# Trial user attributes (in the storage, shared by every process of the study).
FOLDER = "fedtune_folder"  # the trial's federation folder
RESUMES = "fedtune_resumes"  # an interrupted trial's number whose folder this trial goes on with
HOST, PID = "fedtune_host", "fedtune_pid"  # who runs it (an interrupted trial is one whose process is gone)
ROUNDS_RUN, ROUNDS, STEPS = "fedtune_rounds_run", "fedtune_rounds", "fedtune_steps_per_round"
SECONDS = "fedtune_seconds"
INVALID = "fedtune_invalid"  # why the sampled parameters did not make a valid config
OWN = "fedtune_config_values"  # the trial runs the config's own values (tune.include_config)
CONFIG_ATTR = "fedtune_config"  # study attribute: what every process of the study must agree on

# Keys a study cannot search: its own settings, where outputs go, the sites themselves.
NOT_SEARCHED = ("tune.", "output.", "federation.sites", "simulation.baselines", "simulation.partition")

Federate = Callable[..., Any]  # (cfg, out, say, resume, stop_after) -> the server's RunState

# `ftsim tune` with no --config, --site or --data: the built-in demo's sites and config, over the
# learning rate, the LoRA rank and the local steps (the general-knowledge score, which is not the
# objective, is left out: it would cost every trial two more evaluations).
DEMO_STUDY = {
    "tune.space": {
        "train.lr": {"type": "float", "low": 1e-4, "high": 5e-3, "log": True},
        "peft.r": [4, 8, 16, 32],
        "train.local_steps": {"type": "int", "low": 5, "high": 15, "step": 5},
    },
    "eval.forgetting": False,
}


def build_parser():
    """ftsim's parser (the config, sites and partition flags, --set, --resume) with the study's flags."""
    p = cli.build_parser()
    p.prog = "ftsim tune"
    p.description = (
        "Search hyperparameters over real federations (Optuna): the config's tune section gives the search space, "
        "the trials and the objective; each trial is an ftsim run in OUT/trials/. --resume OUT continues a study."
    )
    add_config_flags(
        p, "ftsim tune", description="the study (the config's tune section; every key: docs/configuration.md)"
    )
    for action in p._actions:
        if "--resume" in action.option_strings:
            action.help = "continue the study in DIR (its config is in DIR/study.json; --trials N raises its budget)"
        elif "--out" in action.option_strings:
            action.help = "the study's folder: study.db, trials/, best.yaml, report.md (default ftsim-runs/tune-<time>)"
    return p


def main(argv: list[str] | None = None, federate: Federate | None = None) -> int:
    """``federate``: runs one trial's federation (default: ftsim's, :func:`fedtune.simulations.cli.run`)."""
    args = build_parser().parse_args(argv)
    t0 = time.time()
    say = _say(t0)
    try:
        cfg, out = resolve_study(args)
        validate_space(cfg)
        study = open_study(cfg, out)
    except ConfigError as e:
        print(f"ftsim tune: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    except ImportError as e:
        print(f"ftsim tune: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    runner = Study(cfg, out, study, say, federate or _ftsim)
    sigterm_as_interrupt()
    try:
        runner.run()
    except KeyboardInterrupt:
        # A trial's ServerApp thread may still wait on replies that will never come: leave without it.
        print(
            f"ftsim tune: interrupted; continue the study with: ftsim tune --resume {out}", file=sys.stderr, flush=True
        )
        os._exit(exits.INTERRUPTED)
    except TrialFailed as e:
        print(f"ftsim tune: {e}; continue the study with: ftsim tune --resume {out}", file=sys.stderr)
        runner.write_results()
        return exits.FAILED
    runner.write_results()
    return runner.finish()


def _say(t0: float):
    def say(msg: str) -> None:
        el = int(time.time() - t0)
        print(f"[ftsim tune {el // 60:02d}:{el % 60:02d}] {msg}", flush=True)

    return say


def _ftsim(cfg: FedTuneConfig, out: Path, say, resume: bool, stop_after: Sequence) -> Any:
    """One trial as ftsim runs a federation (Ray's virtual sites); a failure is a TrialFailed."""
    try:
        return cli.run(cfg, out, say, resume=resume, stop_after=stop_after)
    except RuntimeError as e:
        raise TrialFailed(str(e)) from None


class TrialFailed(RuntimeError):
    """A trial's federation failed (not a bad sample: the study stops, and --resume retries it)."""


class InvalidTrial(ValueError):
    """The sampled parameters do not make a valid config (the trial is recorded as failed; the study goes on)."""


# ---------------------------------------------------------------------------------------------
# The study's config


def resolve_study(args) -> tuple[FedTuneConfig, Path]:
    """The study's config (with its tune flags) and folder: from the flags as ftsim reads them,
    or, with --resume DIR, from DIR/study.json."""
    if getattr(args, "baselines", None):
        raise ConfigError("--baselines: a study compares trials with each other; run ftsim --baselines on best.yaml")
    tune_flags = config_overrides(_without_set(args), "ftsim tune")
    if args.resume:
        return _resumed(args, tune_flags)
    # Absolute: the trials' folders are recorded in the storage, and a resume may start elsewhere.
    out = Path(args.out or f"ftsim-runs/tune-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    args.out = str(out)
    if (out / STUDY_FILE).is_file():
        raise ConfigError(f"--out {out} already holds a study; continue it with: ftsim tune --resume {out}")
    demo = not (args.config or args.site or cli.has_partition_flags(args))
    # The sites; a --data partition is written to OUT/partitions here, once, for every trial.
    base = cli.resolve_run(args).cfg
    data = json.loads(base.to_json())
    if demo and not data["tune"]["space"]:
        for key, value in DEMO_STUDY.items():
            set_dotted(data, key, value)
    cfg = load_config(None, tune_flags, base=data, source="the study's config")
    if not cfg.tune.space:
        raise ConfigError(
            "tune.space is empty: list the keys to search in the config's tune section, e.g.\n"
            "tune:\n  space:\n    train.lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}\n    peft.r: [4, 8, 16]"
        )
    return cfg, out


def _without_set(args):
    """``args`` without --set (config_overrides reads --set too; the tune flags alone here)."""
    from argparse import Namespace

    return Namespace(**{**vars(args), "set": []})


def _resumed(args, tune_flags: dict) -> tuple[FedTuneConfig, Path]:
    given = [f for f, v in (("--config", args.config), ("--site", args.site), ("--out", args.out)) if v]
    if given or cli.has_partition_flags(args) or args.set:
        raise ConfigError(
            f"--resume DIR continues the study with its saved config; don't combine it with {', '.join(given) or '--set or the partition flags'} "
            "(the study's own flags, such as --trials, may be given)"
        )
    out = Path(args.resume).resolve()
    path = out / STUDY_FILE
    if not path.is_file():
        raise ConfigError(f"--resume {out}: no study to resume (no {STUDY_FILE})")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))["config"]
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a study file ({e})") from None
    stored = (saved.get("tune") or {}).get("storage")
    if isinstance(stored, str) and "***" in stored and "tune.storage" not in tune_flags:  # written by open_study
        raise ConfigError(
            f"--resume {out}: the study's storage is {stored}; give its URL with the password: --storage URL"
        )
    return load_config(None, tune_flags, base=saved, source=str(path)), out


def searchable_keys() -> list[str]:
    return [
        ck.key
        for ck in config_keys()
        if "[]" not in ck.key and not any(ck.key.startswith(p) or ck.key == p.rstrip(".") for p in NOT_SEARCHED)
    ]


def validate_space(cfg: FedTuneConfig) -> None:
    """Every key of tune.space is a config key a study may set, and each end of its range (each
    choice) makes a valid config on its own; a ConfigError names the key and the value."""
    known = searchable_keys()
    for key, param in cfg.tune.space.items():
        where = f"tune.space.{key}"
        if key not in known:
            close = get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            why = "a study does not set it" if any(key.startswith(p) for p in NOT_SEARCHED) else "not a config key"
            raise ConfigError(f"{where}: {why}{hint}; the keys: docs/configuration.md")
        for label, value in probe_values(param):
            try:
                trial_config(cfg, {key: value}, None)
            except InvalidTrial as e:
                detail = str(e).split("\n", 1)[-1].strip()
                raise ConfigError(f"{where}: {label} {value!r} does not make a valid config: {detail}") from None


def probe_values(param: TuneParam) -> list[tuple[str, Any]]:
    if param.type == "categorical":
        return [("choice", c) for c in param.choices]
    cast = int if param.type == "int" else float
    return [("low", cast(param.low)), ("high", cast(param.high))]


def trial_config(cfg: FedTuneConfig, params: dict[str, Any], folder: Path | None) -> FedTuneConfig:
    """The study's config with a trial's parameters, writing to ``folder``: a plain ftsim run (no
    tune section, no baselines). InvalidTrial names what does not validate."""
    data = json.loads(cfg.to_json())
    data["tune"] = {}
    data["output"]["dir"] = str(folder) if folder is not None else None
    data["simulation"]["baselines"] = False
    try:
        return load_config(None, base=data, overrides=params, source="the trial's parameters")
    except ConfigError as e:
        raise InvalidTrial(str(e)) from None


def own_values(cfg: FedTuneConfig) -> dict[str, Any]:
    """The config's values of the searched keys, when every one lies in its range or choices (else {})."""
    data = json.loads(cfg.to_json())
    own = {}
    for key, p in cfg.tune.space.items():
        node: Any = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if p.type == "categorical":
            fits = node in p.choices
        else:
            fits = isinstance(node, (int, float)) and not isinstance(node, bool) and p.low <= node <= p.high
        if not fits:
            return {}
        own[key] = node
    return own


def in_space(p: TuneParam, value: Any) -> bool:
    """Whether ``value`` is one the search space's key ``p`` can take."""
    if p.type == "categorical":
        return any(value == c and type(value) is type(c) for c in p.choices)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not p.low <= value <= p.high:
        return False
    if p.type == "int" and not float(value).is_integer():
        return False
    return True


def suggest(trial, space: dict[str, TuneParam]) -> dict[str, Any]:
    params = {}
    for key, p in space.items():
        if p.type == "categorical":
            params[key] = trial.suggest_categorical(key, p.choices)
        elif p.type == "int":
            step = int(p.step) if p.step else 1
            params[key] = trial.suggest_int(key, int(p.low), int(p.high), step=step, log=p.log)
        else:
            params[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
    return params


# ---------------------------------------------------------------------------------------------
# The study in Optuna's storage


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ImportError("ftsim tune needs Optuna: pip install 'fedtune[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # what a trial did, ftsim tune says itself
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def storage_url(cfg: FedTuneConfig, out: Path) -> str:
    return cfg.tune.storage or f"sqlite:///{(out / DB_FILE).resolve()}"


def shown_url(url: str) -> str:
    """The storage URL without its password, for the console and the report."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL sqlalchemy reads: Optuna will say so
        return url.split("@")[-1]


def agreed(cfg: FedTuneConfig) -> dict:
    """What every process of one study must share: the config but where each writes, its own
    budget and the sites' file paths (each machine has its own)."""
    data = json.loads(cfg.to_json())
    data.pop("output")
    tune = data["tune"]
    data["tune"] = {k: tune[k] for k in ("space", "metric", "sampler", "pruner", "startup_trials", "seed")}
    data["federation"]["sites"] = [s["name"] for s in data["federation"]["sites"]]
    return data


def _first_difference(a: Any, b: Any, key: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{key}.{k}" if key else k)
    return f"{key}: {b!r} in this config, {a!r} in the study's"


def open_study(cfg: FedTuneConfig, out: Path):
    """The Optuna study (created, or loaded when the storage has it), with OUT/study.json written."""
    optuna = _optuna()
    tc = cfg.tune
    url = storage_url(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        storage = optuna.storages.RDBStorage(url)
    except Exception as e:  # noqa: BLE001 - an unreachable database, a driver missing: one line
        raise ConfigError(f"tune.storage {shown_url(url)}: cannot open it ({type(e).__name__}: {e})") from None
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    joined = tc.study in existing
    study = optuna.create_study(
        study_name=tc.study,
        storage=storage,
        direction=tc.direction,
        load_if_exists=True,
        sampler=_sampler(optuna, cfg, 0),
        pruner=_pruner(optuna, cfg),
    )
    mine = agreed(cfg)
    theirs = study.user_attrs.get(CONFIG_ATTR)
    if theirs is None:
        study.set_user_attr(CONFIG_ATTR, mine)
    elif theirs != mine:
        raise ConfigError(
            f"tune.study {tc.study!r} in {shown_url(url)} was started with another config ({_first_difference(theirs, mine)}); "
            "give the study's config, or another --study name"
        )
    if joined:  # another process's trials are in it: seed this one apart, or it would suggest what they did
        study.sampler = _sampler(optuna, cfg, len(study.trials))
    atomic_write_json(out / STUDY_FILE, study_record(cfg, url))
    return study


def study_record(cfg: FedTuneConfig, url: str) -> dict:
    """OUT/study.json: the study's config and storage, never a database password (a resume of a
    study whose URL has one is given the URL again)."""
    saved = json.loads(cfg.to_json())
    if cfg.tune.storage:
        saved["tune"]["storage"] = shown_url(cfg.tune.storage)
    return {"config": saved, "storage": shown_url(url)}


def _sampler(optuna, cfg: FedTuneConfig, offset: int):
    tc = cfg.tune
    seed = tc.seed + offset
    if tc.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tc.startup)
    if tc.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    try:
        import scipy  # noqa: F401 - Optuna's GP and QMC samplers need it
    except ImportError:
        raise ImportError(f"tune.sampler {tc.sampler!r} needs SciPy: pip install scipy (or use tpe)") from None
    if tc.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=tc.startup)
    return optuna.samplers.QMCSampler(seed=seed)


def _pruner(optuna, cfg: FedTuneConfig):
    tc = cfg.tune
    if tc.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tc.startup, n_warmup_steps=0)
    if tc.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.federation.rounds, reduction_factor=3)
    return optuna.pruners.NopPruner()


def _alive(host: str | None, pid: int | None) -> bool:
    """Whether the process that runs a trial is still there (unknown on another machine: assumed so)."""
    if host != socket.gethostname() or pid is None:
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue_interrupted(study, trials_dir: Path) -> list[int]:
    """Trials of this folder whose process is gone (RUNNING, killed) or that were stopped (FAIL
    with a folder): each is enqueued once more with its parameters, to go on from its folder's
    last checkpoint. -> the interrupted trials' numbers."""
    optuna = _optuna()
    state = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    live_or_done = (state.WAITING, state.RUNNING, state.COMPLETE, state.PRUNED)
    taken = {t.user_attrs.get(RESUMES, t.number) for t in trials if t.state in live_or_done}
    requeued = []
    for t in trials:
        folder = t.user_attrs.get(FOLDER)
        if folder is None or Path(folder).parent.resolve() != trials_dir.resolve():
            continue
        if t.state == state.RUNNING and not _alive(t.user_attrs.get(HOST), t.user_attrs.get(PID)):
            study._storage.set_trial_state_values(t._trial_id, state=state.FAIL)
            taken.discard(t.user_attrs.get(RESUMES, t.number))
        elif t.state != state.FAIL:
            continue
        origin = t.user_attrs.get(RESUMES, t.number)
        if origin in taken:
            continue
        taken.add(origin)
        study.enqueue_trial(t.params, user_attrs={RESUMES: origin}, skip_if_exists=False)
        requeued.append(origin)
    return requeued


# ---------------------------------------------------------------------------------------------
# Running the trials


@dataclass
class Pruning:
    """A stop condition of the trial's rounds: reports each round's federated metric to the trial
    and stops the federation after the round the pruner prunes."""

    trial: Any
    metric: str
    rounds: int
    say: Callable[[str], None]
    label: str
    pruned_after: int | None = None
    values: dict[int, float] = field(default_factory=dict)

    def report(self, rnd: int, value: float | None) -> None:
        if value is None or not math.isfinite(value):
            return
        self.values[rnd] = value
        self.trial.report(value, rnd)

    def __call__(self, rs, rnd: int, population: int) -> str | None:
        value = (rs.rounds[-1].get("aggregate") or {}).get(self.metric)
        self.report(rnd, value)
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "not measured"
        self.say(f"{self.label} round {rnd}/{self.rounds}: {self.metric} {shown}")
        if rnd < self.rounds and self.trial.should_prune():
            self.pruned_after = rnd
            return f"pruned by the study ({self.trial.study.pruner.__class__.__name__}) after round {rnd}: {self.metric} {shown}"
        return None


def _folder_log(path: Path) -> Callable[[str], None]:
    path.parent.mkdir(parents=True, exist_ok=True)

    def say(msg: str) -> None:
        with path.open("a", encoding="utf-8") as f:
            f.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")

    return say


def _metric_of(rounds: Sequence[dict], metric: str, direction: str) -> float:
    """The metric after the last round that has it (a diverged trial: the worst value)."""
    for r in reversed(rounds):
        v = (r.get("aggregate") or {}).get(metric)
        if int(r.get("round", 0)) >= 1 and isinstance(v, (int, float)) and math.isfinite(v):
            return float(v)
    return math.inf if direction == "minimize" else -math.inf


def _recorded_rounds(folder: Path) -> list[dict]:
    path = folder / "metrics.json"
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("rounds", [])
    except ValueError:
        return []


class Study:
    """One process's part of a study: runs trials until tune.trials have finished (or the timeout)."""

    def __init__(self, cfg: FedTuneConfig, out: Path, study, say, federate: Federate):
        self.cfg, self.out, self.study, self.say, self.federate = cfg, out, study, say, federate
        self.optuna = _optuna()
        self.trials_dir = out / TRIALS_DIR
        self.started = time.time()
        self.ran: list[float] = []  # this process's trials' wall times
        self.invalid_in_row = 0  # sampled trials whose parameters made no valid config, one after another
        self.all_invalid = False  # the study stopped on them

    # -- counting
    def finished(self) -> list:
        st = self.optuna.trial.TrialState
        return [t for t in self.study.get_trials(deepcopy=False) if t.state in (st.COMPLETE, st.PRUNED)]

    def run(self) -> None:
        tc = self.cfg.tune
        requeued = requeue_interrupted(self.study, self.trials_dir)
        done = len(self.finished())
        self.say(
            f"study {tc.study!r} in {shown_url(storage_url(self.cfg, self.out))}: {done} of {tc.trials} trials finished; "
            f"objective {tc.metric} ({tc.direction}); sampler {tc.sampler}, pruner {tc.pruner}; "
            f"{len(self.cfg.federation.sites)} sites x {self.cfg.federation.rounds} rounds a trial"
        )
        self.say("search space: " + "; ".join(f"{k} {describe(p)}" for k, p in tc.space.items()))
        if requeued:
            self.say(f"interrupted trial(s) {', '.join(map(str, requeued))} go on from their last checkpoint")
        if done >= tc.trials:
            self.say(f"the study has its {tc.trials} trials (raise --trials to run more)")
            return
        if tc.include_config and not self.study.trials and (own := own_values(self.cfg)):
            self.study.enqueue_trial(own, user_attrs={OWN: True})
            self.say(f"trial 0 runs the config's own values ({shown_params(own)}): what the study improves on")
        st = self.optuna.trial.TrialState
        self.study.optimize(
            self.objective,
            timeout=tc.timeout_s,
            catch=(InvalidTrial,),
            callbacks=[
                self.optuna.study.MaxTrialsCallback(tc.trials, states=(st.COMPLETE, st.PRUNED)),
                self._after_trial,
            ],
            gc_after_trial=True,
        )

    def objective(self, trial) -> float:
        tc = self.cfg.tune
        origin = trial.user_attrs.get(RESUMES, trial.number)
        if isinstance(origin, bool) or not isinstance(origin, int) or not 0 <= origin <= trial.number:
            origin = trial.number  # not a trial this study had: a folder of its own
        try:
            params = suggest(trial, tc.space)
        except ValueError as e:  # an enqueued categorical value that is not a choice
            trial.set_user_attr(INVALID, f"not run: outside the search space: {e}")
            self.say(f"trial {trial.number} not run (recorded as failed): outside the search space: {e}")
            raise InvalidTrial(str(e)) from None
        folder = self.trials_dir / f"trial-{origin:04d}"
        own = " (the config's own values)" if trial.user_attrs.get(OWN) else ""
        label = f"trial {trial.number}" + (f" (trial {origin} continued)" if origin != trial.number else own)
        try:
            outside = [f"{k} {v!r}" for k, v in params.items() if not in_space(tc.space[k], v)]
            if outside:  # an enqueued trial's fixed values: Optuna uses them even out of range
                raise InvalidTrial(f"not run: outside the search space:\n{', '.join(outside)}")
            tcfg = trial_config(self.cfg, params, folder)
        except InvalidTrial as e:
            trial.set_user_attr(INVALID, str(e))
            self.say(f"{label} not run (recorded as failed): " + " ".join(line.strip() for line in str(e).splitlines()))
            raise
        steps = (tcfg.train.local_steps or 0) * len(tcfg.federation.sites)
        for k, v in {
            FOLDER: str(folder),
            HOST: socket.gethostname(),
            PID: os.getpid(),
            ROUNDS: tcfg.federation.rounds,
            STEPS: steps,
        }.items():
            trial.set_user_attr(k, v)
        done = len(self.finished())
        self.say(f"{label} ({done + 1} of {tc.trials}): {shown_params(params)}; its log {folder / 'ftsim.log'}")
        pruning = Pruning(trial, tc.metric, tcfg.federation.rounds, self.say, label)
        recorded = _recorded_rounds(folder)
        resume = origin != trial.number and bool(recorded)
        for r in recorded if resume else ():
            if int(r.get("round", 0)) >= 1:
                pruning.report(int(r["round"]), (r.get("aggregate") or {}).get(tc.metric))
        if not resume and folder.exists():
            shutil.rmtree(folder)  # a trial that never recorded a round: start it clean
        t = time.time()
        rs = self.federate(tcfg, folder, _folder_log(folder / "ftsim.log"), resume, (pruning,))
        seconds = time.time() - t
        self.ran.append(seconds)
        rounds = rs.rounds
        trial.set_user_attr(ROUNDS_RUN, sum(1 for r in rounds if int(r.get("round", 0)) >= 1))
        trial.set_user_attr(SECONDS, round(float(rs.history.finished_s or seconds), 1))
        if pruning.pruned_after is not None:
            raise self.optuna.TrialPruned(f"after round {pruning.pruned_after}")
        return _metric_of(rounds, tc.metric, tc.direction)

    def _after_trial(self, study, frozen) -> None:
        st = self.optuna.trial.TrialState
        self.invalid_in_row = self.invalid_in_row + 1 if INVALID in frozen.user_attrs else 0
        if self.invalid_in_row >= max(10, self.cfg.tune.trials):
            self.say(f"stopping: {self.invalid_in_row} trials in a row did not make a valid config (see above)")
            self.all_invalid = True
            study.stop()
        done = len(self.finished())
        left = max(self.cfg.tune.trials - done, 0)
        eta = f"; ETA {_duration(sum(self.ran) / len(self.ran) * left)}" if self.ran and left else ""
        best = self._best()
        best_line = f"; best trial {best.number} ({self.cfg.tune.metric} {best.value:.4f})" if best else ""
        if frozen.state == st.COMPLETE:
            what = f"complete: {self.cfg.tune.metric} {frozen.value:.4f}"
        elif frozen.state == st.PRUNED:
            what = f"pruned after round {frozen.user_attrs.get(ROUNDS_RUN, '?')}"
        else:
            what = "failed"
        seconds = frozen.user_attrs.get(SECONDS)
        took = f" in {seconds:.0f} s" if isinstance(seconds, (int, float)) else ""
        self.say(f"trial {frozen.number} {what}{took}; {done} of {self.cfg.tune.trials} finished{best_line}{eta}")
        self.keep_folders()
        self.write_results()

    def _best(self):
        st = self.optuna.trial.TrialState
        done = [t for t in self.study.get_trials(deepcopy=False, states=(st.COMPLETE,)) if t.value is not None]
        if not done:
            return None
        sign = 1 if self.cfg.tune.direction == "minimize" else -1
        return min(done, key=lambda t: (sign * t.value, t.number))

    def keep_folders(self) -> None:
        """Remove the folders of pruned trials (unless tune.keep_pruned) and of completed ones
        past the best tune.keep; never a running or interrupted trial's."""
        st = self.optuna.trial.TrialState
        trials = self.study.get_trials(deepcopy=False)
        sign = 1 if self.cfg.tune.direction == "minimize" else -1
        done = sorted(
            (t for t in trials if t.state == st.COMPLETE and t.value is not None),
            key=lambda t: (sign * t.value, t.number),
        )
        drop = [t for t in done[self.cfg.tune.keep :]]
        if not self.cfg.tune.keep_pruned:
            drop += [t for t in trials if t.state == st.PRUNED]
        for t in drop:
            folder = t.user_attrs.get(FOLDER)
            if folder and Path(folder).parent.resolve() == self.trials_dir.resolve() and Path(folder).is_dir():
                shutil.rmtree(folder, ignore_errors=True)

    # -- results
    def write_results(self) -> None:
        best = self._best()
        if best is not None:
            write_best(self.cfg, best, self.out / BEST_FILE)
        write_table(self.study, self.cfg, self.out / TABLE_FILE)
        from .tune_report import write_study_report

        write_study_report(self)

    def finish(self) -> int:
        best = self._best()
        done = len(self.finished())
        if best is None:
            self.say(f"{done} trial(s) finished and none completed: no best config (see {self.out / 'report.md'})")
            return exits.BAD_INPUT if self.all_invalid else exits.FAILED if done else exits.OK
        self.say(
            f"best of {done} trials: trial {best.number}, {self.cfg.tune.metric} {best.value:.4f} ({shown_params(best.params)})"
        )
        self.say(
            f"its config: {self.out / BEST_FILE}   report: {self.out / 'report.md'}   trials: {self.out / TABLE_FILE}"
        )
        return exits.OK


def describe(p: TuneParam) -> str:
    if p.type == "categorical":
        return "one of " + ", ".join(map(str, p.choices))
    scale = ", log" if p.log else f", step {p.step:g}" if p.step else ""
    return f"{p.type} [{p.low:g}, {p.high:g}{scale}]"


def shown_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


def _duration(seconds: float) -> str:
    from fedtune.common import progress

    return progress.duration(seconds)


def best_config(cfg: FedTuneConfig, params: dict[str, Any]) -> dict:
    """The best trial's config as a file holds it: what differs from the defaults, plus every
    searched key (so the file says what was tuned); no tune section, no output folder."""
    full = trial_config(cfg, params, None)
    data = full.model_dump(mode="json", exclude_defaults=True)
    data.pop("tune", None)
    secure = data.get("secure_aggregation") or {}
    if secure.get("enabled") is False:  # ftsim's default (off): left to each tool, so ftserver keeps it on
        secure.pop("enabled")
        if not secure:
            data.pop("secure_aggregation")
    (data.get("output") or {}).pop("dir", None)
    if not data.get("output"):
        data.pop("output", None)
    for key, value in params.items():
        set_dotted(data, key, value)
    return data


def write_best(cfg: FedTuneConfig, best, path: Path) -> None:
    data = best_config(cfg, best.params)
    head = (
        f"# The best trial of study {cfg.tune.study!r} (ftsim tune): trial {best.number}, {cfg.tune.metric} {best.value:.4f}.\n"
        f"# Tuned: {shown_params(best.params)}.\n"
        "# Run it with `ftsim --config best.yaml`, or coordinate real sites with `ftserver --config best.yaml`.\n"
    )
    text = head + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    load_config(None, base=yaml.safe_load(text), source=str(path))  # it loads as a config, or this is our bug
    atomic_write_bytes(path, text.encode("utf-8"))


def write_table(study, cfg: FedTuneConfig, path: Path) -> None:
    """trials.csv: every trial's number, state, parameters, value, rounds run and wall time."""
    keys = list(cfg.tune.space)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "state", *keys, cfg.tune.metric, "rounds_run", "rounds", "seconds", "continues"])
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        w.writerow(
            [
                t.number,
                t.state.name.lower(),
                *(t.params.get(k, "") for k in keys),
                "" if t.value is None else t.value,
                a.get(ROUNDS_RUN, ""),
                a.get(ROUNDS, ""),
                a.get(SECONDS, ""),
                a.get(RESUMES, "") if a.get(RESUMES) != t.number else "",
            ]
        )
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
