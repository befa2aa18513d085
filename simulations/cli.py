"""ftsim: many virtual sites on one machine, on Flower's simulation engine (Ray).

    ftsim                                   # the built-in demo: 3 domain sites, default model
    ftsim --site NAME=TRAIN[:EVAL] ...      # your own sites
    ftsim --data FILE ... --partition dirichlet:0.3 --sites 4   # one dataset split into virtual sites
    ftsim --config run.yaml --rounds 5 --set train.lr=1e-4
    ftsim --baselines                       # then each site alone and all data pooled, at equal compute
    ftsim tune --config study.yaml          # a hyperparameter study over such runs (simulations/tune.py)

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
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.common import exits, methods
from fedtune.common.config import (
    ConfigError,
    FedTuneConfig,
    add_config_flags,
    config_overrides,
    load_config,
    read_config_file,
)
from fedtune.common.metrics import PERSONAL_SCORES
from fedtune.common.procs import sigterm_as_interrupt
from fedtune.common.threads import set_threads, usable_cores

if TYPE_CHECKING:
    from fedtune.simulations.partition import Partition

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
        "With no arguments: the built-in demo (medical, legal and financial sites, bundled data, default model). "
        "'ftsim tune ...' searches hyperparameters over such runs (ftsim tune --help).",
        epilog=exits.epilog(),
        formatter_class=exits.HelpFormatter,
    )
    p.add_argument("--config", help="YAML or TOML config file (see simulations/configs/default.yaml)")
    p.add_argument(
        "--site",
        action="append",
        default=[],
        metavar="NAME=TRAIN[:EVAL]",
        help="a virtual site and its data files (repeatable)",
    )
    _add_partition_flags(p)
    _add_run_flags(p)
    # --rounds, --lr, --out, --secure-aggregation, ...: declared in common/config.py; the help says
    # what the built-in demo (no --config, --site or --data) sets beside each default.
    add_config_flags(p, "ftsim", demo=demo_settings())
    return p


def demo_settings() -> dict[str, Any]:
    """The bundled demo config's values as dotted keys ({'federation.rounds': 3, ...}; not its sites)."""
    raw = read_config_file(bundled_path("configs", DEFAULT_CONFIG))
    return {
        f"{section}.{key}": value
        for section, values in raw.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if not isinstance(value, (dict, list))
    }


def _add_partition_flags(p: argparse.ArgumentParser) -> None:
    """--data, --partition, --sites, --label-key: one dataset split into virtual sites."""
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="FILE",
        help="instead of --site: one dataset to split into virtual sites site-1..site-N (repeatable; each file is a domain); "
        "the sites' files and composition.json go to OUT/partitions",
    )
    p.add_argument(
        "--partition",
        metavar="SPEC",
        help="how --data is split: iid (the default when only --data is given), dirichlet:ALPHA (label skew: each category "
        "spread over the sites by a Dirichlet(ALPHA) draw; small ALPHA, strong skew), quantity:ALPHA (site sizes skewed), "
        "domain (one file per site); seeded by --seed",
    )
    p.add_argument(
        "--sites", type=int, metavar="N", help="how many sites --partition makes (domain: the number of --data files)"
    )
    p.add_argument(
        "--label-key",
        metavar="KEY",
        help="--partition: a record's category is this top-level field (e.g. completion for a label), not its file",
    )


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """--resume, --site-rank, --set: ftsim's own flags over the run's config."""
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its last verified checkpoint (add --rounds N to extend it)",
    )
    p.add_argument(
        "--site-rank",
        action="append",
        default=[],
        metavar="NAME=R",
        help="site NAME trains LoRA rank R, below peft.r (mixed ranks, HetLoRA zero-padding; repeatable)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, e.g. train.lr=1e-4 (repeatable)",
    )


def default_out_dir() -> str:
    return f"ftsim-runs/{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class Resolved:
    cfg: FedTuneConfig
    partition: Partition | None = None  # set when the sites were split from --data
    finished: str | None = None  # --resume of a finished run that the flags do not extend: what to say


PARTITION_FLAGS = "--data, --partition, --sites or --label-key"
PARTITION_KEYS = ("data", "spec", "sites", "label_key", "min_records")


@dataclass
class _PartitionRequest:
    files: list[str]
    spec: str
    sites: int | None
    label_key: str | None
    min_records: int | None


def _partition_request(args: argparse.Namespace, section: Any, cfg_path: Path | None) -> _PartitionRequest | None:
    """The flags, over a config file's ``simulation.partition`` section (paths relative to the file)."""
    where = f"{cfg_path}: simulation.partition" if cfg_path else "simulation.partition"
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping with {', '.join(PARTITION_KEYS)}")
    unknown = sorted(set(section) - set(PARTITION_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(str, unknown))}; expected {', '.join(PARTITION_KEYS)}"
        )
    files = [str(Path(f).expanduser().resolve()) for f in args.data]
    if not files and section.get("data") is not None:
        listed = section["data"] if isinstance(section["data"], list) else [section["data"]]
        if not all(isinstance(f, str) and f for f in listed):
            raise ConfigError(f"{where}.data: expected a data file or a list of them")
        files = [
            str(Path(f).expanduser() if Path(f).expanduser().is_absolute() else (cfg_path.parent / f).resolve())
            for f in listed
        ]
    spec = args.partition if args.partition is not None else section.get("spec")
    sites = args.sites if args.sites is not None else section.get("sites")
    label_key = args.label_key if args.label_key is not None else section.get("label_key")
    min_records = section.get("min_records")
    if not (files or spec is not None or sites is not None or label_key is not None):
        return None
    if not files:
        given = "--partition" if spec is not None else "--sites" if sites is not None else "--label-key"
        raise ConfigError(
            f"{given} splits one dataset into sites and needs it: add --data FILE (repeatable; each file is a domain)"
        )
    for f in files:
        if not Path(f).is_file():
            raise ConfigError(f"--data {f}: file not found")
    if sites is not None and (isinstance(sites, bool) or not isinstance(sites, int) or sites < 1):
        raise ConfigError(f"--sites {sites}: expected a whole number of sites, at least 1")
    if min_records is not None and (
        isinstance(min_records, bool) or not isinstance(min_records, int) or min_records < 1
    ):
        raise ConfigError(f"{where}.min_records {min_records!r}: expected a whole number, at least 1")
    if label_key is not None and (not isinstance(label_key, str) or not label_key.strip()):
        raise ConfigError(f"--label-key {label_key!r}: expected the name of a top-level field of the records")
    return _PartitionRequest(
        files, str(spec) if spec is not None else "iid", sites, label_key.strip() if label_key else None, min_records
    )


def resolve_config(args: argparse.Namespace) -> FedTuneConfig:
    """Defaults <- config file (or the bundled demo config) <- flags."""
    return resolve_run(args).cfg


def resolve_run(args: argparse.Namespace) -> Resolved:
    """The run's config, and its partition when the sites are split from one dataset (--data;
    the split is written to OUT/partitions here, so OUT is settled here too)."""
    if args.site_rank and args.resume:
        raise ConfigError("--site-rank: a resumed run keeps its sites' ranks (they are in its saved config)")
    ranks = _site_ranks(args.site_rank)  # their form checked before any partition is written
    resolved = _resolve_run(args)
    return Resolved(_with_ranks(resolved.cfg, ranks), resolved.partition) if ranks else resolved


def _site_ranks(specs: list[str]) -> dict[str, int]:
    ranks = {}
    for spec in specs:
        name, _, r = spec.partition("=")
        try:
            ranks[name.strip()] = int(r)
        except ValueError:
            raise ConfigError(f"--site-rank {spec!r}: expected NAME=R with R a whole number, e.g. site-1=4") from None
    return ranks


def _with_ranks(cfg: FedTuneConfig, ranks: dict[str, int]) -> FedTuneConfig:
    names = [s.name for s in cfg.federation.sites]
    unknown = sorted(set(ranks) - set(names))
    if unknown:
        raise ConfigError(f"--site-rank {unknown[0]}: no such site; the sites are {', '.join(names)}")
    data = json.loads(cfg.to_json())
    for s in data["federation"]["sites"]:
        if s["name"] in ranks:
            s["rank"] = ranks[s["name"]]
    return load_config(None, base=data, source="--site-rank")


def _resolve_run(args: argparse.Namespace) -> Resolved:
    partition_flags = has_partition_flags(args)
    overrides = config_overrides(args, "ftsim")  # --out among them: output.dir
    if args.resume:
        return _resumed(args, overrides, partition_flags)
    if args.site and partition_flags:
        raise ConfigError(
            f"--site lists the sites and {PARTITION_FLAGS} split one dataset into sites: use one or the other"
        )
    cfg_path = Path(args.config) if args.config else None
    if cfg_path is None and not args.site and not partition_flags:
        cfg_path = bundled_path("configs", DEFAULT_CONFIG)
    raw, section = _read_config(cfg_path, keep_partition=not args.site)
    request = _partition_request(args, section, cfg_path)
    load = _loader(raw, cfg_path)
    if request is not None:
        if section is not None and not partition_flags and _lists_sites(raw):
            raise ConfigError(f"{cfg_path}: both federation.sites and simulation.partition give the sites: keep one")
        return _partitioned(request, overrides, load)
    if args.site:
        overrides["federation.sites"] = [parse_site(s) for s in args.site]
    elif cfg_path is not None and isinstance(sites := _config_sites(raw), list):
        overrides.setdefault("federation.sites", _relative_to(sites, cfg_path))
    return Resolved(_check_sites(load(overrides)))


def has_partition_flags(args: argparse.Namespace) -> bool:
    return bool(args.data or args.partition is not None or args.sites is not None or args.label_key is not None)


def _resumed(args: argparse.Namespace, overrides: dict, partition_flags: bool) -> Resolved:
    """--resume DIR: the run's own record holds its config; flags may change what is safe to
    change (e.g. --rounds). A partitioned run's saved config lists its sites' files in
    DIR/partitions: never split again."""
    from fedtune.server.record import FILE, RecordError, finished_note, read_record

    if args.config or args.site or args.out or partition_flags:
        raise ConfigError(
            f"--resume DIR takes the run's saved config (its sites too) and writes to DIR; don't combine it with --config, --site, --out, {PARTITION_FLAGS}"
        )
    record = Path(args.resume) / FILE
    if not record.is_file():
        raise ConfigError(f"--resume {args.resume}: nothing to resume (no readable {record.name})")
    try:
        doc = read_record(record)
    except RecordError as e:  # names the key that is wrong, or the version that is not read
        raise ConfigError(f"--resume {args.resume}: nothing to resume ({e})") from None
    overrides["output.dir"] = str(Path(args.resume))
    cfg = _check_sites(load_config(None, overrides, base=doc.config, source=str(record)))
    return Resolved(cfg, finished=finished_note(doc, Path(args.resume), cfg.federation.rounds))


def _read_config(cfg_path: Path | None, keep_partition: bool) -> tuple[dict[str, Any], Any]:
    """The config file's contents without ``simulation.partition``, and that section (None
    without one, or when ``keep_partition`` is false: --site overrides it). The section is
    ftsim's own, read here; the run's saved config lists the sites it made."""
    raw: dict[str, Any] = read_config_file(cfg_path) if cfg_path is not None else {}
    if not (isinstance(raw.get("simulation"), dict) and "partition" in raw["simulation"]):
        return raw, None
    section = raw["simulation"]["partition"] if keep_partition else None
    return {**raw, "simulation": {k: v for k, v in raw["simulation"].items() if k != "partition"}}, section


def _loader(raw: dict[str, Any], cfg_path: Path | None) -> Callable[[dict], FedTuneConfig]:
    """overrides -> the config: the defaults, under the config file's contents when there is one."""
    source = str(cfg_path) if cfg_path is not None else None

    def load(ovr: dict) -> FedTuneConfig:
        return load_config(None, ovr, base=raw, source=source) if cfg_path is not None else load_config(None, ovr)

    return load


def _config_sites(raw: dict[str, Any]) -> Any:
    """The config file's federation.sites (None without a federation mapping)."""
    return (raw.get("federation") or {}).get("sites") if isinstance(raw.get("federation"), dict) else None


def _lists_sites(raw: dict[str, Any]) -> bool:
    return isinstance(raw.get("federation"), dict) and bool(raw["federation"].get("sites"))


def _relative_to(sites: list, cfg_path: Path) -> list:
    """Site files in a config are relative to the config file."""
    fixed = []
    for s in sites:
        if isinstance(s, dict):
            s = dict(s)
            for key in ("train", "eval"):
                if isinstance(s.get(key), str) and not Path(s[key]).expanduser().is_absolute():
                    s[key] = str((cfg_path.parent / s[key]).resolve())
        fixed.append(s)
    return fixed


def _partitioned(request: _PartitionRequest, overrides: dict, load) -> Resolved:
    """Split the data, check the whole config with the sites it makes, then write the sites' files."""
    from fedtune.common.data import DataError
    from fedtune.simulations.partition import make_partition

    pre = load(overrides)  # everything but the sites, checked before the data is read
    out = pre.output.dir or default_out_dir()
    if (Path(out) / "metrics.json").is_file():
        raise ConfigError(
            f"--out {out} already holds a run (its sites are in {Path(out) / 'partitions'}); continue it with --resume {out}, or choose another folder"
        )
    try:
        part = make_partition(
            request.files, request.spec, request.sites, pre.train.seed, request.label_key, pre.data, request.min_records
        )
    except DataError as e:  # names the file and line, never the content
        raise ConfigError(str(e)) from None
    overrides = {**overrides, "output.dir": str(out), "federation.sites": part.site_configs(out)}
    cfg = _check_sites(load(overrides), check_files=False)  # the whole config, before anything is written
    part.write(out)
    return Resolved(_check_sites(cfg), part)


def _check_sites(cfg: FedTuneConfig, check_files: bool = True) -> FedTuneConfig:
    if not cfg.federation.sites:
        raise ConfigError(
            "no sites: pass --site NAME=TRAIN[:EVAL] (repeatable), --data FILE with --partition SPEC, or list federation.sites in --config"
        )
    if cfg.federation.min_sites > len(cfg.federation.sites):
        raise ConfigError(
            f"federation.min_sites is {cfg.federation.min_sites} but only {len(cfg.federation.sites)} site(s) are given"
        )
    for s in cfg.federation.sites if check_files else ():
        for label, f in (("train", s.train), ("eval", s.eval)):
            if f is not None and not Path(f).is_file():
                raise ConfigError(f"federation.sites[{s.name}].{label}: file {f} not found")
    return cfg.with_secure_default(False)


def site_problem(site, data_cfg) -> str | None:
    """Why no site would train on this site's files (file, line and what is wrong, as ``ftclient
    check`` says it; counts only, never a record), or None."""
    from fedtune.common.data import DataError, read_valid_records

    for f in (site.train, site.eval):
        if f is not None:
            try:
                read_valid_records(f, data_cfg)  # streamed; the same rule and tolerance as the site's
            except DataError as e:
                return str(e)
    return None


def refuse_unusable_sites(cfg: FedTuneConfig) -> int | None:
    """Every site's files read here, before a model is provisioned or a worker starts: the exit
    code (each bad site and its reason said on stderr) when one is not usable, else None."""
    problems = {s.name: why for s in cfg.federation.sites if (why := site_problem(s, cfg.data)) is not None}
    for name, why in problems.items():
        print(f"ftsim: site {name}: {why}", file=sys.stderr)
    if not problems:
        return None
    print(
        f"ftsim: {len(problems)} of {len(cfg.federation.sites)} sites have data that cannot be used; nothing was "
        "started. `ftclient check --data FILE` lists each file's problems.",
        file=sys.stderr,
    )
    return exits.BAD_INPUT


@dataclass
class SiteExplainer:
    """What ftsim, playing every site, reads from a site's own files about why it sent nothing
    (the coordinator's RunState.explain_site); ``explained``: the sites it had a reason for."""

    cfg: FedTuneConfig
    explained: set[str] = field(default_factory=set)

    def __call__(self, name: str, status: str) -> str | None:
        site = next((s for s in self.cfg.federation.sites if s.name == name), None)
        why = None
        if site is not None and status == "data-error":
            why = site_problem(site, self.cfg.data)
        elif site is not None and status == "no-usable-examples":
            why = (
                f"every training example loses its whole answer at data.max_length {self.cfg.data.max_length} "
                f"(ftclient check --data {site.train} --max-length N shows the token lengths)"
            )
        if why is not None:
            self.explained.add(name)
        return why


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


SITES_NOTE = """# What each virtual site kept to itself

federation.personalization: each folder here is one virtual site's own: `private/round-NNNN/` its
private part after that round (a PEFT folder), `personalized/` its newest personalized model (a
PEFT adapter folder on the run's base: `fteval --adapter sites/NAME/personalized --data FILE`).
The coordinator never received any of it, only each site's scores. In a deployment these stay at
each site, in its ftclient `--work-dir`; ftsim keeps them side by side because it plays every site.
"""


def private_folders(sites: list, out: Path) -> list:
    """Each virtual site with the folder it keeps its private part in: ``out/sites/NAME`` (and
    ``out/sites/README.md`` saying what they are)."""
    from dataclasses import replace

    root = out / "sites"
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text(SITES_NOTE, encoding="utf-8")
    return [replace(s, state_dir=str(root / s.name)) for s in sites]


def with_site_keys(sites: list) -> tuple[list, frozenset]:
    """Each virtual site with a signing key of its own (made here, in memory, for this run: what
    ``ftclient keygen`` is to a real site), and the registered set of their public keys, which
    the coordinator publishes to the sites under secure aggregation (as ftserver publishes
    ``--authorized-keys``). -> (sites, public keys)."""
    from dataclasses import replace

    from cryptography.hazmat.primitives import serialization

    from fedtune.common.secagg import identity_public, new_identity

    keys = [new_identity() for _ in sites]
    pem = [
        k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        for k in keys
    ]
    return [replace(s, key=k) for s, k in zip(sites, pem)], frozenset(identity_public(k) for k in keys)


def _site_cpus(cfg: FedTuneConfig) -> float:
    """The CPUs Ray gives each virtual site's worker (its torch threads: Ray sets OMP_NUM_THREADS)."""
    return min(cfg.simulation.cpus_per_site, float(usable_cores()))


def run(cfg: FedTuneConfig, out: Path, say=print, resume: bool = False, started: float | None = None, stop_after=()):
    """Run the simulation; returns the server's RunState. Ray is shut down on every path. The
    coordinator writes the report, with ftsim's sections (:func:`.report_sections.federation_sections`).
    ``stop_after``: more stop conditions for the rounds (:func:`fedtune.server.app.run_federation`)."""
    from flwr.simulation import run_simulation

    from fedtune.client.app import make_client_app, sites_from_config
    from fedtune.common.modeling import resolve_model_source
    from fedtune.server.app import make_server_app
    from fedtune.simulations.report_sections import federation_sections

    resolve_model_source(cfg.model)  # provision the model here, once, before workers start
    sites, site_keys = with_site_keys(sites_from_config(cfg))
    if cfg.federation.personalization != "none":
        sites = private_folders(sites, out)
    cpus = _site_cpus(cfg)
    backend_config = {"client_resources": {"num_cpus": cpus, "num_gpus": cfg.simulation.gpus_per_site}}
    result: list = []
    # ftsim's sections (the sites' data) go into the coordinator's end-of-run report: rendered once.
    sections = federation_sections(out)
    explain = SiteExplainer(cfg)
    server_app = make_server_app(
        cfg,
        out,
        say,
        result,
        resume,
        site_keys,
        report_sections=sections,
        explain_site=explain,
        started=started,
        stop_after=stop_after,
    )
    client_app = make_client_app(sites, device=None if cfg.model.device == "auto" else cfg.model.device)
    prepare_engine()
    try:
        start_ray()
        run_simulation(
            server_app=server_app, client_app=client_app, num_supernodes=len(sites), backend_config=backend_config
        )
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
        fix = f"fix the data of {', '.join(sorted(explain.explained))} (above), then " if explain.explained else ""
        hint = f" ({fix}continue with: ftsim --resume {out})" if (out / "metrics.json").is_file() else ""
        raise RuntimeError(f"{result[0]}{hint}")
    return result[0]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tune"]:  # ftsim tune: a hyperparameter study over federations (simulations/tune.py)
        from fedtune.simulations.tune import main as tune_main

        return tune_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        resolved = resolve_run(args)
    except ConfigError as e:
        print(f"ftsim: {e}", file=sys.stderr)
        return exits.BAD_INPUT
    cfg = resolved.cfg
    out = Path(cfg.output.dir or default_out_dir())
    t0 = time.time()
    say = make_say(t0)
    if resolved.finished is not None:
        say(resolved.finished)
        if not cfg.simulation.baselines:
            return exits.OK
        return _baselines(cfg, out, say) or exits.OK  # the baselines a finished run has not run yet
    if (code := refuse_unusable_sites(cfg)) is not None:
        return code
    announce(resolved, out, say)
    say(f"the coordinator's scoring and exports use {set_threads()} CPU thread(s); each site {_site_cpus(cfg):g}")
    sigterm_as_interrupt()
    rs = _federate(cfg, out, say, resume=bool(args.resume), started=t0)
    if rs is None:
        return exits.FAILED
    agg = rs.rounds[-1].get("aggregate", {})
    personal = {k.removeprefix("personal_"): v for k, v in agg.items() if k in PERSONAL_SCORES}
    say(
        f"done in {rs.history.finished_s:.0f} s"
        + (f" (all its sessions; this one {time.time() - t0:.0f} s)" if args.resume else "")
        + ". Final global eval: "
        + ", ".join(f"{k} {v:.3f}" for k, v in agg.items() if k not in PERSONAL_SCORES)
        + (
            "; each site's personalized model (mean over sites): "
            + ", ".join(f"{k} {v:.3f}" for k, v in personal.items())
            if personal
            else ""
        )
    )
    if cfg.simulation.baselines and (code := _baselines(cfg, out, say)):
        return code
    _say_outputs(cfg, out, rs, say)
    return exits.OK


def announce(resolved: Resolved, out: Path, say) -> None:
    """What is about to run: the sites, model, method and rounds; the safeguards; the partition."""
    cfg = resolved.cfg
    say(_run_line(cfg, out))
    ranked = [f"{s.name} r={s.rank}" for s in cfg.federation.sites if s.rank is not None]
    if ranked:
        say(f"mixed LoRA ranks (HetLoRA zero-padding): {', '.join(ranked)}; the others r={cfg.peft.r}")
    if (line := _safeguard_line(cfg)) is not None:
        say(line)
    if resolved.partition is not None:
        # Counts only: site records never reach the console or a log.
        say(resolved.partition.summary())
        for line in resolved.partition.lines():
            say(line)
        say(f"sites' files and composition: {out / 'partitions'}")


def _run_line(cfg: FedTuneConfig, out: Path) -> str:
    names = ", ".join(s.name for s in cfg.federation.sites)
    return (
        f"{len(cfg.federation.sites)} site{'s' if len(cfg.federation.sites) != 1 else ''} ({names}); model {cfg.model.name}; {cfg.peft.describe()}; "
        f"{cfg.federation.strategy}{' with secure aggregation (SecAgg+)' if cfg.secure_aggregation.enabled else ''}; {cfg.federation.rounds} rounds x "
        f"{cfg.train.local_steps or str(cfg.train.local_epochs) + ' epochs'} local steps; output {out}"
    )


def _safeguard_line(cfg: FedTuneConfig) -> str | None:
    """Differential privacy's budget, or else the update-norm bound; None without either."""
    if cfg.privacy.enabled:
        return f"client-level differential privacy: budget epsilon {cfg.privacy.epsilon:g} at delta {cfg.privacy.delta:g}; updates clipped to L2 norm {cfg.privacy.clip:g}"
    bound = cfg.federation.update_norm_bound
    if bound in (None, "off"):
        return None
    return f"update-norm bound: each site clips its update to L2 norm {'auto (10 x lr x steps x sqrt(values))' if bound == 'auto' else f'{bound:g}'}"


def _federate(cfg: FedTuneConfig, out: Path, say, resume: bool, started: float):
    """The federation (:func:`run`) -> its RunState; None when it failed (said on stderr)."""
    try:
        return run(cfg, out, say, resume=resume, started=started)
    except KeyboardInterrupt:
        # run() has shut Ray down; the ServerApp thread (not a daemon) may still be waiting on
        # replies that will never come, so leave without joining it.
        print(f"ftsim: interrupted; checkpoints so far are in {out / 'checkpoints'}", file=sys.stderr, flush=True)
        os._exit(exits.INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - one clear line for the user, details above
        print(f"ftsim: failed: {e}", file=sys.stderr)
        return None


def _baselines(cfg: FedTuneConfig, out: Path, say) -> int | None:
    """ftsim --baselines after the federation -> the exit code when they did not finish, else None."""
    from fedtune.simulations.baselines import BaselineError, add_baselines

    try:
        add_baselines(cfg, out, say)
    except BaselineError as e:
        print(f"ftsim: baselines: {e}", file=sys.stderr)
        return exits.FAILED
    except KeyboardInterrupt:
        print(
            f"ftsim: interrupted; the baselines finished so far are kept in {out / 'baselines'} (continue with: ftsim --resume {out})",
            file=sys.stderr,
        )
        return exits.INTERRUPTED
    return None


def _say_outputs(cfg: FedTuneConfig, out: Path, rs, say) -> None:
    """Where the run's artifact, metrics and report are; the best round's adapter."""
    saves = methods.get(cfg.peft.method).artifact  # "model" (full fine-tuning) or "adapter"
    artifact = out / saves
    merged = f"   merged: {out / 'merged'}" if cfg.output.merged else ""
    say(f"{artifact.name}: {artifact}{merged}   metrics: {out / 'metrics.json'}   report: {out / 'report.md'}")
    best = rs.best()
    if best is not None and saves == "adapter":
        say(f"best round: {best['round']} ({best['metric']} {best['value']:.4f}), its adapter in {out / 'best'}")


if __name__ == "__main__":
    sys.exit(main())
