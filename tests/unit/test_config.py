"""common/config.py: one strict schema for files and command-line overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.common.config import (
    ConfigError,
    FedTuneConfig,
    TrainConfig,
    load_config,
    parse_override,
    read_config_file,
)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "simulations" / "configs"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# ------------------------------------------------------------------ loading


def test_defaults_load():
    cfg = load_config()
    assert cfg.model.name == "default"
    assert cfg.peft.r == 16 and cfg.peft.alpha == 32.0 and cfg.peft.target_modules == "all-linear"
    assert cfg.train.local_steps == 10 and cfg.train.local_epochs is None
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.federation.rounds == 3 and cfg.federation.sites == []
    assert cfg.data.max_invalid_fraction == 0.0


def test_yaml_file_loads(tmp_path):
    p = _write(
        tmp_path,
        "run.yaml",
        "peft:\n  r: 8\n  alpha: 16\ntrain:\n  lr: 0.001\n  local_steps: 5\n"
        "federation:\n  rounds: 7\n  sites:\n    - {name: a, train: a.jsonl}\n    - {name: b, train: b.jsonl, eval: b-eval.jsonl}\n",
    )
    cfg = load_config(p)
    assert cfg.peft.r == 8
    assert cfg.peft.alpha == 16.0  # an int is a fine float
    assert cfg.train.lr == pytest.approx(0.001)
    assert cfg.train.local_steps == 5
    assert cfg.federation.rounds == 7
    assert [(s.name, s.train, s.eval) for s in cfg.federation.sites] == [
        ("a", "a.jsonl", None),
        ("b", "b.jsonl", "b-eval.jsonl"),
    ]


def test_toml_file_loads(tmp_path):
    p = _write(
        tmp_path,
        "run.toml",
        '[model]\nname = "/models/x"\n[train]\nlr = 1e-4\nbatch_size = 3\n[peft]\ntarget_modules = ["q_proj", "v_proj"]\n'
        '[[federation.sites]]\nname = "s1"\ntrain = "s1.csv"\n',
    )
    cfg = load_config(p)
    assert cfg.model.name == "/models/x"
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.batch_size == 3
    assert cfg.peft.target_modules == ["q_proj", "v_proj"]
    assert cfg.federation.sites[0].name == "s1"


def test_empty_yaml_is_defaults(tmp_path):
    assert load_config(_write(tmp_path, "e.yaml", "")) == FedTuneConfig()


def test_json_round_trip():
    cfg = load_config(None, {"train.local_epochs": 2.0, "peft.r": 4})
    back = FedTuneConfig.from_json(cfg.to_json())
    assert back == cfg
    assert back.train.local_steps is None and back.train.local_epochs == 2.0


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    # Site files named by a shipped config exist, relative to the config file.
    for s in cfg.federation.sites:
        assert (path.parent / s.train).resolve().is_file(), s.train
        if s.eval:
            assert (path.parent / s.eval).resolve().is_file(), s.eval


def test_there_is_a_shipped_config():
    assert list(CONFIG_DIR.glob("*.yaml"))


# ------------------------------------------------------------------ overrides


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train.lr=0.001", ("train.lr", 0.001)),
        ("federation.rounds=5", ("federation.rounds", 5)),
        ("model.name=/tmp/m", ("model.name", "/tmp/m")),
        ("eval.exact_match=false", ("eval.exact_match", False)),
        ("peft.target_modules=[q_proj, v_proj]", ("peft.target_modules", ["q_proj", "v_proj"])),
        (" train.seed =7", ("train.seed", 7)),
        ("data.system_prompt=a=b", ("data.system_prompt", "a=b")),  # split at the first '=' only
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


def test_parse_override_needs_equals():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.lr")


def test_parse_override_scientific_notation():
    assert parse_override("train.lr=1e-4") == ("train.lr", 1e-4)
    assert load_config(None, dict([parse_override("train.lr=1e-4")])).train.lr == pytest.approx(1e-4)


def test_yaml_scientific_notation(tmp_path):
    cfg = load_config(_write(tmp_path, "lr.yaml", "train:\n  lr: 1e-4\n"))
    assert cfg.train.lr == pytest.approx(1e-4)


def test_overrides_on_top_of_file(tmp_path):
    p = _write(tmp_path, "c.yaml", "train:\n  lr: 0.001\n  batch_size: 2\nfederation:\n  rounds: 2\n")
    overrides = dict(parse_override(t) for t in ["train.lr=0.01", "federation.rounds=9", "peft.r=2"])
    cfg = load_config(p, overrides)
    assert cfg.train.lr == pytest.approx(0.01)
    assert cfg.train.batch_size == 2  # untouched key from the file survives
    assert cfg.federation.rounds == 9
    assert cfg.peft.r == 2


def test_override_into_a_value_fails(tmp_path):
    p = _write(tmp_path, "c.yaml", "train:\n  lr: 0.001\n")
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(p, {"train.lr.x": 1})


# ------------------------------------------------------------------ errors


def test_unknown_key_is_named(tmp_path):
    p = _write(tmp_path, "typo.yaml", "train:\n  lrr: 0.001\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "train.lrr" in msg and "unknown key" in msg
    assert str(p) in msg  # names the file


def test_unknown_override_is_named():
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"train.lrr": 0.1})
    assert "train.lrr" in str(ei.value)
    assert "command line" in str(ei.value)


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match="trian"):
        load_config(_write(tmp_path, "s.yaml", "trian:\n  lr: 0.1\n"))


@pytest.mark.parametrize("value", ["3", 3.5, True])
def test_rounds_wrong_type(value):
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"federation.rounds": value})
    assert "federation.rounds" in str(ei.value)


def test_rounds_string_in_file(tmp_path):
    p = _write(tmp_path, "r.yaml", 'federation:\n  rounds: "3"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert "federation.rounds" in str(ei.value) and str(p) in str(ei.value)


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf"])
def test_non_finite_rejected_from_yaml(tmp_path, text):
    p = _write(tmp_path, "n.yaml", f"train:\n  lr: {text}\n")
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(p)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_rejected_from_overrides(value):
    with pytest.raises(ConfigError, match="train.max_grad_norm"):
        load_config(None, {"train.max_grad_norm": value})


def test_non_finite_rejected_from_toml(tmp_path):
    with pytest.raises(ConfigError, match="peft.alpha"):
        load_config(_write(tmp_path, "n.toml", "[peft]\nalpha = nan\n"))


@pytest.mark.parametrize(
    "key, value",
    [
        ("peft.r", 0),
        ("peft.dropout", 1.0),
        ("peft.dropout", -0.1),
        ("peft.alpha", 0.0),
        ("train.lr", 0.0),
        ("train.batch_size", 0),
        ("data.max_length", 4),
        ("data.eval_fraction", 0.95),
        ("data.max_invalid_fraction", 1.5),
        ("federation.rounds", 0),
        ("train.seed", -1),
        ("peft.target_modules", []),
        ("model.name", "  "),
    ],
)
def test_out_of_range(key, value):
    with pytest.raises(ConfigError) as ei:
        load_config(None, {key: value})
    assert key in str(ei.value)


def test_boundaries_accepted():
    cfg = load_config(None, {"peft.r": 1, "peft.dropout": 0.0, "data.max_invalid_fraction": 1.0, "data.max_length": 8})
    assert cfg.peft.r == 1 and cfg.data.max_length == 8


def test_local_epochs_replaces_default_steps():
    t = TrainConfig(local_epochs=1.5)
    assert t.local_steps is None and t.local_epochs == 1.5


def test_local_steps_and_epochs_both_fail():
    with pytest.raises(ConfigError, match="local_steps.*local_epochs|not both"):
        load_config(None, {"train.local_steps": 3, "train.local_epochs": 1.0})


def test_neither_steps_nor_epochs_fails():
    with pytest.raises(ConfigError, match="local_steps or train.local_epochs"):
        load_config(None, {"train.local_steps": None})


def test_duplicate_site_names(tmp_path):
    p = _write(
        tmp_path,
        "d.yaml",
        "federation:\n  sites:\n    - {name: a, train: x}\n    - {name: b, train: y}\n    - {name: a, train: z}\n",
    )
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "unique" in msg and "repeated: a" in msg and str(p) in msg


def test_bad_site_name(tmp_path):
    with pytest.raises(ConfigError, match=r"federation.sites.0.name"):
        load_config(None, {"federation.sites": [{"name": "../etc", "train": "x"}]})


def test_error_lists_every_problem(tmp_path):
    p = _write(tmp_path, "many.yaml", "peft:\n  r: 0\ntrain:\n  lrr: 1\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert "2 problems" in msg and "peft.r" in msg and "train.lrr" in msg


def test_missing_file_named(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(p)


def test_unknown_suffix_named(tmp_path):
    p = _write(tmp_path, "c.ini", "[train]\n")
    with pytest.raises(ConfigError, match=r"c.ini: unknown config type"):
        read_config_file(p)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = _write(tmp_path, "bad.yaml", "train:\n  lr: 0.1\n   bad: [\n")
    with pytest.raises(ConfigError) as ei:
        read_config_file(p)
    assert str(p) in str(ei.value) and "line" in str(ei.value)


def test_toml_syntax_error_names_file(tmp_path):
    p = _write(tmp_path, "bad.toml", "[train\nlr = 1\n")
    with pytest.raises(ConfigError, match="bad.toml: TOML syntax error"):
        read_config_file(p)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        read_config_file(_write(tmp_path, "l.yaml", "- a\n- b\n"))


def test_non_utf8_config(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_bytes(b"train:\n  lr: 0.1 \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_config_file(p)


def test_assignment_is_validated():
    cfg = FedTuneConfig()
    with pytest.raises(ValueError):
        cfg.train.lr = float("nan")


def test_unknown_method_and_layer_options_are_named():
    with pytest.raises(ConfigError, match="peft.method") as e:
        load_config(None, {"peft.method": "lorra"})
    assert "'lora', 'qlora', 'dora'" in str(e.value)
    with pytest.raises(ConfigError, match="layers.only: must be a non-empty list of distinct layer indices"):
        load_config(None, {"layers.only": [3, 3]})
    with pytest.raises(ConfigError, match="layers.lr_decay"):
        load_config(None, {"layers.lr_decay": 1.5})
    with pytest.raises(ConfigError, match="layers.freez_bottom: unknown key"):
        load_config(None, {"layers.freez_bottom": 2})


def test_secure_clip_defaults_to_what_a_round_of_adamw_can_move():
    assert load_config(None, {}).secure_clip == 0.1  # LoRA: 2 x 2e-4 x 10 is far below
    cfg = load_config(None, {"peft.method": "prompt", "train.local_steps": 20})
    assert cfg.secure_aggregation.clip is None and cfg.secure_clip == pytest.approx(2 * 3e-2 * 20)
    assert load_config(None, {"peft.method": "prompt", "secure_aggregation.clip": 0.5}).secure_clip == 0.5
    assert type(cfg).from_json(cfg.to_json()).secure_clip == cfg.secure_clip


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"train.local_patience": 0}, "train.local_patience"),
        ({"train.local_patience": 2, "train.local_eval_every": 0}, "train.local_eval_every"),
        ({"train.local_patience": 2, "train.local_min_delta": -0.1}, "train.local_min_delta"),
        ({"train.local_eval_every": 2}, "train.local_eval_every"),  # without local_patience it would do nothing
        ({"train.local_min_delta": 0.01}, "train.local_min_delta"),
    ],
)
def test_local_early_stopping_settings_are_checked(overrides, key):
    with pytest.raises(ConfigError) as ei:
        load_config(None, overrides)
    assert key in str(ei.value)
    if "train.local_patience" not in overrides:
        assert "set train.local_patience too" in str(ei.value)


def test_local_early_stopping_settings_accepted():
    cfg = load_config(None, {"train.local_patience": 2, "train.local_eval_every": 3, "train.local_min_delta": 0.01})
    assert (cfg.train.local_patience, cfg.train.local_eval_every, cfg.train.local_min_delta) == (2, 3, 0.01)
    assert load_config(None, {}).train.local_patience is None
