"""The model card (README.md) of every artifact folder a run writes: the hub's YAML header, what
was trained and how it scored, the load lines (which run), and no record text at all."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from fedtune.common import card, methods
from fedtune.common.checkpoint import verify_checkpoint
from fedtune.common.config import load_config
from fedtune.server import app as server
from fedtune.server import checkpoints
from fedtune.simulations import baselines

from .test_client_app import fresh_caches  # noqa: F401  (autouse fixture)
from .test_methods import DATA_DIR, real_sites
from .test_server_rounds import _task_identity  # noqa: F401  (fixture)

NAMES = ("medical", "financial")
ADAPTER_FOLDERS = ("adapter", "best", "baselines/alone/medical", "baselines/alone/financial", "baselines/pooled")


def sites_config(tiny_config, **sections):
    data = json.loads(tiny_config.to_json())
    data["train"].update({"local_steps": 3, "lr": 1e-2})
    data["federation"]["sites"] = [
        {"name": n, "train": str(DATA_DIR / n / "train.jsonl"), "eval": str(DATA_DIR / n / "eval.jsonl")} for n in NAMES
    ]
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return load_config(None, base=data)


@pytest.fixture
def finished_run(tiny_config, tmp_path):
    """A finished 2-round LoRA federation of two real sites, with merged/, forgetting and the baselines."""
    cfg = sites_config(tiny_config, output={"merged": True}, eval={"forgetting": True})
    grid, _ = real_sites(NAMES)
    rs = server.run_federation(grid, cfg, tmp_path, lambda s: None)
    baselines.run_baselines(cfg, tmp_path, rs.rounds, lambda s: None, "cpu")
    return cfg, tmp_path, rs


def split_card(path: Path) -> tuple[dict, str]:
    """-> (the YAML header, parsed; the body)."""
    text = path.read_text(encoding="utf-8")
    m = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert m, f"{path}: no YAML header between --- lines"
    return yaml.safe_load(m.group(1)), m.group(2)


def record_texts() -> list[str]:
    """Every distinctive piece of the sites' data: each prompt and answer whole, and each line of
    them of 16 characters or more (a one-word label such as 'routine' says nothing of a record)."""
    out: set[str] = set()
    for f in sorted(DATA_DIR.glob("*/*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            strings = [m["content"] for m in rec.get("messages", [])]
            strings += [v for k, v in rec.items() if isinstance(v, str)]
            for s in strings:
                out.update(p.strip() for p in [s, *s.splitlines()] if len(p.strip()) >= 16)
    return sorted(out)


def leaked(text: str, texts: list[str]) -> list[str]:
    return [t for t in texts if t in text]


def code_of(body: str) -> str:
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_every_artifact_folder_has_a_card_with_the_hubs_header(finished_run):
    cfg, out, rs = finished_run
    last = rs.rounds[-1]
    for folder in (*ADAPTER_FOLDERS, "merged"):
        head, body = split_card(out / folder / card.FILE)
        assert head["library_name"] == ("transformers" if folder == "merged" else "peft"), folder
        assert head["pipeline_tag"] == "text-generation"
        assert {"fedtune", "lora"} <= set(head["tags"])
        assert ("baseline" in head["tags"]) == folder.startswith("baselines"), folder
        assert "base_model" not in head  # a local folder has no hub id; the body names its path
        assert f"`{Path(cfg.model.name).resolve()}`" in body
        assert "fteval --adapter DIR --relink" in body or folder == "merged"
    # The card sits outside the manifest: the folders still verify, and round checkpoints have none.
    assert verify_checkpoint(out / "adapter") is None and verify_checkpoint(out / "best") is None
    assert not list((out / "checkpoints").rglob(card.FILE))

    # adapter/: the final figures, each site by name with its example counts and its scores.
    _, body = split_card(out / "adapter" / card.FILE)
    assert "after round 2 of 2 (the run: final)" in body and "not recorded yet" not in body
    for name in NAMES:
        base, final = rs.rounds[0]["sites"][name], last["sites"][name]
        row = (
            f"| {name} | {final['examples']:,} | {final['eval_examples']:,} | {base['eval_loss']:.4f} | "
            f"{final['eval_loss']:.4f} |"
        )
        assert row in body
    assert (
        "`peft.r` = `4`" in body and "`peft.alpha` = `8.0`" in body and "`peft.target_modules` = `all-linear`" in body
    )
    assert "strategy: fedavg" in body and "secure aggregation (SecAgg+): off" in body
    assert "differential privacy: off" in body
    f = rs.forgetting
    assert (
        "## Forgetting" in body
        and f"| text loss | {f['base']['text_loss']:.3f} | {f['final']['text_loss']:.3f} |" in body
    )
    best = rs.best()
    assert f"Best round: {best['round']} " in body

    _, body = split_card(out / "best" / card.FILE)
    assert f"The global adapter of round {best['round']}" in body and " so far" not in body

    doc = json.loads((out / "baselines" / baselines.RESULTS).read_text())
    for name in NAMES:
        _, body = split_card(out / "baselines" / "alone" / name / card.FILE)
        assert f"site {name} trained alone" in body
        assert f"- trained: {doc['alone'][name]['steps']} optimizer steps of 2 examples" in body
        assert f"drawing on {last['sites'][name]['examples']:,} training examples" in body
    _, body = split_card(out / "baselines" / "pooled" / card.FILE)
    assert "all sites' data pooled" in body
    pooled = doc["pooled"]
    assert f"- trained: {pooled['steps']} optimizer steps" in body and f"drawing on {pooled['examples']:,}" in body
    # Once every baseline is scored, each card carries its scores beside the base model's.
    base = {name: rs.rounds[0]["sites"][name]["eval_loss"] for name in NAMES}
    for name in NAMES:
        _, body = split_card(out / "baselines" / "alone" / name / card.FILE)
        score = doc["alone"][name]["score"]
        assert f"| {name} | – | {score['eval_examples']} | {base[name]:.4f} | {score['eval_loss']:.4f} |" in body
        assert "eval loss, the site alone" in body and [n for n in NAMES if n != name][0] + " |" not in body
    _, body = split_card(out / "baselines" / "pooled" / card.FILE)
    for name in NAMES:
        score = pooled["scores"][name]
        assert f"| {name} | – | {score['eval_examples']} | {base[name]:.4f} | {score['eval_loss']:.4f} |" in body


def test_no_card_holds_any_record_text(finished_run):
    _, out, _ = finished_run
    texts = record_texts()
    assert len(texts) > 500
    cards = sorted(out.rglob(card.FILE))
    assert len(cards) == len(ADAPTER_FOLDERS) + 1
    for path in cards:
        assert leaked(path.read_text(encoding="utf-8"), texts) == [], path
    # The check can fail: a card with an example in it is caught.
    example = json.loads((DATA_DIR / "medical" / "eval.jsonl").read_text().splitlines()[3])["messages"][0]["content"]
    assert leaked(cards[0].read_text() + "\n" + example.splitlines()[-1], texts)


def test_the_cards_load_lines_load_the_folder(finished_run):
    """The snippet of adapter/'s card and of merged/'s, run as written (offline: the base is the
    local folder adapter_config.json names)."""
    from peft import PeftModel

    _, out, _ = finished_run
    ns: dict = {}
    exec(code_of(split_card(out / "adapter" / card.FILE)[1]), ns)
    assert isinstance(ns["model"], PeftModel) and ns["tokenizer"].pad_token is not None
    ns = {}
    exec(code_of(split_card(out / "merged" / card.FILE)[1]), ns)
    assert not isinstance(ns["model"], PeftModel) and ns["tokenizer"].pad_token is not None


def test_a_card_written_before_its_rounds_evaluation_says_so(finished_run):
    _, _, rs = finished_run
    facts = checkpoints.card_facts(rs, "adapter", rnd=3)  # a round whose evaluation is not recorded
    assert not facts.evaluated and not facts.finished
    text = card.render(facts)
    assert "after round 3 of 2 (the run: in progress" in text and "Round 3's evaluation was not recorded yet" in text
    final = rs.rounds[-1]["sites"]["medical"]["eval_loss"]
    assert f"{final:.4f}" not in text


def test_full_fine_tuning_writes_its_models_card(tiny_config, tmp_path):
    cfg = sites_config(tiny_config, peft={"method": "full"}, federation={"rounds": 1}, eval={"forgetting": False})
    grid, _ = real_sites(NAMES)
    rs = server.run_federation(grid, cfg, tmp_path, lambda s: None)
    assert not (tmp_path / "adapter").exists()
    head, body = split_card(tmp_path / "model" / card.FILE)
    assert head["library_name"] == "transformers" and {"fedtune", "federated-learning", "full"} <= set(head["tags"])
    assert "after round 1 of 1" in body
    assert f'AutoModelForCausalLM.from_pretrained("{tmp_path / "model"}")' in body
    for name in NAMES:
        assert f"| {name} | {rs.rounds[-1]['sites'][name]['examples']:,} |" in body
    assert leaked(body, record_texts()) == []


def facts_for(tiny_config, info: dict, **over) -> card.CardFacts:
    return card.CardFacts(
        **{"kind": "adapter", "folder": "runs/x/adapter", **card.method_facts(tiny_config, info), **over}
    )


def test_a_qlora_card_carries_its_bitsandbytes_line(tiny_config):
    cfg = load_config(None, base=json.loads(tiny_config.to_json()) | {"peft": {"method": "qlora", "r": 4}})
    info = {"method": "qlora", "base_model": cfg.model.name, "quant_type": "fp4", "double_quant": False}
    text = card.render(facts_for(cfg, info))
    assert (
        'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False, '
        "bnb_4bit_compute_dtype=torch.bfloat16)" in text
    )
    assert 'AutoPeftModelForCausalLM.from_pretrained("runs/x/adapter", quantization_config=bnb)' in text
    assert "`peft.quant_type` = `nf4`" in text  # the settings qlora reads, as configured
    assert "bitsandbytes" not in card.render(facts_for(tiny_config, {"method": "lora"}))


def test_the_base_model_names_a_hub_id_and_the_default_its_lineage(tiny_config):
    sha = "ab" * 32
    default = card.base_facts("default", {"base_path": "/cache/models/SmolLM2-135M-Instruct", "base_sha256": sha})
    head, body = split_card_text(card.render(facts_for(tiny_config, {}, base=default)))
    assert head["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "de-quantized" in body and "Q4_1" in body and "lineage only" in body and sha in body
    hub = card.base_facts("org/model", {"base_path": "org/model", "base_sha256": None})
    head, body = split_card_text(card.render(facts_for(tiny_config, {}, base=hub)))
    assert head["base_model"] == "org/model" and "lineage" not in body
    local = card.base_facts("/data/m", {"base_path": "/data/m"})
    assert (
        local.hub_id is None
        and "base_model" not in split_card_text(card.render(facts_for(tiny_config, {}, base=local)))[0]
    )


def test_privacy_and_secure_aggregation_are_stated(tiny_config):
    text = card.render(
        facts_for(
            tiny_config,
            {},
            secure_aggregation=True,
            privacy={"epsilon": 2.345, "delta": 1e-5, "budget": 8.0, "clip": 0.5},
            finished=True,
        )
    )
    head, body = split_card_text(text)
    assert {"differential-privacy", "secure-aggregation"} <= set(head["tags"])
    assert "secure aggregation (SecAgg+): on" in body
    assert "epsilon 2.345 spent by the run of a budget of 8, delta 1e-05, clip 0.5" in body


def test_a_site_name_cannot_write_markup():
    assert card.md("a_b|c\n# d") == r"a\_b\|c \# d"


def split_card_text(text: str) -> tuple[dict, str]:
    m = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    return yaml.safe_load(m.group(1)), m.group(2)


@pytest.mark.parametrize("method", sorted(methods.REGISTRY))
def test_every_methods_card_states_the_settings_it_reads(tiny_config, method):
    data = json.loads(tiny_config.to_json())
    data["peft"] = {"method": method}
    cfg = load_config(None, base=data)
    spec = methods.get(method)
    kind = "model" if spec.artifact == "model" else "adapter"
    head, body = split_card_text(card.render(facts_for(cfg, {"method": method}, kind=kind)))
    assert method in head["tags"] and head["library_name"] == card.library_name(kind)
    for option in spec.options:
        assert f"`peft.{option}` = " in body
    assert ("`peft.target_modules` = " in body) == spec.targets


def test_a_card_that_cannot_be_written_does_not_stop_the_run(tmp_path, monkeypatch, caplog):
    """The card is derived: when writing it fails, the adapter beside it is still saved and the
    round goes on, with a warning naming the folder."""
    from fedtune.server import checkpoints

    def refuse(folder, facts):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(card, "write_card", refuse)
    monkeypatch.setattr(checkpoints, "card_facts", lambda *a, **k: None)
    with caplog.at_level("WARNING", logger="fedtune.checkpoints"):
        checkpoints.write_model_card(SimpleNamespace(out=tmp_path), "adapter", 1)
    assert "adapter/README.md: the model card is not written" in caplog.text and "No space left" in caplog.text
