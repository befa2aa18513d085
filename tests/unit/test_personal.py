"""Personalization (federation.personalization, client/personal.py): each site's private part is
trained and kept at the site, survives a replay, never reaches a message, and is saved as a PEFT
adapter that fteval scores as the site reported it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import MessageType

from fedtune.client import app as client_app
from fedtune.client import personal
from fedtune.client.app import handle_evaluate, handle_train
from fedtune.common.checkpoint import load_adapter_state
from fedtune.common.config import ConfigError, load_config
from fedtune.common.fteval import main as fteval_main

from .test_client_app import (  # noqa: F401  (fresh_caches: autouse; global_state: a fixture)
    eval_reply,
    fresh_caches,
    global_state,
    message,
    site,
    train_reply,
    write_site,
)
from .test_server_rounds import _task_identity  # noqa: F401  (fixture: Flower's Message needs a task identity)


def personalized(cfg, how: str, **fed):
    cfg = cfg.model_copy(deep=True)
    cfg.federation.personalization = how
    for k, v in fed.items():
        setattr(cfg.federation, k, v)
    cfg.eval.exact_match = True
    return cfg


def a_site(tmp_path, name="bank"):
    """A site with its own eval file and a folder for its private part."""
    train = write_site(tmp_path / f"{name}.jsonl", 8)
    ev = write_site(tmp_path / f"{name}-eval.jsonl", 3)
    return site(train, name, eval_data_path=str(ev), state_dir=str(tmp_path / "state" / name)), ev


def evaluate(cfg, state, rnd, ctx):
    return eval_reply(handle_evaluate(message(cfg, state, rnd, MessageType.EVALUATE), ctx, None, "cpu"))


@pytest.mark.parametrize("how", ["dual", "finetune"])
def test_the_site_reports_its_personalized_model_and_fteval_scores_the_saved_one_the_same(
    tmp_path, tiny_config, tiny_model_dir, global_state, how
):
    cfg = personalized(tiny_config, how, personal_steps=3, **({"personal_rank": 2} if how == "dual" else {}))
    ctx, ev = a_site(tmp_path)
    r = evaluate(cfg, global_state, 1, ctx)
    m = r.metrics
    assert r.site.status == "ok" and m.personal_steps == 3
    assert m.personal_eval_loss is not None and m.personal_eval_loss != pytest.approx(m.eval_loss)
    folder = tmp_path / "state" / "bank" / personal.ARTIFACT_DIR
    cfg_json = json.loads((folder / "adapter_config.json").read_text())
    if how == "dual":  # the global rank 4 and the private 2, side by side, scaling 1
        assert cfg_json["r"] == 6 and cfg_json["lora_alpha"] == 6
    card_text = (folder / "README.md").read_text()  # its model card: what it is, the site's score, no record text
    assert (
        "bank's personalized model" in card_text and f"| bank | 8 | 3 | – | {m.personal_eval_loss:.4f} |" in card_text
    )
    assert "SECRET" not in card_text
    out = tmp_path / "scores.json"
    args = ["--model", str(tiny_model_dir), "--adapter", str(folder), "--data", str(ev), "--out", str(out)]
    args += ["--max-length", "192", "--max-new-tokens", "4", "--batch-size", "4", "--device", "cpu"]
    assert fteval_main(args) == 0
    scores = json.loads(out.read_text())
    assert scores["loss"] == pytest.approx(m.personal_eval_loss, rel=1e-4)
    assert scores["exact_match"] == pytest.approx(m.personal_exact_match)


def test_the_global_scores_do_not_change_when_the_site_personalizes(tmp_path, tiny_config, global_state):
    ctx, _ = a_site(tmp_path)
    plain = evaluate(tiny_config.model_copy(deep=True), global_state, 1, ctx).metrics
    client_app._RUNTIME, client_app._SITE_CACHE = None, {}
    dual = evaluate(personalized(tiny_config, "dual"), global_state, 1, ctx).metrics
    assert dual.eval_loss == pytest.approx(plain.eval_loss, abs=1e-6)
    assert plain.personal_eval_loss is None and dual.personal_eval_loss is not None
    # ...and round 0 (the base model's evaluation) trains nothing private
    r0 = evaluate(personalized(tiny_config, "dual"), global_state, 0, ctx).metrics
    assert r0.personal_eval_loss is None


def test_the_private_adapter_never_reaches_a_train_reply(tmp_path, tiny_config, global_state):
    """The attack: a curious coordinator reads every byte a site sends. After the site trained
    its private adapter, its next train reply is byte for byte the one it would send without
    personalization, holds none of the private tensors, and its eval reply carries scores only."""
    ctx, _ = a_site(tmp_path)
    train = message(tiny_config, global_state, 2, MessageType.TRAIN)
    plain = train_reply(handle_train(train, ctx, None, "cpu"))
    client_app._RUNTIME, client_app._SITE_CACHE = None, {}  # a new process
    cfg = personalized(tiny_config, "dual", personal_steps=4)
    ev = handle_evaluate(message(cfg, global_state, 1, MessageType.EVALUATE), ctx, None, "cpu")
    private = load_adapter_state(tmp_path / "state" / "bank" / "private" / "round-0001")
    trained = [v for k, v in private.items() if ".lora_B." in k]
    assert trained and all(v.abs().max() > 0 for v in trained)  # it did train: B left zero
    reply = handle_train(message(cfg, global_state, 2, MessageType.TRAIN), ctx, None, "cpu")
    tr = train_reply(reply)
    assert tr.site.status == "ok" and set(tr.update) == set(plain.update) == set(global_state)
    for k, v in plain.update.items():
        np.testing.assert_array_equal(np.asarray(tr.update[k]), np.asarray(v), err_msg=k)
    sent = b"".join(bytes(a.data) for rec in reply.content.array_records.values() for a in rec.values())
    for v in trained:
        assert v.detach().numpy().astype(np.float32)[0].tobytes() not in sent  # one row of a private B
    assert not ev.content.array_records  # an eval reply carries scores only


def test_the_private_part_survives_a_replay_and_a_missed_round(tmp_path, tiny_config, global_state):
    cfg = personalized(tiny_config, "dual", personal_steps=2)
    ctx, _ = a_site(tmp_path)
    evaluate(cfg, global_state, 1, ctx)
    evaluate(cfg, global_state, 2, ctx)
    root = tmp_path / "state" / "bank" / "private"
    before = load_adapter_state(root / "round-0002")
    # The site's process dies and the coordinator resumes at round 2: a new process replays it.
    client_app._RUNTIME, client_app._SITE_CACHE = None, {}
    evaluate(cfg, global_state, 2, ctx)
    after = load_adapter_state(root / "round-0002")
    assert set(after) == set(before)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    # round 3 missed; round 4 starts from round 2's part; only the newest KEEP rounds stay
    evaluate(cfg, global_state, 4, ctx)
    assert [r for r, _ in personal.private_rounds(root.parent)] == [2, 4]
    # a torn newest round is skipped, the one before it used
    (root / "round-0004" / "adapter_model.safetensors").write_bytes(b"torn")
    assert personal.latest_private(root.parent, 5)[0] == 2


def test_a_site_without_a_state_folder_reports_the_global_scores_alone(tmp_path, tiny_config, global_state):
    train = write_site(tmp_path / "t.jsonl", 6)
    m = evaluate(personalized(tiny_config, "finetune"), global_state, 1, site(train, "x")).metrics
    assert m.eval_loss is not None and m.personal_eval_loss is None


def test_stacked_lora_is_the_exact_sum():
    g = torch.Generator().manual_seed(0)
    a_g, b_g = torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g)
    a_p, b_p = torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g)
    keys = {"m.lora_A.weight": (a_g, a_p), "m.lora_B.weight": (b_g, b_p)}
    s = personal.stacked({k: v[0] for k, v in keys.items()}, {k: v[1] for k, v in keys.items()}, 2.0, 0.5)
    torch.testing.assert_close(s["m.lora_B.weight"] @ s["m.lora_A.weight"], 2.0 * b_g @ a_g + 0.5 * b_p @ a_p)
    with pytest.raises(ValueError, match="not a LoRA A or B"):
        personal.stacked({"m.magnitude": a_g}, {"m.magnitude": a_g}, 1.0, 1.0)


@pytest.mark.parametrize(
    "fed, peft, expected",
    [
        ({"personalization": "dual"}, {"method": "dora"}, "peft.method 'dora'"),
        ({"personalization": "finetune"}, {"method": "full"}, "whole private copy"),
        ({"personalization": "finetune", "personal_rank": 2}, {}, "personal_rank"),
        ({"personal_steps": 5}, {}, "federation.personal_steps is set"),
    ],
)
def test_combinations_that_cannot_work_are_refused_naming_the_keys(tmp_path, fed, peft, expected):
    f = tmp_path / "c.yaml"
    f.write_text(json.dumps({"federation": fed, "peft": peft}))
    with pytest.raises(ConfigError, match=expected):
        load_config(f)


def test_a_personalized_federation_records_every_sites_scores_and_the_coordinator_holds_no_private_byte(
    tmp_path, tiny_config, holds_no_private_row
):
    """Two real sites, two rounds, dual adapters: each round's record has each site's personalized
    scores (the global ones unchanged in kind), the report shows them, and no file the coordinator
    wrote holds a byte row of either site's private adapter."""
    from fedtune.server import app as server
    from fedtune.server.record import read_record

    from .test_methods import real_sites

    data = json.loads(tiny_config.to_json())
    data["train"].update({"local_steps": 2, "lr": 1e-2})
    data["eval"]["forgetting"] = False
    data["federation"].update({"rounds": 2, "personalization": "dual", "personal_steps": 2})
    cfg = load_config(None, base=data)
    grid, _ = real_sites(state_root=tmp_path / "sites")
    out = tmp_path / "run"
    server.run_federation(grid, cfg, out, lambda s: None)
    record = read_record(out / "metrics.json")
    for r in record.rounds[1:]:
        for name in ("medical", "financial"):
            s = r.sites[name]
            assert s.personal_eval_loss is not None and s.personal_steps == 2 and s.eval_loss is not None
        assert r.aggregate.personal_eval_loss is not None
    assert record.rounds[0].sites["medical"].personal_eval_loss is None
    assert "eval loss, personalized" in (out / "report.md").read_text()
    holds_no_private_row(
        [tmp_path / "sites" / name / "private" / "round-0002" for name in ("medical", "financial")], out
    )


def test_a_lower_rank_site_stacks_its_own_rank_with_the_private_one(
    tmp_path, tiny_config, tiny_model_dir, global_state
):
    """Mixed ranks (HetLoRA): a site at LoRA rank 2 of the run's 4 personalizes on the global
    adapter cut to its rank; its personalized model is rank 2 + personal_rank and scores as reported."""
    cfg = personalized(tiny_config, "dual", personal_steps=2, personal_rank=3)
    train = write_site(tmp_path / "t.jsonl", 8)
    ev = write_site(tmp_path / "e.jsonl", 3)
    ctx = site(train, "small", eval_data_path=str(ev), lora_rank=2, state_dir=str(tmp_path / "state"))
    m = evaluate(cfg, global_state, 1, ctx).metrics
    folder = tmp_path / "state" / personal.ARTIFACT_DIR
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 5
    # the card names the site, not its folder (ftclient's folder is site-state/)
    assert "# fedtune: lora, site small's personalized model" in (folder / "README.md").read_text()
    out = tmp_path / "scores.json"
    args = ["--model", str(tiny_model_dir), "--adapter", str(folder), "--data", str(ev), "--out", str(out)]
    args += ["--max-length", "192", "--max-new-tokens", "4", "--batch-size", "4", "--device", "cpu"]
    assert fteval_main(args) == 0
    assert json.loads(out.read_text())["loss"] == pytest.approx(m.personal_eval_loss, rel=1e-4)


def test_a_private_part_of_another_rank_is_not_loaded_and_the_process_follows_the_new_rank(
    tmp_path, tiny_config, global_state
):
    """The site's folder holds a private part from a run with personal_rank 2; a run with rank 3
    in the same process starts afresh at rank 3 instead of failing on the shapes."""
    ctx, _ = a_site(tmp_path)
    evaluate(personalized(tiny_config, "dual", personal_rank=2, personal_steps=1), global_state, 1, ctx)
    m = evaluate(personalized(tiny_config, "dual", personal_rank=3, personal_steps=1), global_state, 2, ctx).metrics
    assert m.personal_eval_loss is not None
    state = load_adapter_state(tmp_path / "state" / "bank" / "private" / "round-0002")
    assert {v.shape[0] for k, v in state.items() if ".lora_A." in k} == {3}
