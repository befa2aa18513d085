"""Split one dataset into virtual sites, for studying non-IID federations (``ftsim --partition``).

The dataset is one or more data files; each file is a *domain*. A record's *category* is the
value of its ``label_key`` field when one is given (e.g. ``completion`` for a classification
set), else its domain. Specs:

- ``iid``             records shuffled and dealt evenly (sizes differ by at most one);
- ``dirichlet:ALPHA`` label skew (Hsu et al. 2019): each category's records are split over the
                      sites in proportions drawn from Dirichlet(ALPHA); small ALPHA, few
                      categories per site; large ALPHA, every site near the global mix;
- ``quantity:ALPHA``  quantity skew: site sizes proportional to a Dirichlet(ALPHA) draw;
- ``domain``          one domain (file) per site.

A random split that leaves a site with fewer than ``min_records`` records is drawn again
(a bounded number of tries, as Flower Datasets' DirichletPartitioner and FedLab do); the
whole procedure is seeded, so the same seed gives the same split.

Site files are written as JSONL to ``<out>/partitions/site-K/train.jsonl`` (atomically), and
the composition (counts per site and category, never record content) to
``<out>/partitions/composition.json``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fedtune.common.config import ConfigError, DataConfig
from fedtune.common.data import DataError, RecordError, read_valid_records

KINDS = ("iid", "dirichlet", "quantity", "domain")
ACCEPTED = "iid, dirichlet:ALPHA, quantity:ALPHA or domain (ALPHA a number > 0, e.g. dirichlet:0.3)"
MIN_RECORDS = 2  # per site: one to train on and one held out for evaluation
MAX_TRIES = 100  # random draws before a split that leaves a site too small is given up
MAX_CATEGORIES = 100  # a label key with more distinct values is free text, not a label
PARTITIONS_DIR = "partitions"
COMPOSITION_FILE = "composition.json"
# Generic file names: the domain is then named after the file's folder (finance/train.jsonl -> finance).
GENERIC_STEMS = {"train", "training", "eval", "test", "dev", "valid", "validation", "data", "all", "records"}


@dataclass(frozen=True)
class PartitionSpec:
    kind: str
    alpha: float | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.alpha:g}" if self.alpha is not None else self.kind


def parse_spec(text: str) -> PartitionSpec:
    """'iid' | 'dirichlet:ALPHA' | 'quantity:ALPHA' | 'domain' -> PartitionSpec; ConfigError otherwise."""
    raw = str(text).strip()
    kind, sep, arg = raw.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ConfigError(f"--partition {raw!r}: unknown partition {kind!r}; expected {ACCEPTED}")
    if kind in ("iid", "domain"):
        if sep:
            raise ConfigError(f"--partition {raw!r}: {kind} takes no parameter; expected {ACCEPTED}")
        return PartitionSpec(kind)
    if not sep or not arg.strip():
        raise ConfigError(f"--partition {raw!r}: {kind} needs ALPHA, e.g. {kind}:0.3; expected {ACCEPTED}")
    try:
        alpha = float(arg)
    except ValueError:
        raise ConfigError(f"--partition {raw!r}: ALPHA {arg.strip()!r} is not a number; expected {ACCEPTED}") from None
    if not np.isfinite(alpha) or alpha <= 0:
        raise ConfigError(
            f"--partition {raw!r}: ALPHA must be a finite number > 0, got {arg.strip()}; expected {ACCEPTED}"
        )
    return PartitionSpec(kind, alpha)


# ---------------------------------------------------------------- the split (pure)


def _cuts(proportions: np.ndarray, n: int) -> np.ndarray:
    """Split points for n items in these proportions (as FedLab / NIID-Bench compute them)."""
    return (np.cumsum(proportions) * n).astype(int)[:-1]


def split_indices(
    keys: Sequence[tuple[str, str]],
    spec: PartitionSpec,
    n_sites: int | None,
    seed: int,
    min_records: int = MIN_RECORDS,
    max_tries: int = MAX_TRIES,
) -> list[list[int]]:
    """Assign records to sites. ``keys[i]`` is record i's (domain, category).

    Returns one list of record indices per site (each index in exactly one list, each list in
    a seeded random order). Raises ConfigError when the spec cannot give every site at least
    ``min_records`` records.
    """
    domains = list(dict.fromkeys(d for d, _ in keys))
    n_sites = _site_count(len(keys), domains, spec, n_sites, min_records)
    rng = np.random.default_rng(seed)
    if spec.kind == "iid":
        sites = [list(a) for a in np.array_split(rng.permutation(len(keys)), n_sites)]
    elif spec.kind == "domain":
        sites = _by_domain(keys, domains, min_records)
    else:
        sites = _skewed(keys, spec, n_sites, rng, min_records, max_tries)
    return [[int(i) for i in rng.permutation(s)] for s in sites]


def _site_count(n: int, domains: list[str], spec: PartitionSpec, n_sites: int | None, min_records: int) -> int:
    """The number of sites the split makes (domain: one per domain), checked against the records."""
    if spec.kind == "domain":
        if n_sites is not None and n_sites != len(domains):
            raise ConfigError(
                f"--partition domain puts one domain (data file) on each site: {len(domains)} domain(s) ({', '.join(domains)}) "
                f"but --sites {n_sites}; give --sites {len(domains)} or leave it out"
            )
        n_sites = len(domains)
    if n_sites is None:
        raise ConfigError(f"--partition {spec} needs the number of sites: add --sites N")
    if n_sites < 1:
        raise ConfigError(f"--sites {n_sites}: expected at least 1")
    if n < n_sites * min_records:
        raise ConfigError(
            f"--partition {spec}: {n} record(s) cannot give each of {n_sites} sites at least {min_records}; lower --sites or add data"
        )
    return n_sites


def _by_domain(keys: Sequence[tuple[str, str]], domains: list[str], min_records: int) -> list[list[int]]:
    """``domain``: every domain's records on a site of their own."""
    sites = [[i for i, (d, _) in enumerate(keys) if d == dom] for dom in domains]
    small = [f"{dom} ({len(s)})" for dom, s in zip(domains, sites) if len(s) < min_records]
    if small:
        raise ConfigError(
            f"--partition domain: each site needs at least {min_records} records; too few in {', '.join(small)}"
        )
    return sites


def _skewed(
    keys: Sequence[tuple[str, str]],
    spec: PartitionSpec,
    n_sites: int,
    rng: np.random.Generator,
    min_records: int,
    max_tries: int,
) -> list[list[int]]:
    """``quantity`` and ``dirichlet``: seeded draws until one leaves every site ``min_records``."""
    by_cat: dict[str, list[int]] = {}
    for i, (_, c) in enumerate(keys):
        by_cat.setdefault(c, []).append(i)
    for _ in range(max_tries):
        if spec.kind == "quantity":
            draw = _quantity_draw(len(keys), spec.alpha, n_sites, rng)
        else:
            draw = _label_draw(by_cat, spec.alpha, n_sites, rng)
        if min(len(s) for s in draw) >= min_records:
            return draw
    what = "categories" if spec.kind == "dirichlet" else "site sizes"
    raise ConfigError(
        f"--partition {spec}: alpha {spec.alpha:g} skews the {what} so much that {max_tries} seeded draws all left a site "
        f"with fewer than {min_records} records ({len(keys)} records, {n_sites} sites); raise ALPHA, lower --sites, or add data"
    )


def _quantity_draw(n: int, alpha: float, n_sites: int, rng: np.random.Generator) -> list[list[int]]:
    """Quantity skew: site sizes proportional to one Dirichlet(alpha) draw."""
    p = rng.dirichlet(np.full(n_sites, alpha))
    return [list(a) for a in np.split(rng.permutation(n), _cuts(p, n))]


def _label_draw(by_cat: dict[str, list[int]], alpha: float, n_sites: int, rng: np.random.Generator) -> list[list[int]]:
    """Label skew, category by category: each one's records over the sites by a Dirichlet(alpha) draw."""
    draw: list[list[int]] = [[] for _ in range(n_sites)]
    for c in sorted(by_cat):
        idx = rng.permutation(by_cat[c])
        p = rng.dirichlet(np.full(n_sites, alpha))
        for site, part in zip(draw, np.split(idx, _cuts(p, len(idx)))):
            site.extend(part.tolist())
    return draw


# ---------------------------------------------------------------- the records


def domain_names(files: Sequence[str | Path]) -> list[str]:
    """A name per file: its folder's name for generic file names (finance/train.jsonl), else its stem; made unique."""
    names: list[str] = []
    for f in files:
        p = Path(f)
        base = p.parent.name if p.stem.lower() in GENERIC_STEMS and p.parent.name else p.stem
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def _label(record: dict, key: str) -> str:
    if key not in record:
        raise RecordError(f"no field '{key}' (the --label-key)")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordError(f"field '{key}' (the --label-key) must be a text or number label, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise RecordError(f"field '{key}' (the --label-key) is empty")
    return text


@dataclass
class Dataset:
    files: list[str]
    domains: list[str]  # one per file
    records: list[Any]  # as written to the site files
    keys: list[tuple[str, str]]  # (domain, category) per record
    skipped: int = 0  # unusable records left out (within data.max_invalid_fraction)
    converted: bool = False  # records rewritten as chat messages (files in different chat formats)


def read_dataset(
    files: Sequence[str | Path], label_key: str | None = None, data_cfg: DataConfig | None = None
) -> Dataset:
    """Read and validate every file as a site's data is validated (``load_site_data``'s rules).

    Errors are DataErrors naming the file and the line (or record, row) and the field, never
    the content. Unusable records within ``data.max_invalid_fraction`` are left out.
    """
    data_cfg = data_cfg or DataConfig()
    paths = [Path(f).expanduser().resolve() for f in files]
    seen: set[Path] = set()
    for p in paths:
        if p in seen:
            raise DataError(f"{p}: given twice in --data")
        seen.add(p)
    domains = domain_names(paths)
    raw: list[tuple[Any, str]] = []
    keys: list[tuple[str, str]] = []
    examples = []
    formats: set[str] = set()
    skipped = 0
    for p, dom in zip(paths, domains):
        read = read_valid_records(p, data_cfg)
        fmt, invalid = read.format, read.invalid
        for where, record, ex in read.valid:
            try:
                category = _label(record, label_key) if label_key else dom
            except RecordError as e:  # a usable record without its label: the key is wrong for this file
                raise DataError(f"{p}: {where}: {e}") from None
            raw.append((record, fmt))
            examples.append(ex)
            keys.append((dom, category))
        skipped += len(invalid)
        if fmt is not None:
            formats.add(fmt)
    if label_key:
        n_cat = len({c for _, c in keys})
        if n_cat > MAX_CATEGORIES:
            raise DataError(
                f"--label-key {label_key}: {n_cat} distinct values in {len(keys)} records; a label key names a field with few "
                f"values (a class label, at most {MAX_CATEGORIES}), and its values are shown in the site composition"
            )
    converted = len(formats) > 1
    if converted and "text" in formats:
        raise DataError(
            f"--data: plain-text files cannot share sites with chat-format files (formats here: {', '.join(sorted(formats))})"
        )
    # A site file is read in one format; files in different chat formats are written as the
    # chat messages they stand for (what a site trains on is the same).
    records = [{"messages": ex.messages} for ex in examples] if converted else [r for r, _ in raw]
    return Dataset([str(p) for p in paths], domains, records, keys, skipped, converted)


# ---------------------------------------------------------------- the partition


@dataclass
class Partition:
    spec: PartitionSpec
    seed: int
    label_key: str | None
    dataset: Dataset
    sites: list[list[int]]  # record indices per site
    min_records: int = MIN_RECORDS
    categories: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.categories:
            counts = Counter(c for _, c in self.dataset.keys)
            # Domains in --data order; labels by frequency, then name.
            self.categories = (
                [d for d in self.dataset.domains if d in counts]
                if not self.label_key
                else sorted(counts, key=lambda c: (-counts[c], c))
            )

    @property
    def names(self) -> list[str]:
        return [f"site-{k}" for k in range(1, len(self.sites) + 1)]

    def composition(self) -> dict[str, Any]:
        sites = {}
        for name, idx in zip(self.names, self.sites):
            counts = Counter(self.dataset.keys[i][1] for i in idx)
            sites[name] = {"records": len(idx), "by_category": {c: counts.get(c, 0) for c in self.categories}}
        return {
            "spec": str(self.spec),
            "seed": self.seed,
            "label_key": self.label_key,
            "min_records": self.min_records,
            "data": [{"file": f, "domain": d} for f, d in zip(self.dataset.files, self.dataset.domains)],
            "records": len(self.dataset.records),
            "skipped_unusable": self.dataset.skipped,
            "sites": sites,
        }

    def lines(self) -> list[str]:
        """One line per site: record count and count per category (counts only, never content)."""
        out = []
        many = len(self.categories) > 10
        for name, c in self.composition()["sites"].items():
            items = c["by_category"].items()
            if many:  # only the categories present, most common first
                items = sorted(((k, v) for k, v in items if v), key=lambda kv: -kv[1])
            out.append(f"{name}: {c['records']} records | " + ", ".join(f"{k} {v}" for k, v in items))
        return out

    def summary(self) -> str:
        ds = self.dataset
        by = f"label key '{self.label_key}'" if self.label_key else "domain"
        extra = f"; {ds.skipped} unusable record(s) left out" if ds.skipped else ""
        conv = "; records written as chat messages (the files' formats differ)" if ds.converted else ""
        return (
            f"partition {self.spec} (seed {self.seed}) of {len(ds.records)} records from {len(ds.files)} file(s) "
            f"({', '.join(ds.domains)}) into {len(self.sites)} sites; categories by {by}{extra}{conv}"
        )

    def site_configs(self, out: str | Path) -> list[dict[str, str]]:
        root = Path(out).expanduser().resolve() / PARTITIONS_DIR
        return [{"name": name, "train": str(root / name / "train.jsonl")} for name in self.names]

    def write(self, out: str | Path) -> list[dict[str, str]]:
        """Write each site's records and the composition under ``out/partitions``; returns the sites for federation.sites."""
        sites = self.site_configs(out)
        for site, idx in zip(sites, self.sites):
            text = "".join(json.dumps(self.dataset.records[i], ensure_ascii=False, default=str) + "\n" for i in idx)
            _write_atomic(Path(site["train"]), text)
        root = Path(out).expanduser().resolve() / PARTITIONS_DIR
        _write_atomic(root / COMPOSITION_FILE, json.dumps(self.composition(), indent=2, ensure_ascii=False) + "\n")
        return sites


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def make_partition(
    files: Sequence[str | Path],
    spec: PartitionSpec | str,
    n_sites: int | None,
    seed: int,
    label_key: str | None = None,
    data_cfg: DataConfig | None = None,
    min_records: int | None = None,
) -> Partition:
    """Read the files and split their records into sites (nothing written yet: see Partition.write)."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    min_records = MIN_RECORDS if min_records is None else min_records
    if not files:
        raise ConfigError(f"--partition {spec}: no data files; add --data FILE (repeatable)")
    ds = read_dataset(files, label_key, data_cfg)
    sites = split_indices(ds.keys, spec, n_sites, seed, min_records)
    return Partition(spec, seed, label_key, ds, sites, min_records)
