"""Every fine-tuning method, federated: one round of the real coordinator against real site
handlers (through a fake Grid) on the tiny model. The loss falls, only the method's tensors
change, and the saved artifact reloads to the outputs the federation's model gives."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from fedtune.client import app as client_app
from fedtune.common import adapters, messages, methods
from fedtune.common.checkpoint import ADAPTER_CONFIG, load_adapter_state
from fedtune.common.config import ConfigError, LayerConfig, load_config
from fedtune.common.messages import NodeConfig, SiteStatus, TrainMetrics, TrainReply, TrainTask
from fedtune.common.methods import REGISTRY
from fedtune.common.modeling import load_base_model
from fedtune.server import app as server

DATA_DIR = Path(__file__).resolve().parents[2] / "simulations" / "data"
from .test_client_app import fresh_caches  # noqa: F401  (autouse fixture: every test starts with no cached model)
from .test_server_rounds import FakeGrid, _task_identity  # noqa: F401  (fixture)

# What the methods that predate the registry train (their state keys contain one of these): pinned
# here against the registry's own declarations (test_registry_declares_what_the_methods_train).
METHODS = {
    "lora": ("lora_",),
    "qlora": ("lora_",),
    "dora": ("lora_",),
    "ia3": ("ia3_l",),
    "adapter": ("adaption_",),
    "prefix": ("prompt_embeddings",),
    "prompt": ("prompt_embeddings",),
    "full": ("",),
    "loha": ("hada_",),
    "lokr": ("lokr_",),
    "vera": ("vera_lambda",),
    "oft": ("oft_",),
    "fourierft": ("fourierft_",),
}
# Learning rates for the tiny model (its logits are flat; see conftest); 1e-2 for the others.
LR = {"full": 3e-3, "prompt": 1e-1, "prefix": 3e-2, "adapter": 1e-1}


def trained_parts(method: str) -> tuple[str, ...]:
    """What the registry says ``method`` trains ("": any name, for full fine-tuning's own weights)."""
    return REGISTRY[method].trained_keys or ("",)


@pytest.fixture
def tiny_config(tiny_config, tiny_model_dir_64):
    """QLoRA needs the 64-wide tiny model (bitsandbytes' CPU blocks); the other methods use it too."""
    data = json.loads(tiny_config.to_json())
    data["model"]["name"] = str(tiny_model_dir_64)
    return load_config(None, base=data)


def method_config(tiny_config, method: str, **layers):
    data = json.loads(tiny_config.to_json())
    data["peft"]["method"] = method
    data["train"].update(lr=LR.get(method, 1e-2), local_steps=8, warmup_ratio=0.0, lr_scheduler="constant")
    data["eval"]["exact_match"] = False
    data["federation"]["rounds"] = 1
    data["layers"] = layers
    return load_config(None, base=data)


def real_sites(
    names=("medical", "financial"), ranks: dict[str, int] | None = None, state_root: Path | None = None
) -> tuple[FakeGrid, list[client_app.SiteFiles]]:
    """Sites that run the real ClientApp handlers on the bundled data (``ranks``: a site's own LoRA
    rank; ``state_root``: each keeps its private part in ``state_root/NAME``, as ftsim's do)."""
    files = [
        client_app.SiteFiles(
            n,
            str(DATA_DIR / n / "train.jsonl"),
            str(DATA_DIR / n / "eval.jsonl"),
            (ranks or {}).get(n),
            state_dir=str(state_root / n) if state_root else None,
        )
        for n in names
    ]

    def site(i: int):
        node_config = NodeConfig(partition_id=i).to_record()
        ctx = Context(run_id=1, node_id=i + 1, node_config=node_config, state=RecordDict(), run_config={})

        def handle(m):
            kind = m.metadata.message_type
            if kind == messages.TRAIN:
                return client_app.handle_train(m, ctx, files, "cpu").content
            if kind == messages.EVALUATE:
                return client_app.handle_evaluate(m, ctx, files, "cpu").content
            return client_app.handle_secure_stage(m, ctx, files).content  # secure aggregation's stages

        return handle

    return FakeGrid({i + 1: site(i) for i in range(len(files))}), files


def logits(model, text_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=text_ids, attention_mask=torch.ones_like(text_ids)).logits


def test_registry_declares_what_the_methods_train():
    """Every method that predates the registry is in it, saying it trains what it always did; the
    federated round below then runs every entry (a new method is covered by its entry alone)."""
    assert {m: trained_parts(m) for m in METHODS} == METHODS
    assert set(METHODS) < set(REGISTRY)


@pytest.mark.parametrize("method", list(REGISTRY))
def test_one_federated_round_per_method(method, tiny_config, tmp_path):
    cfg = method_config(tiny_config, method)
    grid, _ = real_sites()
    init = server.initial_adapter(cfg)
    rs = server.run_federation(grid, cfg, tmp_path, lambda s: None)

    # The loss falls: the sites' evaluation of the new global model against the untouched base.
    before, after = rs.rounds[0]["aggregate"]["eval_loss"], rs.rounds[1]["aggregate"]["eval_loss"]
    assert after < before - 1e-3, (before, after)
    assert rs.rounds[1]["accepted"] == 2

    # Only the intended tensors change: the method's trainable ones, and all of them moved.
    changed = {k for k in init.state if not np.array_equal(init.state[k], rs.global_state[k])}
    assert changed and changed <= set(init.trainable_keys)
    assert all(any(p in k for p in trained_parts(method)) for k in changed)
    assert len(changed) >= 0.9 * len(init.trainable_keys)
    frozen_in_state = set(init.state) - set(init.trainable_keys)  # e.g. VeRA's shared projections
    assert (method == "vera") == bool(frozen_in_state)
    # The site's base weights never moved (a peft method trains only its own tensors; qlora's 4-bit base stays).
    site_model = client_app._RUNTIME.model
    if method != "full":
        fresh = methods.load_model(cfg, "cpu")[0]
        fresh_params = dict(fresh.named_parameters())
        keys = methods.param_keys(site_model)
        for name, p in site_model.named_parameters():
            if keys.get(name) in init.trainable_keys:
                continue
            if type(p).__name__ == "Params4bit":
                # bitsandbytes keeps a 4-bit weight with its quantization state: compare what the layers compute.
                assert not p.requires_grad
                site_layer, fresh_layer = (
                    site_model.get_submodule(name[: -len(".weight")]),
                    fresh.get_submodule(name[: -len(".weight")]),
                )
                z = torch.randn(3, site_layer.in_features, generator=torch.Generator().manual_seed(0))
                with torch.no_grad():
                    assert torch.equal(site_layer(z), fresh_layer(z)), name
            else:
                assert torch.equal(p, fresh_params[name]), name
    # Updates carry only what trains: the round's bytes are 4 per trainable value (+ an .npy header).
    assert rs.rounds[1]["trainable_params"] == rs.trainable_params
    assert 4 * rs.trainable_params <= rs.rounds[1]["update_bytes"] <= 4 * rs.trainable_params + 256
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert doc["rounds"][1]["update_bytes"] == rs.rounds[1]["update_bytes"]

    # The saved artifact reloads, the ecosystem's way, to the outputs of the federation's model.
    methods.set_state(site_model, adapters.to_tensors(rs.global_state))
    x = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 2]])
    expected = logits(site_model, x)
    if method == "full":
        from transformers import AutoModelForCausalLM

        assert not (tmp_path / "adapter").exists()
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    else:
        assert (
            json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == cfg.model.name
        )
        reloaded = methods.load_trained(cfg.model, tmp_path / "adapter", "cpu")[0]
    torch.testing.assert_close(logits(reloaded, x), expected, rtol=0, atol=1e-5)
    base = load_base_model(cfg.model, "cpu")[0]
    assert (logits(base, x) - expected[:, -x.shape[1] :]).abs().max() > 1e-4  # the artifact carries the training


def test_qlora_base_is_4bit_and_never_travels(tiny_config):
    """QLoRA on the CPU: the site's linear layers are bitsandbytes 4-bit NF4; the state (what is
    sent and averaged) is the LoRA tensors alone, the same keys as LoRA on the full-precision base."""
    import bitsandbytes as bnb

    cfg = method_config(tiny_config, "qlora")
    model = methods.load_model(cfg, "cpu")[0]
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.dtype == torch.uint8 and q.weight.quant_type == "nf4"
    state = methods.get_state(model)
    assert all("lora_" in k for k in state)
    lora = methods.get_state(methods.load_model(method_config(tiny_config, "lora"), "cpu")[0])
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in lora.items()}


def test_merged_export_equals_the_adapter_on_its_base(tiny_config, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = method_config(tiny_config, "dora")
    data = json.loads(cfg.to_json())
    data["output"]["merged"] = True
    cfg = load_config(None, base=data)
    grid, _ = real_sites()
    server.run_federation(grid, cfg, tmp_path, lambda s: None)
    x = torch.tensor([[1, 50, 51, 52, 2]])
    with_adapter = logits(methods.load_trained(cfg.model, tmp_path / "adapter", "cpu")[0], x)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not (tmp_path / "merged" / ADAPTER_CONFIG).exists()
    torch.testing.assert_close(logits(merged, x), with_adapter, rtol=0, atol=1e-5)


def test_merging_is_refused_for_methods_that_cannot_merge(tiny_config):
    with pytest.raises(ConfigError, match="output.merged: a prefix adapter cannot be folded"):
        load_config(None, {"peft.method": "prefix", "output.merged": True})
    with pytest.raises(ConfigError, match="already saves model/"):
        load_config(None, {"peft.method": "full", "output.merged": True})


def test_learning_rate_defaults_to_the_methods_own():
    assert load_config(None, {"peft.method": "prompt"}).train.lr == 3e-2
    assert load_config(None, {"peft.method": "full"}).train.lr == 2e-5
    assert load_config(None, {"peft.method": "lora"}).train.lr == 2e-4
    assert load_config(None, {"peft.method": "prompt", "train.lr": 1e-3}).train.lr == 1e-3
    # Resolved once: the value the sites receive is the one the coordinator used.
    cfg = load_config(None, {"peft.method": "ia3"})
    assert type(cfg).from_json(cfg.to_json()).train.lr == 3e-3


# ---- layer-wise control ---------------------------------------------------------------------------

KEYS = (
    ["model.embed_tokens.weight"]
    + [f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)]
    + ["model.norm.weight", "lm_head.weight"]
)


def trains(lc: LayerConfig, rnd: int = 1) -> list[int]:
    return sorted({methods.position(k, 4) for k in methods.round_keys(KEYS, 4, lc, rnd)})


def test_layer_positions_and_static_selection():
    assert [methods.position(k, 4) for k in KEYS] == [-1, 0, 1, 2, 3, 4, 4]
    assert methods.position("base_model.model.model.layers.12.self_attn.q_proj.lora_A.weight", 30) == 12
    assert methods.position("prompt_embeddings", 30) == 30
    assert trains(LayerConfig()) == [-1, 0, 1, 2, 3, 4]
    assert trains(LayerConfig(freeze_bottom=2)) == [2, 3, 4]  # embeddings freeze with the bottom layers
    assert trains(LayerConfig(only=[1, 3])) == [1, 3]  # named layers only, nothing outside them


def test_progressive_unfreezing_schedule():
    lc = LayerConfig(unfreeze_start=1, unfreeze_every=2, unfreeze_step=1)
    assert [trains(lc, r) for r in (1, 2, 3, 4, 5, 6, 7, 8)] == [
        [3, 4],
        [3, 4],
        [2, 3, 4],
        [2, 3, 4],
        [1, 2, 3, 4],
        [1, 2, 3, 4],
        [-1, 0, 1, 2, 3, 4],
        [-1, 0, 1, 2, 3, 4],
    ]  # top layer and head first, one more layer every 2 rounds, embeddings once every layer trains
    assert trains(LayerConfig(unfreeze_start=1, unfreeze_step=2, freeze_bottom=1), 2) == [1, 2, 3, 4]
    assert trains(LayerConfig(unfreeze_start=9, freeze_bottom=1), 1) == [1, 2, 3, 4]  # never the frozen ones


def test_discriminative_learning_rates(tiny_config):
    from fedtune.client.trainer import make_optimizer

    cfg = method_config(tiny_config, "full", lr_decay=0.5)
    model = methods.load_model(cfg, "cpu")[0]
    groups = methods.lr_scales(model, cfg.layers)
    by_scale = {scale: {id(p) for p in ps} for scale, ps in groups}
    params = dict(model.named_parameters())
    # 2 layers: layer 1 and the head at lr, layer 0 at lr/2, the embeddings at lr/4.
    assert sorted(by_scale) == [0.25, 0.5, 1.0]
    assert id(params["model.embed_tokens.weight"]) in by_scale[0.25]
    assert id(params["model.layers.0.mlp.up_proj.weight"]) in by_scale[0.5]
    assert (
        id(params["model.layers.1.mlp.up_proj.weight"]) in by_scale[1.0]
        and id(params["lm_head.weight"]) in by_scale[1.0]
    )
    opt = make_optimizer(model, cfg.train, groups)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([cfg.train.lr * s for s in (0.25, 0.5, 1.0)])


def test_layer_wise_config_errors(tiny_config):
    with pytest.raises(ConfigError, match="layer-wise control needs per-layer tensors.*'prompt'"):
        load_config(None, {"peft.method": "prompt", "layers.freeze_bottom": 1})
    with pytest.raises(ConfigError, match="the model has 2 layers, so none would train"):
        methods.load_model(method_config(tiny_config, "lora", freeze_bottom=2), "cpu")
    with pytest.raises(ConfigError, match=r"layers.only: layer\(s\) \[5\] do not exist"):
        methods.load_model(method_config(tiny_config, "lora", only=[0, 5]), "cpu")
    with pytest.raises(ConfigError, match="peft.target_modules does not apply to method 'prefix'"):
        load_config(None, {"peft.method": "prefix", "peft.target_modules": "mlp"})
    with pytest.raises(ConfigError, match="no module of the model is named 'qkv'"):
        methods.load_model(
            load_config(None, base={**json.loads(tiny_config.to_json()), "peft": {"target_modules": ["qkv"]}}), "cpu"
        )


@pytest.mark.parametrize("modules, expect", [("attention", ("self_attn",)), ("mlp", ("mlp",))])
def test_attention_or_mlp_only(tiny_config, modules, expect):
    for method in ("lora", "ia3", "full"):
        cfg = load_config(
            None, base={**json.loads(tiny_config.to_json()), "peft": {"method": method, "target_modules": modules}}
        )
        model = methods.load_model(cfg, "cpu")[0]
        keys = methods.trainable_capable(model)
        assert keys and all(any(e in k for e in expect) for k in keys), (method, keys[:3])


def test_progressive_unfreezing_federated(tiny_config, tmp_path):
    """Round 1 trains (and sends) only the top layer's tensors; round 2 all of them. Layer 0's
    adapter is untouched by round 1, and the coordinator's record says what each round moved."""
    cfg = method_config(tiny_config, "lora", unfreeze_start=1)
    data = json.loads(cfg.to_json())
    data["federation"]["rounds"] = 2
    cfg = load_config(None, base=data)
    grid, _ = real_sites()
    init = server.initial_adapter(cfg)
    said: list[str] = []
    rs = server.run_federation(grid, cfg, tmp_path, said.append)
    r1, r2 = rs.rounds[1], rs.rounds[2]
    assert r1["accepted"] == r2["accepted"] == 2
    assert r1["trainable_params"] == rs.trainable_params // 2 and r2["trainable_params"] == rs.trainable_params
    assert r1["update_bytes"] < r2["update_bytes"]
    after1 = load_adapter_state(tmp_path / "checkpoints" / "round-0001")
    for k in init.state:
        moved = not np.array_equal(after1[k].numpy(), init.state[k])
        assert moved == (".layers.1." in k), k
    sent = [m for m in grid.sent if m.metadata.message_type == messages.TRAIN]
    assert sorted(len(TrainTask.from_record(m.content).trainable) for m in sent) == [14, 14, 28, 28]


def test_progressive_unfreezing_under_secure_aggregation_gives_the_plain_result(tiny_config, tmp_path):
    """Secure aggregation masks and sums only the round's trainable tensors: the same run, secure
    and plain, ends at the same global adapter within the quantization bound, with the frozen
    layer untouched in both."""
    results = {}
    for secure in (False, True):
        data = json.loads(method_config(tiny_config, "ia3", unfreeze_start=1).to_json())
        data["secure_aggregation"]["enabled"] = secure
        cfg = load_config(None, base=data)
        grid, _ = real_sites(("medical", "legal", "financial"))
        client_app._RUNTIME, client_app._SITE_CACHE = None, {}
        results[secure] = server.run_federation(grid, cfg, tmp_path / str(secure), lambda s: None)
    plain, masked = results[False], results[True]
    r1 = masked.rounds[1]
    assert r1["accepted"] == 3 and r1["trainable_params"] < masked.trainable_params
    bound = r1["secure_aggregation"]["quantization_error_bound"]
    n = r1["trainable_params"]  # 4 bytes a value, and 4 for the weight the values are multiplied by
    assert r1["secure_aggregation"]["upload_bytes_per_param"] == pytest.approx(4.0 * (n + 1) / n, abs=1e-4)
    init = server.initial_adapter(cfg).state
    for k in init:
        diff = float(np.abs(masked.global_state[k] - plain.global_state[k]).max())
        assert diff <= bound + 3e-7, (k, diff, bound)  # + float32 rounding of values near 1
        assert np.array_equal(masked.global_state[k], init[k]) == (".layers.0." in k), k


def test_updates_that_do_not_match_the_trainable_set_are_rejected(tiny_config, tmp_path):
    """A site that trains (and sends) more than the round's set is rejected, not averaged."""
    cfg = method_config(tiny_config, "lora", unfreeze_start=1)
    init = server.initial_adapter(cfg)
    rs = server.RunState(
        cfg=cfg,
        out=tmp_path,
        global_state=init.state,
        peft_config=None,
        trainable_params=0,
        trainable_keys=init.trainable_keys,
        n_layers=init.n_layers,
    )

    def greedy(m):  # sends a delta for every tensor, frozen ones included (a well-formed reply: its content is wrong)
        delta = adapters.to_tensors(OrderedDict((k, np.full(v.shape, 0.01, np.float32)) for k, v in init.state.items()))
        return TrainReply(SiteStatus("greedy", "ok"), TrainMetrics(num_examples=5), delta).to_record()

    def honest(m):
        keys = TrainTask.from_record(m.content).trainable
        delta = adapters.to_tensors(OrderedDict((k, np.full(init.state[k].shape, 0.01, np.float32)) for k in keys))
        return TrainReply(SiteStatus("honest", "ok"), TrainMetrics(num_examples=5), delta).to_record()

    out = server.run_training_round(FakeGrid({1: greedy, 2: honest}), [1, 2], rs, 1, lambda s: None)
    # Refused on its declared size before it is read (more values than the round's trainable set), or by name.
    reason = out["sites"]["greedy"]["reason"]
    assert out["sites"]["greedy"]["status"] == "rejected" and (
        "refused unread" in reason or "unexpected tensor" in reason
    )
    assert out["sites"]["honest"]["status"] == "ok" and out["accepted"] == 1


def test_a_site_refuses_a_trainable_set_its_model_does_not_train(tiny_config, tmp_path):
    from .test_client_app import message

    cfg = method_config(tiny_config, "lora")
    state = methods.get_state(methods.load_model(cfg, "cpu")[0])
    files = [client_app.SiteFiles("medical", str(DATA_DIR / "medical" / "train.jsonl"))]
    ctx = Context(
        run_id=1, node_id=7, node_config=NodeConfig(partition_id=0).to_record(), state=RecordDict(), run_config={}
    )
    reply = client_app.handle_train(
        message(cfg, state, 1, messages.TRAIN, trainable=["model.layers.0.mlp.up_proj.weight"]), ctx, files, "cpu"
    )
    read = TrainReply.from_record(reply.content)
    assert read.site.status == "refused"
    assert "trainable set" in read.site.reason and read.update is None and messages.ARRAYS not in reply.content


# ---- fteval on what the methods save ----------------------------------------------------------------


def test_fteval_scores_a_qlora_adapter_on_its_4bit_base_and_exports_merged(tiny_config, tmp_path, capsys):
    """fteval reads fedtune_method.json: a qlora adapter is scored on the 4-bit base it trained on,
    giving the loss the site measured in the federation; --export-merged folds it into the
    full-precision base."""
    from transformers import AutoModelForCausalLM

    from fedtune.common import fteval

    cfg = method_config(tiny_config, "qlora")
    grid, files = real_sites(("medical", "financial"))
    rs = server.run_federation(grid, cfg, tmp_path, lambda s: None)
    site_loss = rs.rounds[1]["sites"]["medical"]["eval_loss"]
    assert json.loads((tmp_path / "adapter" / methods.METHOD_FILE).read_text())["method"] == "qlora"
    score = ["--data", files[0].eval, "--max-examples", "4", "--max-length", "192", "--no-generate", "--device", "cpu"]
    assert fteval.main(["--adapter", str(tmp_path / "adapter"), *score, "--out", str(tmp_path / "q.json")]) == 0
    assert json.loads((tmp_path / "q.json").read_text())["loss"] == pytest.approx(site_loss, abs=1e-5)

    assert (
        fteval.main(
            ["--adapter", str(tmp_path / "adapter"), "--export-merged", str(tmp_path / "merged"), "--device", "cpu"]
        )
        == 0
    )
    assert "merged model:" in capsys.readouterr().out
    x = torch.tensor([[1, 60, 61, 62, 2]])
    full_precision = methods.load_trained(cfg.model, tmp_path / "adapter", "cpu", merged_precision=True)[0]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(logits(merged, x), logits(full_precision, x), rtol=0, atol=1e-5)
    assert fteval.main(["--model", str(tmp_path / "merged"), *score, "--out", str(tmp_path / "m.json")]) == 0
    merged_loss = json.loads((tmp_path / "m.json").read_text())["loss"]
    assert merged_loss != pytest.approx(site_loss, abs=1e-5)  # the 4-bit base is not the full-precision one
    assert abs(merged_loss - site_loss) < 0.5


def test_fteval_refuses_to_merge_what_cannot_merge(tiny_config, tmp_path, capsys):
    from fedtune.common import fteval

    cfg = method_config(tiny_config, "prompt")
    grid, _ = real_sites(("medical", "financial"))
    server.run_federation(grid, cfg, tmp_path, lambda s: None)
    assert (
        fteval.main(["--adapter", str(tmp_path / "adapter"), "--export-merged", str(tmp_path / "m"), "--device", "cpu"])
        == 2
    )
    assert "a prompt adapter cannot be merged into the base" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where one is lent)")
@pytest.mark.parametrize("method", ["qlora", "dora"])
def test_qlora_and_dora_on_cuda_in_bf16(method, tiny_config, tmp_path):
    """The GPU check: one federated round on CUDA with bf16 compute; the loss falls, the update is
    float32 on the wire, and the adapter reloads to the same outputs."""
    data = json.loads(method_config(tiny_config, method).to_json())
    data["model"] |= {"device": "cuda", "dtype": "bfloat16"}
    cfg = load_config(None, base=data)
    grid, _ = real_sites()
    rs = server.run_federation(grid, cfg, tmp_path, lambda s: None)
    assert rs.rounds[1]["aggregate"]["eval_loss"] < rs.rounds[0]["aggregate"]["eval_loss"]
    assert client_app._RUNTIME.device.type == "cuda"
    x = torch.tensor([[1, 40, 41, 42, 2]], device="cuda")
    site_model = client_app._RUNTIME.model
    methods.set_state(site_model, adapters.to_tensors(rs.global_state))
    reloaded = methods.load_trained(cfg.model, tmp_path / "adapter", "cuda")[0]
    torch.testing.assert_close(logits(reloaded, x).float(), logits(site_model, x).float(), rtol=0, atol=1e-2)


def test_a_layer_selection_that_leaves_nothing_to_train_stops_the_run_clearly(tiny_config, tmp_path):
    cfg = method_config(tiny_config, "adapter", only=[0])
    data = json.loads(cfg.to_json())
    data["peft"]["adapter_layers"] = 1  # LLaMA-Adapter in the top layer only
    cfg = load_config(None, base=data)
    grid, _ = real_sites()
    with pytest.raises(
        server.FederationError,
        match=r"round 1: the layers section leaves nothing to train: adapter has tensors in layers \[1\]",
    ):
        server.run_federation(grid, cfg, tmp_path, lambda s: None)


def test_saved_adapter_names_the_base_as_the_user_did_while_the_live_model_keeps_its_path(tiny_config):
    """peft looks the base up by the live config's name whenever it reads the state: a name like
    'default' there would send it to the hub. The saved config carries the user's name instead."""
    import warnings

    model = methods.load_model(tiny_config, "cpu")[0]
    saved = methods.saved_peft_config(model, "default")
    assert saved.base_model_name_or_path == "default"
    assert model.peft_config["default"].base_model_name_or_path == tiny_config.model.name  # a local directory
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unable to fetch remote file" lookups
        methods.get_state(model)


def test_ffa_lora_trains_b_only_and_averages_the_products_exactly(tiny_config, tmp_path):
    """FFA-LoRA: A is frozen at the shared init, updates carry B alone (half LoRA's bytes here:
    square-ish layers), and the global B·A moves by exactly the example-weighted mean of the sites'
    own B·A changes. Plain LoRA, averaging A and B apart, does not."""
    results = {}
    for ffa in (False, True):
        data = json.loads(method_config(tiny_config, "lora").to_json())
        data["peft"]["ffa"] = ffa
        cfg = load_config(None, base=data)
        grid, _ = real_sites(("medical", "financial"))
        client_app._RUNTIME, client_app._SITE_CACHE = None, {}
        init = server.initial_adapter(cfg)
        rs = server.run_federation(grid, cfg, tmp_path / str(ffa), lambda s: None)
        replies = [m for m in grid.sent if m.metadata.message_type == messages.TRAIN]
        assert len(replies) == 2
        # Each site's own adapter after training: the global start plus its delta (from its reply).
        site_states, weights = [], []
        for m in replies:
            out = TrainReply.from_record(grid.sites[m.metadata.dst_node_id](m))
            site_states.append({k: init.state[k] + out.update.get(k, 0.0) for k in init.state})
            weights.append(out.metrics.num_examples)
        errors = []
        for a_key in (k for k in init.state if ".lora_A." in k):
            b_key = a_key.replace(".lora_A.", ".lora_B.")
            product = lambda s: s[b_key].astype(np.float64) @ s[a_key].astype(np.float64)  # noqa: E731, B023 (used in this iteration only)
            mean_of_products = sum(w * product(s) for w, s in zip(weights, site_states)) / sum(weights)
            errors.append(float(np.abs(product(rs.global_state) - mean_of_products).max()))
        results[ffa] = (rs, init, max(errors))
    (plain, plain_init, plain_err), (ffa, ffa_init, ffa_err) = results[False], results[True]
    assert (
        all(".lora_B." in k for k in ffa_init.trainable_keys)
        and len(ffa_init.trainable_keys) == len(plain_init.trainable_keys) // 2
    )
    assert all(np.array_equal(ffa.global_state[k], ffa_init.state[k]) for k in ffa_init.state if ".lora_A." in k)
    assert ffa.rounds[1]["update_bytes"] < 0.6 * plain.rounds[1]["update_bytes"]
    assert ffa_err < 1e-6, ffa_err  # exact, to float error
    assert plain_err > 100 * max(ffa_err, 1e-9), (plain_err, ffa_err)
    # The coordinator measures the same on every round and reports it (metrics.json, report).
    assert ffa.rounds[1]["aggregation_error_rel"] < 1e-5
    assert plain.rounds[1]["aggregation_error_rel"] > 100 * ffa.rounds[1]["aggregation_error_rel"]
