"""The command lines a user meets: fteval, ftclient check, and the placeholders that must not pretend."""

from __future__ import annotations

import json

import pytest

from fedtune.client import cli as ftclient
from fedtune.common import adapters, fteval
from fedtune.common.checkpoint import save_adapter
from fedtune.common.modeling import lora_config
from fedtune.server import cli as ftserver

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[2] / "simulations" / "data"


def test_fteval_scores_base_and_adapter(tiny_model_dir, tiny_config, tiny_peft_model, tmp_path, capsys):
    data = DATA_DIR / "financial" / "eval.jsonl"
    args = ["--model", str(tiny_model_dir), "--data", str(data), "--max-examples", "5", "--max-new-tokens", "3", "--device", "cpu"]
    assert fteval.main([*args, "--labels", "groceries,travel,utilities,salary", "--out", str(tmp_path / "base.json")]) == 0
    base = json.loads((tmp_path / "base.json").read_text())
    assert base["examples"] == 5 and base["format"] == "prompt_completion"
    assert base["loss"] > 0 and 0 <= base["exact_match"] <= 1 and 0 <= base["label_accuracy"] <= 1
    printed = capsys.readouterr().out
    assert "examples        5" in printed and "label accuracy" in printed

    # An adapter pushed far from its init must change the loss that fteval reports.
    model, _, _ = tiny_peft_model
    state = {k: v + 0.5 for k, v in adapters.get_trainable_state(model).items()}
    save_adapter(tmp_path / "adapter", state, lora_config(tiny_config.peft, base_name=str(tiny_model_dir)))
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
    assert fteval.main(["--model", str(tiny_model_dir), "--data", str(DATA_DIR / "legal/eval.jsonl"), "--adapter", str(tmp_path)]) == 2
    assert "not a PEFT adapter folder" in capsys.readouterr().err


def test_ftclient_check_reports_counts_and_problems(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "site.jsonl"
    f.write_bytes(b'{"prompt": "Categorize: SHOP 12", "completion": "groceries"}\n{oops\n\xff\n')
    rc = ftclient.main(["check", "--data", str(f), "--model", str(tiny_model_dir)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "records         3" in out and "valid           1" in out and "invalid         2" in out
    assert "line 2: malformed JSON" in out and "line 3: not valid UTF-8" in out
    assert "SHOP 12" not in out
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert ftclient.main(["check", "--data", str(empty), "--model", str(tiny_model_dir)]) == 2
    assert "empty file" in capsys.readouterr().err


@pytest.mark.parametrize("main", [ftserver.main, lambda a: ftclient.main(["--server", "127.0.0.1:9092", "--data", "x.jsonl"])])
def test_deployment_placeholders_do_not_pretend(main, capsys):
    assert main([]) == 2
    assert "not available in this version" in capsys.readouterr().err
