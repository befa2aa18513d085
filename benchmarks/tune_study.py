"""A hyperparameter study on the demo sites (issue 21), stopped mid-trial and resumed, with the
figures benchmarks/README.md reports:

    python benchmarks/tune_study.py                       # ftsim tune (the demo study: 12 trials), Ctrl-C
                                                          # during trial 2, ftsim tune --resume, then the figures
    python benchmarks/tune_study.py --stop-in-trial none  # without the interruption
    python benchmarks/tune_study.py --summary-only        # the figures of the study in --out as it is

The study is ``ftsim tune`` with no config: the demo's three sites and config, over the learning
rate (log 1e-4..5e-3), the LoRA rank (4, 8, 16, 32) and the local steps (5, 10, 15), TPE, the
median pruner; trial 0 runs the demo's own values (lr 1e-3, r 16, 10 steps). The interruption is
SIGINT (what Ctrl-C sends) once trial ``--stop-in-trial`` has recorded its first round; the
resume must finish the study with 12 trials and continue the interrupted one from its checkpoint.

Figures: the best trial's federated eval loss against trial 0's (the demo's defaults); the best
among the trials at the defaults' compute (10 local steps x 3 rounds); optimizer steps run against
12 full trials (what pruning saved); wall time; and that no trial's folder trained a round twice.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, say

OUT = REPO / "benchmarks" / "out" / "tune-demo"


def ftsim_tune(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    f = log.open("a", encoding="utf-8")
    return subprocess.Popen(
        [sys.executable, "-m", "fedtune.simulations.cli", "tune", *args], stdout=f, stderr=subprocess.STDOUT, env=env
    )


def recorded_rounds(folder: Path) -> list[int]:
    try:
        return [r["round"] for r in json.loads((folder / "metrics.json").read_text())["rounds"]]
    except (OSError, ValueError, KeyError):
        return []


def run_study(out: Path, stop_in: int | None) -> float:
    """The study, interrupted once when asked, then resumed -> wall seconds in all."""
    log = out.parent / f"{out.name}.log"
    t0 = time.time()
    if not (out / "study.json").is_file():
        proc = ftsim_tune(["--out", str(out)], log)
        if stop_in is not None:
            folder = out / "trials" / f"trial-{stop_in:04d}"
            while proc.poll() is None and max(recorded_rounds(folder), default=0) < 1:
                time.sleep(1)
            if proc.poll() is None:
                say(f"trial {stop_in} recorded round 1: interrupting the study (SIGINT, as Ctrl-C)")
                proc.send_signal(signal.SIGINT)
        proc.wait()
        say(f"ftsim tune exited {proc.returncode} after {time.time() - t0:.0f} s")
    proc = ftsim_tune(["--resume", str(out)], log)
    proc.wait()
    say(f"ftsim tune --resume exited {proc.returncode}; log: {log}")
    return time.time() - t0


def summary(out: Path, wall: float | None) -> None:
    import optuna

    from fedtune.simulations import tune

    study = optuna.load_study(study_name="fedtune", storage=f"sqlite:///{out / tune.DB_FILE}")
    trials = study.get_trials()
    st = optuna.trial.TrialState
    done = [t for t in trials if t.state in (st.COMPLETE, st.PRUNED)]
    complete = [t for t in done if t.state == st.COMPLETE]
    own = next((t for t in trials if t.user_attrs.get(tune.OWN)), None)
    best = min(complete, key=lambda t: t.value)
    print(f"trials: {len(done)} finished ({len(complete)} completed, {len(done) - len(complete)} pruned), "
          f"{sum(t.state == st.FAIL for t in trials)} interrupted or failed")  # fmt: skip
    for t in trials:
        a = t.user_attrs
        print(f"  trial {t.number:2d} {t.state.name.lower():8s} {tune.shown_params(t.params):52s} "
              f"value {t.value if t.value is not None else float('nan'):.4f} rounds {a.get(tune.ROUNDS_RUN, '-')}/{a.get(tune.ROUNDS, '-')} "
              f"{a.get(tune.SECONDS, '-')} s" + (f"  continues trial {a[tune.RESUMES]}" if a.get(tune.RESUMES) not in (None, t.number) else ""))  # fmt: skip
    if own is not None and own.value is not None:
        print(f"defaults (trial {own.number}): eval_loss {own.value:.4f}")
        print(f"best (trial {best.number}): eval_loss {best.value:.4f} ({tune.shown_params(best.params)}), "
              f"{best.value / own.value:.2f}x the defaults' loss")  # fmt: skip
        same = [t for t in complete if t.params.get("train.local_steps") == own.params.get("train.local_steps")]
        if same:
            b = min(same, key=lambda t: t.value)
            print(f"best at the defaults' compute ({own.params.get('train.local_steps')} local steps): trial {b.number}, "
                  f"eval_loss {b.value:.4f} ({tune.shown_params(b.params)}), {b.value / own.value:.2f}x")  # fmt: skip
    ran = sum(int(t.user_attrs.get(tune.ROUNDS_RUN) or 0) * t.user_attrs.get(tune.STEPS, 0) for t in done)
    full = sum(int(t.user_attrs.get(tune.ROUNDS) or 0) * t.user_attrs.get(tune.STEPS, 0) for t in done)
    print(
        f"optimizer steps (all sites): {ran} run, {full} had every trial run all its rounds: pruning saved {1 - ran / full:.0%}"
    )
    seconds = sum(float(t.user_attrs.get(tune.SECONDS) or 0) for t in done)
    print(f"trials' wall time: {seconds:.0f} s ({seconds / len(done):.0f} s a finished trial)" +
          (f"; the whole study {wall:.0f} s" if wall else ""))  # fmt: skip
    origins = [t.user_attrs.get(tune.RESUMES, t.number) for t in done]
    print(f"each finished trial's folder trained once: {len(origins) == len(set(origins))} (folders {sorted(origins)})")
    for t in trials:
        origin = t.user_attrs.get(tune.RESUMES)
        if origin not in (None, t.number):
            log = out / "trials" / f"trial-{origin:04d}" / "ftsim.log"
            lines = [x for x in log.read_text().splitlines() if "resuming after round" in x] if log.is_file() else []
            print(
                f"trial {t.number} continued trial {origin}'s folder: {lines[0].split('] ', 1)[-1] if lines else '(folder removed: not among the best kept)'}"
            )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument(
        "--stop-in-trial", default="2", help="interrupt the study once this trial has a round (none: do not)"
    )
    p.add_argument("--summary-only", action="store_true")
    args = p.parse_args()
    stop = None if args.stop_in_trial == "none" else int(args.stop_in_trial)
    wall = None if args.summary_only else run_study(args.out.resolve(), stop)
    summary(args.out.resolve(), wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
