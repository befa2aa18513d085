"""ftsim: many virtual sites on one machine, on Flower's simulation engine (Ray).

    ftsim                                   # the built-in demo: 3 domain sites, default model
    ftsim --site NAME=TRAIN[:EVAL] ...      # your own sites
    ftsim --config run.yaml --rounds 5 --set train.lr=1e-4

Flags override the config file, which overrides the defaults. The run's outputs go to
``--out`` (default ``ftsim-runs/<time>``): ``adapter/``, ``checkpoints/``, ``metrics.json``,
``report.md`` and plots.

We use ``flwr.simulation.run_simulation`` (deprecated upstream in favour of ``flwr run``
against a detached simulation SuperLink) because it runs in-process: the ServerApp and
ClientApp get our validated config as Python objects, and when it returns Ray is shut down,
so no process outlives ftsim.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import get_args

from fedtune.common.config import ConfigError, FedTuneConfig, PeftMethod, Strategy, flag_overrides, load_config, read_config_file
from fedtune.common.procs import sigterm_as_interrupt

BUNDLED_DATA = "data"
DEFAULT_CONFIG = "default.yaml"


def bundled_path(*parts: str) -> Path:
    return Path(str(resources.files("fedtune.simulations").joinpath(*parts)))


def parse_site(spec: str) -> dict:
    """'NAME=TRAIN[:EVAL]' -> {'name', 'train', 'eval'}."""
    if "=" not in spec:
        raise ConfigError(f"--site {spec!r}: expected NAME=TRAIN_FILE[:EVAL_FILE]")
    name, files = spec.split("=", 1)
    train, ev = files, None
    if not Path(files).exists() and ":" in files:
        train, ev = files.rsplit(":", 1)
    for label, p in (("train", train), ("eval", ev)):
        if p is not None and not Path(p).expanduser().is_file():
            raise ConfigError(f"--site {name}: {label} file {p} not found")
    site = {"name": name.strip(), "train": str(Path(train).expanduser().resolve())}
    if ev:
        site["eval"] = str(Path(ev).expanduser().resolve())
    return site


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ftsim",
        description="Run a federated fine-tuning simulation with virtual sites on this machine. "
        "With no arguments: the built-in demo (medical, legal and financial sites, bundled data, default model).",
    )
    p.add_argument("--config", help="YAML or TOML config file (see simulations/configs/default.yaml)")
    p.add_argument("--site", action="append", default=[], metavar="NAME=TRAIN[:EVAL]", help="a virtual site and its data files (repeatable)")
    p.add_argument("--model", help="'default', a local HF directory, a .gguf file, or a hub id")
    p.add_argument("--peft", choices=get_args(PeftMethod), help="fine-tuning method (default lora; see peft in the config)")
    p.add_argument("--merged", action="store_const", const=True, help="also save merged/: the adapter folded into the base (LoRA family)")
    p.add_argument("--strategy", choices=get_args(Strategy), help="server optimizer (default fedavg)")
    p.add_argument(
        "--secure-aggregation",
        action="store_const",
        const=True,
        help="SecAgg+: the coordinator sees only the weighted mean of the sites' updates (see secure_aggregation in the config)",
    )
    p.add_argument("--rounds", type=int, help="federated rounds")
    p.add_argument("--local-steps", type=int, help="optimizer steps per site per round")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--batch-size", type=int, help="examples per micro-batch")
    p.add_argument("--max-length", type=int, help="tokens per example")
    p.add_argument("--seed", type=int, help="seed for adapter init, data order and splits")
    p.add_argument("--out", help="output directory (default: ftsim-runs/<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last verified checkpoint (add --rounds N to extend it)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where sites train")
    p.add_argument("--cpus-per-site", type=float, help="Ray CPUs per virtual site (default 2: one site at a time on 2 cores)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, e.g. train.lr=1e-4 (repeatable)")
    return p


FLAG_KEYS = {
    "model": "model.name",
    "peft": "peft.method",
    "merged": "output.merged",
    "strategy": "federation.strategy",
    "secure_aggregation": "secure_aggregation.enabled",
    "rounds": "federation.rounds",
    "local_steps": "train.local_steps",
    "lr": "train.lr",
    "batch_size": "train.batch_size",
    "max_length": "data.max_length",
    "seed": "train.seed",
    "device": "model.device",
    "cpus_per_site": "simulation.cpus_per_site",
}


def resolve_config(args: argparse.Namespace) -> FedTuneConfig:
    """Defaults <- config file (or the bundled demo config) <- flags."""
    cfg_path = Path(args.config) if args.config else None
    if cfg_path is None and not args.site:
        cfg_path = bundled_path("configs", DEFAULT_CONFIG)
    overrides = flag_overrides(args, FLAG_KEYS)
    if args.out:
        overrides["output.dir"] = args.out
    if args.resume:
        # The run's own record holds its config; flags may change what is safe to change (e.g. --rounds).
        if args.config or args.site or args.out:
            raise ConfigError("--resume DIR takes the run's saved config and writes to DIR; don't combine it with --config, --site or --out")
        record = Path(args.resume) / "metrics.json"
        try:
            saved = json.loads(record.read_text())["config"]
        except (OSError, ValueError, KeyError):
            raise ConfigError(f"--resume {args.resume}: nothing to resume (no readable {record.name})") from None
        overrides["output.dir"] = str(Path(args.resume))
        return _check_sites(load_config(None, overrides, base=saved, source=str(record)))
    if args.site:
        overrides["federation.sites"] = [parse_site(s) for s in args.site]
    elif cfg_path is not None:
        # Site files in a config are relative to the config file.
        raw = read_config_file(cfg_path)
        sites = (raw.get("federation") or {}).get("sites") if isinstance(raw.get("federation"), dict) else None
        if isinstance(sites, list):
            fixed = []
            for s in sites:
                if isinstance(s, dict):
                    s = dict(s)
                    for key in ("train", "eval"):
                        if isinstance(s.get(key), str) and not Path(s[key]).expanduser().is_absolute():
                            s[key] = str((cfg_path.parent / s[key]).resolve())
                fixed.append(s)
            overrides.setdefault("federation.sites", fixed)
    return _check_sites(load_config(cfg_path, overrides))


def _check_sites(cfg: FedTuneConfig) -> FedTuneConfig:
    if not cfg.federation.sites:
        raise ConfigError("no sites: pass --site NAME=TRAIN[:EVAL] (repeatable) or list federation.sites in --config")
    if cfg.federation.min_sites > len(cfg.federation.sites):
        raise ConfigError(f"federation.min_sites is {cfg.federation.min_sites} but only {len(cfg.federation.sites)} site(s) are given")
    for s in cfg.federation.sites:
        for label, f in (("train", s.train), ("eval", s.eval)):
            if f is not None and not Path(f).is_file():
                raise ConfigError(f"federation.sites[{s.name}].{label}: file {f} not found")
    return cfg.with_secure_default(False)


def make_say(t0: float):
    def say(msg: str) -> None:
        el = int(time.time() - t0)
        print(f"[ftsim {el // 60:02d}:{el % 60:02d}] {msg}", flush=True)

    return say


def start_ray() -> None:
    """Start Ray here rather than inside Flower (which then reuses it), so that we can take SIGTERM back.

    ray.init installs a native failure handler that turns SIGTERM into an abort, which would
    skip our clean-up; re-registering ours afterwards makes SIGTERM behave like Ctrl-C.
    """
    import ray

    # Ray starts workers at nice 15 by default; the sites' training *is* the job here, and on
    # a shared machine a niced worker can run 10x slower than the coordinator waiting on it.
    os.environ.setdefault("RAY_worker_niceness", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
        ray.init(
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=True,
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
        )
    if threading.current_thread() is threading.main_thread():
        sigterm_as_interrupt()


def _not_deprecation_notice(record: logging.LogRecord) -> bool:
    return "`run_simulation` function is deprecated" not in record.getMessage()


def prepare_engine() -> None:
    """Flower's simulation engine as ftsim runs it: warnings only, without run_simulation's
    deprecation notice (we use it on purpose, see the module docstring; the notice is not for
    our users), and picking up messages every 0.01 s (common/flwr_latency.py)."""
    from flwr.simulation.ray_transport import utils  # noqa: F401 - turns every DeprecationWarning on at import

    from fedtune.common import quiet_dependency_warnings
    from fedtune.common.flwr_latency import tune_simulation

    quiet_dependency_warnings()

    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.WARNING)
    if _not_deprecation_notice not in flwr_log.filters:
        flwr_log.addFilter(_not_deprecation_notice)
    tune_simulation()


def run(cfg: FedTuneConfig, out: Path, say=print, resume: bool = False):
    """Run the simulation; returns the server's RunState. Ray is shut down on every path."""
    from flwr.simulation import run_simulation

    from fedtune.client.app import make_client_app, sites_from_config
    from fedtune.common.modeling import resolve_model_source
    from fedtune.server.app import make_server_app

    resolve_model_source(cfg.model)  # provision the model here, once, before workers start
    sites = sites_from_config(cfg)
    cpus = min(cfg.simulation.cpus_per_site, float(os.cpu_count() or 1))
    backend_config = {"client_resources": {"num_cpus": cpus, "num_gpus": cfg.simulation.gpus_per_site}}
    result: list = []
    server_app = make_server_app(cfg, out, say, result, resume=resume)
    client_app = make_client_app(sites, device=None if cfg.model.device == "auto" else cfg.model.device)
    prepare_engine()
    try:
        start_ray()
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(sites), backend_config=backend_config)
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
    if not result:
        raise RuntimeError("the simulation ended without finishing its rounds (see the messages above)")
    if isinstance(result[0], Exception):
        hint = f" (continue with: ftsim --resume {out})" if (out / "metrics.json").is_file() else ""
        raise RuntimeError(f"{result[0]}{hint}")
    return result[0]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"ftsim: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.output.dir or f"ftsim-runs/{time.strftime('%Y%m%d-%H%M%S')}")
    t0 = time.time()
    say = make_say(t0)
    names = ", ".join(s.name for s in cfg.federation.sites)
    say(
        f"{len(cfg.federation.sites)} site{'s' if len(cfg.federation.sites) != 1 else ''} ({names}); model {cfg.model.name}; {cfg.peft.describe()}; "
        f"{cfg.federation.strategy}{' with secure aggregation (SecAgg+)' if cfg.secure_aggregation.enabled else ''}; {cfg.federation.rounds} rounds x "
        f"{cfg.train.local_steps or str(cfg.train.local_epochs) + ' epochs'} local steps; output {out}"
    )
    sigterm_as_interrupt()
    try:
        rs = run(cfg, out, say, resume=bool(args.resume))
    except KeyboardInterrupt:
        # run() has shut Ray down; the ServerApp thread (not a daemon) may still be waiting on
        # replies that will never come, so leave without joining it.
        print(f"ftsim: interrupted; checkpoints so far are in {out / 'checkpoints'}", file=sys.stderr, flush=True)
        os._exit(130)
    except Exception as e:  # noqa: BLE001 - one clear line for the user, details above
        print(f"ftsim: failed: {e}", file=sys.stderr)
        return 1
    last = rs.rounds[-1]
    say(f"done in {time.time() - t0:.0f} s. Final global eval: " + ", ".join(f"{k} {v:.3f}" for k, v in last.get("aggregate", {}).items()))
    artifact = out / ("model" if cfg.peft.method == "full" else "adapter")
    merged = f"   merged: {out / 'merged'}" if cfg.output.merged else ""
    say(f"{artifact.name}: {artifact}{merged}   metrics: {out / 'metrics.json'}   report: {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
