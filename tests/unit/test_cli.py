"""The command lines a user meets: fteval, ftclient check/keygen/join, ftserver: what they do and how they refuse bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.client import cli as ftclient
from fedtune.common import fteval, methods
from fedtune.common.checkpoint import save_adapter
from fedtune.server import cli as ftserver

DATA_DIR = Path(__file__).resolve().parents[2] / "simulations" / "data"


def test_fteval_scores_base_and_adapter(tiny_model_dir, tiny_config, tiny_peft_model, tmp_path, capsys):
    data = DATA_DIR / "financial" / "eval.jsonl"
    args = [
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--max-examples",
        "5",
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
    ]
    assert (
        fteval.main([*args, "--labels", "groceries,travel,utilities,salary", "--out", str(tmp_path / "base.json")]) == 0
    )
    base = json.loads((tmp_path / "base.json").read_text())
    assert base["examples"] == 5 and base["format"] == "prompt_completion"
    assert base["loss"] > 0 and 0 <= base["exact_match"] <= 1 and 0 <= base["label_accuracy"] <= 1
    printed = capsys.readouterr().out
    assert "examples        5" in printed and "label accuracy" in printed

    # An adapter pushed far from its init must change the loss that fteval reports.
    model, _, _ = tiny_peft_model
    state = {k: v + 0.5 for k, v in methods.get_state(model).items()}
    save_adapter(
        tmp_path / "adapter", state, methods.peft_config(None, tiny_config.peft, 0, base_name=str(tiny_model_dir))
    )
    # No --model: the adapter's recorded base is used.
    rest = args[2:]
    assert fteval.main(["--adapter", str(tmp_path / "adapter"), *rest, "--out", str(tmp_path / "ad.json")]) == 0
    with_adapter = json.loads((tmp_path / "ad.json").read_text())
    assert with_adapter["examples"] == 5
    assert abs(with_adapter["loss"] - base["loss"]) > 1e-3


def test_fteval_bad_input_names_the_file(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert fteval.main(["--model", str(tiny_model_dir), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "line 1" in err and "completion" in err
    assert (
        fteval.main(
            ["--model", str(tiny_model_dir), "--data", str(DATA_DIR / "legal/eval.jsonl"), "--adapter", str(tmp_path)]
        )
        == 2
    )
    assert "not a PEFT adapter folder" in capsys.readouterr().err


def test_ftclient_check_reports_counts_and_problems(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "site.jsonl"
    f.write_bytes(b'{"prompt": "Categorize: SHOP 12", "completion": "groceries"}\n{oops\n\xff\n')
    rc = ftclient.main(["check", "--data", str(f), "--model", str(tiny_model_dir)])
    out = capsys.readouterr().out
    assert rc == 2 and "NOT usable: 2 of 3 records unusable, above the tolerance --max-invalid-fraction 0" in out
    rc = ftclient.main(["check", "--data", str(f), "--model", str(tiny_model_dir), "--max-invalid-fraction", "0.7"])
    out = capsys.readouterr().out
    assert rc == 0 and "usable: 2 of 3 records will be skipped" in out
    assert "records         3" in out and "valid           1" in out and "invalid         2" in out
    assert "line 2: malformed JSON" in out and "line 3: not valid UTF-8" in out
    assert "SHOP 12" not in out
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert ftclient.main(["check", "--data", str(empty), "--model", str(tiny_model_dir)]) == 2
    assert "empty file" in capsys.readouterr().err


def test_ftclient_check_reports_a_50_mb_line_deep_nesting_and_a_lone_surrogate_at_their_lines(
    tiny_model_dir, tmp_path, capsys
):
    """Issue 15: a 50 MB single line once took 9.2 GB and was still running at 150 s; nested JSON
    gave a RecursionError traceback; a lone surrogate crashed tokenization without a location."""
    import time
    import tracemalloc

    f = tmp_path / "site.jsonl"
    with f.open("wb") as out:
        out.write(b'{"prompt": "Categorize: SHOP 12", "completion": "groceries"}\n{"prompt": "')
        for _ in range(50):
            out.write(b"SHOP 12 " * (1 << 17))
        out.write(b'", "completion": "x"}\n')
        out.write(b'{"prompt": "a", "completion": "b", "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")
        out.write(b'{"prompt": "SHOP 12 \\ud800", "completion": "b"}\n')
    tracemalloc.start()
    t0 = time.perf_counter()
    rc = ftclient.main(["check", "--data", str(f), "--model", str(tiny_model_dir), "--max-invalid-fraction", "0.75"])
    seconds, (_, peak) = time.perf_counter() - t0, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = capsys.readouterr().out
    f.unlink()
    assert rc == 0 and seconds < 30 and peak < 64 << 20, (seconds, peak)
    assert "records         4" in out and "valid           1" in out and "invalid         3" in out
    assert "line 2: longer than data.max_record_bytes (1048576 bytes)" in out
    assert "line 3: nested deeper than 32 levels" in out
    assert "line 4: field 'prompt' is not valid Unicode" in out
    assert "SHOP 12" not in out


def test_ftclient_check_takes_the_record_cap(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "site.jsonl"
    f.write_text('{"prompt": "' + "q" * 5000 + '", "completion": "a"}\n{"prompt": "q", "completion": "a"}\n')
    cap = ["--max-record-bytes", "4096", "--max-invalid-fraction", "0.5"]
    assert ftclient.main(["check", "--data", str(f), "--model", str(tiny_model_dir), *cap]) == 0
    assert "line 1: longer than data.max_record_bytes (4096 bytes)" in capsys.readouterr().out
    assert ftclient.main(["check", "--data", str(f), "--model", str(tiny_model_dir), "--max-record-bytes", "10"]) == 2
    assert "max_record_bytes" in capsys.readouterr().err


@pytest.fixture
def pki(tmp_path):
    from fedtune.client.keys import create_site_keys
    from fedtune.server.certs import create_certificates

    create_certificates(tmp_path / "pki", ["localhost"], days=1)
    priv, pub = create_site_keys(tmp_path / "site")
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "alpha.pub").write_bytes(pub.read_bytes())
    return {"pki": tmp_path / "pki", "keys": keys, "key": priv, "ca": tmp_path / "pki" / "ca.crt"}


@pytest.mark.parametrize(
    "make_args, expected",
    [
        (lambda t, p: [], "--out DIR is required"),
        (lambda t, p: ["--out", str(t / "r")], "TLS is on: pass --certs DIR"),
        (lambda t, p: ["--out", str(t / "r"), "--certs", str(t)], "missing ca.crt, server.crt, server.key"),
        (lambda t, p: ["--out", str(t / "r"), "--certs", str(p["pki"])], "pass --authorized-keys DIR"),
        (
            lambda t, p: ["--out", str(t / "r"), "--certs", str(p["pki"]), "--authorized-keys", str(t / "nope")],
            "not a folder",
        ),
        (lambda t, p: ["--out", str(t / "r"), "--insecure", "--port", "70000"], "--port 70000: expected 1..65535"),
        (
            lambda t, p: ["--out", str(t / "r"), "--insecure", "--set", "federation.sites_per_round=0"],
            "federation.sites_per_round",
        ),
        (
            lambda t, p: ["--out", str(t / "r"), "--insecure", "--min-sites", "3", "--expected-sites", "2"],
            "expected_sites (2) is below min_sites (3)",
        ),
        (lambda t, p: ["--resume", str(t / "nothing")], "nothing to resume"),
        (lambda t, p: ["--resume", str(t), "--out", str(t)], "don't combine it with --config or --out"),
    ],
)
def test_ftserver_refuses_bad_input_naming_what_is_wrong(make_args, expected, pki, tmp_path, capsys):
    assert ftserver.main(make_args(tmp_path, pki)) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "r" / "config.json").exists()  # nothing started, nothing written


def test_ftserver_names_a_bad_site_key_file(pki, tmp_path, capsys):
    (pki["keys"] / "mallory.pub").write_text("ssh-rsa AAAA not-a-key\n")
    assert (
        ftserver.main(["--out", str(tmp_path / "r"), "--certs", str(pki["pki"]), "--authorized-keys", str(pki["keys"])])
        == 2
    )
    err = capsys.readouterr().err
    assert "mallory.pub" in err and "ftclient keygen" in err


def test_ftserver_will_not_overwrite_a_run(pki, tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.json").write_text("{}")
    assert ftserver.main(["--out", str(tmp_path / "r"), "--insecure"]) == 2
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make_args, expected",
    [
        (lambda d, p: ["--server", "coordinator", "--data", d], "expected HOST:PORT"),
        (lambda d, p: ["--server", "h:0", "--data", d], "expected HOST:PORT"),
        (lambda d, p: ["--server", "h:8000", "--data", "/no/such.jsonl"], "--data /no/such.jsonl: file not found"),
        (lambda d, p: ["--server", "h:8000", "--data", d], "TLS is on: pass --ca-cert FILE"),
        (lambda d, p: ["--server", "h:8000", "--data", d, "--ca-cert", str(p["ca"])], "pass --key FILE"),
        (
            lambda d, p: ["--server", "h:8000", "--data", d, "--ca-cert", d, "--key", str(p["key"])],
            "not a readable PEM certificate",
        ),
        (
            lambda d, p: ["--server", "h:8000", "--data", d, "--ca-cert", str(p["ca"]), "--key", str(p["ca"])],
            "not a readable OpenSSH private key",
        ),
    ],
)
def test_ftclient_join_refuses_bad_input_before_connecting(make_args, expected, pki, capsys):
    data = str(DATA_DIR / "medical" / "train.jsonl")
    assert ftclient.main(make_args(data, pki)) == 2
    assert expected in capsys.readouterr().err


def test_ftclient_join_names_the_data_problem_without_its_content(tmp_path, pki, capsys):
    bad = tmp_path / "site.jsonl"
    bad.write_text('{"prompt": "PATIENT-SECRET-4711"}\n{"nonsense": 1}\n')
    assert ftclient.main(["--server", "h:8000", "--data", str(bad), "--insecure"]) == 2
    err = capsys.readouterr().err
    assert "site.jsonl" in err and "no usable record among 2" in err
    assert "PATIENT-SECRET-4711" not in err


def test_key_fingerprint_matches_openssh_format(pki):
    import base64
    import hashlib

    from fedtune.client.join import key_fingerprint

    line = (pki["keys"] / "alpha.pub").read_bytes()
    fp = key_fingerprint(line)
    assert fp.startswith("SHA256:") and "=" not in fp
    assert base64.b64decode(fp[7:] + "=") == hashlib.sha256(base64.b64decode(line.split()[1])).digest()


def test_node_config_quotes_paths_safely(tmp_path):
    import argparse

    from flwr.common.config import parse_config_args

    from fedtune.client.join import node_config
    from fedtune.common.messages import NodeConfig

    for name in ['we"ird dir', "it's here", "back\\slash"]:
        weird = tmp_path / name / "train.jsonl"
        args = argparse.Namespace(data=str(weird), eval_data=str(weird))
        parsed = parse_config_args([node_config("site a", args)])
        path = str(weird.resolve())
        assert parsed == NodeConfig(site_name="site a", data_path=path, eval_data_path=path).to_record()
    args = argparse.Namespace(data=str(tmp_path / "both'\"quotes.jsonl"), eval_data=None)
    with pytest.raises(ValueError, match="cannot be passed to Flower"):
        node_config("a", args)


def test_ftclient_join_rank_reaches_the_node_config(tmp_path):
    import argparse

    from flwr.common.config import parse_config_args

    from fedtune.client.join import JoinError, node_config
    from fedtune.common.messages import NodeConfig

    args = argparse.Namespace(data=str(tmp_path / "t.jsonl"), eval_data=None, rank=4)
    assert NodeConfig.from_record(parse_config_args([node_config("s", args)])).lora_rank == 4
    with pytest.raises(JoinError, match="--rank 0: expected a positive LoRA rank"):
        node_config("s", argparse.Namespace(data="t.jsonl", eval_data=None, rank=0))


def test_ftclient_keeps_a_personalized_sites_private_part_in_its_work_dir(tmp_path, monkeypatch):
    """The folder a site keeps its private part in is the site's own choice (--work-dir), passed
    to its ClientApp in the node config: the same --work-dir again finds the same part."""
    import argparse

    from flwr.common.config import parse_config_args

    from fedtune.client import join
    from fedtune.common.messages import NodeConfig

    seen = {}
    monkeypatch.setattr(join, "check_inputs", lambda args: ("bank", {}))
    monkeypatch.setattr(join, "site_policy", lambda args, work: (_ for _ in ()).throw(join.JoinError("stop here")))
    real = join.node_config
    monkeypatch.setattr(join, "node_config", lambda *a, **k: seen.setdefault("nc", real(*a, **k)))
    args = argparse.Namespace(
        data=str(tmp_path / "t.jsonl"), eval_data=None, rank=None, work_dir=str(tmp_path / "w"), insecure=False
    )
    assert join.join(args) == 2
    nc = NodeConfig.from_record(parse_config_args([seen["nc"]]))
    assert nc.state_dir == str((tmp_path / "w" / join.SITE_STATE).resolve())


def test_ftclient_site_policy_comes_from_its_own_flags(tmp_path, monkeypatch):
    from fedtune.client.join import JoinError, join_parser, site_policy

    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "env-cache"))
    base = ["--server", "h:8000", "--data", "d.jsonl"]
    strict = site_policy(join_parser().parse_args(base), tmp_path / "work")
    # ftclient's default is the strict policy: no plaintext, the site's own cache, its own folders.
    assert (
        not strict.allow_plaintext
        and strict.min_noise_multiplier is None
        and strict.model is None
        and strict.model_sha256 is None
    )
    assert strict.cache_dir == str((tmp_path / "env-cache").resolve())
    assert strict.model_roots == (str((tmp_path / "env-cache").resolve()), str((tmp_path / "work").resolve()))
    flags = [
        "--allow-plaintext", "--min-noise-multiplier", "1.5", "--model", str(tmp_path / "m"), "--model-sha256", "AB" * 32,
        "--cache-dir", str(tmp_path / "c"), "--model-root", str(tmp_path / "r1"), "--model-root", str(tmp_path / "r2"),
    ]  # fmt: skip
    pol = site_policy(join_parser().parse_args(base + flags), tmp_path / "work")
    assert (
        pol.allow_plaintext
        and pol.min_noise_multiplier == 1.5
        and pol.model == str(tmp_path / "m")
        and pol.model_sha256 == "ab" * 32
    )
    assert pol.cache_dir == str((tmp_path / "c").resolve())
    assert {str((tmp_path / n).resolve()) for n in ("c", "r1", "r2", "work", "m")} == set(pol.model_roots)
    with pytest.raises(JoinError, match="site policy: model sha256: expected 64 hexadecimal digits"):
        site_policy(join_parser().parse_args(base + ["--model-sha256", "xyz"]), tmp_path)
    with pytest.raises(JoinError, match="site policy: minimum noise multiplier"):
        site_policy(join_parser().parse_args(base + ["--min-noise-multiplier", "-1"]), tmp_path)


def test_ftclient_join_refuses_a_bad_pin_before_connecting(tmp_path, capsys):
    data = str(DATA_DIR / "medical" / "train.jsonl")
    args = [
        "--server",
        "h:8000",
        "--data",
        data,
        "--insecure",
        "--work-dir",
        str(tmp_path / "w"),
        "--model-sha256",
        "nothex",
    ]
    assert ftclient.main(args) == 2
    assert "site policy: model sha256" in capsys.readouterr().err


def test_ftsim_and_ftserver_take_the_privacy_and_rank_flags(tmp_path, capsys):
    from fedtune.simulations import cli as ftsim

    d = str(DATA_DIR / "medical" / "train.jsonl")
    two = ["--site", f"a={d}", "--site", f"b={d}"]
    cfg = ftsim.resolve_config(
        ftsim.build_parser().parse_args([*two, "--dp-epsilon", "8", "--dp-clip", "0.2", "--site-rank", "b=4"])
    )
    assert cfg.privacy.epsilon == 8 and cfg.privacy.clip == 0.2 and cfg.privacy.delta == 1e-5
    assert [s.rank for s in cfg.federation.sites] == [None, 4]
    assert not cfg.simulation.baselines
    cfg = ftsim.resolve_config(ftsim.build_parser().parse_args([*two, "--update-norm-bound", "0.5", "--baselines"]))
    assert cfg.federation.update_norm_bound == 0.5 and not cfg.privacy.enabled and cfg.simulation.baselines
    assert ftsim.main([*two, "--site-rank", "c=4"]) == 2
    assert "--site-rank c: no such site; the sites are a, b" in capsys.readouterr().err
    assert ftsim.main([*two, "--site-rank", "b=64"]) == 2
    assert "federation.sites[b].rank 64: at most peft.r (16)" in capsys.readouterr().err
    assert ftsim.main([*two, "--site-rank", "b=four"]) == 2
    assert "expected NAME=R" in capsys.readouterr().err
    assert ftsim.main([*two, "--dp-epsilon", "8", "--set", "federation.aggregator=median"]) == 2
    assert "use aggregator 'mean'" in capsys.readouterr().err
    server_args = ftserver.build_parser().parse_args(
        ["--out", str(tmp_path / "s"), "--dp-epsilon", "4", "--dp-noise-multiplier", "1.5"]
    )
    cfg = ftserver.resolve(server_args)[0]
    assert cfg.privacy.epsilon == 4 and cfg.privacy.noise_multiplier == 1.5 and cfg.secure_aggregation.enabled


def test_ftsim_refuses_more_min_sites_than_sites(capsys):
    from fedtune.simulations import cli as ftsim

    d = DATA_DIR / "medical" / "train.jsonl"
    assert ftsim.main(["--site", f"a={d}", "--site", f"b={d}", "--set", "federation.min_sites=3"]) == 2
    assert "federation.min_sites is 3 but only 2 site(s) are given" in capsys.readouterr().err


def test_secure_aggregation_is_opt_in_for_ftsim_and_on_by_default_for_ftserver(tmp_path, capsys):
    from fedtune.simulations import cli as ftsim

    d = str(DATA_DIR / "medical" / "train.jsonl")
    two = ["--site", f"a={d}", "--site", f"b={d}"]
    assert ftsim.resolve_config(ftsim.build_parser().parse_args(two)).secure_aggregation.enabled is False
    assert (
        ftsim.resolve_config(ftsim.build_parser().parse_args([*two, "--secure-aggregation"])).secure_aggregation.enabled
        is True
    )
    # One site: a sum of one update is that update.
    assert ftsim.main(["--site", f"a={d}", "--secure-aggregation"]) == 2
    assert "secure aggregation needs at least 2 sites" in capsys.readouterr().err
    assert ftsim.main([*two, "--secure-aggregation", "--set", "federation.aggregator=median"]) == 2
    assert "aggregator 'median' inspects each site's update" in capsys.readouterr().err

    server_args = ftserver.build_parser().parse_args(["--out", str(tmp_path / "a"), "--insecure"])
    assert ftserver.resolve(server_args)[0].secure_aggregation.enabled is True
    server_args = ftserver.build_parser().parse_args(
        ["--out", str(tmp_path / "b"), "--insecure", "--no-secure-aggregation"]
    )
    assert ftserver.resolve(server_args)[0].secure_aggregation.enabled is False
    server_args = ftserver.build_parser().parse_args(
        ["--out", str(tmp_path / "c"), "--set", "federation.aggregator=median"]
    )
    with pytest.raises(ftserver.ConfigError, match="on by default here"):
        ftserver.resolve(server_args)


def test_one_ftserver_per_run_folder(tmp_path, capsys):
    first = ftserver.hold_folder(tmp_path)
    with pytest.raises(ftserver.ConfigError, match=r"another ftserver \(pid \d+\) is running this run"):
        ftserver.hold_folder(tmp_path)
    first.close()
    ftserver.hold_folder(tmp_path).close()  # free again once the holder is gone


# Flags from the schema: each config flag is declared once, on the Field it sets (common/config.py).

# The flags the tools had when each was written by hand (SHARED_FLAG_KEYS + FLAG_KEYS), and their keys:
# every one keeps its name and its key.
LEGACY_SHARED = {
    "--peft": "peft.method",
    "--merged": "output.merged",
    "--strategy": "federation.strategy",
    "--patience": "eval.patience",
    "--tensorboard": "output.tensorboard",
    "--update-norm-bound": "federation.update_norm_bound",
    "--dp-epsilon": "privacy.epsilon",
    "--dp-delta": "privacy.delta",
    "--dp-clip": "privacy.clip",
    "--dp-noise-multiplier": "privacy.noise_multiplier",
    "--rounds": "federation.rounds",
    "--no-plots": "output.plots",
    "--personalize": "federation.personalization",
    "--max-invalid-fraction": "data.max_invalid_fraction",  # issue 22: one tolerance, the same flag in every tool
}
LEGACY_FTSIM = LEGACY_SHARED | {
    "--model": "model.name",
    "--secure-aggregation": "secure_aggregation.enabled",
    "--local-steps": "train.local_steps",
    "--lr": "train.lr",
    "--batch-size": "train.batch_size",
    "--max-length": "data.max_length",
    "--seed": "train.seed",
    "--device": "model.device",
    "--cpus-per-site": "simulation.cpus_per_site",
    "--baselines": "simulation.baselines",
    "--out": "output.dir",
}
LEGACY_FTSERVER = LEGACY_SHARED | {
    "--min-sites": "federation.min_sites",
    "--expected-sites": "federation.expected_sites",
    "--join-timeout": "federation.join_timeout_s",
    "--round-timeout": "federation.round_timeout_s",
    "--no-secure-aggregation": "secure_aggregation.enabled",
}
LEGACY_CHECK = {
    "--model": "model.name",
    "--format": "data.format",
    "--max-length": "data.max_length",
    "--max-record-bytes": "data.max_record_bytes",
    "--max-invalid-fraction": "data.max_invalid_fraction",
}


def _tool_parsers():
    import argparse

    from fedtune.common.config import add_config_flags
    from fedtune.simulations import cli as ftsim
    from fedtune.simulations import tune as fttune

    check = argparse.ArgumentParser(prog="ftclient check")
    add_config_flags(check, "ftclient check")
    return {
        "ftsim": ftsim.build_parser(),
        "ftserver": ftserver.build_parser(),
        "ftclient check": check,
        "ftsim tune": fttune.build_parser(),
    }


def _sample(f) -> list[str]:
    """A valid command-line value for flag ``f`` (nothing for a switch)."""
    if f.const is not None:
        return []
    if f.choices:
        return [f.choices[-1]]
    if f.default is not None and not isinstance(f.default, bool):
        return [str(f.default)]
    return ["0.5" if f.type is float else "2" if f.type is int else "x"]


def _key_exists(key: str) -> bool:
    from fedtune.common.config import FedTuneConfig

    model = FedTuneConfig
    for part in key.split("."):
        if model is None or part not in model.model_fields:
            return False
        ann = model.model_fields[part].annotation
        model = ann if isinstance(ann, type) and hasattr(ann, "model_fields") else None
    return model is None  # a value, not a section


@pytest.mark.parametrize(
    "tool, legacy", [("ftsim", LEGACY_FTSIM), ("ftserver", LEGACY_FTSERVER), ("ftclient check", LEGACY_CHECK)]
)
def test_every_flag_a_tool_had_keeps_its_name_and_key(tool, legacy):
    from fedtune.common.config import config_flags

    declared = {f.name: f.key for f in config_flags(tool)}
    assert {name: declared.get(name) for name in legacy} == legacy
    options = {s for a in _tool_parsers()[tool]._actions for s in a.option_strings}
    assert set(legacy) <= options


def test_every_declared_flag_sets_a_real_key_to_a_value_that_loads():
    from fedtune.common.config import FLAG_TOOLS, config_flags, config_overrides, load_config

    assert config_flags()  # the walk finds them
    parsers = _tool_parsers()
    for f in config_flags():
        assert _key_exists(f.key), f"{f.name}: {f.key} is not a key of the schema"
        assert f.tools and set(f.tools) <= set(FLAG_TOOLS)
        for tool in f.tools:
            args = parsers[tool].parse_args([f.name, *_sample(f)])
            overrides = config_overrides(args, tool)
            assert list(overrides) == [f.key], (tool, f.name, overrides)
            cfg = load_config(None, overrides)  # the parsed value has the type the strict schema takes
            value = cfg
            for part in f.key.split("."):
                value = getattr(value, part)
            assert value == overrides[f.key], (f.name, value)


def test_ftsim_and_ftserver_parse_a_shared_flag_to_the_same_key_and_value():
    from fedtune.common.config import config_flags, config_overrides

    parsers = _tool_parsers()
    shared = [f for f in config_flags() if {"ftsim", "ftserver"} <= set(f.tools)]
    assert {f.name for f in shared} == set(LEGACY_SHARED)
    for f in shared:
        argv = [f.name, *_sample(f)]
        got = [config_overrides(parsers[t].parse_args(argv), t) for t in ("ftsim", "ftserver")]
        assert got[0] == got[1] == {f.key: got[0][f.key]}, (f.name, got)


def test_a_flag_left_out_is_none_so_the_config_decides():
    from fedtune.common.config import config_flags, config_overrides

    for tool, parser in _tool_parsers().items():
        args = parser.parse_args([])
        assert all(getattr(args, f.dest) is None for f in config_flags(tool))
        assert config_overrides(args, tool) == {}


def test_a_flag_wins_over_set_and_set_wins_over_the_file(tmp_path):
    from fedtune.simulations import cli as ftsim

    d = str(DATA_DIR / "medical" / "train.jsonl")
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("federation:\n  rounds: 9\noutput:\n  plots: true\n")
    base = ["--config", str(cfg_file), "--site", f"a={d}"]

    def resolved(*extra):
        return ftsim.resolve_config(ftsim.build_parser().parse_args([*base, *extra]))

    assert resolved().federation.rounds == 9
    assert resolved("--set", "federation.rounds=7").federation.rounds == 7
    assert resolved("--set", "federation.rounds=7", "--rounds", "2").federation.rounds == 2
    assert resolved("--rounds", "2", "--set", "federation.rounds=7").federation.rounds == 2  # order on the line aside
    assert resolved().output.plots is True
    assert resolved("--set", "output.plots=true", "--no-plots").output.plots is False
    assert resolved("--out", str(tmp_path / "o")).output.dir == str(tmp_path / "o")
    server = ftserver.build_parser().parse_args(["--out", str(tmp_path / "s"), "--set", "eval.patience=4"])
    assert ftserver.resolve(server)[0].eval.patience == 4
    server = ftserver.build_parser().parse_args(
        ["--out", str(tmp_path / "s"), "--set", "eval.patience=4", "--patience", "2", "--join-timeout", "5"]
    )
    cfg = ftserver.resolve(server)[0]
    assert cfg.eval.patience == 2 and cfg.federation.join_timeout_s == 5.0


@pytest.mark.parametrize(
    "tool, argv, named",
    [
        ("ftsim", ["--peft", "lorax"], ["invalid choice: 'lorax'", "'lora'", "'qlora'", "'full'"]),
        ("ftserver", ["--peft", "lorax"], ["invalid choice: 'lorax'", "'lora'", "'qlora'"]),
        ("ftserver", ["--strategy", "fedsgd"], ["invalid choice: 'fedsgd'", "'fedavg'", "'fedyogi'"]),
        ("ftsim", ["--device", "tpu"], ["invalid choice: 'tpu'", "'auto', 'cpu', 'cuda'"]),
        ("ftclient check", ["--format", "xml"], ["invalid choice: 'xml'", "'alpaca'", "'prompt_completion'"]),
        ("ftsim", ["--update-norm-bound", "huge"], ["expected a number or one of auto, off, got 'huge'"]),
        ("ftserver", ["--rounds", "three"], ["--rounds: invalid int value: 'three'"]),
    ],
)
def test_a_flag_refuses_a_bad_value_naming_what_it_takes(tool, argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        _tool_parsers()[tool].parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert all(n in err for n in named), err


def test_update_norm_bound_flag_takes_a_number_or_its_words():
    from fedtune.common.config import config_overrides

    p = _tool_parsers()["ftsim"]
    for text, value in (("0.5", 0.5), ("auto", "auto"), ("off", "off"), ("3", 3.0)):
        assert config_overrides(p.parse_args(["--update-norm-bound", text]), "ftsim") == {
            "federation.update_norm_bound": value
        }


def test_a_flag_help_is_its_key_description_and_names_the_key(monkeypatch):
    from fedtune.common.config import config_flags, config_keys

    monkeypatch.setenv("COLUMNS", "10000")  # argparse wraps at the terminal's width, breaking at hyphens too

    described = {k.key: k.field.description for k in config_keys()}
    for f in config_flags():
        assert f.description == described[f.key] and f.description
        assert f.help.startswith(f.description.replace("%", "%%")) and f.key in f.help
    from fedtune.simulations.cli import demo_settings

    demo = {"ftsim": demo_settings()}  # ftsim's help also says what its built-in demo sets
    helps = {tool: " ".join(p.format_help().split()) for tool, p in _tool_parsers().items()}
    for tool, text in helps.items():
        shown = [f.help_with(demo.get(tool, {}).get(f.key)) for f in config_flags(tool)]
        assert all(" ".join(h.replace("%%", "%").split()) in text for h in shown), tool
    text = helps["ftserver"]
    assert "[federation.join_timeout_s; default 600.0]" in text
    assert "[sets secure_aggregation.enabled: false]" in text


def test_a_bad_flag_declaration_fails_at_import():
    from fedtune.common.config import flag

    assert flag("--rounds") == {"flags": [{"name": "--rounds", "tools": ["ftsim", "ftserver"]}]}
    for bad in (lambda: flag("rounds"), lambda: flag("--Rounds"), lambda: flag("--rounds", "ftclient")):
        with pytest.raises(ValueError, match="expected --lower-case-words"):
            bad()


def test_ftclient_check_flags_reach_its_data_and_model_config(tmp_path, capsys):
    f = tmp_path / "site.jsonl"
    f.write_text('{"prompt": "q", "completion": "a"}\n')
    assert ftclient.main(["check", "--data", str(f), "--max-length", "4"]) == 2
    assert "data.max_length: Input should be greater than or equal to 8" in capsys.readouterr().err
    assert ftclient.main(["check", "--data", str(f), "--model", " "]) == 2
    assert "model.name: " in capsys.readouterr().err


def _saved_run_adapter(cfg, model, folder: Path) -> None:
    """An adapter saved as a run saves it: its config naming the base as methods.base_reference
    does, fedtune_method.json beside it."""
    save_adapter(
        folder,
        methods.get_state(model),
        methods.saved_peft_config(model, methods.base_reference(cfg.model)),
        {methods.METHOD_FILE: methods.method_info(cfg)},
    )


def test_a_saved_adapter_names_a_base_that_exists_and_records_its_digest(tiny_config, tiny_peft_model, tmp_path):
    from fedtune.common.modeling import weights_sha256

    model, _, _ = tiny_peft_model
    _saved_run_adapter(tiny_config, model, tmp_path / "adapter")
    named = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(named).is_absolute() and (Path(named) / "config.json").is_file()
    info = methods.read_method_info(tmp_path / "adapter")
    assert info["base_model"] == tiny_config.model.name and info["base_path"] == named
    assert info["base_sha256"] == weights_sha256(named) and len(info["base_sha256"]) == 64


def test_fteval_relink_points_a_moved_adapter_at_this_machines_base_and_refuses_another(
    tiny_config, tiny_peft_model, tiny_model_dir, tmp_path, capsys
):
    """Another machine: the base the adapter names is not at that path; --relink finds the one its
    fedtune_method.json names, checks the digest, and rewrites adapter_config.json (the manifest
    still verifies). A base with other weights is refused, naming both digests."""
    import shutil

    from fedtune.common.checkpoint import verify_checkpoint

    model, _, _ = tiny_peft_model
    _saved_run_adapter(tiny_config, model, tmp_path / "adapter")
    cfg_file = tmp_path / "adapter" / "adapter_config.json"
    here = tmp_path / "elsewhere" / "base"
    shutil.copytree(tiny_model_dir, here)
    moved = json.loads(cfg_file.read_text()) | {"base_model_name_or_path": "/nonexistent/machine-a/base"}
    cfg_file.write_text(json.dumps(moved))
    info_file = tmp_path / "adapter" / methods.METHOD_FILE
    info_file.write_text(json.dumps(json.loads(info_file.read_text()) | {"base_model": str(here)}))
    save_adapter(  # the manifest as the run wrote it, over these files
        tmp_path / "adapter",
        methods.get_state(model),
        methods.saved_peft_config(model, "/nonexistent/machine-a/base"),
        {methods.METHOD_FILE: json.loads(info_file.read_text())},
    )
    assert fteval.main(["--adapter", str(tmp_path / "adapter"), "--relink"]) == 0
    assert json.loads(cfg_file.read_text())["base_model_name_or_path"] == str(here.resolve())
    assert f"-> base {here.resolve()}" in capsys.readouterr().out
    assert verify_checkpoint(tmp_path / "adapter") is None
    assert fteval.base_of(str(tmp_path / "adapter")) == str(here.resolve())

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    weights = next(other.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    assert fteval.main(["--adapter", str(tmp_path / "adapter"), "--relink", "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "not the same model" in err and methods.read_method_info(tmp_path / "adapter")["base_sha256"] in err
    assert json.loads(cfg_file.read_text())["base_model_name_or_path"] == str(here.resolve())  # untouched
