"""Every fine-tuning method on the default model: step time, peak memory, bytes per round, and
eval loss after the same number of steps on ../shared/data/finance.

    python benchmarks/methods.py                 # all methods, 40 steps each (~43 min on 2 cores)
    python benchmarks/methods.py --quick         # 3 steps, 8 eval examples: a smoke run
    python benchmarks/methods.py --only lora --only qlora --steps 20
    python benchmarks/methods.py --device cuda --only qlora --only dora   # on a GPU: bf16 against fp32 LoRA

Each method runs in a fresh subprocess (one after another, so they do not share the CPU) through
fedtune's own site code: ``methods.load_model`` (the base, 4-bit for qlora), the site trainer
``train_round`` at the method's default learning rate, and ``evaluate_examples``. The data is
../shared/data/finance/train.jsonl (Financial PhraseBank, 600 records), split by a fixed seed
into 480 train and 120 eval records; every method sees the same batches.

- step time: median seconds per optimizer step (batch 4, max_length 256), steps 3.. (the first
  two warm up); the table also gives it relative to LoRA's, measured in the same run.
- peak memory: the subprocess's peak resident memory (ru_maxrss) up to the end of training,
  before any evaluation: the base model, the method, gradients, optimizer state and activations
  (loading alone peaks at a few hundred MB, the weights being mapped from disk); and its ratio to
  LoRA's. Beside it the resident memory right after training, when the activations and the
  optimizer state are gone. On CUDA, torch's peak allocation instead.
- bytes per round: what one site uploads per round, the serialised update of the tensors the
  method trains (fedtune's wire format, float32); plain rounds, no secure aggregation.
- eval loss: mean answer-token loss on the 120 eval records after the steps; exact match of
  the greedy label (positive / negative / neutral) beside it. Before training: the base model's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
from _common import REPO, median, say

from fedtune.common.methods import REGISTRY

FINANCE = REPO.parent / "shared" / "data" / "finance" / "train.jsonl"
# The methods a plain run benchmarks (those benchmarks/README.md has figures for); --only takes any registered one.
METHODS = [m for m in REGISTRY if m != "hra"]  # hra came later: no figures yet


def child(method: str, steps: int, n_eval: int, device: str = "cpu") -> dict:
    """One method, in this (fresh) process. On CUDA the LoRA reference runs in float32 and the
    others in bfloat16 (the issue's "against fp32 LoRA"), and memory is torch's peak allocation."""
    import torch

    from fedtune.client.trainer import train_round
    from fedtune.common import adapters, methods
    from fedtune.common.config import load_config
    from fedtune.common.data import load_site_data, split_examples, tokenize_all
    from fedtune.common.evaluation import evaluate_examples

    torch.set_num_threads(2)
    cfg = load_config(
        None,
        {
            "peft.method": method,
            "data.max_length": 256,
            "train.local_steps": steps,
            "train.batch_size": 4,
            "train.warmup_ratio": 0.1,
            "train.seed": 0,
            "eval.max_examples": n_eval,
            "eval.batch_size": 20,
            "eval.max_new_tokens": 4,
            "federation.rounds": 1,
            "model.device": device,
            "model.dtype": "float32" if device == "cpu" or method == "lora" else "bfloat16",
        },
    )
    data = load_site_data(FINANCE, cfg.data)
    train_ex, eval_ex = split_examples(data.examples, 0.2, seed=0)
    t0 = time.perf_counter()
    model, tok, dev = methods.load_model(cfg, device)
    load_s = time.perf_counter() - t0
    init = methods.get_state(model)
    trainable = methods.trainable_capable(model)
    methods.set_trainable(model, trainable)
    items = tokenize_all(train_ex, tok, cfg.data).items
    step_times: list[float] = []
    last = [time.perf_counter()]

    def progress(step: int, n: int, loss: float) -> None:
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    last[0] = time.perf_counter()
    stats = train_round(
        model,
        items,
        tok.pad_token_id,
        cfg.train,
        dev,
        server_round=1,
        total_rounds=1,
        seed=0,
        progress=progress,
        lr_groups=methods.lr_scales(model, cfg.layers),
    )
    rss_after_train = psutil.Process().memory_info().rss
    # The peak so far: loading (a few hundred MB: the weights are mapped) is far below training's.
    peak_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device == "cuda":
        peak_train = torch.cuda.max_memory_allocated()
    after = evaluate_examples(model, tok, eval_ex, cfg.data, cfg.eval, dev)
    before = None
    if method == "lora":  # the base model's scores: LoRA with its adapter switched off
        with model.disable_adapter():
            before = evaluate_examples(model, tok, eval_ex, cfg.data, cfg.eval, dev)
    local = methods.get_state(model)
    update = adapters.adapter_records(adapters.delta({k: local[k] for k in trainable}, {k: init[k] for k in trainable}))
    return {
        "method": method,
        "dtype": cfg.model.dtype,
        "lr": cfg.train.lr,
        "trainable_params": adapters.num_params({k: init[k] for k in trainable}),
        "bytes_per_round": adapters.record_nbytes(update["arrays"]),
        "step_s": median(step_times[2:] or step_times),
        "load_s": load_s,
        "loss_first": stats.loss_first,
        "loss_last": stats.loss_last,
        "eval_loss": after.loss,
        "exact_match": after.exact_match,
        "base_eval_loss": before.loss if before else None,
        "base_exact_match": before.exact_match if before else None,
        "peak_rss_mb": peak_train / 2**20,
        "load_peak_mb": load_peak / 2**20,
        "rss_after_train_mb": rss_after_train / 2**20,
        "train_examples": len(items),
        "eval_examples": after.examples,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", choices=list(REGISTRY), help="run just these methods (repeatable)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-examples", type=int, default=120)
    ap.add_argument("--quick", action="store_true", help="3 steps, 8 eval examples (a smoke run)")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: bf16 for every method but the fp32 LoRA reference; memory = torch's peak allocation",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    steps, n_eval = (3, 8) if args.quick else (args.steps, args.eval_examples)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, steps, n_eval, args.device)), flush=True)
        return 0
    if not FINANCE.is_file():
        sys.exit(f"{FINANCE}: not found (the shared data sets live at ../shared/data beside the project)")
    todo = args.only or METHODS
    if "lora" not in todo:
        todo = ["lora", *todo]  # the reference every ratio is taken against
    rows = []
    for m in todo:
        say(f"{m}: {steps} steps ...")
        cmd = [
            sys.executable,
            __file__,
            "--child",
            m,
            "--steps",
            str(steps),
            "--eval-examples",
            str(n_eval),
            "--device",
            args.device,
        ]
        cmd += ["--quick"] if args.quick else []
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not found:
            say(f"{m}: FAILED (exit {proc.returncode})\n{proc.stderr[-2000:]}")
            rows.append(
                {
                    "method": m,
                    "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
                }
            )
            continue
        r = json.loads(found[-1][len("RESULT ") :])
        say(
            f"{m}: step {r['step_s']:.2f} s, peak {r['peak_rss_mb']:.0f} MB, {r['bytes_per_round'] / 1e6:.3f} MB/round, eval loss {r['eval_loss']:.3f}"
        )
        rows.append(r)
    ref = next(r for r in rows if r["method"] == "lora" and "error" not in r)
    print()
    where = "2 CPU cores" if args.device == "cpu" else "CUDA (LoRA fp32, the others bf16; memory: peak CUDA allocation)"
    print(
        f"default model, ../shared/data/finance ({ref['train_examples']} train / {ref['eval_examples']} eval), {steps} steps of batch 4, {where}"
    )
    print(
        f"base model before training: eval loss {ref['base_eval_loss']:.3f}, exact match {ref['base_exact_match']:.3f}"
    )
    print()
    print(
        "| method | lr | trainable params | step time (s) | vs LoRA | peak memory (MB) | vs LoRA | memory after training (MB) | bytes per round | eval loss | exact match |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | failed: {r['error'][:80]} ||||||||||")
            continue
        print(
            f"| {r['method']} | {r['lr']:g} | {r['trainable_params']:,} | {r['step_s']:.2f} | {r['step_s'] / ref['step_s']:.2f} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f} | {r['rss_after_train_mb']:.0f} | {r['bytes_per_round']:,} | {r['eval_loss']:.3f} | {r['exact_match']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": steps, "eval_examples": n_eval, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
