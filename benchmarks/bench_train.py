"""Figure 1: local training throughput in the ClientApp path vs a plain peft+torch loop.

A  fedtune.client.app.handle_train, called with a hand-built Flower TRAIN Message and Context,
   exactly as the ClientApp's @app.train() calls it: decode the global adapter, load it,
   fedtune.client.trainer.train_round, delta, encode the reply. Timed as a whole (wall).
B  a plain loop on a second copy of the same base model: peft.get_peft_model + AdamW +
   model(input_ids, attention_mask, labels=labels).loss.backward(); clip; step.

All arms see the same batches: the token ids train_round picks for site "medical" in round 1
(its batch order, batch size and max length from default.yaml), starting from the same
adapter weights and the same dropout seed, so their first-step losses must agree.
Arms are interleaved (A B, B A, A B, ...) after one unmeasured warm-up each; the figure is
the median over repetitions of the per-repetition wall-time ratio, so a shared, noisy machine
slows both sides of a ratio alike. Because bursts of load from other processes can still land
on one side of a pair, the process CPU-time ratio (sum over repetitions) and the ratio of the
fastest repetitions are printed next to it as cross-checks.
"""

from __future__ import annotations

import time

import torch
from _common import DATA, DEFAULT_CONFIG, median, say


def _pad(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad one batch (independent of fedtune's collate; checked equal to it below)."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, it in enumerate(items):
        n = len(it["input_ids"])
        ids[r, :n] = torch.tensor(it["input_ids"])
        labels[r, :n] = torch.tensor(it["labels"])
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run(steps: int = 4, reps: int = 6) -> dict:
    from flwr.app import Context, Message, MessageType, Metadata, RecordDict
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from fedtune.client import app as capp
    from fedtune.client.trainer import batch_order, dropout_seed
    from fedtune.common import adapters, messages, methods
    from fedtune.common.config import load_config
    from fedtune.common.data import collate
    from fedtune.common.modeling import load_base_model

    cfg = load_config(DEFAULT_CONFIG, {"train.local_steps": steps})
    site = capp.SiteFiles("medical", str(DATA / "medical" / "train.jsonl"), str(DATA / "medical" / "eval.jsonl"))
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})

    # --- A: the ClientApp's own runtime (base model + adapter, cached per process) and data.
    rt = capp.runtime(cfg, None)
    init_state = methods.get_state(rt.model)  # = the server's initial adapter (same seed)
    st = capp.site_state(site, cfg, rt)
    items, pad_id = st.train_items, rt.tokenizer.pad_token_id
    seed = capp.site_seed(cfg, site.name)
    order = batch_order(len(items), cfg.train.batch_size, steps * cfg.train.grad_accum, seed, 0)  # round 1
    batches = [_pad([items[i] for i in idx], pad_id) for idx in order]
    for idx, b in zip(order, batches):  # same tensors as the trainer's collate
        ref = collate([items[i] for i in idx], pad_id)
        assert all(torch.equal(b[k], ref[k]) for k in ref), "padding differs from fedtune.common.data.collate"
    tokens_per_rep = int(sum(int(b["attention_mask"].sum()) for b in batches))

    def message() -> Message:
        content = messages.TrainTask(messages.RoundConfig(cfg, 1, list(init_state)), init_state).to_record()
        # As a SuperNode hands it to the ClientApp: metadata filled in by the SuperLink.
        meta = Metadata(
            run_id=1,
            message_id=f"bench-{time.monotonic_ns()}",
            src_node_id=0,
            dst_node_id=1,
            reply_to_message_id="",
            group_id="1",
            created_at=time.time(),
            ttl=3600.0,
            message_type=MessageType.TRAIN,
        )
        return Message(content=content, metadata=meta)

    def arm_a() -> dict:
        msg = message()  # built outside the timing: Flower decodes it before the ClientApp runs
        c0, t0 = time.process_time(), time.perf_counter()
        reply = capp.handle_train(msg, ctx, [site])  # seeds dropout with dropout_seed(seed, 1)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        m = reply.content["metrics"]
        assert reply.content["site"]["status"] == "ok", reply.content["site"]["status"]
        return {
            "wall": wall,
            "cpu": cpu,
            "loop": float(m["train-seconds"]),
            "tokens": int(m["train-tokens"]),
            "loss0": float(m["train-loss-first"]),
        }

    # --- B/C: a plain peft + torch loop on a second copy of the base model.
    base, _, dev = load_base_model(cfg.model)
    lcfg = LoraConfig(
        r=cfg.peft.r,
        lora_alpha=cfg.peft.alpha,
        lora_dropout=cfg.peft.dropout,
        target_modules=cfg.peft.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
    plain = get_peft_model(base, lcfg)
    params = [p for p in plain.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    assert n_trainable == adapters.num_params(init_state), "plain LoRA differs in size from fedtune's"
    dev_batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]

    def arm_plain() -> dict:
        res = set_peft_model_state_dict(plain, dict(init_state))
        assert not getattr(res, "unexpected_keys", None)
        torch.manual_seed(dropout_seed(seed, 1))  # as fedtune's trainer seeds this site's round 1
        c0, t0 = time.process_time(), time.perf_counter()
        opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        plain.train()
        loss0 = None
        for b in dev_batches:
            loss = plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
            loss.backward()
            if cfg.train.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if loss0 is None:
                loss0 = float(loss.detach())
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"wall": wall, "cpu": cpu, "loop": wall, "tokens": tokens_per_rep, "loss0": loss0}

    arms = {"A": arm_a, "B": arm_plain}
    say(f"fig 1: warm-up ({', '.join(arms)}), then {reps} interleaved repetitions of {steps} steps each")
    warm = {k: f() for k, f in arms.items()}
    runs: dict[str, list[dict]] = {k: [] for k in arms}
    for r in range(reps):
        names = list(arms) if r % 2 == 0 else list(arms)[::-1]  # A B, B A, ...: no arm always goes first
        for k in names:
            runs[k].append(arms[k]())
        say(
            f"  rep {r + 1}/{reps}: "
            + "  ".join(f"{k} {runs[k][-1]['wall']:.1f} s (cpu {runs[k][-1]['cpu']:.1f} s)" for k in arms)
            + f"  (A's train_round loop {runs['A'][-1]['loop']:.1f} s)"
        )

    ratio = [
        b["wall"] / a["wall"] for a, b in zip(runs["A"], runs["B"])
    ]  # tokens equal, so time ratio = throughput ratio
    ratio_loop = [b["wall"] / a["loop"] for a, b in zip(runs["A"], runs["B"])]
    out = {
        "train_throughput_ratio": median(ratio),
        "train_throughput_ratio_loop_only": median(ratio_loop),
        "ratios": ratio,
        "cpu_time_ratio": sum(b["cpu"] for b in runs["B"]) / sum(a["cpu"] for a in runs["A"]),
        "fastest_ratio": min(b["wall"] for b in runs["B"]) / min(a["wall"] for a in runs["A"]),
        "walls": {k: [round(x["wall"], 2) for x in v] for k, v in runs.items()},
        "a_tokens_per_s": median([a["tokens"] / a["wall"] for a in runs["A"]]),
        "b_tokens_per_s": median([tokens_per_rep / b["wall"] for b in runs["B"]]),
        "a_steps_per_s": median([steps / a["wall"] for a in runs["A"]]),
        "b_steps_per_s": median([steps / b["wall"] for b in runs["B"]]),
        "a_overhead_s": median([a["wall"] - a["loop"] for a in runs["A"]]),
        "loss0": {k: warm[k]["loss0"] for k in arms},
        "tokens_a": runs["A"][0]["tokens"],
        "tokens_b": tokens_per_rep,
        "inputs": {
            "model": cfg.model.name,
            "site": "medical (bundled train.jsonl)",
            "batch_size": cfg.train.batch_size,
            "max_length": cfg.data.max_length,
            "batch_shapes": [list(b["input_ids"].shape) for b in batches],
            "steps_per_rep": steps,
            "reps": reps,
            "tokens_per_rep": tokens_per_rep,
            "lora": f"r={cfg.peft.r} alpha={cfg.peft.alpha:g} dropout={cfg.peft.dropout} {cfg.peft.target_modules}",
            "trainable_params": n_trainable,
            "torch_threads": torch.get_num_threads(),
            "device": str(dev),
        },
    }
    plain = base = None  # free both copies before the next arm (arm_plain has run)
    return out
