"""common/adapters.py and common/checkpoint.py on a tiny PEFT model."""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedtune.common import adapters, methods
from fedtune.common.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    atomic_write_bytes,
    atomic_write_json,
    load_adapter_state,
    save_adapter,
    verify_checkpoint,
)


def _perturbed(state, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((k, v + scale * torch.randn(v.shape, generator=g)) for k, v in state.items())


def test_trainable_state_is_lora_only_float32_copies(tiny_peft_model, tiny_config):
    model, _, _ = tiny_peft_model
    state = methods.get_state(model)
    # 2 layers x 7 linear modules (q,k,v,o,gate,up,down) x (A, B)
    assert len(state) == 2 * 7 * 2
    assert all(("lora_A" in k or "lora_B" in k) and ".default." not in k for k in state)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
    r, h, ffn = tiny_config.peft.r, 32, 64
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    k = "base_model.model.model.layers.0.self_attn.k_proj"
    d = "base_model.model.model.layers.1.mlp.down_proj"
    assert state[f"{q}.lora_A.weight"].shape == (r, h)
    assert state[f"{q}.lora_B.weight"].shape == (h, r)
    assert state[f"{k}.lora_B.weight"].shape == (16, r)  # 2 kv heads x head_dim 8
    assert state[f"{d}.lora_A.weight"].shape == (r, ffn)
    # LoRA B starts at zero, A does not.
    assert all(float(v.abs().sum()) == 0 for k_, v in state.items() if "lora_B" in k_)
    assert all(float(v.abs().sum()) > 0 for k_, v in state.items() if "lora_A" in k_)
    # A copy: changing it leaves the model alone.
    next(iter(state.values())).add_(1.0)
    assert not torch.equal(methods.get_state(model)[next(iter(state))], next(iter(state.values())))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapters.num_params(state) == n_trainable


def test_wrap_peft_is_seeded(tiny_config):
    from fedtune.common.methods import wrap
    from fedtune.common.modeling import load_base_model

    a = methods.get_state(wrap(load_base_model(tiny_config.model, "cpu")[0], tiny_config.peft, seed=5))
    b = methods.get_state(wrap(load_base_model(tiny_config.model, "cpu")[0], tiny_config.peft, seed=5))
    c = methods.get_state(wrap(load_base_model(tiny_config.model, "cpu")[0], tiny_config.peft, seed=6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_set_get_round_trip(tiny_peft_model):
    model, _, _ = tiny_peft_model
    new = _perturbed(methods.get_state(model))
    methods.set_state(model, new)
    back = methods.get_state(model)
    assert list(back) == list(new)
    assert all(torch.equal(back[k], new[k]) for k in new)


def test_set_changes_the_forward(tiny_peft_model):
    model, _, _ = tiny_peft_model
    model.eval()
    x = torch.tensor([[3, 4, 5, 6]])
    before = model(input_ids=x).logits
    methods.set_state(model, _perturbed(methods.get_state(model)))
    assert not torch.allclose(model(input_ids=x).logits, before)


def test_set_rejects_missing_and_extra_keys(tiny_peft_model):
    model, _, _ = tiny_peft_model
    state = methods.get_state(model)
    missing = OrderedDict(list(state.items())[1:])
    with pytest.raises(KeyError, match="missing"):
        methods.set_state(model, missing)
    extra = OrderedDict(state)
    extra["base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="unexpected"):
        methods.set_state(model, extra)


def test_delta_and_apply_delta_hand_computed():
    base = OrderedDict(a=torch.tensor([1.0, 2.0, 3.0]), b=torch.tensor([[0.5, -1.0]]))
    local = OrderedDict(a=torch.tensor([1.5, 1.0, 3.0]), b=torch.tensor([[0.0, 1.0]]))
    d = adapters.delta(local, base)
    assert d["a"].tolist() == [0.5, -1.0, 0.0]
    assert d["b"].tolist() == [[-0.5, 2.0]]
    back = adapters.apply_delta(base, d)
    assert back["a"].tolist() == [1.5, 1.0, 3.0] and back["b"].tolist() == [[0.0, 1.0]]
    assert list(d) == ["a", "b"]


def test_delta_upcasts_half():
    d = adapters.delta(
        {"a": torch.tensor([1.0], dtype=torch.bfloat16)}, {"a": torch.tensor([0.25], dtype=torch.float16)}
    )
    assert d["a"].dtype == torch.float32 and d["a"].item() == 0.75


def test_delta_key_mismatch():
    with pytest.raises(KeyError):
        adapters.delta({"a": torch.zeros(1)}, {"b": torch.zeros(1)})
    with pytest.raises(KeyError):
        adapters.apply_delta({"a": torch.zeros(1)}, {"a": torch.zeros(1), "b": torch.zeros(1)})


def test_adapter_records_round_trip_as_one_vector():
    state = OrderedDict(
        x=torch.tensor([[1.0, -2.5], [3.25, 0.0]]),
        y=torch.arange(6, dtype=torch.float32).reshape(3, 2) / 7,
        z=torch.tensor([1.0, 2.0], dtype=torch.bfloat16),  # ArrayRecord rejects bf16: packing casts
        s=torch.tensor(4.0),  # a 0-d tensor keeps its shape
    )
    content = adapters.adapter_records(state)
    assert list(content["arrays"].keys()) == ["flat"]  # one array, whatever the number of tensors
    assert tuple(content["arrays"]["flat"].shape) == (4 + 6 + 2 + 1,)
    arrays = adapters.read_adapter(content)
    assert list(arrays) == ["x", "y", "z", "s"]
    assert all(a.dtype == np.float32 for a in arrays.values())
    np.testing.assert_array_equal(arrays["x"], state["x"].numpy())
    np.testing.assert_array_equal(arrays["y"], state["y"].numpy())
    np.testing.assert_array_equal(arrays["z"], np.array([1.0, 2.0], dtype=np.float32))
    assert arrays["s"].shape == () and float(arrays["s"]) == 4.0
    back = adapters.to_tensors(arrays)
    assert all(back[k].dtype == torch.float32 for k in back)
    assert torch.equal(back["y"], state["y"])


@pytest.mark.parametrize(
    "layout, match",
    [
        ({"names": ["a", "b"], "ndims": [1, 1], "dims": [2, 3]}, "fewer than its layout"),
        ({"names": ["a"], "ndims": [1], "dims": [2]}, "its layout describes 2"),
        ({"names": ["a"], "ndims": [2], "dims": [2]}, "do not agree"),
        ({"names": ["a"], "ndims": [1], "dims": [-4]}, "do not agree"),
        ({"names": ["a"], "ndims": [1]}, "missing"),
    ],
)
def test_read_adapter_rejects_a_layout_that_does_not_fit_the_vector(layout, match):
    from flwr.app import ConfigRecord

    content = adapters.adapter_records(OrderedDict(a=torch.zeros(4)))
    content[adapters.LAYOUT_KEY] = ConfigRecord(layout)
    with pytest.raises(ValueError, match=match):
        adapters.read_adapter(content)


def test_read_adapter_needs_both_records():
    content = adapters.adapter_records(OrderedDict(a=torch.zeros(4)))
    del content[adapters.LAYOUT_KEY]
    with pytest.raises(ValueError, match="no adapter"):
        adapters.read_adapter(content)


def test_num_params_hand_computed(tiny_peft_model):
    model, _, _ = tiny_peft_model
    state = methods.get_state(model)
    # r=4: per layer q(32->32), k(32->16), v(32->16), o(32->32), gate(32->64), up(32->64), down(64->32)
    per_layer = sum(4 * (i + o) for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)])
    assert adapters.num_params(state) == 2 * per_layer == 4096


def test_record_nbytes_counts_at_least_the_float32_payload(tiny_peft_model):
    model, _, _ = tiny_peft_model
    state = methods.get_state(model)
    n = adapters.record_nbytes(adapters.adapter_records(state)["arrays"])
    assert 4 * adapters.num_params(state) <= n <= 4 * adapters.num_params(state) + 256


# ------------------------------------------------------------------ checkpoint


@pytest.mark.parametrize("which_config", ["from_settings", "from_model"])
def test_save_adapter_loads_with_peft_and_gives_same_logits(tmp_path, tiny_peft_model, tiny_config, which_config):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _, _ = tiny_peft_model
    model.eval()
    state = _perturbed(methods.get_state(model), seed=7, scale=0.2)
    methods.set_state(model, state)
    x = torch.tensor([[1, 10, 20, 30, 40, 2]])
    with torch.no_grad():
        expected = model(input_ids=x).logits
    pc = (
        methods.peft_config(None, tiny_config.peft, 0, base_name=tiny_config.model.name)
        if which_config == "from_settings"
        else model.peft_config["default"]
    )
    out = save_adapter(tmp_path / "adapter", state, pc)
    assert sorted(os.listdir(out)) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST])
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"

    base = AutoModelForCausalLM.from_pretrained(tiny_config.model.name, dtype=torch.float32)
    with torch.no_grad():
        plain = base(input_ids=x).logits
    assert not torch.allclose(plain, expected, atol=1e-5)  # the adapter matters
    loaded = PeftModel.from_pretrained(base, str(out))
    loaded.eval()
    with torch.no_grad():
        got = loaded(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_load_adapter_state_round_trip(tmp_path, tiny_peft_model, tiny_config):
    model, _, _ = tiny_peft_model
    state = _perturbed(methods.get_state(model))
    save_adapter(tmp_path / "a", state, methods.peft_config(None, tiny_config.peft, 0))
    back = load_adapter_state(tmp_path / "a")
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        load_adapter_state(tmp_path)


def test_save_adapter_overwrites(tmp_path, tiny_config):
    d = tmp_path / "a"
    save_adapter(d, {"w": torch.zeros(2)}, methods.peft_config(None, tiny_config.peft, 0))
    save_adapter(d, {"w": torch.ones(2)}, methods.peft_config(None, tiny_config.peft, 0))
    assert load_adapter_state(d)["w"].tolist() == [1.0, 1.0]
    assert sorted(os.listdir(d)) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST])


def test_atomic_write_leaves_no_temp_files(tmp_path):
    p = tmp_path / "sub" / "f.json"
    atomic_write_json(p, {"a": 1})
    atomic_write_json(p, {"a": 2})
    atomic_write_bytes(tmp_path / "sub" / "g.bin", b"\x00\x01")
    assert json.loads(p.read_text()) == {"a": 2}
    assert (tmp_path / "sub" / "g.bin").read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path / "sub")) == ["f.json", "g.bin"]


def test_atomic_write_failure_keeps_old_file_and_cleans_up(tmp_path):
    p = tmp_path / "f.json"
    atomic_write_json(p, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(p, {"a": object()})  # fails before the write starts
    with pytest.raises(TypeError):
        atomic_write_bytes(p, "not bytes")  # fails inside, after the temp file exists
    assert json.loads(p.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["f.json"]


def test_manifest_detects_torn_and_corrupted_checkpoints(tmp_path, tiny_peft_model, tiny_config):
    model, _, _ = tiny_peft_model
    pc = methods.peft_config(None, tiny_config.peft, 0)
    d = save_adapter(tmp_path / "ck", methods.get_state(model), pc)
    assert verify_checkpoint(d) is None
    data = bytearray((d / ADAPTER_WEIGHTS).read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the tensor data
    (d / ADAPTER_WEIGHTS).write_bytes(bytes(data))
    assert "hash mismatch" in verify_checkpoint(d)
    d2 = save_adapter(tmp_path / "ck2", methods.get_state(model), pc)
    (d2 / ADAPTER_CONFIG).unlink()
    assert "missing" in verify_checkpoint(d2)
    (d2 / MANIFEST).unlink()
    assert "manifest" in verify_checkpoint(d2)
