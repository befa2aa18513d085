"""The method registry is the one place a method is declared: the config's allowed set is exactly its
entries, each entry's declarations hold for the model it builds (what trains, what merges, the rank
axes), every entry builds, trains a step and round-trips its state on the tiny model, and the config
asks the registry rather than keeping tables of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from typing import get_args

import pytest
import torch

from fedtune.common import methods
from fedtune.common.checkpoint import save_adapter
from fedtune.common.config import (
    DEFAULT_LR,
    LAYERED_METHODS,
    MERGEABLE_METHODS,
    MIXED_RANK_METHODS,
    RANKED_METHODS,
    ConfigError,
    FedTuneConfig,
    PeftMethod,
    PeftSettings,
    load_config,
)
from fedtune.common.methods import REGISTRY, Method
from fedtune.common.methods.spec import Method as SpecMethod


def test_the_configs_methods_are_exactly_the_registrys_entries():
    assert get_args(PeftMethod) == tuple(REGISTRY)
    assert PeftSettings.model_json_schema()["properties"]["method"]["enum"] == list(REGISTRY)
    assert set(DEFAULT_LR) == set(REGISTRY)
    for name, m in REGISTRY.items():
        assert isinstance(m, SpecMethod) and m.name == name
        assert load_config(None, {"peft.method": name}).peft.method == name  # each one validates
        assert DEFAULT_LR[name] == m.default_lr and 0 < m.default_lr <= 1.0
        assert set(m.options) <= set(PeftSettings.model_fields), (name, m.options)  # options are real settings
        assert (m.artifact == "model") == (m.build is None)
        assert not m.mixed_ranks or m.rank, name  # mixed ranks need a rank to lower
        assert not m.four_bit or m.rank_axes, name  # a 4-bit base carries a LoRA-family adapter
        assert m.build is None or m.trained_keys, name  # an adapter says what its tensors are called
    # The config's views of the registry (still imported by the apps) are the registry's.
    assert MERGEABLE_METHODS == methods.names(mergeable=True)
    assert RANKED_METHODS == methods.names(rank=True)
    assert LAYERED_METHODS == methods.names(layered=True)
    assert MIXED_RANK_METHODS == methods.names(mixed_ranks=True)
    assert methods.names() == tuple(REGISTRY)


def test_the_tables_the_registry_replaced_are_what_it_declares():
    """The lists common/config.py kept before the registry, for the methods they named: the
    registry's declarations must say the same (a changed default or trait would change runs)."""
    before = ("lora", "qlora", "dora", "ia3", "adapter", "prefix", "prompt", "full", "loha", "lokr", "vera", "oft")
    before += ("fourierft",)
    assert tuple(REGISTRY)[: len(before)] == before  # --peft's order, and the error message's
    pick = lambda trait: tuple(n for n in before if getattr(REGISTRY[n], trait))  # noqa: E731
    assert pick("mergeable") == ("lora", "qlora", "dora", "ia3", "loha", "lokr", "vera", "oft", "fourierft")
    assert pick("rank") == ("lora", "qlora", "dora", "loha", "lokr", "vera")
    assert pick("layered") == (
        "lora",
        "qlora",
        "dora",
        "ia3",
        "adapter",
        "full",
        "loha",
        "lokr",
        "vera",
        "oft",
        "fourierft",
    )
    assert pick("mixed_ranks") == ("lora", "qlora", "dora")
    assert pick("ffa_frozen") == ("lora", "qlora")
    assert pick("four_bit") == ("qlora",)
    assert tuple(n for n in before if not REGISTRY[n].targets) == ("adapter", "prefix", "prompt")
    lr = {"lora": 2e-4, "qlora": 2e-4, "dora": 2e-4, "loha": 2e-4, "lokr": 2e-4, "vera": 4e-3, "ia3": 3e-3}
    lr |= {"adapter": 5e-3, "prefix": 5e-3, "prompt": 3e-2, "full": 2e-5, "oft": 2e-4, "fourierft": 1e-2}
    assert {n: REGISTRY[n].default_lr for n in before} == lr
    assert [n for n in before if REGISTRY[n].artifact == "model"] == ["full"]


def test_an_unknown_method_is_refused_with_the_list():
    with pytest.raises(ConfigError, match="peft.method") as e:
        load_config(None, {"peft.method": "lorra"})
    assert all(repr(n) in str(e.value) for n in REGISTRY)
    with pytest.raises(ConfigError, match=r"peft.method 'lorra' is not a method; one of lora, qlora, dora"):
        methods.get("lorra")


def test_the_config_asks_the_registry():
    """A method's own declarations reach validation: HRA's even-rank check, its default lr, its
    header line, and the option lists in the schema's descriptions."""
    with pytest.raises(ConfigError, match="hra starts its reflections in cancelling pairs, so r must be even"):
        load_config(None, {"peft.method": "hra", "peft.r": 5})
    cfg = load_config(None, {"peft.method": "hra", "peft.r": 6, "peft.target_modules": "mlp"})
    assert cfg.train.lr == REGISTRY["hra"].default_lr
    assert cfg.peft.describe() == "hra r=6 on mlp"
    assert load_config(None, {"peft.method": "hra", "output.merged": True}).output.merged  # it merges
    assert "hra" in PeftSettings.model_fields["r"].description
    assert "hra" not in PeftSettings.model_fields["alpha"].description  # HRA has no scaling
    with pytest.raises(ConfigError, match="it needs method lora or qlora, not 'hra'"):
        load_config(None, {"peft.method": "hra", "peft.ffa": True})
    with pytest.raises(ConfigError, match="mixed ranks need a LoRA-family method"):
        load_config(None, {"peft.method": "hra", "federation.sites": [{"name": "a", "train": "x.jsonl", "rank": 2}]})


def test_the_registry_imports_neither_torch_nor_peft():
    """common/config.py validates against the registry; it must stay light (ftclient check, the CLIs' --help)."""
    code = (
        "import sys; import fedtune.common.config as c; from fedtune.common import methods; "
        "methods.REGISTRY['oft'].describe(c.PeftSettings(method='oft')); "
        "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_method_is_a_frozen_declaration():
    m = REGISTRY["lora"]
    with pytest.raises(AttributeError):
        m.default_lr = 1.0  # type: ignore[misc]
    assert {f.name for f in fields(Method)} >= {"build", "rank", "mergeable", "layered", "default_lr", "four_bit"}
    assert m.rank_axis("base_model.model.layers.0.q_proj.lora_A.weight") == 0
    assert m.rank_axis("x.lora_B.weight") == 1 and m.rank_axis("x.lora_magnitude_vector.weight") is None
    assert REGISTRY["vera"].rank_axis("x.lora_A.weight") is None  # no rank axes: no mixed ranks
    assert methods.lora_pairs(["a.lora_A.weight", "a.lora_B.weight"], "vera") == []


def test_site_rank_problems_come_from_the_registry():
    lora = load_config(None, {"peft.r": 8})
    vera = load_config(None, {"peft.method": "vera", "peft.r": 8})
    assert methods.site_rank_problem(lora, None) is None and methods.site_rank_problem(lora, 4) is None
    assert "above the run's peft.r 8" in methods.site_rank_problem(lora, 9)
    assert "the run's method vera has no LoRA rank" in methods.site_rank_problem(vera, 4)
    assert methods.site_rank_problem(vera, None) is None


# ---- every entry on the tiny model ---------------------------------------------------------------

LR = {"full": 3e-3, "prompt": 1e-1, "prefix": 3e-2, "adapter": 1e-1}  # the tiny model's flat logits


@pytest.fixture
def tiny64(tiny_config, tiny_model_dir_64) -> FedTuneConfig:
    data = json.loads(tiny_config.to_json())
    data["model"]["name"] = str(tiny_model_dir_64)  # qlora: bitsandbytes' 64-value blocks
    return load_config(None, base=data)


def _with(cfg: FedTuneConfig, method: str) -> FedTuneConfig:
    data = json.loads(cfg.to_json())
    data["peft"]["method"] = method
    data["train"]["lr"] = None
    return load_config(None, base=data)


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float()


@pytest.mark.parametrize("method", list(REGISTRY))
def test_every_entry_builds_trains_a_step_and_round_trips(method, tiny64, tmp_path):
    """The entry builds on the tiny model; what trains is what it declares (its key parts, per layer
    when ``layered``, rank axes where it says); one step moves exactly those tensors; the state loads
    into a fresh model (and, saved, through peft) to the same outputs; a ``mergeable`` entry merges."""
    torch.manual_seed(0)
    cfg = _with(tiny64, method)
    spec = REGISTRY[method]
    model = methods.load_model(cfg, "cpu")[0]
    assert methods.is_peft(model) == (spec.artifact == "adapter")
    keys = methods.trainable_capable(model)
    assert keys and all(any(p in k for p in spec.trained_keys or ("",)) for k in keys), keys[:3]
    n_layers = methods.n_layers_of(model)
    in_layers = {methods.position(k, n_layers) for k in keys} & set(range(n_layers))
    assert bool(in_layers) == spec.layered, sorted(in_layers)
    if spec.rank_axes:
        assert (
            methods.rank_of(methods.get_state(model), {k: v.shape for k, v in methods.get_state(model).items()})
            == cfg.peft.r
        )
    if spec.ffa_frozen:
        assert any(spec.ffa_frozen in k for k in keys)

    before = methods.get_state(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR.get(method, 1e-2))
    x = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 2], [1, 50, 51, 52, 53, 54, 55, 2]])
    loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss
    loss.backward()
    opt.step()
    after = methods.get_state(model)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and moved <= set(keys), sorted(moved - set(keys))[:3]

    expected = _logits(model, x)
    fresh = methods.load_model(cfg, "cpu")[0]
    assert not torch.allclose(_logits(fresh, x), expected, atol=1e-6)  # the step changed the outputs
    methods.set_state(fresh, after)
    torch.testing.assert_close(_logits(fresh, x), expected, rtol=0, atol=1e-5)
    if spec.artifact == "model":
        return
    save_adapter(
        tmp_path / "a",
        after,
        methods.saved_peft_config(model, cfg.model.name),
        extra_json={methods.METHOD_FILE: methods.method_info(cfg)},
    )
    reloaded = methods.load_trained(cfg.model, tmp_path / "a", "cpu")[0]
    torch.testing.assert_close(_logits(reloaded, x), expected, rtol=0, atol=1e-5)
    if spec.mergeable:
        merged = methods.load_trained(cfg.model, tmp_path / "a", "cpu", merged_precision=True)[0]
        with_adapter = _logits(merged, x)
        torch.testing.assert_close(_logits(merged.merge_and_unload(), x), with_adapter, rtol=0, atol=1e-4)
    else:
        with pytest.raises(ConfigError, match="cannot be merged into the base"):
            methods.export_merged(cfg.model, tmp_path / "a", tmp_path / "m")
