"""ftsim --partition: one dataset split into virtual sites (iid, label skew, quantity skew, by domain).

Fast: no model. The split itself is a pure function of (domain, category) keys and a seed;
the rest reads small JSONL files written here and checks what is written and printed.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedtune.common.config import ConfigError
from fedtune.common.data import DataError
from fedtune.server.record import MethodInfo, RunRecord, write_record
from fedtune.simulations import cli as ftsim
from fedtune.simulations.partition import (
    MIN_RECORDS,
    PartitionSpec,
    domain_names,
    make_partition,
    parse_spec,
    split_indices,
)

SPECS = ["iid", "dirichlet:0.3", "dirichlet:0.1", "quantity:0.5", "quantity:1000", "domain"]


def keys_for(n_per_cat: int = 100, cats: int = 4, domains: int = 2) -> list[tuple[str, str]]:
    return [(f"d{i % domains}", f"c{i % cats}") for i in range(n_per_cat * cats)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def finance_like(tmp_path: Path, n: int = 60, name: str = "finance/train.jsonl") -> tuple[Path, list[dict]]:
    labels = ["positive", "negative", "neutral"]
    recs = [{"prompt": f"SECRET-F{i} How is this news?", "completion": " " + labels[i % 3]} for i in range(n)]
    return write_jsonl(tmp_path / name, recs), recs


def medical_like(tmp_path: Path, n: int = 40, name: str = "medical/train.jsonl") -> tuple[Path, list[dict]]:
    recs = [
        {
            "messages": [
                {"role": "user", "content": f"SECRET-M{i} what is it?"},
                {"role": "assistant", "content": f"SECRET-A{i} an answer"},
            ]
        }
        for i in range(n)
    ]
    return write_jsonl(tmp_path / name, recs), recs


def assert_exact_cover(sites: list[list[int]], n: int) -> None:
    flat = [i for s in sites for i in s]
    assert sorted(flat) == list(range(n)), "every record in exactly one site"


# ---------------------------------------------------------------- spec parsing


@pytest.mark.parametrize(
    "text, kind, alpha",
    [
        ("iid", "iid", None),
        ("domain", "domain", None),
        ("dirichlet:0.3", "dirichlet", 0.3),
        (" Dirichlet:1e3 ", "dirichlet", 1000.0),
        ("quantity:2", "quantity", 2.0),
    ],
)
def test_parse_spec_accepts_the_documented_forms(text, kind, alpha):
    spec = parse_spec(text)
    assert (spec.kind, spec.alpha) == (kind, alpha)
    assert parse_spec(str(spec)) == spec


@pytest.mark.parametrize(
    "text, shown",
    [
        ("zipf:1", "zipf"),
        ("", "''"),
        ("dirichlet", "needs ALPHA"),
        ("dirichlet:", "needs ALPHA"),
        ("dirichlet:0", "0"),
        ("quantity:-1", "-1"),
        ("dirichlet:abc", "abc"),
        ("dirichlet:nan", "nan"),
        ("iid:3", "iid:3"),
        ("domain:2", "domain:2"),
    ],
)
def test_parse_spec_refuses_bad_values_naming_them_and_the_accepted_forms(text, shown):
    with pytest.raises(ConfigError) as e:
        parse_spec(text)
    msg = str(e.value)
    assert repr(text.strip()) in msg and shown in msg
    assert "iid, dirichlet:ALPHA, quantity:ALPHA or domain" in msg


# ---------------------------------------------------------------- the split


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_every_record_is_assigned_exactly_once(spec, seed):
    keys = keys_for()
    s = parse_spec(spec)
    sites = split_indices(keys, s, None if s.kind == "domain" else 4, seed)
    assert_exact_cover(sites, len(keys))
    assert min(len(x) for x in sites) >= MIN_RECORDS


def test_iid_deals_evenly():
    keys = keys_for(n_per_cat=25, cats=3)  # 75 records over 4 sites: 19, 19, 19, 18
    sites = split_indices(keys, parse_spec("iid"), 4, seed=0)
    sizes = [len(s) for s in sites]
    assert len(sites) == 4 and max(sizes) - min(sizes) <= 1
    assert_exact_cover(sites, len(keys))
    # Shuffled, not dealt in file order.
    assert sites[0] != sorted(sites[0]) or sites[0][0] != 0


def _mix_distance(keys, sites) -> list[float]:
    """Per site: total variation distance between its category mix and the global mix."""
    glob = Counter(c for _, c in keys)
    n = len(keys)
    out = []
    for s in sites:
        c = Counter(keys[i][1] for i in s)
        out.append(0.5 * sum(abs(c.get(k, 0) / len(s) - v / n) for k, v in glob.items()))
    return out


def test_dirichlet_small_alpha_skews_categories_and_large_alpha_keeps_the_global_mix():
    keys = keys_for(n_per_cat=100, cats=4)
    small, large, top_small = [], [], []
    for seed in range(10):
        sites = split_indices(keys, parse_spec("dirichlet:0.1"), 4, seed)
        small += _mix_distance(keys, sites)
        top_small += [max(Counter(keys[i][1] for i in s).values()) / len(s) for s in sites]
        large += _mix_distance(keys, split_indices(keys, parse_spec("dirichlet:1000"), 4, seed))
    # alpha 0.1: most sites dominated by one category (the global mix is 25% each).
    assert np.mean(np.array(top_small) > 0.5) >= 0.6
    assert np.mean(small) > 0.4
    # alpha 1000: every site within a few points of the global mix.
    assert max(large) < 0.08


def test_dirichlet_uses_the_category_not_the_domain():
    # Two domains, each holding both categories equally: label skew must still separate categories.
    keys = keys_for(n_per_cat=200, cats=2, domains=2)
    keys = [(d, "x" if i < 200 else "y") for i, (d, _) in enumerate(keys)]
    tops = []
    for seed in range(5):
        for s in split_indices(keys, parse_spec("dirichlet:0.05"), 2, seed):
            tops.append(max(Counter(keys[i][1] for i in s).values()) / len(s))
    assert np.mean(tops) > 0.8


def test_quantity_skews_site_sizes_and_keeps_the_mix():
    keys = keys_for(n_per_cat=125, cats=4)
    cv_q, cv_iid, cv_big = [], [], []
    for seed in range(10):
        for spec, acc in (("quantity:0.5", cv_q), ("iid", cv_iid), ("quantity:1000", cv_big)):
            sizes = [len(s) for s in split_indices(keys, parse_spec(spec), 4, seed)]
            acc.append(np.std(sizes) / np.mean(sizes))
    assert np.mean(cv_q) > 0.4 and max(cv_iid) < 0.01 and max(cv_big) < 0.1
    # Sizes differ, but each site is a random sample: its mix stays near the global one.
    sites = split_indices(keys, parse_spec("quantity:0.5"), 4, seed=3)
    big = max(sites, key=len)
    assert _mix_distance(keys, [big])[0] < 0.1


def test_domain_puts_one_domain_on_each_site_and_checks_the_site_count():
    keys = [("finance", "positive")] * 30 + [("medical", "medical")] * 20 + [("legal", "legal")] * 10
    sites = split_indices(keys, parse_spec("domain"), None, seed=0)
    assert [sorted({keys[i][0] for i in s}) for s in sites] == [["finance"], ["medical"], ["legal"]]
    assert [len(s) for s in sites] == [30, 20, 10]
    assert split_indices(keys, parse_spec("domain"), 3, seed=0) == sites
    with pytest.raises(ConfigError, match=r"3 domain\(s\) \(finance, medical, legal\) but --sites 4"):
        split_indices(keys, parse_spec("domain"), 4, seed=0)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.3", "quantity:0.5"])
def test_same_seed_same_split_other_seed_other_split(spec):
    keys = keys_for()
    s = parse_spec(spec)
    assert split_indices(keys, s, 4, seed=5) == split_indices(keys, s, 4, seed=5)
    assert split_indices(keys, s, 4, seed=5) != split_indices(keys, s, 4, seed=6)


@pytest.mark.parametrize("spec, n_sites", [("dirichlet:0.1", 6), ("quantity:0.3", 4)])
def test_minimum_records_per_site_is_respected_by_drawing_again(spec, n_sites):
    keys = keys_for(n_per_cat=30, cats=4)
    first_draw_too_small = 0
    for seed in range(20):
        sites = split_indices(keys, parse_spec(spec), n_sites, seed, min_records=5)
        assert min(len(s) for s in sites) >= 5
        assert_exact_cover(sites, len(keys))
        try:
            split_indices(keys, parse_spec(spec), n_sites, seed, min_records=5, max_tries=1)
        except ConfigError:
            first_draw_too_small += 1
    assert first_draw_too_small > 0, "the redraw was exercised"


def test_an_impossible_minimum_is_a_clear_error():
    keys = keys_for(n_per_cat=5, cats=4)  # 20 records
    with pytest.raises(ConfigError) as e:
        split_indices(keys, parse_spec("dirichlet:0.001"), 8, seed=0, max_tries=20)
    assert "dirichlet:0.001" in str(e.value) and "alpha 0.001" in str(e.value) and "20 seeded draws" in str(e.value)
    with pytest.raises(ConfigError, match=r"quantity:0.001.*alpha 0.001"):
        split_indices(keys, parse_spec("quantity:0.001"), 8, seed=0, max_tries=20)
    with pytest.raises(ConfigError, match=r"20 record\(s\) cannot give each of 11 sites at least 2"):
        split_indices(keys, parse_spec("iid"), 11, seed=0)
    with pytest.raises(ConfigError, match="needs the number of sites"):
        split_indices(keys, parse_spec("iid"), None, seed=0)


def test_domain_names_come_from_folders_for_generic_file_names():
    assert domain_names(["a/finance/train.jsonl", "b/medical/train.jsonl", "c/legal.jsonl"]) == [
        "finance",
        "medical",
        "legal",
    ]
    assert domain_names(["x/train.jsonl", "y/x/data.jsonl", "z/x.csv"]) == ["x", "x-2", "x-3"]


# ---------------------------------------------------------------- files and composition


def test_site_files_hold_the_original_records_and_the_composition(tmp_path):
    fin, fin_recs = finance_like(tmp_path)
    part = make_partition([fin], "dirichlet:0.5", 3, seed=0, label_key="completion")
    out = tmp_path / "run"
    sites = part.write(out)
    assert [s["name"] for s in sites] == ["site-1", "site-2", "site-3"]
    written = []
    for s in sites:
        path = Path(s["train"])
        assert path == out.resolve() / "partitions" / s["name"] / "train.jsonl"
        lines = path.read_text(encoding="utf-8").splitlines()
        written.append([json.loads(line) for line in lines])  # valid JSONL
    assert sorted(json.dumps(r) for site in written for r in site) == sorted(json.dumps(r) for r in fin_recs)
    assert not list(out.rglob(".*tmp*")), "no temporary files left"

    comp = json.loads((out / "partitions" / "composition.json").read_text())
    assert comp["spec"] == "dirichlet:0.5" and comp["seed"] == 0 and comp["label_key"] == "completion"
    for s, recs in zip(sites, written):
        c = comp["sites"][s["name"]]
        assert c["records"] == len(recs)
        assert c["by_category"] == {
            k: Counter(r["completion"].strip() for r in recs).get(k, 0) for k in ("negative", "neutral", "positive")
        }
        assert set(c["by_category"]) == {"positive", "negative", "neutral"}


def test_files_in_different_chat_formats_are_written_as_messages(tmp_path):
    fin, fin_recs = finance_like(tmp_path, n=12)
    med, med_recs = medical_like(tmp_path, n=8)
    part = make_partition([fin, med], "domain", None, seed=0)
    sites = part.write(tmp_path / "run")
    first = [json.loads(x) for x in Path(sites[0]["train"]).read_text().splitlines()]
    second = [json.loads(x) for x in Path(sites[1]["train"]).read_text().splitlines()]
    expect_fin = [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in fin_recs
    ]
    assert sorted(map(json.dumps, first)) == sorted(map(json.dumps, expect_fin))
    assert sorted(map(json.dumps, second)) == sorted(map(json.dumps, med_recs))
    assert part.composition()["sites"]["site-1"]["by_category"] == {"finance": 12, "medical": 0}


def test_a_bad_file_names_file_and_line_not_content(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "SECRET-1", "completion": "x"}\n{"prompt": "SECRET-2", \n')
    with pytest.raises(DataError) as e:
        make_partition([bad], "iid", 1, seed=0)
    assert str(bad) in str(e.value) and "line 2" in str(e.value) and "SECRET" not in str(e.value)
    fin, _ = finance_like(tmp_path, n=10)
    med, _ = medical_like(tmp_path, n=10)
    with pytest.raises(DataError) as e:
        make_partition([fin, med], "iid", 2, seed=0, label_key="completion")
    assert str(med) in str(e.value) and "line 1" in str(e.value) and "no field 'completion'" in str(e.value)
    # A label key naming free text would print record content as category names: refused.
    many = write_jsonl(tmp_path / "many.jsonl", [{"prompt": f"p{i}", "completion": f"SECRET-{i}"} for i in range(150)])
    with pytest.raises(DataError, match="150 distinct values") as e:
        make_partition([many], "iid", 2, seed=0, label_key="completion")
    assert "SECRET" not in str(e.value)


# ---------------------------------------------------------------- the command line


class _Stop(Exception):
    pass


def _no_run(*a, **k):
    raise _Stop("no simulation in unit tests")


def test_ftsim_prints_the_composition_in_counts_only(tmp_path, monkeypatch, capsys):
    fin, _ = finance_like(tmp_path)
    med, _ = medical_like(tmp_path)
    monkeypatch.setattr(ftsim, "run", _no_run)
    out = tmp_path / "run"
    argv = [
        "--data",
        str(fin),
        "--data",
        str(med),
        "--partition",
        "dirichlet:0.3",
        "--sites",
        "4",
        "--seed",
        "3",
        "--out",
        str(out),
    ]
    assert ftsim.main(argv) == 1  # stopped where the simulation would start
    cap = capsys.readouterr()
    lines = [line.split("] ", 1)[1] for line in cap.out.splitlines() if "] site-" in line]
    comp = json.loads((out / "partitions" / "composition.json").read_text())
    assert len(lines) == 4
    for line, (name, c) in zip(lines, comp["sites"].items()):
        assert (
            line
            == f"{name}: {c['records']} records | finance {c['by_category']['finance']}, medical {c['by_category']['medical']}"
        )
    assert "4 sites (site-1, site-2, site-3, site-4)" in cap.out and "partition dirichlet:0.3 (seed 3)" in cap.out
    assert "SECRET" not in cap.out + cap.err
    assert comp["seed"] == 3 and sum(c["records"] for c in comp["sites"].values()) == 100

    # The same command gives the same split.
    (out / "partitions" / "composition.json").unlink()
    assert ftsim.main(argv) == 1
    assert json.loads((out / "partitions" / "composition.json").read_text()) == comp


def test_ftsim_partition_sites_and_output_dir_in_the_config(tmp_path, monkeypatch):
    fin, _ = finance_like(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ftsim.build_parser().parse_args(["--data", str(fin), "--sites", "3"])  # iid is the default
    res = ftsim.resolve_run(args)
    out = Path(res.cfg.output.dir)
    assert out.parts[0] == "ftsim-runs" and res.partition.spec == PartitionSpec("iid")
    assert [s.train for s in res.cfg.federation.sites] == [
        str((tmp_path / out / "partitions" / f"site-{k}" / "train.jsonl").resolve()) for k in (1, 2, 3)
    ]
    assert all(Path(s.train).is_file() and s.eval is None for s in res.cfg.federation.sites)

    # --resume DIR reads the sites from the run's saved config and does not split again.
    # (a run record as the coordinator writes it: read back through server.record.read_record).
    record = RunRecord(
        fedtune=MethodInfo(peft=res.cfg.peft.method, strategy=res.cfg.federation.strategy),
        model=res.cfg.model.name,
        trainable_params=0,
        config=json.loads(res.cfg.to_json()),
        rounds=[],
        elapsed_s=0.0,
    )
    write_record(out / "metrics.json", record)
    before = {p: p.stat().st_mtime_ns for p in (out / "partitions").rglob("*.json*")}
    resumed = ftsim.resolve_run(ftsim.build_parser().parse_args(["--resume", str(out), "--rounds", "5"]))
    assert resumed.partition is None and resumed.cfg.federation.sites == res.cfg.federation.sites
    assert {p: p.stat().st_mtime_ns for p in (out / "partitions").rglob("*.json*")} == before
    # ... and a new split will not overwrite that run.
    with pytest.raises(ConfigError, match="already holds a run"):
        ftsim.resolve_run(ftsim.build_parser().parse_args(["--data", str(fin), "--sites", "3", "--out", str(out)]))
    # A record that is not a run record is refused, naming what is wrong.
    (out / "metrics.json").write_text(json.dumps({"config": json.loads(res.cfg.to_json()), "rounds": []}))
    with pytest.raises(ConfigError, match=r"nothing to resume \(.*metrics.json: not a valid run record: fedtune"):
        ftsim.resolve_run(ftsim.build_parser().parse_args(["--resume", str(out)]))


def test_ftsim_reads_a_partition_section_from_the_config_file(tmp_path):
    finance_like(tmp_path / "cfg")
    cfg_file = tmp_path / "cfg" / "run.yaml"
    cfg_file.write_text(
        "simulation:\n  cpus_per_site: 1\n  partition: {data: [finance/train.jsonl], spec: 'dirichlet:0.5', sites: 3, label_key: completion, min_records: 4}\n"
        f"output:\n  dir: {tmp_path / 'run'}\n"
    )
    res = ftsim.resolve_run(ftsim.build_parser().parse_args(["--config", str(cfg_file)]))
    assert len(res.cfg.federation.sites) == 3 and res.cfg.simulation.cpus_per_site == 1
    assert res.partition.label_key == "completion" and min(len(s) for s in res.partition.sites) >= 4
    # Flags win over the section.
    res = ftsim.resolve_run(
        ftsim.build_parser().parse_args(["--config", str(cfg_file), "--sites", "2", "--partition", "iid"])
    )
    assert len(res.cfg.federation.sites) == 2 and str(res.partition.spec) == "iid"
    cfg_file.write_text("simulation:\n  partition: {data: finance/train.jsonl, spec: iid, sites: 2, shards: 3}\n")
    assert ftsim.main(["--config", str(cfg_file)]) == 2


@pytest.mark.parametrize(
    "make_argv, expected",
    [
        (
            lambda d: ["--partition", "dirichlet:0.3", "--sites", "4"],
            "--partition splits one dataset into sites and needs it: add --data",
        ),
        (lambda d: ["--sites", "4"], "--sites splits one dataset"),
        (
            lambda d: ["--data", d, "--partition", "iid", "--sites", "2", "--site", f"a={d}"],
            "--site lists the sites and --data",
        ),
        (lambda d: ["--data", d, "--partition", "dirichlet:zero", "--sites", "2"], "'dirichlet:zero'"),
        (lambda d: ["--data", d, "--partition", "domain", "--sites", "2"], "but --sites 2"),
        (lambda d: ["--data", d, "--partition", "dirichlet:0.3"], "needs the number of sites: add --sites N"),
        (lambda d: ["--data", d + ".missing", "--sites", "2"], "file not found"),
        (lambda d: ["--data", d, "--sites", "0"], "--sites 0"),
        (lambda d: ["--data", d, "--data", d, "--sites", "2"], "given twice"),
        (lambda d: ["--resume", "somewhere", "--data", d], "--resume DIR takes the run's saved config"),
        (
            lambda d: ["--data", d, "--sites", "2", "--set", "federation.min_sites=3"],
            "federation.min_sites is 3 but only 2",
        ),
    ],
)
def test_ftsim_partition_flags_refuse_bad_combinations(make_argv, expected, tmp_path, monkeypatch, capsys):
    fin, _ = finance_like(tmp_path)
    monkeypatch.setattr(ftsim, "run", _no_run)
    monkeypatch.chdir(tmp_path)
    assert ftsim.main([*make_argv(str(fin)), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.startswith("ftsim: ")
    assert not (tmp_path / "run" / "partitions").exists(), "nothing written for a refused command"
