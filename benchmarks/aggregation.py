"""Aggregation strategies on a non-IID federation: ../shared/data's finance and medical records,
split into 4 sites by Dirichlet(0.3) over the domain, trained the same way by each strategy.

    python benchmarks/aggregation.py             # 6 runs of ftsim on the default model (~60 min on 2 cores)
    python benchmarks/aggregation.py --quick     # 1 round of 2 steps each: a smoke run
    python benchmarks/aggregation.py --only fedavg --only dp

First 60 records of each domain (a fixed shuffle) are held out as test sets; the rest is the pool
that ``ftsim --partition dirichlet:0.3 --sites 4`` splits (seed 0, the same split for every run;
its composition is printed). Every run has the same compute: the same rounds, local steps,
batch size, learning rate and data order; only the aggregation differs:

- fedavg: example-weighted mean of the LoRA deltas (A and B averaged apart);
- fedprox: the same, with the proximal term mu = 0.01 in each site's loss;
- fedadam: the mean delta as a pseudo-gradient for server-side Adam (server lr 1e-3);
- ffa: FFA-LoRA, A frozen at the shared init, B alone trained and averaged (exact);
- hetlora: mixed ranks, site-1 and site-2 train r=4 and the others r=16, zero-padded (HetLoRA);
- dp: client-level DP at epsilon 8 (delta 1e-5) over the rounds, updates clipped to --dp-clip,
  the coordinator's Gaussian noise on the sum (no secure aggregation here; with it the same noise
  comes from the sites).

After each run, fteval scores its final adapter on the held-out sets: finance (exact match of
the greedy label, and answer-token loss) and medical (answer-token loss). The table also gives
the mean aggregation error the coordinator measured (the global B·A against the mean of the
sites' B·A products, relative to the change) and the epsilon spent.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from _common import REPO, log_tail, run_ftsim, say

SHARED = REPO.parent / "shared" / "data"
DOMAINS = {"finance": SHARED / "finance" / "train.jsonl", "medical": SHARED / "medical" / "train.jsonl"}
HELD_OUT = 60

RUNS = {
    "fedavg": ["--strategy", "fedavg"],
    "fedprox": ["--strategy", "fedprox", "--set", "federation.proximal_mu=0.01"],
    "fedadam": ["--strategy", "fedadam"],
    "ffa": ["--set", "peft.ffa=true"],
    "dp": ["--dp-epsilon", "8"],
    "hetlora": ["--site-rank", "site-1=4", "--site-rank", "site-2=4"],
}


def split_data(out: Path) -> dict[str, Path]:
    """-> {finance-train, medical-train, finance-test, medical-test}: JSONL files under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, path in DOMAINS.items():
        lines = [l for l in path.read_text().splitlines() if l.strip()]
        random.Random(0).shuffle(lines)
        for part, chunk in (("test", lines[:HELD_OUT]), ("train", lines[HELD_OUT:])):
            f = out / name / f"{part}.jsonl"  # the partitioner names a domain after the folder
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("\n".join(chunk) + "\n")
            files[f"{name}-{part}"] = f
    return files


def fteval(target: list[str], data: Path, out: Path, generate: bool) -> dict:
    """fteval's scores of ``target`` (``--adapter DIR`` or ``--model NAME``) on ``data``."""
    cmd = [sys.executable, "-m", "fedtune.common.fteval", *target, "--data", str(data), "--out", str(out),
           "--max-length", "256", "--batch-size", "20", "--max-new-tokens", "4"] + ([] if generate else ["--no-generate"])  # fmt: skip
    res = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"fteval failed on {data.name}:\n{res.stderr[-2000:]}")
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "aggregation"))
    ap.add_argument("--only", action="append", choices=list(RUNS), help="run only these (repeatable)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument(
        "--dp-clip", type=float, default=0.05, help="L2 bound under DP (default 0.05; see benchmarks/README.md)"
    )
    ap.add_argument("--quick", action="store_true", help="1 round of 2 steps, few eval examples")
    args = ap.parse_args()
    out = Path(args.out)
    rounds, steps = (1, 2) if args.quick else (args.rounds, args.local_steps)
    files = split_data(out / "data")
    common = [
        "--data", str(files["finance-train"]), "--data", str(files["medical-train"]),
        "--partition", "dirichlet:0.3", "--sites", "4", "--seed", "0",
        "--rounds", str(rounds), "--local-steps", str(steps), "--batch-size", "4", "--lr", "1e-3", "--max-length", "256",
        "--no-plots", "--set", "eval.exact_match=false", "--set", f"eval.max_examples={4 if args.quick else 8}",
    ]  # fmt: skip
    results = {}
    for name in args.only or list(RUNS):
        extra = RUNS[name] + (["--dp-clip", str(args.dp_clip)] if name == "dp" else [])
        say(f"{name}: ftsim {' '.join(extra)}")
        run = run_ftsim(common + extra, out / name, timeout_s=3600)
        if run.returncode != 0:
            say(f"{name}: ftsim failed (rc {run.returncode}):\n{log_tail(run.log)}")
            results[name] = {"failed": run.returncode}
            continue
        doc = run.metrics()
        trained = [r for r in doc["rounds"] if r["round"] > 0 and "accepted" in r]
        errs = [r["aggregation_error_rel"] for r in trained if "aggregation_error_rel" in r]
        n_test = 8 if args.quick else HELD_OUT
        fin = fteval(
            ["--adapter", str(out / name / "adapter")],
            files["finance-test"],
            out / f"{name}-finance.json",
            generate=True,
        )
        med = fteval(
            ["--adapter", str(out / name / "adapter")],
            files["medical-test"],
            out / f"{name}-medical.json",
            generate=False,
        )
        results[name] = {
            "wall_s": round(run.wall_s, 1),
            "rounds": len(trained),
            "federation_eval_loss": doc["rounds"][-1]["aggregate"].get("eval_loss"),
            "finance_loss": fin.get("loss"),
            "finance_exact_match": fin.get("exact_match"),
            "medical_loss": med.get("loss"),
            "aggregation_error_rel": sum(errs) / len(errs) if errs else None,
            "epsilon": (trained[-1].get("privacy") or {}).get("epsilon") if trained else None,
            "update_bytes": max((r.get("update_bytes") or 0) for r in trained) if trained else None,
            "test_examples": n_test,
        }
        say(f"{name}: {json.dumps(results[name])}")
    base_fin = fteval(["--model", "default"], files["finance-test"], out / "base-finance.json", True)
    base_med = fteval(["--model", "default"], files["medical-test"], out / "base-medical.json", False)
    results["base model"] = {
        "finance_loss": base_fin.get("loss"),
        "finance_exact_match": base_fin.get("exact_match"),
        "medical_loss": base_med.get("loss"),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print(
        "| run | final eval loss (sites) | finance loss | finance EM | medical loss | aggregation error (rel., mean) | epsilon | MB/round/site | wall s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    f = lambda x, s=".3f": "–" if x is None else format(x, s)  # noqa: E731
    for name, r in results.items():
        if "failed" in r:
            print(f"| {name} | failed (rc {r['failed']}) | | | | | | | |")
            continue
        mb = r.get("update_bytes")
        print(
            f"| {name} | {f(r.get('federation_eval_loss'))} | {f(r.get('finance_loss'))} | {f(r.get('finance_exact_match'))} | "
            f"{f(r.get('medical_loss'))} | {f(r.get('aggregation_error_rel'), '.2e')} | {f(r.get('epsilon'), '.2f')} | "
            f"{f(mb / 1e6 if mb else None, '.1f')} | {f(r.get('wall_s'), '.0f')} |"
        )
    print(f"\nresults: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
