"""fedtune benchmarks: ratios measured side by side, printed with the inputs that produced them.

    python benchmarks/run.py            # full run (~22 min on 2 idle CPU cores; --only deploy ~16 min)
    python benchmarks/run.py --quick    # smoke run: every figure, tiny sizes (not for reading off numbers)
    python benchmarks/run.py --only train --only mem

Figures (see README.md next to this file):
  train_throughput_ratio         ClientApp training path vs a plain peft+torch loop, same batches (goal >= 0.95)
  round_over_train               ftsim training-phase wall / sum of the sites' training time (goal <= 1.15)
  round_with_eval_over_train     the same for the whole round, evaluation included (no goal; explained)
  mem_12_over_3                  ftsim peak process-tree RSS, 12 sites / 3 sites (goal <= 1.25)
  upload_bytes_per_site_round    bytes a site uploads per round; bytes_per_param = that / trainable params
  deploy_round_over_sim_round    deploy_localhost (ftserver + 3 ftclients, TLS) round wall / ftsim round wall, same config (goal <= 1.3)
  startup_s_after_first_round    a site's seconds from holding a round's message to its first training step, rounds >= 2 (goal <= 1)

The last line printed is ``key=value`` pairs of every figure.
Needs psutil (today it comes with ray; it should be a declared benchmark/dev dependency).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import say, stray_ray_processes  # noqa: E402

GOALS = {
    "train_throughput_ratio": (">=", 0.95),
    "round_over_train": ("<=", 1.15),
    "mem_12_over_3": ("<=", 1.25),
    "deploy_round_over_sim_round": ("<=", 1.3),
    "startup_s_after_first_round": ("<=", 1.0),
}


def verdict(key: str, value: float) -> str:
    op, goal = GOALS[key]
    ok = value >= goal if op == ">=" else value <= goal
    return f"goal {op} {goal}: {'MET' if ok else 'NOT MET'}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run with tiny sizes")
    ap.add_argument(
        "--only",
        action="append",
        choices=["train", "round", "mem", "deploy"],
        help="run only these figures (repeatable)",
    )
    ap.add_argument("--reps", type=int, help="fig 1: interleaved repetitions (full 6, quick 1)")
    ap.add_argument(
        "--personalize",
        metavar="METHOD",
        help="fig 3 with ftsim --personalize METHOD: every site also keeps its private part (on disk, not in memory)",
    )
    ap.add_argument(
        "--steps", type=int, help="fig 1: optimizer steps per repetition, i.e. per handle_train call (full 4, quick 1)"
    )
    ap.add_argument(
        "--ray-niceness",
        default="0",
        help="RAY_worker_niceness for ftsim's Ray workers. Ray's own default is 15, which starves the sites "
        "whenever anything else runs on the machine; 0 (our default) runs them like any process. "
        "'ray' keeps Ray's default.",
    )
    ap.add_argument("--keep", action="store_true", help="keep the ftsim output folders (printed)")
    ap.add_argument("--json", help="also write every figure and input to this JSON file")
    a = ap.parse_args(argv)
    todo = set(a.only or ["train", "round", "mem", "deploy"])
    q = a.quick
    env = {} if a.ray_niceness == "ray" else {"RAY_worker_niceness": str(a.ray_niceness)}
    workdir = Path(tempfile.mkdtemp(prefix="fedtune-bench-"))
    t_start = time.time()
    figures: dict[str, float] = {}
    report: dict = {"mode": "quick" if q else "full", "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    docs = []
    ours: list = []  # processes from our ftsim trees still alive after ftsim exited
    say(
        f"mode {'quick' if q else 'full'}; {os.cpu_count()} CPUs; ftsim outputs under {workdir}; Ray worker niceness {a.ray_niceness}"
    )
    try:
        if "train" in todo:
            import bench_train

            steps = a.steps or (1 if q else 4)
            reps = a.reps or (1 if q else 6)
            r = bench_train.run(steps=steps, reps=reps)
            figures["train_throughput_ratio"] = r["train_throughput_ratio"]
            report["train"] = r
            print(
                "\n== 1. train_throughput_ratio: ClientApp path (handle_train -> train_round) / plain peft+torch loop"
            )
            print(f"   inputs: {json.dumps(r['inputs'])}")
            print(f"   per-rep ratios (B time / A time, equal tokens): {', '.join(f'{x:.3f}' for x in r['ratios'])}")
            print(
                f"   A ClientApp path: {r['a_tokens_per_s']:.1f} tok/s, {r['a_steps_per_s']:.3f} steps/s (of which outside train_round: {r['a_overhead_s']:.2f} s/call)"
            )
            print(f"   B plain loop:     {r['b_tokens_per_s']:.1f} tok/s, {r['b_steps_per_s']:.3f} steps/s")
            print(
                f"   train_throughput_ratio = {r['train_throughput_ratio']:.3f}   ({verdict('train_throughput_ratio', r['train_throughput_ratio'])})"
            )
            print(
                f"   cross-checks: train_round loop alone vs B {r['train_throughput_ratio_loop_only']:.3f}; "
                f"CPU-time ratio {r['cpu_time_ratio']:.3f}; fastest-rep ratio {r['fastest_ratio']:.3f}"
            )
            print(
                f"   check: first-step losses A {r['loss0']['A']:.4f} / B {r['loss0']['B']:.4f} (same batches, init and dropout seed); tokens A {r['tokens_a']} = B {r['tokens_b']}"
            )

        if "round" in todo:
            import bench_sim

            r = bench_sim.round_over_train(
                workdir, rounds=1 if q else 2, local_steps=1 if q else 2, eval_examples=1 if q else 4, env=env
            )
            run = r.pop("run")
            docs.append(r.pop("doc"))
            figures["round_over_train"] = r["round_over_train"]
            figures["round_with_eval_over_train"] = r["round_with_eval_over_train"]
            report["round"] = r
            print("\n== 2. round_over_train: ftsim round wall / sum of the sites' train_seconds")
            print(f"   inputs: {json.dumps(r['inputs'])}")
            for x in r["per_round"]:
                print(
                    f"   round {x['round']}: training phase {x['train_phase_s']:.1f} s, whole round {x['round_s']:.1f} s, "
                    f"sum of {x['sites']} sites' train_seconds {x['sum_site_train_s']:.1f} s -> {x['train_phase_over_train']:.3f} / {x['round_over_train']:.3f}"
                )
            print(
                f"   round_over_train (training phase, all rounds) = {r['round_over_train']:.3f}   ({verdict('round_over_train', r['round_over_train'])})"
            )
            print(
                f"   round_with_eval_over_train = {r['round_with_eval_over_train']:.3f}   (adds checkpointing and the evaluation of the new "
                f"adapter at every site; round 0 alone, evaluation only, took {r['round0_eval_s']:.1f} s)"
            )
            ours.extend(run.leftovers)
            if run.leftovers:
                print(f"   LEFTOVER processes after ftsim exited (killed by pid): {run.leftovers}")

        if "mem" in todo:
            import bench_sim

            n_small, n_large = (1, 2) if q else (3, 12)
            extra = ["--personalize", a.personalize] if a.personalize else []
            r = bench_sim.memory_ratio(
                workdir,
                n_small,
                n_large,
                local_steps=1,
                eval_examples=1 if q else 4,
                env=env,
                interval=0.2,
                extra=extra,
            )
            runs = r.pop("runs")
            docs.extend(run.metrics() for run in runs.values())
            key = f"mem_{n_large}_over_{n_small}"
            figures[key] = r["ratio"]
            report["mem"] = {**r, "peak_mib": {str(k): v for k, v in r["peak_mib"].items()}}
            print(f"\n== 3. {key}: ftsim peak summed RSS of the whole process tree, {n_large} sites / {n_small} sites")
            print(f"   inputs: {json.dumps(r['inputs'])}")
            print(
                f"   peak: {n_small} sites {r['peak_mib'][n_small]:.0f} MiB, {n_large} sites {r['peak_mib'][n_large]:.0f} MiB"
            )
            print(f"     {'process (MiB)':46s} {'at the peak sample':>22s}   {'own peak':>17s}")
            print(f"     {'':46s} {n_small:>10d} {n_large:>11d}   {n_small:>8d} {n_large:>8d}")
            for role, v in r["breakdown_mib"].items():
                o = r["role_peak_mib"][role]
                print(f"     {role:46s} {v[n_small]:10.0f} {v[n_large]:11.0f}   {o[n_small]:8.0f} {o[n_large]:8.0f}")
            goal = verdict("mem_12_over_3", r["ratio"]) if not q else "quick run: 1 vs 2 sites, not the 3 vs 12 figure"
            print(f"   {key} = {r['ratio']:.3f}   ({goal})")
            for n, run in runs.items():
                ours.extend(run.leftovers)
                if run.leftovers:
                    print(f"   LEFTOVER processes after the {n}-site ftsim exited (killed by pid): {run.leftovers}")

        if "deploy" in todo:
            import bench_deploy

            r = bench_deploy.deploy_vs_sim(
                workdir, rounds=2 if q else 3, local_steps=1 if q else 10, eval_examples=2 if q else 40, env=env
            )
            figures["deploy_round_over_sim_round"] = r["deploy_round_over_sim_round"]
            figures["startup_s_after_first_round"] = r["startup_s_after_first_round_max"]
            report["deploy"] = r
            ours.extend(r["sim_leftovers"])
            print("\n== 5. deploy_round_over_sim_round: deploy_localhost round wall / ftsim round wall, same config")
            print(f"   inputs: {json.dumps(r['inputs'])}")
            for x in r["per_round"]:
                print(
                    f"   round {x['round']}: ftsim {x['sim_s']:.1f} s (training phase {x['sim_train_phase_s']:.1f} s), "
                    f"deployment {x['deploy_s']:.1f} s (training phase {x['deploy_train_phase_s']:.1f} s) -> {x['deploy_s'] / x['sim_s']:.3f}"
                )
            print(
                f"   deploy_round_over_sim_round = {r['deploy_round_over_sim_round']:.3f}   "
                f"({verdict('deploy_round_over_sim_round', r['deploy_round_over_sim_round'])}); whole runs: ftsim {r['sim_wall_s']:.0f} s, "
                f"deployment {r['deploy_wall_s']:.0f} s (incl. certificates, keys, SuperLink start); intruder refused: {r['intruder_refused']}"
            )
            for rnd, xs in r["startup_s_by_round"].items():
                rx = r["receive_s_by_round"][rnd]
                print(
                    f"   round {rnd}: startup_s per site {', '.join(f'{x:.3f}' for x in xs)}; receive_s {', '.join(f'{x:.2f}' for x in rx)}"
                )
            goal = (
                verdict("startup_s_after_first_round", r["startup_s_after_first_round_max"])
                if not q
                else "quick run: 2 rounds"
            )
            print(
                f"   startup_s_after_first_round (max over sites, rounds >= 2) = {r['startup_s_after_first_round_max']:.3f} s, "
                f"median {r['startup_s_after_first_round_median']:.3f} s   ({goal})"
            )

        if docs:
            import bench_sim

            u = bench_sim.upload_bytes(docs)
            figures["upload_bytes_per_site_round"] = u["upload_bytes_per_site_round"]
            figures["bytes_per_param"] = u["bytes_per_param"]
            figures["trainable_params"] = u["trainable_params"]
            report["upload"] = u
            print("\n== 4. upload per site and round (metrics.json bytes_sent) and per trainable parameter")
            print(
                f"   inputs: {u['n_updates']} site updates from the ftsim runs above; all equal: {u['all_equal']}; "
                f"trainable_params {u['trainable_params']:,}"
            )
            print(
                f"   upload_bytes_per_site_round = {u['upload_bytes_per_site_round']:,.0f} B ({u['upload_bytes_per_site_round'] / 2**20:.2f} MiB); "
                f"bytes_per_param = {u['bytes_per_param']:.4f} (float32 = 4; the {u['header_bytes']:,.0f} B beyond 4/param "
                "are the .npy header(s) that Flower's Array.data carries: one, since the adapter travels as one vector)"
            )
    finally:
        stray = stray_ray_processes()
        if a.keep:
            say(f"ftsim outputs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\nprocesses of our ftsim runs alive after they exited: {len(ours)}"
        + (f" (killed by pid): {ours}" if ours else "")
    )
    print(f"ray/ftsim processes on the machine now (anyone's): {len(stray)}" + (f": {stray}" if stray else ""))
    print(f"benchmark wall time: {time.time() - t_start:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({**report, "figures": figures}, indent=1, default=str))
    figures["leftover_processes"] = len(ours)
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
